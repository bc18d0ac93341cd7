"""Quantized weights (int8, int4): the stored form against the documented formula, cake's products against
transformers run on weights dequantized here (by this file's own code, from docs/quantization.md), and
greedy tokens the same for every split and for bundles written by cake-split-model --quantize."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cake.errors import CakeError, ModelError
from cake.master import Master
from cake.memory import parse_size
from cake.model import quant
from cake.model.kv_cache import Row
from cake.model.loader import load_layers
from cake.split import split_model
from cake.synthetic import make_model
from cake.tokenizer import Tokenizer
from cake.topology import load_topology
from conftest import EOS, handshake, reference_model, run, test_device
from test_pipeline import cake_generate

N = 16
GROUP = {"int8": 0, "int4": 64}  # int4 at 64: the MLP's width 160 leaves a padded last group


# ---- the documented formula, written out here (never cake's code) -------------------------------------

def ref_quantize(w: torch.Tensor, scheme: str, group: int) -> torch.Tensor:
    """w, quantized and dequantized as docs/quantization.md defines it."""
    w = w.float()
    if scheme == "int8":
        s = (w.abs().amax(dim=1) / 127).to(torch.bfloat16).float()
        s[s == 0] = 1
        return torch.round(w / s[:, None]).clamp(-127, 127) * s[:, None]
    out, k = w.shape
    padded = -(-k // group) * group
    g = torch.cat([w, w[:, -1:].expand(out, padded - k)], dim=1).view(out, -1, group)
    lo, hi = g.amin(-1), g.amax(-1)
    s = ((hi - lo) / 15).to(torch.bfloat16).float()
    z = (lo + 8 * s).to(torch.bfloat16).float()
    q = torch.round((g - z[..., None]) / torch.where(s == 0, 1, s)[..., None] + 8).clamp(0, 15)
    return ((q - 8) * s[..., None] + z[..., None]).view(out, padded)[:, :k]


def ref_dequantize_file(tensors: dict[str, torch.Tensor], base: str, scheme: str, group: int, k: int) -> torch.Tensor:
    """A matrix of a quantized bundle, dequantized from its stored tensors."""
    q, s = tensors[f"{base}.qweight"], tensors[f"{base}.scales"].float()
    if scheme == "int8":
        return q.float() * s[:, None]
    lo, hi = (q & 15).long(), (q >> 4).long()
    values = torch.stack((lo, hi), dim=-1).view(q.shape[0], -1).float()  # even column in the low nibble
    z = tensors[f"{base}.zeros"].float()
    w = (values.view(q.shape[0], -1, group) - 8) * s[..., None] + z[..., None]
    return w.view(q.shape[0], -1)[:, :k]


def dequantized_reference(model_dir: Path, scheme: str, group: int):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 2:  # every matrix: the layers' projections, the embedding and the head
                p.copy_(ref_quantize(p, scheme, group))
    return model


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """Weights 10x larger at init (std 0.2), so attention is far from uniform and int4's error moves the
    logits by whole units: a product computed on the wrong weights cannot pass."""
    return make_model(tmp_path_factory.mktemp("quant") / "model", hidden=64, intermediate=160, layers=6, heads=4,
                      kv_heads=2, seed=3, init_std=0.2)


@pytest.fixture(scope="module")
def prompt_ids(model):
    return Tokenizer(model).encode_prompt("Explain pipelines in one sentence.", "Be brief.")


_EXPECTED: dict[str, list[int]] = {}


def expected(model: Path, prompt_ids: list[int], scheme: str) -> list[int]:
    if scheme not in _EXPECTED:
        ref = dequantized_reference(model, scheme, GROUP[scheme])
        with torch.no_grad():
            out = ref.generate(torch.tensor([prompt_ids]), max_new_tokens=N, do_sample=False, eos_token_id=list(EOS),
                               pad_token_id=EOS[0], attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
        _EXPECTED[scheme] = out[0, len(prompt_ids):].tolist()
    return _EXPECTED[scheme]


def quant_args(scheme: str) -> tuple[str, ...]:
    return ("--quantize", scheme, "--group-size", str(GROUP[scheme] or 32))


# ---- the stored form ----------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_stored_form_is_the_documented_formula(scheme):
    torch.manual_seed(0)
    w = torch.randn(48, 100) * torch.linspace(0.01, 3, 48)[:, None]  # rows of very different ranges
    w[5] = 0  # an all-zero row
    w[7, :32] = 1.5  # a constant group (int4)
    q = quant.quantize(w, scheme, 32)
    got = ref_dequantize_file({"w.qweight": q.qweight, "w.scales": q.scales, "w.zeros": q.zeros}, "w", scheme, 32, 100)
    assert torch.equal(got, ref_quantize(w, scheme, 32))
    assert torch.equal(q.dequantize(), got)
    step = q.scales.float() if scheme == "int8" else q.scales.float().repeat_interleave(32, dim=1)[:, :100].T
    err = (got - w).abs()
    assert (err <= 0.51 * (step[:, None] if scheme == "int8" else step.T) + 1e-6).all()  # at most half a step
    assert torch.equal(got[5], torch.zeros(100))
    assert scheme == "int8" or torch.equal(got[7, :32], torch.full((32,), 1.5))
    if scheme == "int4":
        assert q.qweight.shape == (48, 64) and q.scales.shape == (48, 4)  # 100 columns: 4 groups, the last padded


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_products_equal_the_dequantized_matrix_for_every_batch(scheme, dtype):
    """Whatever kernel the node chose (torch's, or dequantized blocks), for 1, 3 and 9 rows, and for the 40
    of a prompt (which may take the other way: quant.MANY_ROWS)."""
    torch.manual_seed(1)
    w = torch.randn(96, 256)
    q = quant.quantize(w, scheme, 32)
    lin = quant.QuantLinear(q, torch.device("cpu"), dtype)
    deq = ref_quantize(w, scheme, 32)
    for rows in (1, 3, 9, 40):
        x = torch.randn(rows, 256).to(dtype)
        want = x.float() @ deq.T
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        assert torch.allclose(lin(x).float(), want, atol=tol * float(want.abs().max()), rtol=0), (lin.kernel_name, rows)
    assert lin.nbytes < w.numel() * (1.1 if scheme == "int8" else 0.8)  # (int4 keeps f32 scales for f32 products)


# ---- against transformers on the dequantized weights ---------------------------------------------------

@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_master_matches_transformers_on_dequantized_weights(scheme, model, prompt_ids):
    group = GROUP[scheme] or 32
    master = Master(model, load_topology(None), device=test_device(), dtype="f32", quantize=scheme, group_size=group)
    ref = dequantized_reference(model, scheme, group)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        want = ref(ids).logits[0]
    cache = master.stack.new_cache()
    hidden = master.stack.forward(master.head.embed(ids.to(master.device)), [Row(cache, 0)], 0, 6)
    prompt = master.head.logits(hidden)[0].cpu()
    steps = []  # the same positions again, one token at a time: the decode path
    cache = master.stack.new_cache()
    for pos, t in enumerate(prompt_ids):
        h = master.stack.forward(master.head.embed(torch.tensor([[t]], device=master.device)), [Row(cache, pos)], 0, 6)
        steps.append(master.head.logits(h)[0, 0].cpu())
    # f32 products of the same weights in another order: 1e-4 of the logits' scale (they reach ~10 here).
    scale = float(want.abs().max())
    assert (prompt - want).abs().max() < 1e-4 * scale
    assert (torch.stack(steps) - want).abs().max() < 1e-4 * scale
    with torch.no_grad():
        full = reference_model(model)(ids).logits[0]
    assert (full - want).abs().max() > 100 * 1e-4 * scale  # unquantized weights would fail this test
    assert run(cake_generate(model, None, prompt_ids, n=N, master=master)) == expected(model, prompt_ids, scheme)


# ---- split invariance, through real workers ------------------------------------------------------------

LAYOUTS = {
    "one-worker": {"w": ["model.layers.0-5"]},
    "two-workers": {"a": ["model.layers.0-2"], "b": ["model.layers.3-5"]},
    "ranges-with-master-between": {"a": ["model.layers.0-1", "model.layers.4"], "b": ["model.layers.5"]},
}


async def _generate(model, topology, prompt_ids, scheme):
    group = GROUP[scheme] or 32
    master = Master(model, load_topology(topology), device=test_device(), quantize=scheme, group_size=group)
    try:
        return await cake_generate(model, topology, prompt_ids, n=N, master=master)
    finally:
        await master.close()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_every_split_gives_the_same_tokens(scheme, layout, model, prompt_ids, cluster):
    c = cluster(model, LAYOUTS[layout], extra=quant_args(scheme))
    assert run(_generate(model, c.topology, prompt_ids, scheme)) == expected(model, prompt_ids, scheme)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_bundles_hold_the_documented_form_and_give_the_same_tokens(scheme, model, prompt_ids, cluster,
                                                                              tmp_path):
    group = GROUP[scheme] or 32
    layout = LAYOUTS["two-workers"]
    c = cluster(model, layout, start=False)
    bundles = split_model(model, c.topology, tmp_path / "bundles", quiet=True, quantize=scheme, group_size=group)
    # The bundle's bytes, read with safetensors and dequantized here, are the formula's.
    files = sorted((tmp_path / "bundles" / "a").glob("*.safetensors"))
    tensors, meta = {}, {}
    for f in files:
        with safe_open(f, "pt") as st:
            meta.update(st.metadata())
            tensors.update({k: st.get_tensor(k) for k in st.keys()})
    assert meta["cake.quantization"] == scheme and meta["cake.format_version"] == "1"
    assert "model.layers.0.mlp.down_proj.weight" not in tensors
    with safe_open(model / "model.safetensors", "pt") as st:
        for base, k in (("model.layers.1.mlp.down_proj", 160), ("model.layers.0.self_attn.k_proj", 64)):
            w = st.get_tensor(base + ".weight")
            assert torch.equal(ref_dequantize_file(tensors, base, scheme, group, k), ref_quantize(w, scheme, group))
        norm = "model.layers.0.input_layernorm.weight"
        assert torch.equal(tensors[norm], st.get_tensor(norm))  # norms are copied as they are
    c.models = {name: b for name, b in zip(layout, bundles)}
    c.extra = ()  # the bundle says how its weights are kept
    c.start_all()
    assert run(_generate(model, c.topology, prompt_ids, scheme)) == expected(model, prompt_ids, scheme)

    async def info():
        _, writer, i = await handshake(c.ports["a"])
        writer.close()
        return i
    i = run(info())
    want = sum(t.numel() * t.element_size() for t in tensors.values())  # the bundle's own bytes
    # An f32 node may hold its scales (and int4 zeros) as f32 for torch's kernel: up to twice their bytes.
    scales = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.endswith((".scales", ".zeros")))
    label = "int8" if scheme == "int8" else f"int4 (group {group})"
    assert i.quantization == label and want <= i.weight_bytes <= want + scales


def test_a_bundle_started_with_another_quantize_is_one_line(model, tmp_path):
    topo = tmp_path / "t.yml"
    topo.write_text("a:\n  host: '127.0.0.1:1'\n  layers:\n    - 'model.layers.0-1'\n")
    (bundle,) = split_model(model, topo, tmp_path / "b", quiet=True, quantize="int4")
    r = subprocess.run([sys.executable, "-m", "cake", "--mode", "worker", "--model", str(bundle), "--name", "a",
                        "--quantize", "int8"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "holds int4 (group 32) weights, not int8" in r.stderr
    stack, _ = load_layers(bundle, [0, 1], "cpu", "f32", 64, quantize="int4")  # the same scheme is accepted
    assert str(stack.quantization) == "int4 (group 32)"


def _rewrite(bundle: Path, change) -> Path:
    """Rewrite the bundle's file holding layer 0, with change(tensors, metadata) applied."""
    index = json.loads((bundle / "model.safetensors.index.json").read_text())
    fname = bundle / index["weight_map"]["model.layers.0.self_attn.q_proj.qweight"]
    with safe_open(fname, "pt") as st:
        meta, tensors = dict(st.metadata()), {k: st.get_tensor(k) for k in st.keys()}
    change(tensors, meta)
    save_file(tensors, fname, meta)
    return fname


@pytest.mark.parametrize("damage,message", [
    (lambda t, m: t.update({"model.layers.0.self_attn.q_proj.scales": torch.zeros(5, dtype=torch.bfloat16)}),
     "model.layers.0.self_attn.q_proj'.scales is bfloat16 [5], expected bfloat16 [64, 2]"),
    (lambda t, m: t.update({"model.layers.0.mlp.up_proj.qweight": t["model.layers.0.mlp.up_proj.qweight"].to(
        torch.int16)}), "model.layers.0.mlp.up_proj'.qweight is int16"),
    (lambda t, m: t.pop("model.layers.0.mlp.down_proj.zeros"), "'model.layers.0.mlp.down_proj.zeros'"),
    (lambda t, m: m.update({"cake.format_version": "99"}), "of format version '99'; this cake reads version 1"),
])
def test_a_corrupt_quantized_bundle_is_one_error_naming_file_and_tensor(damage, message, model, tmp_path):
    topo = tmp_path / "t.yml"
    topo.write_text("a:\n  host: '127.0.0.1:1'\n  layers:\n    - 'model.layers.0-1'\n")
    (bundle,) = split_model(model, topo, tmp_path / "b", quiet=True, quantize="int4")
    fname = _rewrite(bundle, damage)
    with pytest.raises(ModelError) as e:
        load_layers(bundle, [0, 1], "cpu", "f32", 64)
    assert message in str(e.value) and (str(fname) in str(e.value) or str(bundle) in str(e.value))
    assert "\n" not in str(e.value)


# ---- what a node says, and what it refuses before loading ---------------------------------------------

def test_check_shows_each_workers_quantization_and_weight_bytes(model, cluster):
    from click.testing import CliRunner

    from cake.cli import main

    c = cluster(model, LAYOUTS["two-workers"], extra=quant_args("int8"))
    c.extras = {}
    ok = CliRunner().invoke(main, ["--model", str(model), "--topology", str(c.topology), "--check"])
    assert ok.exit_code == 0, ok.output
    # 3 layers of int8 matrices (43008 weights and a bf16 scale per row) and f32 norms (2 x 64 x 4 bytes)
    layer = 43008 + 2 * (64 + 32 + 32 + 64 + 160 + 160 + 64) + 2 * 64 * 4
    assert f"a (127.0.0.1:{c.ports['a']}): ok, layers 0-2 on {test_device()} (f32, int8), context" in ok.stdout
    assert f"weights {3 * layer / 1e6:.1f} MB" in ok.stdout


@pytest.mark.parametrize("cap,fix", [("100KB", "--quantize int8 would fit (0.1 MB)"),
                                     ("60KB", "--quantize int4 would fit (0.1 MB)"),
                                     ("1KB", "give this node fewer layers, or more memory")])
def test_a_share_over_max_memory_is_refused_before_loading(cap, fix, model, tmp_path):
    from cake import launch

    topo = tmp_path / "t.yml"
    topo.write_text(f"a:\n  host: '127.0.0.1:{launch.free_port()}'\n  layers:\n    - 'model.layers.0-1'\n")
    r = subprocess.run([sys.executable, "-m", "cake", "--mode", "worker", "--model", str(model), "--name", "a",
                        "--topology", str(topo), "--max-memory", cap], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "loaded" not in r.stderr
    # 2 layers of 43008 f32 weights and two norms of 64: 0.345 MB
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: this node's decoder layers (2 layer(s)) need 0.3 MB as f32, but only "
        f"{parse_size(cap) / 1e6:.1f} MB is allowed by --max-memory; {fix}")


def test_sizes_people_type():
    assert parse_size("8GB") == 8 * 10**9 and parse_size("500MB") == 500 * 10**6 and parse_size("12mb") == 12 * 10**6
    assert parse_size("1.5GiB") == 3 * 2**29 and parse_size("0") == 0 and parse_size("64 MiB") == 64 * 2**20
    with pytest.raises(CakeError, match="--max-memory 'lots' is not a size; write it like 8GB"):
        parse_size("lots")
