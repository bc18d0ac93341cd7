"""The generation loop: prefill the prompt in one pass, then one position per step until a stop."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from cake.master import Master
from cake.sampling import Sampler, SamplingParams


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated: int = 0
    ttft_s: float = 0.0  # prompt in -> first token out
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str = ""  # "stop" (an EOS id) or "length"
    tokens: list[int] = field(default_factory=list)

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        steps = self.generated - 1
        return steps / self.decode_s if steps > 0 and self.decode_s else 0.0

    def summary(self) -> str:
        return (f"{self.prompt_tokens} prompt tokens, {self.generated} generated ({self.finish_reason}); "
                f"time to first token {self.ttft_s * 1e3:.0f} ms; prefill {self.prefill_tps:.1f} tok/s; "
                f"decode {self.decode_tps:.1f} tok/s")


async def generate(master: Master, prompt_ids: list[int], params: SamplingParams, max_tokens: int,
                   eos_ids: tuple[int, ...] | list[int], stats: GenerationStats | None = None) -> AsyncIterator[int]:
    """Yield generated token ids (an EOS id, when one ends the answer, is yielded last)."""
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt_ids)
    if not prompt_ids:
        raise ValueError("empty prompt")
    master.check_fits(len(prompt_ids), max_tokens)
    sampler = Sampler(params)
    session = master.new_session()
    eos = set(eos_ids)
    try:
        if max_tokens <= 0:
            stats.finish_reason = "length"
            return
        t0 = time.perf_counter()
        logits = await master.step(session, list(prompt_ids))
        token = sampler(logits, session.tokens)
        stats.prefill_s = stats.ttft_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        while True:
            stats.generated += 1
            stats.tokens.append(token)
            yield token
            if token in eos:
                stats.finish_reason = "stop"
                break
            if stats.generated >= max_tokens:
                stats.finish_reason = "length"
                break
            logits = await master.step(session, [token])
            token = sampler(logits, session.tokens)
        stats.decode_s = time.perf_counter() - t1
    finally:
        await master.end(session)
