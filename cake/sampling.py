"""Turning logits into the next token: greedy, or seeded sampling with the usual processors; and the
log-probabilities of tokens under the model's own distribution.

Processors run in transformers' order: repetition penalty, temperature, top-k, top-p. Sampling happens
on the master's CPU with its own seeded generator, so a seed gives the same text whatever the split.
Log-probabilities are taken of the raw logits, before any processor (as OpenAI's API reports them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cake.errors import CakeError

DEFAULT_SEED = 299792458


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repeat_penalty: float = 1.0  # 1: off
    repeat_last_n: int = 0  # 0: the whole history (transformers' penalty); N: the last N tokens
    seed: int = DEFAULT_SEED


def apply_repeat_penalty(logits: torch.Tensor, history: list[int], penalty: float, last_n: int) -> torch.Tensor:
    if penalty == 1.0 or not history:
        return logits
    recent = history[-last_n:] if last_n > 0 else history
    idx = torch.tensor(sorted(set(recent)), dtype=torch.long)
    picked = logits[idx]
    logits[idx] = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if 0 < k < logits.numel():
        kth = torch.topk(logits, k).values[-1]
        logits[logits < kth] = float("-inf")
    return logits


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop = cum - torch.softmax(sorted_logits, dim=-1) >= p
    drop[0] = False
    logits[order[drop]] = float("-inf")
    return logits


NON_FINITE = ("the model produced NaN or inf logits: a node's arithmetic overflowed (run f16 nodes in bf16 "
              "or f32) or its weights are corrupt")


def greedy(logits: torch.Tensor) -> int:
    """The first most likely token, like argmax; max(dim) finds it 3x faster on a 128k vocabulary. A NaN
    anywhere is the maximum (max propagates it), so one look at the value catches broken logits."""
    best = logits.max(dim=-1)
    # One device sync for both; ids below 2**24 are exact in float32 (Llama 3 has 128256).
    value, index = torch.stack((best.values.float(), best.indices.float())).tolist()
    if not math.isfinite(value):
        raise CakeError(NON_FINITE)
    return int(index)


@dataclass
class TokenLogProb:
    """One position: the token there, its log-probability, and the most likely tokens (most likely first)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


LOGPROB_ROWS = 64  # positions per log_softmax, so a long prompt's [n, vocab] is not copied whole


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int = 0) -> list[TokenLogProb]:
    """log_softmax in float32 of each row of `logits` [n, vocab], at `tokens[i]` for row i, with each
    row's `top` most likely tokens."""
    out: list[TokenLogProb] = []
    for a in range(0, len(tokens), LOGPROB_ROWS):
        part = tokens[a:a + LOGPROB_ROWS]
        rows = torch.log_softmax(logits[a:a + LOGPROB_ROWS].float(), dim=-1)
        chosen = rows.gather(-1, torch.tensor(part, device=rows.device)[:, None])
        values, indices = torch.topk(rows, top, dim=-1)
        found = torch.cat((chosen, values), dim=-1)
        if not bool(torch.isfinite(found).all()):
            raise CakeError(NON_FINITE)
        for t, (lp, *v), i in zip(part, found.tolist(), indices.tolist()):
            out.append(TokenLogProb(t, lp, list(zip(i, v))))
    return out


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params
        self.generator = torch.Generator().manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        p = self.p
        if p.temperature <= 0 and p.repeat_penalty == 1.0:
            return greedy(logits)
        x = logits.detach().float().cpu().clone()
        x = apply_repeat_penalty(x, history, p.repeat_penalty, p.repeat_last_n)
        if p.temperature <= 0:
            return greedy(x)  # which refuses NaN/inf itself
        if bool(torch.isnan(x).any() | torch.isposinf(x).any()):
            raise CakeError(NON_FINITE)
        x = top_p_filter(top_k_filter(x / p.temperature, p.top_k), p.top_p)
        probs = torch.softmax(x, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
