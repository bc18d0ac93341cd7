"""Where one hop's time goes: the same small request measured at each layer of the stack.

    python scripts/hop_probe.py [--device cuda] [--requests 300]

Builds a 4-layer model (hidden 256, the tiny benchmark model's layer shape) in a temp dir and prints the
median of each, back to back and after a 2 ms idle gap (a token's worth of waiting, when a process's CPU
may go idle):
- a raw Python socket round trip of 600 bytes between two processes (the operating system's floor);
- the 4 layers in-process, input from the host and output back to it (what a worker's compute is);
- a cake `ping` round trip to a real worker process, and a forward of one token through its 4 layers,
  from an asyncio client (what the master does) and from a blocking one; a forward's time minus the
  compute the worker reports is its protocol and wake-up share.
Used for docs/benchmarks.md ("Why a hop costs ~1 ms on this GPU machine"). The first 10 requests of each
series are warm-up and not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not

from cake import eventloop, launch, synthetic, wire  # noqa: E402
from cake.client import Options, WorkerLink  # noqa: E402
from cake.errors import CakeError  # noqa: E402
from cake.model.kv_cache import Row  # noqa: E402
from cake.model.loader import load_layers  # noqa: E402
from cake.topology import load_topology  # noqa: E402

HIDDEN, LAYERS, GAP_S, WARMUP = 256, 4, 0.002, 10

ECHO_SERVER = """
import socket
s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); print(s.getsockname()[1], flush=True)
c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while True:
    d = c.recv(65536)
    if not d:
        break
    c.sendall(d)
