"""How long one session's stream stalls while another session's long prompt computes.

    python scripts/prompt_stall.py [--model big|tiny] [--prompt-tokens 1500] [--repeats 3] [--device cpu]

Starts two `cake --mode worker` processes on loopback (the benchmark's models and split, built once by
scripts/bench.py's code) and an API-style master. Session A decodes; after its first tokens, session B
sends a long prompt. Prints, per run: B's time to first token alone and with A decoding, and A's
inter-token gaps (median and longest) while B's prompt was computing. Used for docs/benchmarks.md
("A long prompt no longer freezes the other streams").
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not

import bench  # noqa: E402
from cake import eventloop  # noqa: E402
from cake.client import Options  # noqa: E402
from cake.generate import generate  # noqa: E402
from cake.master import Master  # noqa: E402
from cake.sampling import SamplingParams  # noqa: E402
from cake.topology import load_topology  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)


async def stream(master: Master, prompt: list[int], tokens: int, stamps: list[float]) -> None:
    async for _ in generate(master, prompt, GREEDY, tokens, ()):
        stamps.append(time.perf_counter())


async def first_token(master: Master, prompt: list[int]) -> tuple[float, float]:
    """(start time, seconds to the first token) of one generation of `prompt`."""
    t0 = time.perf_counter()
    async for _ in generate(master, prompt, GREEDY, 1, ()):
        break
    return t0, time.perf_counter() - t0


async def measure(master: Master, prompt_tokens: int, seed: int) -> dict:
    long_prompt = bench.prompt_ids(prompt_tokens, seed)
    _, alone = await first_token(master, long_prompt)
    stamps: list[float] = []
    a = asyncio.ensure_future(stream(master, bench.prompt_ids(16, 0), master.capacity - 16, stamps))

    async def a_has(n: int) -> None:
        while len(stamps) < n:
            if a.done():
                a.result()  # its error, if any
                raise RuntimeError("session A stopped decoding early")
            await asyncio.sleep(0.001)

    try:
        await a_has(12)  # A is decoding
        t0, ttft = await first_token(master, bench.prompt_ids(prompt_tokens, seed + 1))
        await a_has(len(stamps) + 4)  # A goes on after B's first token
    finally:
        a.cancel()
        await asyncio.gather(a, return_exceptions=True)
    before = [y - x for x, y in zip(stamps, stamps[1:]) if y < t0]
    during = [y - x for x, y in zip(stamps, stamps[1:]) if y > t0 and x < t0 + ttft]
    return {"alone": alone, "ttft": ttft, "before": statistics.median(before), "during": during}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["tiny", "big"], default="big")
    p.add_argument("--prompt-tokens", type=int, default=1500)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(bench.ITEMSIZE), default="f32")
    p.add_argument("--workdir", type=Path, default=bench.default_workdir())
    args = p.parse_args()
    spec = bench.SPECS[args.model]
    model = bench.ensure_model(spec, args.workdir)
    with tempfile.TemporaryDirectory() as logs, \
            bench.running_workers(model, spec.layers, Path(logs), args.device, args.dtype) as cluster:
        loop = eventloop.new_loop()
        master = Master(model, load_topology(cluster.topology), device=args.device, dtype=args.dtype,
                        context=max(8192, 2 * args.prompt_tokens), options=Options(request_timeout=600.0),
                        compute_in_thread=True)  # as `cake --api` builds it
        loop.run_until_complete(master.connect())
        print(f"{spec.name} model, 2 workers on loopback, {args.device} {args.dtype}, "
              f"B's prompt {args.prompt_tokens} tokens")
        for i in range(args.repeats):
            r = loop.run_until_complete(measure(master, args.prompt_tokens, 2 * i + 1))
            d = r["during"]
            print(f"run {i + 1}: B's first token alone {r['alone'] * 1e3:.0f} ms, with A decoding "
                  f"{r['ttft'] * 1e3:.0f} ms; A's tokens {r['before'] * 1e3:.1f} ms apart before, during B's "
                  f"prompt {len(d)} gaps, median {statistics.median(d) * 1e3:.0f} ms, longest {max(d) * 1e3:.0f} ms",
                  flush=True)
        loop.run_until_complete(master.close())


if __name__ == "__main__":
    main()
