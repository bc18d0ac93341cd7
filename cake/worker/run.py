"""`cake --mode worker`: its arguments, binding the port before the weights load, loading (or waiting
for the master's plan, or its weights), then serving until stopped."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from dataclasses import dataclass

from cake import auth, eventloop, wire
from cake.devices import pick_device
from cake.errors import CakeError
from cake.model.config import load_config
from cake.model.stack import LayerStack
from cake.model.loader import load_layers
from cake.topology import load_topology, split_address
from cake.worker.server import Placement, Worker

log = logging.getLogger("cake.worker")


@dataclass
class WorkerArgs:
    model_dir: str | None  # None: the master ships the config and the layers, into cache_dir
    name: str
    topology: str
    address: str | None = None  # None: this worker's port in the topology (see run_worker)
    device: str = "auto"
    dtype: str = "auto"
    context: int | None = None
    key: str | None = None
    kv_budget_mb: float = 2048
    max_frame_mb: float = 0  # 0: derived from the model and context
    busy_poll: str | None = None  # µs or 'auto'; None: $CAKE_BUSY_POLL_US, else auto
    quantize: str | None = None  # none, int8, int4; None: as the folder holds (cake.model.loader.choose_quantization)
    group_size: int = 32
    max_memory: int | None = None  # bytes its decoder layers may take (--max-memory)
    cache_dir: str | None = None  # without model_dir: where the shipped layers go (None: the user's cache folder)


def bind(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to host:port (one per address the host stands for, as asyncio.start_server makes),
    not yet listening: a port in use fails here, before the weights load, not minutes later, and
    nothing connects before the worker can answer. OSError when it cannot bind."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):  # the same address can come twice
            s = socket.socket(family, kind, proto)
            sockets.append(s)
            if os.name == "posix":  # a restarted worker rebinds while its old connections linger in TIME_WAIT
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # the IPv4 address has its own
            s.bind(address)
    except OSError:
        for s in sockets:
            s.close()
        raise
    return sockets


def run_worker(args: WorkerArgs) -> None:
    topo = load_topology(args.topology)
    me = topo.worker(args.name)
    config = load_config(args.model_dir) if args.model_dir else None  # without: the master sends it
    if config is not None:
        topo.check_layers(config.num_hidden_layers)
    # By default: this worker's port from the topology, on every interface, unless the topology puts it on
    # loopback (then nothing else could reach it anyway, and nothing else should). A bare --address PORT
    # keeps that interface.
    default_host = me.host if auth.is_loopback(me.host) else "0.0.0.0"
    address = args.address or f"{default_host}:{me.port}"
    if address.strip().isdigit():
        address = f"{default_host}:{address.strip()}"
    parsed = split_address(address)
    if parsed is None:
        raise CakeError(f"--address '{address}' needs host:port with a port between 1 and 65535, "
                        f"e.g. 0.0.0.0:{me.port}")
    host, port = parsed
    if port != me.port:
        log.warning("listening on port %d, but the topology gives worker '%s' %s: the master and other workers "
                    "will look for it there", port, me.name, me.address)
    eventloop.busy_poll_us("cpu", args.busy_poll)  # a bad value fails before the weights load
    max_frame = int(args.max_frame_mb * (1 << 20))
    least = wire.FORWARD_OVERHEAD + (config.hidden_size * 4 if config else 1 << 20)  # a row of f32, or a 1 MiB block
    if args.max_frame_mb != 0 and max_frame < least:
        raise CakeError(f"--max-frame-mb {args.max_frame_mb:g} cannot hold one token's hidden states; give at "
                        f"least {least / (1 << 20):.3f}, or 0 for a full context")
    try:
        sockets = bind(host, port)
    except OSError as e:
        raise _cannot_listen(address, e) from None
    def load(layers: list[int]) -> LayerStack:
        return load_layers(args.model_dir, layers, args.device, args.dtype, args.context, config,
                           quantize=args.quantize, group=args.group_size, max_memory=args.max_memory)[0]
    stack = load(list(me.layers)) if config else None
    placement = fetch = None
    if config is None:
        from cake.weight_cache import open_cache

        fetch = open_cache(args, me)
    elif not me.placed:
        from cake import placement as plan

        fmt = stack.quantization
        took = plan.measure_layer(config, fmt, stack.dtype, stack.device)
        placement = Placement(load, took.decode_us, plan.room(stack.device, args.max_memory),
                              plan.layer_bytes(config, fmt, stack.dtype, stack.capacity), chunk_us=took.chunk_us)
        log.info("waiting for the master's plan: one layer takes %.3f ms here (a prompt chunk of %d tokens %.1f "
                 "ms), room for %d layer(s)", placement.layer_us / 1e3, plan.CHUNK, took.chunk_us / 1e3,
                 placement.room // max(1, placement.layer_bytes))
    if not auth.is_loopback(host) and not args.key:
        log.warning("listening on %s without --cluster-key: anyone who can reach this port can use this "
                    "worker; set --cluster-key (or %s) on every node", host, auth.ENV_KEY)
    worker = Worker(args.name, stack, config, key=args.key, kv_budget=int(args.kv_budget_mb * (1 << 20)),
                    max_frame=max_frame, topology=topo, placement=placement, fetch=fetch)
    poll_us = eventloop.busy_poll_us((stack.device if stack else pick_device(args.device)).type, args.busy_poll)
    if poll_us:
        log.info("busy-polling for %d µs after each message (--busy-poll 0 turns it off)", poll_us)
    try:
        eventloop.run(_serve_until_stopped(worker, sockets), poll_us)
    except OSError as e:  # listening failed after all (another worker bound the port while this one loaded)
        raise _cannot_listen(address, e) from None


async def _serve_until_stopped(worker: Worker, sockets: list[socket.socket]) -> None:
    """Serve until SIGTERM (a service manager's stop, `kill`): then one line, and a clean exit, every
    connection closed and its sessions freed."""
    loop = asyncio.get_running_loop()
    serving = asyncio.ensure_future(worker.serve(sockets=sockets))
    stopped = []

    def stop() -> None:
        stopped.append(signal.SIGTERM)
        serving.cancel()

    try:
        loop.add_signal_handler(signal.SIGTERM, stop)
    except NotImplementedError:  # Windows: no signal handlers on the loop; SIGTERM ends the process there
        pass
    try:
        await serving
    except asyncio.CancelledError:
        if not stopped:  # Ctrl-C, or the loop shutting down
            raise
        log.warning("worker '%s' stopped by SIGTERM", worker.name)
        await worker.close()


def _cannot_listen(address: str, e: OSError) -> CakeError:
    return CakeError(f"cannot listen on {address}: {e.strerror or e}; pick another --address port")
