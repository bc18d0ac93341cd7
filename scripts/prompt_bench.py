"""Long prompts through two workers: how long they stall other sessions' streams, and how fast they go.

    python scripts/prompt_bench.py stall [--model big|tiny] [--prompt-tokens 1500] [--repeats 3]
    python scripts/prompt_bench.py pipeline --pin [--model big|tiny] [--prompt-tokens 1536] [--repeats 3]

Starts two `cake --mode worker` processes on loopback (the benchmark's models and split, built once by
scripts/bench.py's code) and an API-style master.
- `stall`: session A decodes; after its first tokens, session B sends a long prompt. Prints, per run, B's
  time to first token alone and with A decoding, and A's inter-token gaps (median and longest) while B's
  prompt was computing.
- `pipeline`: one prompt's time to first token with --pipeline off and on, in alternating runs. With
  `--pin`, each worker runs on a CPU core of its own with one thread (`taskset`): two one-core machines,
  emulated, where stages can compute at the same time; without it they share every core.
Used for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not

from benchmarks import cluster as workers, models, pinning, weights  # noqa: E402  (the benchmark's models and workers)
from cake import eventloop, launch  # noqa: E402
from cake.client import Options  # noqa: E402
from cake.generate import generate  # noqa: E402
from cake.master import Master  # noqa: E402
from cake.model.config import load_config  # noqa: E402
from cake.sampling import SamplingParams  # noqa: E402
from cake.topology import load_topology  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)


async def stream(master: Master, prompt: list[int], tokens: int, stamps: list[float]) -> None:
    async for _ in generate(master, prompt, GREEDY, tokens, ()):
        stamps.append(time.perf_counter())


async def first_token(master: Master, prompt: list[int]) -> tuple[float, float]:
    """(start time, seconds to the first token) of one generation of `prompt`."""
    t0 = time.perf_counter()
    tokens = generate(master, prompt, GREEDY, 1, ())
    try:
        await tokens.__anext__()
        return t0, time.perf_counter() - t0
    finally:
        await tokens.aclose()  # ends the session on the workers


async def measure(master: Master, prompt_tokens: int, seed: int) -> dict:
    long_prompt = models.prompt_ids(prompt_tokens, seed)
    _, alone = await first_token(master, long_prompt)
    stamps: list[float] = []
    a = asyncio.ensure_future(stream(master, models.prompt_ids(16, 0), master.capacity - 16, stamps))

    async def a_has(n: int) -> None:
        while len(stamps) < n:
            if a.done():
                a.result()  # its error, if any
                raise RuntimeError("session A stopped decoding early")
            await asyncio.sleep(0.001)

    try:
        await a_has(12)  # A is decoding
        t0, ttft = await first_token(master, models.prompt_ids(prompt_tokens, seed + 1))
        await a_has(len(stamps) + 4)  # A goes on after B's first token
    finally:
        a.cancel()
        await asyncio.gather(a, return_exceptions=True)
    before = [y - x for x, y in zip(stamps, stamps[1:]) if y < t0]
    during = [y - x for x, y in zip(stamps, stamps[1:]) if y > t0 and x < t0 + ttft]
    return {"alone": alone, "ttft": ttft, "before": statistics.median(before), "during": during}


async def pipeline_runs(master: Master, prompt_tokens: int, repeats: int) -> dict[str, list[float]]:
    """Time to first token of a fresh prompt with pipelining off and on, alternating which goes first."""
    times: dict[str, list[float]] = {"off": [], "on": []}
    for i in range(repeats):
        for choice in ("off", "on") if i % 2 else ("on", "off"):
            master.options.pipeline = choice
            _, ttft = await first_token(master, models.prompt_ids(prompt_tokens, 100 + i))
            times[choice].append(ttft)
    return times


@contextlib.contextmanager
def pinned_workers(model: Path, layers: int, logs: Path) -> Iterator[workers.Cluster]:
    """The benchmark's two workers, each on a CPU core of its own with one thread."""
    ranges = pinning.worker_ranges(layers)
    ports = {name: launch.free_port() for name in ranges}
    topology = logs / "topology.yml"
    workers.write_topology(topology, ranges, ports)
    procs: dict[str, subprocess.Popen] = {}
    try:
        for cpu, name in enumerate(ranges):
            command = launch.worker_command(model, name, topology, ports[name], "--threads", "1")
            with open(logs / f"{name}.log", "ab") as log:
                procs[name] = subprocess.Popen(["taskset", "-c", str(cpu), *command], stdout=log, stderr=log)
        for name in ranges:
            launch.wait_ready(ports[name], procs[name], workers.WORKER_START_TIMEOUT)
        yield workers.Cluster(topology, procs)
    finally:
        for proc in procs.values():
            launch.stop(proc)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("measure", choices=["stall", "pipeline"])
    p.add_argument("--model", choices=["tiny", "big"], default="big")
    p.add_argument("--prompt-tokens", type=int, default=None, help="default: 1500 (stall), 1536 (pipeline)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pin", action="store_true", help="pipeline: each worker on a core of its own (taskset)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(weights.ITEMSIZE), default="f32")
    p.add_argument("--workdir", type=Path, default=models.default_workdir())
    p.add_argument("--model-dir", type=Path, default=None, help="another model folder instead of a benchmark model")
    args = p.parse_args(argv)
    tokens = args.prompt_tokens or (1500 if args.measure == "stall" else 1536)
    if args.model_dir is not None:
        model, name = args.model_dir, args.model_dir.name
        layers = load_config(model).num_hidden_layers
    else:
        spec = models.SPECS[args.model]
        model, name, layers = models.ensure_model(spec, args.workdir), spec.name, spec.layers
    context = max(8192, 2 * tokens)  # the workers' (4096 by default) bounds it
    with tempfile.TemporaryDirectory() as logs, \
            (pinned_workers(model, layers, Path(logs)) if args.pin else
             workers.running_workers(model, layers, Path(logs), args.device, args.dtype)) as cluster:
        loop = eventloop.new_loop()
        master = Master(model, load_topology(cluster.topology), device=args.device, dtype=args.dtype,
                        context=context, options=Options(request_timeout=600.0),
                        compute_in_thread=True)  # as `cake --api` builds it
        loop.run_until_complete(master.connect())
        where = "each worker pinned to a core of its own, 1 thread" if args.pin else "sharing every core"
        print(f"{name} model, 2 workers on loopback ({where}), {args.device} {args.dtype}, prompt {tokens} tokens")
        if args.measure == "pipeline":
            loop.run_until_complete(first_token(master, models.prompt_ids(tokens, 99)))  # warm-up
            times = loop.run_until_complete(pipeline_runs(master, tokens, args.repeats))
            off, on = (statistics.median(times[k]) for k in ("off", "on"))
            print("time to first token, --pipeline off: " + ", ".join(f"{t * 1e3:.0f}" for t in times["off"])
                  + f" ms (median {off * 1e3:.0f}); on: " + ", ".join(f"{t * 1e3:.0f}" for t in times["on"])
                  + f" ms (median {on * 1e3:.0f}); off/on {off / on:.2f}x")
        for i in range(args.repeats if args.measure == "stall" else 0):
            r = loop.run_until_complete(measure(master, tokens, 2 * i + 1))
            d = r["during"]
            print(f"run {i + 1}: B's first token alone {r['alone'] * 1e3:.0f} ms, with A decoding "
                  f"{r['ttft'] * 1e3:.0f} ms; A's tokens {r['before'] * 1e3:.1f} ms apart before, during B's "
                  f"prompt {len(d)} gaps, median {statistics.median(d) * 1e3:.0f} ms, longest {max(d) * 1e3:.0f} ms",
                  flush=True)
        loop.run_until_complete(master.close())
        loop.close()


if __name__ == "__main__":
    main()
