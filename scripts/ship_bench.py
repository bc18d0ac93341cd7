#!/usr/bin/env python3
"""Weights shipped by the master (cake.shipping) against a plain socket copy of the same bytes, over loopback,
in one run; then the time to bring up a 2-worker cluster of the benchmark's model from nothing.

    python scripts/ship_bench.py               # the big benchmark model (built once by scripts/bench.py)
    python scripts/ship_bench.py --model tiny  # quicker

1. Plain copy: a child process accepts one connection and writes what comes to files (4 MiB reads); this
   process sends every layer's tensor bytes from the model's files (4 MiB at a time). Each copy starts
   after a sync: dirty pages left by the one before would have the kernel throttle its writes. Then the
   same with the child taking each MiB's sum as it goes (cake.content_hash's XXH3-128): what a receiver
   that checks what it gets must do, the ceiling of shipping's rate where both ends share the cores.
2. Shipping: a real `cake --mode worker` with no model files, a fresh cache folder and every layer in its
   topology entry; this process is its master (cake.shipping.Supplier through a WorkerLink) and times the
   transfer alone (manifest to the last chunk's answer), then again with a cluster key (sealed), then a
   reconnect that finds everything cached (the worker hashes its cache; nothing is sent).
3. Bring-up from nothing: two workers with no model files and fresh caches, and `cake --model M -p hi -n 1
   --max-memory 0` (the master plans, hashes, ships, and generates one token); the wall time from starting
   the workers to the master's exit, next to the same with workers started on the model folder.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

from benchmarks import models  # noqa: E402  (the benchmark's models)
from cake import launch  # noqa: E402
from cake.content_hash import block_sum  # noqa: E402

CHUNK = 4 << 20
KEY = "ship-bench-key"


def receive(port_file: str, out_dir: str, hashing: bool) -> None:
    """The plain copy's receiving side: one connection, everything it carries written to files of 64 MiB;
    with `hashing`, each MiB's sum taken as well (cake.content_hash's, as a worker checks its chunks)."""
    server = socket.create_server(("127.0.0.1", 0))
    Path(port_file).write_text(str(server.getsockname()[1]))
    conn, _ = server.accept()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    n, k, f = 0, 0, None
    while got := conn.recv_into(view):
        if f is None or n >= 64 << 20:
            if f:
                f.close()
            f, n, k = open(Path(out_dir) / f"part-{k}", "wb"), 0, k + 1
        f.write(view[:got])
        if hashing:
            for i in range(0, got, 1 << 20):
                block_sum(view[i:min(got, i + (1 << 20))])
        n += got
    if f:
        f.close()
    conn.sendall(b"k")
    conn.close()


def plain_copy(files, tmp: Path, hashing: bool = False) -> tuple[int, float]:
    """Bytes and seconds of sending the layers' tensor bytes to a child that writes them to disk (and, with
    `hashing`, sums each MiB)."""
    out = tmp / "plain"
    out.mkdir()
    port_file = tmp / f"port-{time.monotonic_ns()}"
    child = subprocess.Popen([sys.executable, __file__, "--receive", str(port_file), str(out), str(int(hashing))])
    while not port_file.exists() or not port_file.read_text():
        time.sleep(0.01)
    sock = socket.create_connection(("127.0.0.1", int(port_file.read_text())))
    os.sync()  # no dirty pages of an earlier run: the kernel throttles writers past its dirty limit
    total, t0 = 0, time.perf_counter()
    for f in files:
        for e in f.parts:
            with open(e.path, "rb", buffering=0) as src:
                src.seek(e.start)
                left = e.end - e.start
                while left:
                    data = src.read(min(CHUNK, left))
                    sock.sendall(data)
                    left -= len(data)
                    total += len(data)
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)  # written and closed
    seconds = time.perf_counter() - t0
    sock.close()
    child.wait()
    return total, seconds


async def ship(model: Path, tmp: Path, key: str | None, cache: Path, port: int, topo: Path) -> dict:
    from cake.client import Options, WorkerLink
    from cake.model.config import load_config
    from cake.shipping import Supplier
    from cake.topology import load_topology

    supply = Supplier(model, load_config(model))
    entry = load_topology(topo).workers["w"]
    t0 = time.perf_counter()
    files = await supply.layer_files(list(entry.layers))
    hashed = time.perf_counter() - t0
    times = []
    original = supply.ship

    async def timed(*args):
        os.sync()  # as for the plain copy
        t = time.perf_counter()
        await original(*args)
        times.append(time.perf_counter() - t)
    supply.ship = timed
    link = WorkerLink(entry, Options(key=key, supply=supply, retry_timeout=60))
    t0 = time.perf_counter()
    try:
        await link.ensure_connected()
    finally:
        link.shutdown()
    connected = time.perf_counter() - t0
    return {"bytes": sum(f.size for f in files), "hash_s": hashed, "ship_s": times[0], "connect_s": connected,
            "sent": supply.sent}


def start_worker(name: str, topo: Path, port: int, log: Path, *extra: str) -> subprocess.Popen:
    p = launch.start_worker(None, name, topo, port, "--device", "cpu", *extra, log=log)
    launch.wait_ready(port, p)
    return p


def shipping_row(model: Path, tmp: Path, key: str | None, restart: bool) -> list[dict]:
    """A fresh worker (empty cache) shipped every layer; with `restart`, then restarted and shipped again."""
    from cake.model.config import load_config

    layers = load_config(model).num_hidden_layers
    port = launch.free_port()
    topo = launch.write_topology(tmp / f"w-{port}.yml", {"w": (port, [f"model.layers.0-{layers - 1}"])})
    cache = tmp / f"cache-{port}"
    extra = ("--cache-dir", str(cache), *(("--cluster-key", key) if key else ()))
    w = start_worker("w", topo, port, tmp / f"w-{port}.log", *extra)
    rows = []
    try:
        rows.append({"what": "ship, sealed" if key else "ship", **asyncio.run(ship(model, tmp, key, cache, port, topo))})
        if restart:  # a worker that comes back: it hashes its cache, nothing is sent
            w.kill()
            w.wait()
            w = start_worker("w", topo, port, tmp / f"w-{port}.log", *extra)
            rows.append({"what": "restart, all cached", **asyncio.run(ship(model, tmp, key, cache, port, topo))})
    finally:
        launch.stop(w)
        shutil.rmtree(cache, ignore_errors=True)
    return rows


def bring_up(model: Path, tmp: Path, from_nothing: bool, half: int) -> tuple[float, list[str]]:
    """Seconds from starting two workers (each with room for half the layers: `half` bytes) to the master's
    exit after one generated token, and the master's lines about what it hashed, shipped and planned."""
    ports = [launch.free_port(), launch.free_port()]
    topo = tmp / f"cluster-{ports[0]}.yml"
    topo.write_text("".join(f"{n}:\n  host: '127.0.0.1:{p}'\n" for n, p in zip("ab", ports)))
    t0 = time.perf_counter()
    workers = []
    for n, p in zip("ab", ports):
        extra = ("--max-memory", f"{half}B", *(("--cache-dir", str(tmp / f"up-{p}")) if from_nothing else ()))
        workers.append(launch.start_worker(None if from_nothing else model, n, topo, p, "--device", "cpu", *extra,
                                           log=tmp / f"up-{n}-{p}.log"))
    try:
        for p, w in zip(ports, workers):
            launch.wait_ready(p, w, timeout=300)
        master = subprocess.run([sys.executable, "-m", "cake", "--model", str(model), "--topology", str(topo),
                                 "--max-memory", "0", "--device", "cpu", "--raw", "-p", "hi", "-n", "1"],
                                capture_output=True, text=True, timeout=1200,
                                # from nothing: nor the block sums a master keeps between runs
                                env={**os.environ, "XDG_CACHE_HOME": str(tmp / f"master-{ports[0]}")}
                                if from_nothing else None)
        seconds = time.perf_counter() - t0
        if master.returncode:
            raise SystemExit(master.stderr)
        print(master.stderr, file=sys.stderr)
        said = [line.split("] ", 1)[-1] for line in master.stderr.splitlines()
                if "shipped" in line or "hashed" in line or "sums" in line or "layers 0" in line or "layers 8" in line]
    finally:
        for w in workers:
            launch.stop(w)
    return seconds, said


