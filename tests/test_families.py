"""Every family cake serves against its own transformers implementation: f32 logits for a prompt and decode
steps, and greedy tokens all-local, through two workers (one of them started from a cake-split-model
bundle), and for a mixture of experts, in batched concurrent sessions."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cake.master import Master
from cake.model.kv_cache import Row
from cake.split import split_model
from cake.topology import load_topology
from conftest import count_batches, run, test_device
from test_pipeline import cake_generate

N = 12
PROMPT = [3, 17, 250, 9, 41, 77, 120, 5, 64, 201, 33, 8, 150, 99, 12, 280, 7]  # 17 tokens
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=300, initializer_range=0.2)  # large weights: attention is far from uniform

# family -> (transformers classes, the config differences that exercise what the family does differently)
FAMILIES = {
    "mistral-window-linear-rope": ("Mistral", dict(sliding_window=5, rope_parameters={
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),  # a window shorter than the prompt
    "qwen2-tied-yarn": ("Qwen2", dict(tie_word_embeddings=True, max_position_embeddings=256, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64})),
    "qwen3-head-dim": ("Qwen3", dict(head_dim=32)),  # head_dim 32, not 64 / 4
    "phi3-partial-longrope": ("Phi3", dict(
        partial_rotary_factor=0.5, pad_token_id=0, eos_token_id=1, bos_token_id=2, max_position_embeddings=64,
        original_max_position_embeddings=10, rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 4.0, 8.0, 16.0]})),  # crosses 10 in decode
    "gemma3-sliding-softcap": ("Gemma3Text", dict(  # sliding and global layers, each with its own rope
        head_dim=32, sliding_window=5, sliding_window_pattern=2, query_pre_attn_scalar=24, final_logit_softcapping=30.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "gemma3-multimodal-checkpoint": ("Gemma3", dict(  # Gemma 3 4B and up: the text model of a vision model
        head_dim=32, sliding_window=6, query_pre_attn_scalar=32, tie_word_embeddings=True,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e5},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}})),
    "mixtral": ("Mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3-moe-dense-layer": ("Qwen3Moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                               norm_topk_prob=False, mlp_only_layers=[1])),
}
PROMPTS = {"phi3-partial-longrope": PROMPT[:6]}  # 6 tokens, then decode steps past the original context of 10


def build(name: str, out: Path) -> Path:
    import transformers

    kind, extra = FAMILIES[name]
    torch.manual_seed(sorted(FAMILIES).index(name))
    if kind == "Gemma3":  # a vision tower beside the text model, which alone is read
        config = transformers.Gemma3Config(
            text_config={**COMMON, **extra}, initializer_range=COMMON["initializer_range"],
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=28, patch_size=14),
            mm_tokens_per_image=4, boi_token_index=290, eoi_token_index=291, image_token_index=292)
        transformers.Gemma3ForConditionalGeneration(config).eval().save_pretrained(out)
        return out
    config = getattr(transformers, f"{kind}Config")(**COMMON, **extra)
    getattr(transformers, f"{kind.removesuffix('Text')}ForCausalLM")(config).eval().save_pretrained(out)
    return out


_MODELS: dict[str, Path] = {}


@pytest.fixture
def family(request, tmp_path_factory) -> tuple[str, Path]:
    name = request.param
    if name not in _MODELS:
        _MODELS[name] = build(name, tmp_path_factory.mktemp(name) / "model")
    return name, _MODELS[name]


def reference(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def reference_greedy(model_dir: Path, prompt: list[int], n: int) -> list[int]:
    """transformers' own forward with its KV cache, token by token (no end-of-text rule to differ on)."""
    model, out = reference(model_dir), []
    with torch.no_grad():
        step = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(n):
            out.append(int(step.logits[0, -1].argmax()))
            step = model(torch.tensor([[out[-1]]]), cache=step.cache, use_cache=True)
    return out


def all_families(fn):
    return pytest.mark.parametrize("family", list(FAMILIES), indirect=True)(fn)


