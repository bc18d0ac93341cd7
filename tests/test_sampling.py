from __future__ import annotations

import pytest
import torch

from cake.errors import CakeError
from cake.sampling import (LOGPROB_ROWS, Sampler, SamplingParams, apply_repeat_penalty, token_logprobs, top_k_filter,
                           top_p_filter)


def test_greedy_is_argmax_first_of_ties():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert Sampler(SamplingParams())(logits, []) == 1
    tied = torch.zeros(128256)
    tied[[70000, 5, 128000]] = 1.0
    assert Sampler(SamplingParams())(tied, []) == int(torch.argmax(tied)) == 5
    big = torch.randn(128256)
    assert Sampler(SamplingParams())(big, []) == int(torch.argmax(big))


def test_repeat_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(50)
    history = [3, 7, 7, 49, 0]
    want = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([history]), logits.clone()[None])[0]
    got = apply_repeat_penalty(logits.clone(), history, 1.3, last_n=0)
    assert torch.allclose(got, want)
    # last_n limits the window
    only_last = apply_repeat_penalty(logits.clone(), history, 1.3, last_n=1)
    assert torch.equal(only_last[3], logits[3]) and not torch.equal(only_last[0], logits[0])


def test_top_k_and_top_p_match_transformers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(1000)
    want_k = TopKLogitsWarper(10)(None, logits.clone()[None])[0]
    assert torch.equal(torch.isinf(top_k_filter(logits.clone(), 10)), torch.isinf(want_k))
    want_p = TopPLogitsWarper(0.7)(None, logits.clone()[None])[0]
    assert torch.equal(torch.isinf(top_p_filter(logits.clone(), 0.7)), torch.isinf(want_p))


def test_top_p_keeps_at_least_one():
    logits = torch.tensor([10.0, 0.0, 0.0])
    assert (~torch.isinf(top_p_filter(logits.clone(), 0.01))).sum() == 1


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = torch.randn(5000)

    def draws(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed))
        return [sampler(logits, []) for _ in range(20)]

    assert draws(5) == draws(5)
    assert draws(5) != draws(6)


def test_sampling_respects_top_k():
    logits = torch.randn(1000)
    allowed = set(torch.topk(logits, 3).indices.tolist())
    s = Sampler(SamplingParams(temperature=2.0, top_k=3, seed=1))
    assert {s(logits, []) for _ in range(200)} <= allowed


def _folder_params(tmp_path, gen: dict, **flags) -> SamplingParams:
    import json

    from cake.run_master import MasterArgs, sampling_params

    (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    return sampling_params(MasterArgs(str(tmp_path), **flags))


def test_folder_settings_are_what_transformers_generate_uses(tmp_path):
    from transformers import GenerationConfig

    meta = {"do_sample": True, "temperature": 0.6, "top_p": 0.9}  # Meta's Llama 3 Instruct: no top_k
    p = _folder_params(tmp_path, meta)
    assert (p.temperature, p.top_p, p.repeat_penalty) == (0.6, 0.9, 1.0)
    defaults = getattr(GenerationConfig, "_get_default_generation_params", None)  # transformers 5
    assert p.top_k == (defaults()["top_k"] if defaults else GenerationConfig().top_k) == 50
    assert _folder_params(tmp_path, {**meta, "top_k": 0}).top_k == 0
    assert _folder_params(tmp_path, meta, top_k=7, repeat_penalty=1.2).top_k == 7
    greedy = _folder_params(tmp_path, {"repetition_penalty": 1.3})  # applied when greedy too
    assert (greedy.temperature, greedy.top_k, greedy.repeat_penalty, greedy.repeat_last_n) == (0.0, 0, 1.3, 0)
    assert _folder_params(tmp_path, {"repetition_penalty": 1.3}, repeat_penalty=1.0).repeat_penalty == 1.0


def test_token_logprobs_are_log_softmax_at_the_tokens_with_the_top_in_order():
    torch.manual_seed(0)
    n = LOGPROB_ROWS * 2 + 3  # rows go in blocks: cross two block boundaries
    logits = torch.randn(n, 5000) * 4
    tokens = torch.randint(0, 5000, (n,)).tolist()
    got = token_logprobs(logits.to(torch.bfloat16), tokens, top=5)  # taken in float32 whatever comes in
    want = torch.log_softmax(logits.to(torch.bfloat16).float(), dim=-1)
    assert [e.token for e in got] == tokens
    for row, t, e in zip(want, tokens, got):
        assert e.logprob == pytest.approx(row[t].item(), abs=1e-6)
        top = torch.topk(row, 5)
        assert [i for i, _ in e.top] == top.indices.tolist()
        assert [v for _, v in e.top] == pytest.approx(top.values.tolist(), abs=1e-6)
        assert all(a >= b for (_, a), (_, b) in zip(e.top, e.top[1:]))
    assert all(e.top == [] for e in token_logprobs(logits, tokens, top=0))
    assert token_logprobs(logits[:0], []) == []


def test_token_logprobs_refuse_broken_logits():
    logits = torch.randn(2, 100)
    logits[1, 7] = float("nan")
    with pytest.raises(CakeError, match="NaN or inf"):
        token_logprobs(logits, [0, 1])