def kv_bytes(config) -> int:
    """A session's KV cache for one layer at the default context, in f32 (as cake.placement.layer_bytes)."""
    return 2 * config.num_key_value_heads * config.head_dim * 4096 * 4


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--receive":
        receive(sys.argv[2], sys.argv[3], sys.argv[4] == "1")
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["tiny", "big"], default="big")
    p.add_argument("--workdir", type=Path, default=models.default_workdir())
    p.add_argument("--rounds", type=int, default=3, help="plain copy and shipping, alternated, this many times")
    p.add_argument("--no-bring-up", action="store_true", help="only the rates")
    p.add_argument("--tmp", type=Path, default=None,
                   help="where the copies land (default: a temporary folder; /dev/shm takes the disk out)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args()
    model = models.ensure_model(models.SPECS[args.model], args.workdir)
    from cake.model.config import load_config
    from cake.model.weights import WeightFiles
    from cake.shipping import layer_file

    config = load_config(model)
    files = [layer_file(WeightFiles(model), config, i) for i in range(config.num_hidden_layers)]
    mb = lambda n, s: n / s / 1e6  # noqa: E731
    rounds, rows = [], []
    with tempfile.TemporaryDirectory(prefix="ship-bench-", dir=args.tmp) as t:
        tmp = Path(t)
        for r in range(args.rounds):  # alternated, so a busy moment falls on all three
            copied, copy_s = plain_copy(files, tmp)
            shutil.rmtree(tmp / "plain")
            _, hashed_s = plain_copy(files, tmp, hashing=True)
            shutil.rmtree(tmp / "plain")
            shipped = shipping_row(model, tmp, None, restart=r == args.rounds - 1)
            rounds.append((mb(copied, copy_s), mb(shipped[0]["bytes"], shipped[0]["ship_s"]), mb(copied, hashed_s)))
            rows += shipped
            print(f"round {r + 1}: plain copy {rounds[-1][0]:.1f} MB/s, shipping {rounds[-1][1]:.1f} MB/s "
                  f"({rounds[-1][1] / rounds[-1][0]:.2f})", file=sys.stderr)
        if args.rounds:
            rows += shipping_row(model, tmp, KEY, restart=False)
        # Room for half the layers and a bit: the plan gives each worker half (one alone would be one hop less).
        half = int(sum(f.size for f in files) / 2 * 1.1 + config.num_hidden_layers / 2 * kv_bytes(config))
        up = {} if args.no_bring_up else {"from nothing": bring_up(model, tmp, True, half),
                                          "workers with --model": bring_up(model, tmp, False, half)}
    print(f"\nmodel {args.model}: {len(files)} layers, {sum(f.size for f in files) / 1e6:.1f} MB as layer files")
    for i, (plain, shipping, hashed) in enumerate(rounds):
        print(f"round {i + 1}: plain socket copy {plain:7.1f} MB/s, shipping {shipping:7.1f} MB/s: {shipping / plain:.2f}"
              f" (a plain copy that hashes each MiB: {hashed:7.1f} MB/s, {hashed / plain:.2f})")
    if rounds:
        plain, shipping, hashed = (statistics.median(r[i] for r in rounds) for i in (0, 1, 2))
        print(f"medians of {len(rounds)}: plain copy {plain:.1f} MB/s, shipping {shipping:.1f} MB/s: "
              f"{shipping / plain:.2f}; a plain copy that hashes each MiB {hashed:.1f} MB/s: {hashed / plain:.2f}")
    for r in rows:
        print(f"{r['what']:<20} {mb(r['bytes'], r['ship_s']):7.1f} MB/s ({r['ship_s']:.2f} s, sent {r['sent'] / 1e6:.1f} MB; "
              f"hashing on the master {r['hash_s']:.2f} s; connect, loading included, {r['connect_s']:.2f} s)")
    for what, (s, said) in up.items():
        print(f"bring-up, {what:<20} {s:6.1f} s")
        for line in said:
            print(f"    {line}")
    if args.json:
        args.json.write_text(json.dumps({"rounds_mb_s": rounds, "rows": rows, "bring_up_s": up}, indent=2))


if __name__ == "__main__":
    main()
