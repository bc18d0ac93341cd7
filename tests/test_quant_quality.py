"""scripts/quant_quality.py on a tiny model trained for a few seconds: the script's perplexity and agreement
against this file's own computation on weights quantized here from the documented formula, int8 close to
f32 and int4 further away, and the alternative int4 quantizers writing cake's stored form with less error."""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from test_quant import ref_dequantize_file, ref_quantize


def _load_script():
    path = Path(__file__).resolve().parent.parent / "scripts" / "quant_quality.py"
    spec = importlib.util.spec_from_file_location("quant_quality", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["quant_quality"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


qq = _load_script()
SPEC = replace(qq.Spec(), hidden=64, intermediate=172, layers=2, heads=4, kv_heads=2, vocab=512, seq=64, batch=8,
               steps=50, max_files=20)
WINDOWS = 16


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model_dir, held, corpus = qq.prepare(SPEC, tmp_path_factory.mktemp("quality"))
    finally:
        torch.set_num_threads(threads)
    return model_dir, qq.windows(held, SPEC.seq, WINDOWS), corpus


def _logits(model_dir: Path, wins: torch.Tensor, scheme: str, group: int) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and scheme != "none":
                p.copy_(ref_quantize(p, scheme, group))
        return model(wins).logits[:, :-1].float()


def _perplexity(logits: torch.Tensor, wins: torch.Tensor) -> float:
    logp = torch.log_softmax(logits.double(), -1)
    return math.exp(-float(logp.gather(-1, wins[:, 1:, None]).mean()))


def test_int8_is_close_to_f32_and_int4_further_away(trained):
    model_dir, wins, corpus = trained
    assert corpus["files"][1] > 0 and corpus["tokens"][1] >= WINDOWS * SPEC.seq  # a held-out split by file
    logits = {s: _logits(model_dir, wins, s, 32) for s in ("none", "int8", "int4")}
    ppl = {s: _perplexity(v, wins) for s, v in logits.items()}
    top = logits["none"].argmax(-1)
    agree = {s: float((v.argmax(-1) == top).float().mean()) for s, v in logits.items()}
    ref = torch.log_softmax(logits["none"].double(), -1)
    kl = {s: float((ref.exp() * (ref - torch.log_softmax(v.double(), -1))).sum(-1).mean()) for s, v in logits.items()}

    # The model learned something: far below the untrained model's perplexity (about the vocabulary's size).
    assert ppl["none"] < SPEC.vocab / 4
    # int8 per channel: within 1% of f32. int4 moves the predictions much further; on a model this weak its
    # perplexity may move either way by a fraction of a percent, so "worse" is measured as agreement and KL.
    assert abs(ppl["int8"] / ppl["none"] - 1) < 0.01
    assert agree["int8"] > 0.97 and agree["int4"] < agree["int8"]
    assert kl["int4"] > 5 * kl["int8"] > 0

    # The script measures the same things.
    results = {r.label: r for r in qq.measure(model_dir, wins, 4, groups=(32,), methods=("min/max",))}
    for label, scheme in (("none", "none"), ("int8", "int8"), ("int4 g32", "int4")):
        assert results[label].ppl == pytest.approx(ppl[scheme], rel=1e-4)
        assert results[label].top1 == pytest.approx(agree[scheme], abs=2 / top.numel())
        assert results[label].kl == pytest.approx(kl[scheme], rel=1e-3, abs=1e-7)
    # and cake's own inference gives the script's perplexity
    assert math.exp(qq.cake_nll(model_dir, wins[:4], "int4", 32)) == pytest.approx(math.exp(results["int4 g32"].sub_nll),
                                                                                   rel=1e-4)


@pytest.mark.parametrize("method", ["clip search", "HQQ"])
def test_the_alternative_int4_quantizers_write_cakes_stored_form(trained, method):
    from safetensors.torch import load_file

    model_dir, _, _ = trained
    w = load_file(model_dir / "model.safetensors")["model.layers.1.mlp.down_proj.weight"]  # 172 wide: a padded group
    for group in (32, 64):
        q = qq.METHODS[method](w, "int4", group)
        got = ref_dequantize_file({"w.qweight": q.qweight, "w.scales": q.scales, "w.zeros": q.zeros}, "w", "int4",
                                  group, w.shape[1])
        assert torch.equal(q.dequantize(), got) and got.shape == w.shape
        err = float((got - w).norm() / w.norm())
        minmax = float((ref_quantize(w, "int4", group) - w).norm() / w.norm())
        assert err < minmax * (0.97 if method == "clip search" else 1.0), (group, err, minmax)
