"""Generation, as each side does it: transformers' `generate` and cake's Master driven by `cake.generate`,
timed token by token (time to first token, decode time, each stage's share), and concurrent sessions."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict

from cake.errors import CakeError

from .children import Job, Run, StageSplit, Subject
from .models import prompt_ids


def steady_rate(stamps: list[list[float]]) -> float:
    """Tokens per second while every session is decoding.

    `stamps[i]` holds the times session i produced its tokens. The window runs from the last session's
    first token to the first session's last token, so prefills and stragglers are left out.
    """
    start = max(s[0] for s in stamps)
    end = min(s[-1] for s in stamps)
    count = sum(start < t <= end for s in stamps for t in s)
    if end <= start or not count:
        raise CakeError(f"the {len(stamps)} concurrent sessions never decoded at the same time; raise --tokens")
    return count / (end - start)


class Transformers(Subject):
    """transformers' `generate` with the family's own class (`LlamaForCausalLM`, `Qwen3MoeForCausalLM`, ...,
    as config.json names it), greedy, on the same weights, device and dtype."""

    def __init__(self, job: Job):
        import torch
        from transformers import AutoModelForCausalLM

        self.tokens = job.tokens
        from cake.devices import DTYPES

        self.model = AutoModelForCausalLM.from_pretrained(job.model_dir, dtype=DTYPES[job.dtype]).to(job.device).eval()
        self.ids = torch.tensor([prompt_ids(job.prompt_tokens)], device=job.device)
        self._generate(self.tokens)  # a full run: on a GPU a shorter one leaves kernels for later lengths cold

    def _generate(self, tokens: int) -> Run:
        import torch
        from transformers.generation.streamers import BaseStreamer

        from cake.synthetic import END_OF_TEXT

        class TokenClock(BaseStreamer):
            """Notes when generate hands over each token; its first call carries the prompt."""

            def __init__(self) -> None:
                self.stamps: list[float] = []

            def put(self, value) -> None:
                self.stamps.append(time.perf_counter())

            def end(self) -> None:
                pass

        clock = TokenClock()
        t0 = time.perf_counter()
        # min_new_tokens keeps an EOS from ending a run early: every run decodes exactly `tokens`.
        self.model.generate(self.ids, attention_mask=torch.ones_like(self.ids), max_new_tokens=tokens,
                            min_new_tokens=tokens, do_sample=False, streamer=clock, pad_token_id=END_OF_TEXT)
        out = clock.stamps[1:]
        return Run(out[0] - t0, out[-1] - out[0], len(out) - 1)

    def run(self) -> dict:
        return asdict(self._generate(self.tokens))

    def finish(self) -> dict:
        return {"model_class": type(self.model).__name__}


class Cake(Subject):
    """An in-process Master (all layers local, or none with a topology) driven by `cake.generate`."""

    def __init__(self, job: Job):
        from cake import eventloop
        from cake.client import Options
        from cake.master import Master
        from cake.topology import load_topology

        self.job = job
        self.loop = eventloop.new_loop(eventloop.busy_poll_us(job.device, job.busy_poll))
        # Short timeouts: a stuck worker should fail the benchmark in seconds, not after minutes.
        self.master = Master(job.model_dir, load_topology(job.topology), device=job.device, dtype=job.dtype,
                             options=Options(retry_timeout=10.0, request_timeout=120.0, relay=job.relay),
                             compute_in_thread=job.server,
                             quantize=None if job.quantize == "none" else job.quantize, group_size=job.group)
        self.loop.run_until_complete(self.master.connect())
        self.prompt = prompt_ids(job.prompt_tokens)
        self.loop.run_until_complete(self._generate(self.prompt, job.tokens))  # warm-up, as measured

    def _totals(self) -> list[StageSplit]:
        return [StageSplit(str(st.stage), st.stats.calls, st.stats.total_s, st.stats.compute_s)
                for st in self.master.stages]

    async def _generate(self, prompt: list[int], tokens: int) -> tuple[Run, list[StageSplit]]:
        """One greedy generation of exactly `tokens` tokens (no EOS stops it); the stage split covers
        its decode steps only."""
        from cake.generate import GenerationStats, generate
        from cake.sampling import SamplingParams

        stats = GenerationStats()
        before: list[StageSplit] | None = None
        async for _ in generate(self.master, prompt, SamplingParams(temperature=0.0), tokens, (), stats):
            if before is None:  # the prefill step is done and no decode step has started
                before = self._totals()
        split = [a - b for a, b in zip(self._totals(), before or [])]
        return Run(stats.ttft_s, stats.decode_s, stats.generated - 1), split

    def run(self) -> dict:
        run, split = self.loop.run_until_complete(self._generate(self.prompt, self.job.tokens))
        return {**asdict(run), "stages": [asdict(s) for s in split]}

    def concurrent(self, sessions: int) -> dict:
        """Aggregate decode tok/s of `sessions` generations gathered on this one master."""
        import asyncio

        from cake.generate import generate
        from cake.sampling import SamplingParams

        stamps: list[list[float]] = [[] for _ in range(sessions)]

        async def one(i: int) -> None:
            prompt = prompt_ids(self.job.prompt_tokens, seed=i)
            async for _ in generate(self.master, prompt, SamplingParams(temperature=0.0), self.job.tokens, ()):
                stamps[i].append(time.perf_counter())

        async def gathered() -> None:
            await asyncio.gather(*(one(i) for i in range(sessions)))

        self.loop.run_until_complete(gathered())
        return {"tok_s": steady_rate(stamps)}

    def _matrices(self) -> dict[str, list]:
        """The matrices this master multiplies in a decode step, by kind: its layers' and the head."""
        layers = [self.master.stack.layers[i] for i in self.master.stack.indices]
        out = {kind: [w for layer in layers if (w := getattr(layer, kind, None)) is not None]
               for kind in ("wqkv", "wo", "w13", "w2")}  # a Llama decoder layer's four (fused) matrices
        return {**{k: v for k, v in out.items() if v}, "head": [self.master.head.lm_head]}

    def products(self, passes: int = 3) -> dict:
        """One decode step's matrix products alone, with cake's own kernels on the weights this master
        holds (a one-row input, as a decode step has): seconds per kind, the median of `passes`."""
        import torch

        from cake.model.kernels import linear

        dev, dtype = self.master.device, self.master.dtype
        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
        times: dict[str, list[float]] = {}
        with torch.inference_mode():
            for _ in range(passes):
                for kind, ws in self._matrices().items():
                    k = getattr(ws[0], "in_features", None) or ws[0].shape[1]
                    x = torch.ones(1, k, dtype=dtype, device=dev)
                    sync()
                    t0 = time.perf_counter()
                    for w in ws:
                        linear(x, w)
                    sync()
                    times.setdefault(kind, []).append(time.perf_counter() - t0)
        return {"products_s": {kind: statistics.median(t) for kind, t in times.items()}}

    def finish(self) -> dict:
        from cake.model.quant import QuantLinear

        self.loop.run_until_complete(self.master.close())
        chosen = sorted({w.kernel_name for ws in self._matrices().values() for w in ws if isinstance(w, QuantLinear)})
        return {"weight_bytes": self.master.stack.weight_bytes + self.master.head.weight_bytes, "kernels": chosen}