@all_families
def test_logits_match_transformers_for_a_prompt_and_decode_steps(family):
    name, model = family
    prompt = PROMPTS.get(name, PROMPT)
    master = Master(model, load_topology(None), device=test_device(), dtype="f32")
    layers = master.config.num_hidden_layers
    with torch.no_grad():
        want = reference(model)(torch.tensor([prompt])).logits[0]
    cache = master.stack.new_cache()
    ids = torch.tensor([prompt], device=master.device)
    got = master.head.logits(master.stack.forward(master.head.embed(ids), [Row(cache, 0)], 0, layers))[0].cpu()
    steps, cache = [], master.stack.new_cache()
    for pos, t in enumerate(prompt):
        h = master.head.embed(torch.tensor([[t]], device=master.device))
        steps.append(master.head.logits(master.stack.forward(h, [Row(cache, pos)], 0, layers))[0, 0].cpu())
    scale = float(want.abs().max())
    assert (got - want).abs().max() < 1e-4 * scale
    assert (torch.stack(steps) - want).abs().max() < 1e-4 * scale


@all_families
def test_greedy_tokens_all_local_and_through_workers_one_from_a_bundle(family, cluster, tmp_path):
    name, model = family
    prompt = PROMPTS.get(name, PROMPT)
    want = reference_greedy(model, prompt, N)
    assert run(cake_generate(model, None, prompt, n=N)) == want
    c = cluster(model, {"a": ["model.layers.0-1"], "b": ["model.layers.2"]}, start=False)
    bundles = split_model(model, c.topology, tmp_path / "bundles", quiet=True)
    c.models = {"b": bundles[1]}  # a from the full folder, b from its bundle
    c.start_all()
    assert run(cake_generate(model, c.topology, prompt, n=N)) == want


@pytest.mark.parametrize("family", ["mixtral", "qwen3-moe-dense-layer"], indirect=True)
def test_batched_sessions_of_a_mixture_of_experts_equal_their_solo_answers(family, cluster):
    name, model = family
    c = cluster(model, {"a": ["model.layers.1-2"]})
    prompts, lengths = [PROMPT, PROMPT[5:9], PROMPT[2:]], [N, 5, 9]

    async def go():
        master = Master(model, load_topology(c.topology), device=test_device())
        await master.connect()
        batches = count_batches(master)
        try:
            return await asyncio.gather(*(cake_generate(model, None, p, n, master=master)
                                          for p, n in zip(prompts, lengths))), batches
        finally:
            await master.close()

    outs, batches = run(go())
    assert max(batches) == 3
    for p, n, out in zip(prompts, lengths, outs):
        assert out == reference_greedy(model, p, n)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cake", *args], capture_output=True, text=True, timeout=120)


