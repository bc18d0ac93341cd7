"""What sealing costs: µs per hop and tokens/s through two loopback workers, with and without a cluster key.

    python scripts/seal_bench.py [--model tiny|big|both] [--tokens 64] [--repeats 5] [--json out.json]

Both benchmark models of scripts/bench.py (made once into its work folder). For each model, two clusters of
two loopback workers (each half of the layers, the master none but the head): one without a key, one with
a key (every frame sealed). Measured in one process, the two clusters taking turns run by run so that a
slow moment of the machine falls on both:
- hop: the round trip of one decode step's forward [1, 1, hidden] through worker a alone, less the
  worker's own compute time: framing, sealing, the kernel's loopback and both event loops (median);
- ping: the round trip of a ping (no tensor) (median);
- tok/s: greedy decode of --tokens tokens after a 32-token prompt through both workers (relay on), median
  of the runs;
- frame: the least µs to write and read back one such forward frame in memory (no socket), which is
  what sealing adds to each frame without the machine's noise (a hop is 2 frames, a relayed token n+1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

from cake import launch, wire
from cake.auth import keygen
from cake.client import Options
from cake.master import Master, RemoteStage
from cake.topology import load_topology

HERE = Path(__file__).resolve().parent


async def hop_us(master: Master, n: int) -> tuple[float, float]:
    """Median µs of a decode step's forward through the first remote stage less its compute, and of a ping."""
    stage = next(st for st in master.stages if isinstance(st, RemoteStage))
    link, hidden = stage.link, master.config.hidden_size
    session = uuid.uuid4().hex
    x = torch.zeros(1, 1, hidden)
    await link.forward(stage.stage.start, stage.stage.end, [session], [0], x)  # makes the session's cache
    hops, pings = [], []
    for i in range(n):
        t0 = time.perf_counter()
        _, compute_s = await link.forward(stage.stage.start, stage.stage.end, [session], [1], x)
        hops.append(time.perf_counter() - t0 - compute_s)
        t0 = time.perf_counter()
        await link.request(wire.Ping())
        pings.append(time.perf_counter() - t0)
    await link.end([session])
    return 1e6 * statistics.median(hops), 1e6 * statistics.median(pings)


async def decode_tok_s(master: Master, prompt: list[int], tokens: int) -> float:
    session = master.new_session()
    logits = await master.step(session, prompt)
    t0 = time.perf_counter()
    for _ in range(tokens):
        logits = await master.step(session, [int(logits.argmax())])
    spent = time.perf_counter() - t0
    await master.end(session)
    return tokens / spent


def framing_us(hidden: int, n: int = 3000) -> dict[str, float]:
    """Least µs to write one decode step's forward [1, 1, hidden] f32 and read it back (an in-memory stream,
    no socket), without and with sealing: what sealing adds to each frame, apart from the machine's noise."""
    from cake.seal import Seal

    class Sink:
        def __init__(self):
            self.data = bytearray()

        def write(self, b):
            self.data += b

        async def drain(self):
            pass

    async def one(seal_out, seal_in) -> float:
        best = float("inf")
        x = torch.randn(1, 1, hidden)
        msg = wire.Forward(1, 0, 4, ["0123456789abcdef0123456789abcdef"], [100])
        for _ in range(n):
            sink, reader = Sink(), asyncio.StreamReader()
            t0 = time.perf_counter()
            await wire.write_message(sink, msg, x, seal_out)
            reader.feed_data(bytes(sink.data))
            await wire.read_message(reader, 1 << 24, seal_in)
            best = min(best, time.perf_counter() - t0)
        return 1e6 * best

    key = b"k" * 32
    return {"no key": asyncio.run(one(None, None)), "key": asyncio.run(one(Seal(key), Seal(key)))}


def measure(model_dir: Path, layers: int, tokens: int, repeats: int, tmp: Path) -> dict:
    half = layers // 2
    layout = {"a": [f"model.layers.0-{half - 1}"], "b": [f"model.layers.{half}-{layers - 1}"]}
    key = keygen()
    clusters, procs = {}, []
    try:
        for label, extra in (("no key", ()), ("key", ("--cluster-key", key))):
            ports = {name: launch.free_port() for name in layout}
            topology = launch.write_topology(tmp / f"topology-{label.replace(' ', '-')}-{model_dir.name}.yml",
                                             {n: (ports[n], spec) for n, spec in layout.items()})
            for name in layout:
                procs.append(launch.start_worker(model_dir, name, topology, ports[name], "--device", "cpu",
                                                 "--dtype", "f32", "--busy-poll", "0", *extra,
                                                 log=tmp / f"worker-{name}-{ports[name]}.log"))
                launch.wait_ready(ports[name], procs[-1], timeout=300)
            clusters[label] = Master(model_dir, load_topology(topology), device="cpu", dtype="f32",
                                     options=Options(key=key if extra else None))
        prompt = [(i * 7919) % 120000 + 1000 for i in range(32)]
        out = {label: {"hop_us": [], "ping_us": [], "tok_s": []} for label in clusters}

        async def go():
            for m in clusters.values():
                await m.connect()
                await decode_tok_s(m, prompt, 4)  # warm-up
            for _ in range(repeats):
                for label, m in clusters.items():
                    hop, ping = await hop_us(m, 200)
                    out[label]["hop_us"].append(hop)
                    out[label]["ping_us"].append(ping)
                    out[label]["tok_s"].append(await decode_tok_s(m, prompt, tokens))
            for m in clusters.values():
                await m.close()

        asyncio.run(go())
        return {label: {k: statistics.median(v) for k, v in figures.items()} | {"runs": figures}
                for label, figures in out.items()}
    finally:
        for p in procs:
            launch.stop(p)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["tiny", "big", "both"], default="both")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    from benchmarks import models  # the benchmark's models

    workdir = models.default_workdir()
    names = ["tiny", "big"] if args.model == "both" else [args.model]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    report = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu, "threads": torch.get_num_threads(), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            spec = models.SPECS[name]
            model_dir = models.ensure_model(spec, workdir)
            report["models"][name] = measure(model_dir, spec.layers, args.tokens, args.repeats, Path(tmp))
            for label, us in framing_us(spec.hidden).items():
                report["models"][name][label]["frame_us"] = us
    print(f"{report['date']}, {cpu}, 2 loopback workers, f32, relay on, busy-poll off")
    print(f"{'model':6} {'key':7} {'hop µs':>8} {'ping µs':>8} {'tok/s':>7} {'frame µs':>9}")
    for name, by_key in report["models"].items():
        for label, f in by_key.items():
            print(f"{name:6} {label:7} {f['hop_us']:8.0f} {f['ping_us']:8.0f} {f['tok_s']:7.2f} {f['frame_us']:9.1f}")
        plain, sealed = by_key["no key"], by_key["key"]
        print(f"{name:6} {'cost':7} {sealed['hop_us'] - plain['hop_us']:+8.0f} {sealed['ping_us'] - plain['ping_us']:+8.0f} "
              f"{100 * (sealed['tok_s'] / plain['tok_s'] - 1):+6.1f}% {sealed['frame_us'] - plain['frame_us']:+9.1f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
