"""The generation loop's log-probabilities, on an all-local master, against transformers."""

from __future__ import annotations

import pytest
import torch

from cake.client import SessionsLost
from cake.generate import GenerationStats, LogProbs, generate
from cake.master import Master
from cake.sampling import SamplingParams
from cake.topology import Topology
from conftest import EOS, reference_model, run


def reference_logprobs(model_dir, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(reference_model(model_dir)(torch.tensor([ids])).logits[0].float(), dim=-1)


async def collect(tokens) -> list[int]:
    return [t async for t in tokens]


def test_prompt_logprobs_survive_a_replay_of_part_of_the_prompt(peaked_model, monkeypatch):
    """A prompt that goes in requests of 30 positions, whose third request loses positions 45 on (as a
    worker that restarted would): the step replays from 45, and every position's log-probability is still
    transformers' (those of positions 30-44 are kept from before the loss)."""
    master = Master(peaked_model, Topology(), device="cpu")
    monkeypatch.setattr(master, "_request_limits", lambda: (30, 64))
    stage = master.stages[0]
    forward, starts = stage.forward, []

    async def losing_once(sessions, positions, hidden):
        starts.append(positions[0])
        if len(starts) == 3:
            raise SessionsLost("w", 45)
        return await forward(sessions, positions, hidden)

    monkeypatch.setattr(stage, "forward", losing_once)
    ids = torch.randint(1000, 100000, (100,), generator=torch.Generator().manual_seed(2)).tolist()
    logprobs, stats = LogProbs(top=2, prompt=True), GenerationStats()
    answer = run(collect(generate(master, ids, SamplingParams(), 2, EOS, stats, logprobs)))
    assert starts[:5] == [0, 30, 60, 45, 75]  # the replay really went back into the prompt
    rows = reference_logprobs(peaked_model, ids + answer)
    assert [e.token for e in logprobs.prompt_entries] == ids[1:]
    assert [e.token for e in logprobs.entries] == answer and len(answer) == stats.generated == 2
    for i, e in enumerate(logprobs.prompt_entries + logprobs.entries, start=1):
        assert e.logprob == pytest.approx(rows[i - 1, (ids + answer)[i]].item(), abs=1e-4)
        assert [t for t, _ in e.top] == torch.topk(rows[i - 1], 2).indices.tolist()


def test_max_tokens_0_scores_the_prompt_only(peaked_model, monkeypatch):
    master = Master(peaked_model, Topology(), device="cpu")
    ids = [9906, 1070, 11, 15660, 315, 8340]
    logprobs, stats = LogProbs(prompt=True), GenerationStats()
    assert run(collect(generate(master, ids, SamplingParams(), 0, EOS, stats, logprobs))) == []
    assert stats.finish_reason == "length" and stats.generated == 0 and logprobs.entries == []
    rows = reference_logprobs(peaked_model, ids)
    assert [e.logprob for e in logprobs.prompt_entries] == pytest.approx(
        [rows[i - 1, ids[i]].item() for i in range(1, len(ids))], abs=1e-4)
    assert run(collect(generate(master, ids, SamplingParams(), 0, EOS))) == []  # nothing asked: nothing runs

    def every_position(h):
        raise AssertionError("the head ran over every position")

    # the answer's log-probabilities alone need only the last position's logits, as plain generation does
    monkeypatch.setattr(master, "_all_logits", every_position)
    logprobs = LogProbs(top=1)
    assert len(run(collect(generate(master, ids, SamplingParams(), 2, EOS, logprobs=logprobs)))) == 2
    assert len(logprobs.entries) == 2 and logprobs.prompt_entries is None