def test_an_unsupported_architecture_is_one_line_everywhere(tmp_path):
    model = build("mixtral", tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": ["GPTNeoXForCausalLM"]}))
    topo = tmp_path / "t.yml"
    topo.write_text("a:\n  host: '127.0.0.1:1'\n  layers:\n    - 'model.layers.0'\n")
    runs = [_cli("--mode", "worker", "--model", str(model), "--name", "a", "--topology", str(topo)),
            _cli("--model", str(model), "-p", "hi"),
            subprocess.run([sys.executable, "-m", "cake.split", "--model-path", str(model), "--topology", str(topo),
                            "--output", str(tmp_path / "b")], capture_output=True, text=True, timeout=120)]
    for r in runs:
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        line = r.stderr.strip().splitlines()[-1]
        assert line.startswith("error: config.json: architecture GPTNeoXForCausalLM is not supported; cake serves ")
        assert "Qwen3MoeForCausalLM" in line and "MistralForCausalLM" in line


def test_the_hubs_gemma3_multimodal_config_is_read_as_transformers_reads_it():
    """google/gemma-3-4b-it's config.json as published: a sparse text_config, 4.x spellings, the end ids at
    the top. Each setting cake takes from it equals transformers' Gemma3Config's text model."""
    from transformers import Gemma3Config

    from cake.model.config import LlamaConfig

    hub = {"architectures": ["Gemma3ForConditionalGeneration"], "eos_token_id": [1, 106], "model_type": "gemma3",
           "torch_dtype": "bfloat16", "image_token_index": 262144, "mm_tokens_per_image": 256,
           "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                           "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                           "sliding_window": 1024},
           "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                             "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                             "patch_size": 14, "vision_use_head": False}}
    ours, theirs = LlamaConfig.from_dict(hub), Gemma3Config(**hub).text_config
    rope = theirs.rope_parameters
    assert (ours.arch, ours.hidden_size, ours.num_hidden_layers, ours.intermediate_size) == ("gemma3", 2560, 34, 10240)
    assert (ours.num_attention_heads, ours.num_key_value_heads, ours.head_dim, ours.vocab_size) == (
        theirs.num_attention_heads, theirs.num_key_value_heads, theirs.head_dim, theirs.vocab_size)
    assert (ours.rope_theta, ours.local_rope_theta) == (rope["full_attention"]["rope_theta"],
                                                        rope["sliding_attention"]["rope_theta"])
    assert ours.rope_scaling == {"factor": 8.0, "rope_type": "linear"} and rope["full_attention"]["factor"] == 8.0
    assert list(ours.layer_types) == list(theirs.layer_types) and ours.sliding_window == theirs.sliding_window
    assert ours.attn_scale == theirs.query_pre_attn_scalar ** -0.5 and ours.rms_norm_eps == theirs.rms_norm_eps
    assert ours.max_position_embeddings == theirs.max_position_embeddings and ours.tie_word_embeddings
    assert ours.eos_token_ids == (1, 106) and ours.torch_dtype == "bfloat16"


def test_a_config_missing_what_its_family_needs_is_one_line(tmp_path):
    model = build("phi3-partial-longrope", tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config["rope_parameters"].pop("original_max_position_embeddings", None)
    config.pop("original_max_position_embeddings")
    (model / "config.json").write_text(json.dumps(config))
    r = _cli("--model", str(model), "-p", "hi")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "error: config.json: rope scaling 'longrope' needs original_max_position_embeddings")


@pytest.mark.parametrize("family", ["mixtral"], indirect=True)
def test_a_worker_of_another_family_is_refused_by_name(family, tmp_path, cluster):
    _, model = family
    other = build("qwen3-moe-dense-layer", tmp_path / "other")
    c = cluster(other, {"a": ["model.layers.2"]})

    async def go():
        master = Master(model, load_topology(c.topology), device=test_device())
        try:
            await master.connect()
        finally:
            await master.close()
    with pytest.raises(Exception, match="runs a qwen3_moe model, the master a mixtral one"):
        run(go())


@all_families
def test_int4_weights_match_transformers_on_the_dequantized_weights(family):
    """--quantize covers every family's matrices (the experts' too; never the routers or norms)."""
    from test_quant import ref_quantize

    name, model = family
    prompt = PROMPTS.get(name, PROMPT)
    ref = reference(model)
    with torch.no_grad():
        for pname, p in ref.named_parameters():
            if p.dim() == 2 and not pname.endswith(("block_sparse_moe.gate.weight", "mlp.gate.weight")):
                p.copy_(ref_quantize(p, "int4", 32))
            elif p.dim() == 3:  # transformers keeps a mixture's experts as [experts, out, in]
                p.copy_(torch.stack([ref_quantize(e, "int4", 32) for e in p]))
        want = ref(torch.tensor([prompt])).logits[0]
    master = Master(model, load_topology(None), device=test_device(), dtype="f32", quantize="int4")
    cache = master.stack.new_cache()
    ids = torch.tensor([prompt], device=master.device)
    hidden = master.stack.forward(master.head.embed(ids), [Row(cache, 0)], 0, master.config.num_hidden_layers)
    got = master.head.logits(hidden)[0].cpu()
    assert (got - want).abs().max() < 1e-4 * float(want.abs().max())