"""


def report(name: str, times: list[float], compute: list[float] | None = None) -> None:
    times = times[WARMUP:]
    line = f"{name:46s} {statistics.median(times) * 1e6:7.1f} us"
    if compute:
        compute = compute[WARMUP:]
        rest = statistics.median(t - c for t, c in zip(times, compute))
        line += f"   (compute {statistics.median(compute) * 1e6:.1f} us, rest {rest * 1e6:.1f} us)"
    print(line, flush=True)


def raw_sockets(n: int) -> None:
    echo = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        s = socket.create_connection(("127.0.0.1", int(echo.stdout.readline())))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        msg = b"x" * 600
        for gap in (0.0, GAP_S):
            times = []
            for _ in range(n):
                time.sleep(gap)
                t0 = time.perf_counter()
                s.sendall(msg)
                got = 0
                while got < len(msg):
                    got += len(s.recv(65536))
                times.append(time.perf_counter() - t0)
            report(f"raw socket 600 B round trip, gap {gap * 1e3:.0f} ms", times)
        s.close()
    finally:
        echo.wait(10)


def in_process(model: Path, device: str, dtype: str, tdtype: torch.dtype, n: int) -> None:
    stack, _ = load_layers(model, list(range(LAYERS)), device, dtype, 1024)
    cache = stack.new_cache()
    with torch.inference_mode():
        stack.forward(torch.randn(1, 16, HIDDEN, dtype=tdtype), [Row(cache, 0)], 0, LAYERS)
        for gap in (0.0, GAP_S):
            times = []
            for i in range(n):
                time.sleep(gap)
                x = torch.randn(1, 1, HIDDEN, dtype=tdtype)
                t0 = time.perf_counter()
                stack.forward(x, [Row(cache, 16 + i % 200)], 0, LAYERS).cpu()
                times.append(time.perf_counter() - t0)
            report(f"in-process {LAYERS} layers + copies, gap {gap * 1e3:.0f} ms", times)


async def asyncio_client(topology: Path, tdtype: torch.dtype, n: int, label: str = "") -> None:
    link = WorkerLink(load_topology(topology).workers["a"], Options())
    await link.ensure_connected()
    await link.forward(0, LAYERS, ["s"], [0], torch.randn(1, 16, HIDDEN, dtype=tdtype))
    for gap in (0.0, GAP_S):
        times = []
        for _ in range(n):
            await asyncio.sleep(gap)
            t0 = time.perf_counter()
            await link.request(wire.Ping())
            times.append(time.perf_counter() - t0)
        report(f"cake ping, asyncio client{label}, gap {gap * 1e3:.0f} ms", times)
        times, compute = [], []
        for i in range(n):
            await asyncio.sleep(gap)
            x = torch.randn(1, 1, HIDDEN, dtype=tdtype)
            t0 = time.perf_counter()
            _, c = await link.forward(0, LAYERS, ["s"], [16 + i % 200], x)
            times.append(time.perf_counter() - t0)
            compute.append(c)
        report(f"cake forward, asyncio client{label}, gap {gap * 1e3:.0f} ms", times, compute)
    await link.request(wire.End(["s"]))
    link.shutdown()


def blocking_client(port: int, tdtype: torch.dtype, n: int) -> None:
    """The same frames as the master sends, written and read with plain blocking socket calls."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()

    def read() -> wire.Message:
        nonlocal buf
        while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
            buf += s.recv(1 << 20)
        size = struct.unpack(">I", buf[:4])[0]
        frame, buf = bytes(buf[4:4 + size]), buf[4 + size:]
        head = struct.unpack(">I", frame[:4])[0]
        return wire.parse_message(msgpack.unpackb(frame[4:4 + head], raw=False))

    def send(msg: wire.Message, tensor: torch.Tensor | None = None) -> None:
        head, payload = wire.encode(msg, tensor)
        s.sendall(bytes(head) + bytes(payload))

    send(wire.Hello(wire.PROTOCOL, wire.VERSION, os.urandom(16)))
    read(), read()  # welcome, info (no cluster key on loopback)
    send(wire.Forward(1, 0, LAYERS, ["b"], [0]), torch.randn(1, 16, HIDDEN, dtype=tdtype))
    read()
    for gap in (0.0, GAP_S):
        times, compute = [], []
        for i in range(n):
            time.sleep(gap)
            x = torch.randn(1, 1, HIDDEN, dtype=tdtype)
            t0 = time.perf_counter()
            send(wire.Forward(2 + i, 0, LAYERS, ["b"], [16 + i % 200]), x)
            reply = read()
            times.append(time.perf_counter() - t0)
            if not isinstance(reply, wire.Result):
                raise CakeError(f"the worker answered a forward with {reply}")
            compute.append(reply.compute_us / 1e6)
        report(f"cake forward, blocking client, gap {gap * 1e3:.0f} ms", times, compute)
    s.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="the worker's and the in-process layers' device")
    p.add_argument("--requests", type=int, default=300, help="requests per series (default 300)")
    p.add_argument("--busy-poll", type=int, default=0, metavar="US",
                   help="also measure the cake series with worker and client busy-polling for US µs")
    args = p.parse_args()
    if not 0 <= args.busy_poll <= 1_000_000:
        p.error("--busy-poll must be microseconds from 0 to 1000000")
    dtype = "bf16" if args.device.startswith("cuda") else "f32"
    tdtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    tmp = Path(tempfile.mkdtemp(prefix="cake-hop-"))
    try:
        probe(tmp, args.device, dtype, tdtype, args.requests, args.busy_poll)
        shutil.rmtree(tmp, ignore_errors=True)  # kept only when something failed, for its logs
    except (CakeError, ConnectionError) as e:  # as the benchmark does: one line, and where to look
        print(f"error: {e} [files and the worker's log: {tmp}]", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def probe(tmp: Path, device: str, dtype: str, tdtype: torch.dtype, n: int, busy_poll_us: int = 0) -> None:
    model = synthetic.make_model(tmp / "model", hidden=HIDDEN, intermediate=704, layers=LAYERS, heads=8,
                                 kv_heads=2, seed=1)
    raw_sockets(n)
    in_process(model, device, dtype, tdtype, n)
    for poll in (0, busy_poll_us) if busy_poll_us > 0 else (0,):
        port = launch.free_port()
        topology = launch.write_topology(tmp / "topology.yml", {"a": (port, [f"model.layers.0-{LAYERS - 1}"])})
        proc = launch.start_worker(model, "a", topology, port, "--device", device, "--dtype", dtype,
                                   "--busy-poll", str(poll), log=tmp / f"worker-poll{poll}.log")
        try:
            launch.wait_ready(port, proc, 120)
            label = f", busy-poll {poll} us" if busy_poll_us > 0 else ""
            eventloop.run(asyncio_client(topology, tdtype, n, label), poll)
            if poll == 0:  # a blocking client has no loop to poll in
                blocking_client(port, tdtype, n)
        finally:
            launch.stop(proc)


if __name__ == "__main__":
    main()
