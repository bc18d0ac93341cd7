"""The generation loop: prefill the prompt in one pass, then one position per step until a stop."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from cake.master import Master
from cake.sampling import Sampler, SamplingParams, TokenLogProb, token_logprobs


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


@dataclass
class LogProbs:
    """Asks `generate` for log-probabilities (of the model's own distribution, before sampling's
    filters) and receives them."""

    top: int = 0  # how many of the most likely tokens each position also lists
    prompt: bool = False  # the prompt's own tokens too: the head then runs over every prompt position
    prompt_entries: list[TokenLogProb] | None = None  # the prompt's tokens after the first, once prefilled
    entries: list[TokenLogProb] = field(default_factory=list)  # one per generated token, ready when it is yielded


async def generate(master: Master, prompt_ids: list[int], params: SamplingParams, max_tokens: int,
                   eos_ids: tuple[int, ...] | list[int], stats: GenerationStats | None = None,
                   logprobs: LogProbs | None = None) -> AsyncIterator[int]:
    """Yield generated token ids (an EOS id, when one ends the answer, is yielded last). With
    `logprobs` asking for the prompt's, `max_tokens` 0 runs the prompt and yields nothing."""
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt_ids)
    if not prompt_ids:
        raise ValueError("empty prompt")
    master.check_fits(len(prompt_ids), max_tokens)
    sampler = Sampler(params)
    session = master.new_session()
    eos = set(eos_ids)
    top = logprobs.top if logprobs is not None else 0
    every = logprobs is not None and logprobs.prompt
    try:
        if max_tokens <= 0 and not every:
            stats.finish_reason = "length"
            return
        t0 = time.perf_counter()
        logits = await master.step(session, list(prompt_ids), every_position=every)
        if every:  # row i holds the distribution of the token at position i + 1
            logprobs.prompt_entries = token_logprobs(logits[:-1], prompt_ids[1:], top)
            logits = logits[-1]
            if max_tokens <= 0:
                stats.prefill_s = time.perf_counter() - t0
                stats.finish_reason = "length"
                return
        token = sampler(logits, session.tokens)
        stats.prefill_s = stats.ttft_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        while True:
            if logprobs is not None:
                logprobs.entries += token_logprobs(logits[None], [token], top)
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
