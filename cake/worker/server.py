"""The worker's server: accepts connections, runs the handshake, reads requests and answers them.

Each connection is its own task, so a silent or broken client blocks nobody. A bad request gets an
error reply; a broken frame closes that connection only. What runs when is the Scheduler's, the KV
caches the SessionStore's, passing outputs on to the next worker the Relay's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cake import auth, streams, wire
from cake.devices import compute_unit, dtype_name, machine_id
from cake.errors import ProtocolError
from cake.layer_ranges import format_layers
from cake.memory import free_memory
from cake.model.config import LlamaConfig
from cake.model.stack import LayerStack
from cake.seal import Seal
from cake.topology import Topology
from cake.worker.connection import Conn
from cake.worker.errors import AuthFailed, RequestError
from cake.worker.handshake import AuthLog, greet
from cake.worker.relay import Relay
from cake.worker.scheduler import QUEUED_BYTES, Scheduler
from cake.worker.sessions import SessionEntry, SessionStore

if TYPE_CHECKING:
    from cake.weight_cache import Fetch

log = logging.getLogger("cake.worker")

HANDSHAKE_TIMEOUT = 10.0
MAX_BATCH = 256
MAX_CONNECTIONS = 64  # masters and relaying workers at once (a cluster needs a handful)
MAX_HANDSHAKING = 32  # connections not yet through the handshake (each gets HANDSHAKE_TIMEOUT)
IDLE_TIMEOUT = 300.0  # seconds a connection may send nothing before a new one replaces it, when the worker is full
FRAME_STALL = 60.0  # seconds the rest of a frame may take once it has begun
SHIP_FRAME = wire.FORWARD_OVERHEAD + (4 << 20)  # a worker with no model yet: a chunk of the weights shipped to it


@dataclass
class Placement:
    """A worker whose topology entry lists no layers: it measured one layer and offers its room, then
    loads what the master's plan assigns it."""

    load: Callable[[list[int]], LayerStack]
    layer_us: int
    room: int
    layer_bytes: int
    fetches: bool = False  # no model folder: its layers come from the master (cake.weight_cache)
    chunk_us: int = 0  # a prompt chunk through one layer

    def said(self, stack: LayerStack) -> dict:
        return {"placed": bool(stack.layers), "layer_us": self.layer_us, "chunk_us": self.chunk_us,
                "room": self.room, "layer_bytes": self.layer_bytes, "fetches": self.fetches}


def frame_limits(stack: LayerStack | None, config: LlamaConfig | None, asked: int | None) -> tuple[int, int]:
    """The largest frame a worker reads, and the rows of hidden states a forward may carry under it (in
    f32, the widest wire dtype: masters split larger work). A frame never needs more than a full context
    (or a full batch) of f32 hidden states; with no model yet, a chunk of the weights shipped to it."""
    if config is None:
        return asked or SHIP_FRAME, 0
    frame = asked or (max(stack.capacity, MAX_BATCH) * config.hidden_size * 4 + wire.FORWARD_OVERHEAD)
    return frame, max(1, (frame - wire.FORWARD_OVERHEAD) // (config.hidden_size * 4))


class Worker:
    def __init__(self, name: str, stack: LayerStack | None, config: LlamaConfig | None, key: str | None = None,
                 kv_budget: int = 2 << 30, max_frame: int | None = None, topology: Topology | None = None,
                 placement: Placement | None = None, fetch: Fetch | None = None):
        self.name = name
        self.fetch = fetch  # no --model: the master sends the config, then the layers (cake.weight_cache)
        self.placement = placement  # a worker the master places: what it measured, and how it loads layers
        self.topology = topology or Topology()
        self.config = config
        self.key = key or None
        if self.key:
            auth.stretch(self.key)  # once per process, before serving: a failed proof costs nothing more
        self._auth_failures = AuthLog()
        # Seconds: a silent connection replaced when full, a frame begun and stalled (both env-settable).
        self.idle_timeout = float(os.environ.get("CAKE_IDLE_TIMEOUT", IDLE_TIMEOUT))
        self.stall_timeout = float(os.environ.get("CAKE_FRAME_STALL", FRAME_STALL))
        self._frame_asked = max_frame
        self.max_frame, self.max_rows = frame_limits(stack, config, max_frame)
        self.conns: dict[str, Conn] = {}  # by token
        self._conn_ids = itertools.count(1)
        self._handshaking: OrderedDict[int, asyncio.StreamWriter] = OrderedDict()  # connection id -> writer
        self._handlers: set[asyncio.Task] = set()  # one per connection (handle), for close
        self.store = SessionStore(stack, kv_budget)
        self.scheduler = Scheduler(self.store, max(QUEUED_BYTES, self.max_frame))
        self.relay = Relay(name, self.key, self.conns)

    @property
    def stack(self) -> LayerStack | None:
        """The layers it serves (None: no model yet); their KV caches are the store's."""
        return self.store.stack

    @property
    def sessions(self) -> OrderedDict[tuple[int, str], SessionEntry]:
        return self.store.sessions

    @property
    def kv_budget(self) -> int:
        return self.store.budget

    @property
    def queue_budget(self) -> int:
        """Bytes of hidden states of forwards not yet computed, past which a master's connection waits."""
        return self.scheduler.queue_budget

    @queue_budget.setter
    def queue_budget(self, size: int) -> None:
        self.scheduler.queue_budget = size

    # ---- connections -------------------------------------------------------------------------------

    async def serve(self, host: str = "", port: int = 0, sockets: list[socket.socket] | None = None) -> None:
        """Serve on host:port, or on `sockets` already bound there (see run.bind)."""
        if sockets:
            servers = [await streams.start_server(self.handle, sock=s, limit=1 << 20) for s in sockets]
        else:
            servers = [await streams.start_server(self.handle, host, port, limit=1 << 20)]
        addrs = ", ".join(f"{s.getsockname()[0]}:{s.getsockname()[1]}" for server in servers for s in server.sockets)
        if self.stack is None:
            log.info("worker '%s' on %s has no model files: it takes the model's config and its layers from the "
                     "master, into %s", self.name, addrs, self.fetch.root)
        else:
            log.info("worker '%s' serving layers %s on %s (%s, %s)", self.name, format_layers(self.stack.indices),
                     addrs, self.stack.device, dtype_name(self.stack.dtype))
        try:
            await asyncio.gather(*(server.serve_forever() for server in servers))
        finally:
            for server in servers:
                server.close()

    async def close(self, timeout: float = 5.0) -> None:
        """Close every connection and wait (up to `timeout`) for their handlers to end as for any closed
        connection, their sessions freed: not cancelled under asyncio's server, which would log each."""
        for writer in [*(c.writer for c in self.conns.values()), *self._handshaking.values()]:
            writer.close()
        handlers = [t for t in self._handlers if not t.done()]
        if handlers:
            await asyncio.wait(handlers, timeout=timeout)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(next(self._conn_ids), secrets.token_hex(16), writer)
        task = asyncio.current_task()
        self._handlers.add(task)
        peer = writer.get_extra_info("peername")
        peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if len(self._handshaking) >= MAX_HANDSHAKING:  # a flood of connections that say nothing: the
            oldest = next(iter(self._handshaking))     # oldest goes (a real client's handshake takes ms)
            log.warning("closed a connection still in its handshake: %d are", MAX_HANDSHAKING)
            self._handshaking.pop(oldest).close()
        try:
            wire.tune_socket(writer)  # a ConnectionError when the client reset it at once: closed quietly
            self._handshaking[conn.id] = writer
            try:
                opener = await asyncio.wait_for(self._handshake(reader, conn, peer), HANDSHAKE_TIMEOUT)
            finally:
                self._handshaking.pop(conn.id, None)
            self.conns[conn.token] = conn
            log.info("client connected from %s", peer)
            while True:
                try:
                    msg, tensor = await wire.read_message(reader, self.max_frame, opener, self.stall_timeout,
                                                          self.fetch.receiving() if self.fetch else None)
                except wire.FrameError as e:  # the byte stream is broken: say why (best effort), then close
                    if e.oversized:
                        e.args = (f"{e} (this worker's --max-frame-mb)",)
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.send(wire.Error("bad_frame", f"worker '{self.name}' closed "
                                                                     f"the connection: {e}")), 1.0)
                    raise
                except ProtocolError as e:
                    log.warning("bad request from %s: %s", peer, e)
                    await conn.send(wire.Error("bad_request", str(e), id=getattr(e, "request_id", 0)))
                    continue
                conn.last_read = time.monotonic()
                await self._serve(conn, msg, tensor, peer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.TimeoutError:
            log.warning("client %s did not finish the handshake in %.0fs; closed", peer, HANDSHAKE_TIMEOUT)
        except AuthFailed:
            pass  # logged by AuthLog
        except ProtocolError as e:
            log.warning("closed connection from %s: %s", peer, e)
        except Exception:  # never let one connection take the worker down
            log.exception("internal error on connection from %s", peer)
        finally:
            conn.closed = True
            self.conns.pop(conn.token, None)
            dropped = self.scheduler.drop(conn)
            if dropped:
                log.info("connection from %s closed: stopped %d forward(s) for it", peer, dropped)
            freed = self.store.free_connection(conn.id)
            if freed:
                log.info("connection from %s closed; freed %d session(s)", peer, freed)
            writer.close()
            self._handlers.discard(task)

    async def _handshake(self, reader: asyncio.StreamReader, conn: Conn, peer: str) -> Seal | None:
        """The greeting and proofs (handshake.greet), then room for this connection, then this worker's
        info. Returns the seal of what the client sends (None without a key)."""
        opener = await greet(reader, conn, peer, self.name, self.key, self._auth_failures)
        if len(self.conns) >= MAX_CONNECTIONS and not self._close_idle():
            await conn.send(wire.Error(
                "busy", f"worker '{self.name}' already serves {MAX_CONNECTIONS} connections, the most it takes; "
                        f"stop masters you no longer use"))
            raise ProtocolError(f"over {MAX_CONNECTIONS} connections")
        await conn.send(self.info(conn.token))
        return opener

    def _close_idle(self) -> bool:
        """The worker is full: close the connection that has sent nothing for longest, if that is over
        idle_timeout and nothing of it is in progress, to make room (its sessions are freed; its master
        reconnects and replays if it comes back). False if none is."""
        now = time.monotonic()
        idle = [c for c in self.conns.values() if now - c.last_read > self.idle_timeout and not c.queued]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.last_read)
        log.warning("closed a connection silent for %.0fs to make room: this worker serves %d, the most it takes",
                    now - oldest.last_read, MAX_CONNECTIONS)
        self.conns.pop(oldest.token, None)
        oldest.writer.close()
        return True

    # ---- what it serves ----------------------------------------------------------------------------

    def take_model(self, config: LlamaConfig, stack: LayerStack, placement: Placement) -> None:
        """A worker without --model, once the master's config came (cake.weight_cache): its stack, still
        empty, and how it loads the layers it is given."""
        self.config, self.store.stack, self.placement = config, stack, placement
        self.max_frame, self.max_rows = frame_limits(stack, config, self._frame_asked)
        if not self._frame_asked:  # a chunk of its weights fits, whatever the model's shape
            self.max_frame = max(self.max_frame, SHIP_FRAME)

    def info(self, token: str = "") -> wire.Info:
        if self.config is None:  # no model yet: the master sends its config first
            return self.fetch.bare_info(self, token)
        return wire.Info(
            name=self.name, layers=self.stack.indices, device=str(self.stack.device),
            dtype=dtype_name(self.stack.dtype), hidden_size=self.config.hidden_size,
            num_layers=self.config.num_hidden_layers, capacity=self.stack.capacity,
            memory=free_memory(self.stack.device), conn=token, max_rows=self.max_rows, max_batch=MAX_BATCH,
            topology=self.topology.digest, machine=machine_id(), unit=compute_unit(self.stack.device),
            quantization=str(self.stack.quantization or "none"), weight_bytes=self.stack.weight_bytes,
            arch=self.config.arch, **(self.placement.said(self.stack) if self.placement else {}),
        )

    # ---- requests ----------------------------------------------------------------------------------

    async def _serve(self, conn: Conn, msg: wire.Message, tensor: torch.Tensor | None, peer: str) -> None:
        """Answer one request: on its own connection, or, for a relayed forward, on the connection its
        token names (the master's), whose sessions it uses."""
        dest = conn
        if isinstance(msg, wire.Forward) and msg.reply_conn:
            dest = self.conns.get(msg.reply_conn)
            if dest is None:  # that master disconnected; it replays on its new connection
                log.warning("relayed forward from %s names a connection that is gone; dropped", peer)
                return
        # A forward with an id (every master's) that cannot run now goes on a task; one without keeps its
        # place in the order of answers, as everything else, by being served here.
        if isinstance(msg, wire.Forward) and msg.id > 0 and not self.scheduler.runs_now(dest, msg, tensor):
            await self.scheduler.queue(conn, dest, msg, tensor, lambda: self._serve_on(conn, dest, msg, tensor, peer),
                                       peer)
            return
        await self._serve_on(conn, dest, msg, tensor, peer)

    async def _serve_on(self, conn: Conn, dest: Conn, msg: wire.Message, tensor: torch.Tensor | None,
                        peer: str) -> None:
        """Serve `msg` for `dest` and answer it: here if it came on `dest`, else on `dest` from a task."""
        reply, out = await self._dispatch(dest, msg, tensor, peer)
        if reply is None:  # relayed on: the last worker of the chain answers
            return
        if dest is conn:
            await conn.send(reply, out)
            return
        dest.answer_later(reply, out)

    async def _dispatch(self, dest: Conn, msg: wire.Message, tensor: torch.Tensor | None, peer: str):
        """Serve `msg` for the connection `dest` (whose sessions it uses and which gets the answer)."""
        try:
            if isinstance(msg, (wire.ModelConfig, wire.Manifest, wire.Chunk)):
                if self.fetch is None:
                    raise RequestError("bad_request", f"worker '{self.name}' loads its layers from its --model "
                                                      f"folder: it takes no weights from a master")
                return await self.fetch.serve(self, dest, msg, tensor), None
            if self.stack is None and isinstance(msg, (wire.Forward, wire.Assign)):
                raise RequestError("bad_layers", f"worker '{self.name}' has no model yet: its master sends it first")
            if isinstance(msg, wire.Forward):
                return await self._forward(dest, msg, tensor)
            if isinstance(msg, wire.End):
                ended = sum(self.store.end(dest.id, s) for s in msg.sessions)
                log.debug("%s ended %d session(s); %d held", peer, ended, len(self.sessions))
                return wire.Ok(), None
            if isinstance(msg, wire.Ping):
                return wire.Ok(), None
            if isinstance(msg, wire.Assign):
                return await self._assign(dest, msg, peer), None
            raise RequestError("bad_request", f"'{msg.TYPE}' is not a request a worker serves")
        except (RequestError, wire.Malformed) as e:
            log.warning("request from %s refused: %s", peer, e)
            return e.reply(getattr(msg, "id", 0)), None
        except Exception as e:  # a bug or an out-of-memory: answer it (the master must not wait), keep serving
            log.exception("request from %s failed", peer)
            first = (str(e).strip().splitlines() or [""])[0][:200]
            return wire.Error("internal", f"worker '{self.name}' failed ({type(e).__name__}: {first}); see its log",
                              id=getattr(msg, "id", 0)), None

    async def _assign(self, dest: Conn, msg: wire.Assign, peer: str) -> wire.Info:
        """Take the layers a master's plan gives this worker (loaded from its model folder, off the event
        loop), and the plan's topology for relays. One assignment at a time: another master's open
        sessions refuse it."""
        if self.placement is None:
            raise RequestError("bad_request", f"worker '{self.name}' serves the layers its topology file lists; "
                                              f"leave out its 'layers' there to let the master place it")
        if not (len(msg.names) == len(msg.starts) == len(msg.ends)) or self.name not in msg.names:
            raise RequestError("bad_request", f"the plan does not name worker '{self.name}'")
        i = msg.names.index(self.name)
        layers = list(range(max(0, msg.starts[i]), min(self.config.num_hidden_layers, msg.ends[i])))
        if self.store.held_by_others(dest.id) and layers != self.stack.indices:
            raise RequestError("busy", f"worker '{self.name}' holds sessions of another master; stop that master or "
                                       f"let its answers end, then start this one")
        plan = {n: list(range(a, b)) for n, a, b in zip(msg.names, msg.starts, msg.ends) if n in self.topology.workers}
        if layers != self.stack.indices:
            log.info("%s assigns layers %s; loading them", peer, format_layers(layers))
            self.store.free_all()
            self.store.stack = self.placement.load([])  # the old layers go before the new load: never both held
            self.store.stack = await asyncio.to_thread(self.placement.load, layers)
        self.topology = self.topology.with_layers(plan)
        return self.info(dest.token)

    async def _forward(self, dest: Conn, msg: wire.Forward, x: torch.Tensor | None):
        """Check, compute (when the Scheduler lets it), then answer or pass the output on."""
        hops = self._check_forward(msg, x)
        out, us = await self.scheduler.compute(dest, msg, x)
        if not bool(torch.isfinite(out).all()):
            fix = ("run it with --dtype bf16 or f32" if self.stack.dtype == torch.float16
                   else "check its model files: a weight may be corrupt")
            raise RequestError("non_finite", f"worker '{self.name}' layers {msg.start}-{msg.end - 1} produced NaN or "
                                             f"inf in {dtype_name(self.stack.dtype)}; {fix}")
        if hops:
            await self.relay.send(msg, hops, self.topology.workers[hops[0][0]], out, us, dest.token)
            return None, None
        return wire.Result(msg.id, us, msg.upstream_us), out

    def _check_forward(self, msg: wire.Forward, x: torch.Tensor | None) -> list[tuple[str, int, int, str]]:
        """A forward's shape (wire), then what this worker can do: its layers, its context, the next
        worker of a relay in its topology, finite hidden states. The relay's hops."""
        msg.check_rows(x, self.config.hidden_size, MAX_BATCH)
        if not (0 <= msg.start < msg.end) or any(i not in self.stack.layers for i in range(msg.start, msg.end)):
            raise RequestError("bad_layers", f"worker '{self.name}' serves layers {format_layers(self.stack.indices)}, "
                                             f"not {msg.start}-{msg.end - 1}; check the topology file")
        hops = msg.relay_hops(self.name, len(self.topology.workers))
        if hops and hops[0][0] not in self.topology.workers:
            raise RequestError("relay", f"has no worker '{hops[0][0]}' in its topology file (give every node "
                                        f"the same topology)", peer=hops[0][0])
        T = x.shape[1]
        for s, p in zip(msg.sessions, msg.positions):
            if p < 0 or p + T > self.stack.capacity:
                raise RequestError("capacity", f"positions {p}..{p + T - 1} of session {s} exceed this worker's "
                                               f"context of {self.stack.capacity}; start it with a larger --context")
        if not bool(torch.isfinite(x).all()):  # on the wire's CPU copy: microseconds for a decode step
            raise RequestError("bad_tensor", "hidden states to this worker contain NaN or inf; the node before "
                                             "it overflowed (run it in bf16 or f32) or is faulty")
        return hops
