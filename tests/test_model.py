"""The plain-torch Llama 3 against transformers on the same weights, in-process."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from cake.errors import ModelError
from cake.model.config import LlamaConfig, load_config, load_eos_ids
import torch.nn.functional as F

from cake.model.cuda_graphs import Captured, DecodeGraphs
from cake.model.kernels import _add_inside_mv, add_linear, linear
from cake.model.kv_cache import KVCache, Row
from cake.model.rope import rope_inv_freq, rope_rotations, rope_swap, rope_table
from cake.model.loader import load_head, load_layers, resolve_context
from conftest import reference_model


def run_model(path, ids: torch.Tensor, dtype="f32", chunks=(None,)):
    stack, config = load_layers(path, list(range(load_config(path).num_hidden_layers)), "cpu", dtype, 512)
    head = load_head(path, config, stack.device, stack.dtype)
    cache = stack.new_cache()
    out = []
    bounds = [0, *[c for c in chunks if c], ids.shape[1]]
    for a, b in zip(bounds, bounds[1:]):
        h = stack.forward(head.embed(ids[:, a:b]), [Row(cache, a)], 0, len(stack.layers))
        out.append(head.logits(h))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("which", ["tiny_model", "tied_model"])
def test_prefill_and_chunked_logits_match(which, request):
    path = request.getfixturevalue(which)
    ids = torch.randint(0, 128000, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = reference_model(path)(ids).logits
    assert torch.allclose(run_model(path, ids), want, atol=1e-4, rtol=0)
    # a prompt in chunks (cached prefix + causal chunk) and single-token decode steps
    assert torch.allclose(run_model(path, ids, chunks=(7, 30, 31, 32)), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("rows", [2, 5])  # 5: the batched-decode kernel path (4+ rows)
def test_batched_rows_at_different_positions(tiny_model, rows):
    stack, config = load_layers(tiny_model, list(range(6)), "cpu", "f32", 256)
    head = load_head(tiny_model, config, stack.device, stack.dtype)
    ids = torch.randint(0, 128000, (rows, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = reference_model(tiny_model)(ids).logits
    caches = [stack.new_cache() for _ in range(rows)]
    lengths = [20 - 3 * r for r in range(rows)]
    for r in range(rows):
        stack.forward(head.embed(ids[r:r + 1, :lengths[r]]), [Row(caches[r], 0)], 0, 6)
    step = torch.stack([ids[r, lengths[r]:lengths[r] + 1] for r in range(rows)])
    h = stack.forward(head.embed(step), [Row(caches[r], lengths[r]) for r in range(rows)], 0, 6)
    got = head.logits(h[:, -1])
    for r in range(rows):
        assert torch.allclose(got[r], want[r, lengths[r]], atol=1e-4, rtol=0)


def test_bf16_tracks_f32(tiny_model):
    ids = torch.randint(0, 128000, (1, 16), generator=torch.Generator().manual_seed(5))
    f32 = run_model(tiny_model, ids)
    bf16 = run_model(tiny_model, ids, dtype="bf16")
    assert bf16.dtype == torch.float32  # logits are always handed out in f32
    assert (bf16 - f32).abs().max() < 0.05 * f32.abs().max()


def test_config_4x_spelling_reads_the_same(tiny_model, tmp_path):
    d = json.loads((tiny_model / "config.json").read_text())
    rope = d.pop("rope_parameters")
    d["rope_theta"] = rope.pop("rope_theta")
    d["rope_scaling"] = rope
    d.pop("head_dim")
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert load_config(tmp_path) == load_config(tiny_model)


def test_rope_matches_transformers(tiny_model):
    from transformers import LlamaConfig as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = HFConfig.from_pretrained(tiny_model)
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    assert torch.allclose(rope_inv_freq(load_config(tiny_model)), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_as_rotation_matrix_equals_elementwise_rope(tiny_model, dtype):
    """Decode steps rotate with one matrix product per layer; it must be the same rotation at every position."""
    config = load_config(tiny_model)
    hd = config.head_dim
    cos, sin = rope_table(config, 300, torch.device("cpu"))
    cos, sin = cos.to(dtype), sin.to(dtype)
    x = torch.randn(300, 6, hd, generator=torch.Generator().manual_seed(8)).to(dtype)
    rot = rope_rotations(cos, sin, torch.eye(hd, dtype=dtype), rope_swap(hd, dtype, torch.device("cpu")))
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    # transformers' own rotation of the same vectors (not cake's apply_rope): x [positions, heads, hd]
    want, _ = apply_rotary_pos_emb(x.float(), x.float(), cos.float(), sin.float(), unsqueeze_dim=1)
    tol = 1e-6 if dtype == torch.float32 else 2e-2  # bf16: one rounding against the elementwise three
    assert torch.allclose(torch.bmm(x, rot).float(), want, atol=tol * want.abs().max(), rtol=0)


@pytest.mark.parametrize("shape, out, kernel", [((1, 96), 80, "mv"), ((1, 1, 96), 80, "mv"), ((2, 96), 80, ""),
                                                ((2, 96), 11000, "mm"), ((4, 1, 96), 11000, "mm"),
                                                ((24, 96), 11000, "mm"), ((40, 96), 11000, "")])
def test_few_bf16_rows_take_faster_kernels_with_the_same_result(shape, out, kernel, monkeypatch):
    """On the CPU, one bf16 row goes through torch.mv or addmv and a few rows of a large matrix through
    W @ x^T (both faster there than F.linear), with F.linear's and addmm's result, with and without a
    bias or a residual; many rows, and a few rows of a small matrix, keep F.linear. (Bit for bit on the
    x86 CPUs measured; other CPUs' kernels may sum in another order, hence one bf16 step of slack.)"""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=g).bfloat16()
    rows = x.numel() // 96
    w, b = torch.randn(out, 96, generator=g).bfloat16(), torch.randn(out, generator=g).bfloat16()
    residual = torch.randn(rows, out, generator=g).bfloat16()
    addmm = torch.addmm
    one_row = ["mv", "addmv", "addmv"] if _add_inside_mv() else ["mv", "mv", "mv"]  # as timed on this CPU
    calls = []
    for name in ("mv", "addmv", "mm", "addmm"):
        fn = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, fn=fn, name=name: calls.append(name) or fn(*a))

    def same(got: torch.Tensor, want: torch.Tensor) -> bool:
        return got.shape == want.shape and got.dtype == want.dtype and torch.allclose(
            got.float(), want.float(), rtol=2 ** -7, atol=2 ** -7 * want.float().abs().max().item())

    assert same(linear(x, w), F.linear(x, w))
    assert same(linear(x, w, b), F.linear(x, w, b))
    assert same(add_linear(residual, x.reshape(rows, 96), w, None), addmm(residual, x.reshape(rows, 96), w.t()))
    assert calls == {"mv": one_row, "mm": ["mm", "addmm", "addmm"], "": ["addmm"]}[kernel]


def test_eos_ids_from_generation_config(tiny_model):
    assert set(load_eos_ids(tiny_model, load_config(tiny_model))) == {128001, 128009}


def test_generation_config_eos_ids_replace_config_json_ones(tiny_model, tmp_path):
    """As in transformers' generate: config.json's EOS ids count only where generation_config.json names none."""
    (tmp_path / "config.json").write_text(json.dumps({**json.loads((tiny_model / "config.json").read_text()),
                                                      "eos_token_id": 280}))
    config = load_config(tmp_path)
    assert load_eos_ids(tmp_path, config) == (280,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True}))
    assert load_eos_ids(tmp_path, config) == (280,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [425, 500]}))
    assert load_eos_ids(tmp_path, config) == (425, 500)


def test_context_is_capped_by_the_model():
    c = LlamaConfig(64, 128, 2, 4, 2, 16, 100, max_position_embeddings=1024)
    assert resolve_context(c, None) == 1024 and resolve_context(c, 100) == 100


def test_missing_tensor_is_named(tiny_model, tmp_path):
    for f in tiny_model.iterdir():
        shutil.copy2(f, tmp_path / f.name)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ModelError, match="tensor 'model.layers.2.mlp.up_proj.weight' is not in"):
        load_layers(tmp_path, [1, 2], "cpu", "f32", 64)
    load_layers(tmp_path, [1, 3], "cpu", "f32", 64)  # other layers still load


def test_conversion_on_load_goes_in_blocks_and_is_exact(tiny_model, monkeypatch):
    """A tensor stored in another dtype is read and converted a block of rows at a time (so a node never
    holds a whole stored copy next to the converted one), with torch's own conversion's result."""
    from safetensors.torch import load_file

    from cake.model import weights

    stored = load_file(tiny_model / "model.safetensors")
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"]
    reads = []
    read = weights._read_into
    monkeypatch.setattr(weights, "_read_into", lambda path, start, out: reads.append(out.nbytes) or read(path, start, out))
    monkeypatch.setattr(weights, "CONVERT_CHUNK", 10_000)
    got = weights.WeightFiles(tiny_model).load(names, torch.bfloat16, torch.device("cpu"))
    for n in names:
        assert got[n].dtype == torch.bfloat16 and torch.equal(got[n], stored[n].to(torch.bfloat16)), n
    assert max(reads) <= 10_000 and len(reads) > stored[names[0]].nbytes // 10_000


def test_bad_model_folder_errors(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_config(tmp_path)


def test_bf16_checkpoint_converts_on_load(tmp_path):
    from cake.synthetic import make_model

    path = make_model(tmp_path / "bf16", hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, seed=3,
                      dtype="bfloat16")
    assert load_config(path).torch_dtype == "bfloat16"
    stack, _ = load_layers(path, [0, 1], "cpu", "auto", 64)
    assert stack.dtype == torch.bfloat16 and stack.layers[0].wqkv.dtype == torch.bfloat16  # auto keeps bf16 on CPU
    ids = torch.randint(0, 128000, (1, 12), generator=torch.Generator().manual_seed(6))
    from transformers import LlamaForCausalLM

    with torch.no_grad():
        want = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(ids).logits
    assert torch.allclose(run_model(path, ids), want, atol=1e-4, rtol=0)  # f32 from a bf16 file


def test_truncated_or_corrupt_weights_are_named(tiny_model, tmp_path):
    for f in tiny_model.iterdir():
        shutil.copy2(f, tmp_path / f.name)
    st = tmp_path / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="ends early; the file is truncated"):
        load_layers(tmp_path, [5], "cpu", "f32", 64)
    st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ModelError, match="corrupt safetensors header"):
        load_layers(tmp_path, [0], "cpu", "f32", 64)


def _decode_steps(path, device: str, steps: range, fixed_shape: bool):
    """Logits of one-token steps at positions `steps` after an eager prefill, through the fixed-shape
    step (what a CUDA graph records) or through LayerStack.forward (which replays graphs on CUDA)."""
    from cake.model.cuda_graphs import span_for

    stack, config = load_layers(path, list(range(load_config(path).num_hidden_layers)), device, "f32", 1024)
    head = load_head(path, config, stack.device, stack.dtype)
    ids = torch.randint(0, 128000, (1, steps.stop), generator=torch.Generator().manual_seed(8)).to(stack.device)
    n = len(stack.layers)
    cache = (KVCache(stack.indices, config, stack.capacity, stack.dtype, stack.device, zeroed=True)
             if fixed_shape else stack.new_cache())
    with torch.inference_mode():
        stack.forward(head.embed(ids[:, :steps.start]), [Row(cache, 0)], 0, n)
        out = []
        for p in steps:
            x = head.embed(ids[:, p:p + 1])
            if fixed_shape:
                pos = torch.tensor([p], device=stack.device)
                h = stack.decode_static(x, [cache], pos, 0, n, span_for(p + 1, stack.capacity))
            else:
                h = stack.forward(x, [Row(cache, p)], 0, n)
            out.append(head.logits(h)[0, -1].cpu())
    return torch.stack(out), ids.cpu(), cache


def test_fixed_shape_decode_step_matches_transformers(tiny_model):
    """The step CUDA graphs replay, run eagerly on the CPU: position in a tensor, keys written with
    index_copy_, attention over a masked span (crossing from 256 to 512 positions here)."""
    steps = range(250, 262)
    got, ids, cache = _decode_steps(tiny_model, "cpu", steps, fixed_shape=True)
    with torch.no_grad():
        want = reference_model(tiny_model)(ids).logits[0, steps.start:steps.stop]
    assert torch.allclose(got, want, atol=1e-4, rtol=0)


def test_cuda_graph_decode_matches_transformers(tiny_model):
    from conftest import test_device

    if not test_device().startswith("cuda"):
        pytest.skip("needs --device cuda")
    steps = range(250, 262)
    got, ids, cache = _decode_steps(tiny_model, test_device(), steps, fixed_shape=False)
    assert {span for (_, _, span) in cache.graphs} == {256, 512}  # the steps were replayed graphs
    assert cache.lengths == [steps.stop] * len(cache.lengths)
    with torch.no_grad():
        want = reference_model(tiny_model)(ids).logits[0, steps.start:steps.stop]
    assert torch.allclose(got, want, atol=1e-4, rtol=0)


class EagerGraphs(DecodeGraphs):
    """DecodeGraphs whose captures record nothing: replaying one runs the fixed-shape step eagerly. A GPU
    node's bookkeeping (what is captured, kept, replayed and forgotten; cache lengths) on a CPU."""

    def _capture(self, hidden, caches, positions, start, end, span):
        s = self.stack
        x = hidden.to(device=s.device, dtype=s.dtype).clone()
        pos, out = torch.tensor(positions, device=s.device), torch.empty_like(x)
        step = SimpleNamespace(replay=lambda: out.copy_(s.decode_static(x, caches, pos, start, end, span)))
        return Captured(step, x, pos, out)


@pytest.mark.parametrize("replay", [False, True])
def test_graph_decode_of_batches_and_single_rows(tiny_model, replay):
    """Batches of one-token rows and single rows through DecodeGraphs: spans, the batched step (products
    shared, attention per row), a batch's graph captured the second time it is stepped, cache lengths,
    and an ended session's cache reused by the next one. replay=False replays the fixed-shape step
    eagerly on the CPU (EagerGraphs); replay=True captures CUDA graphs (with --device cuda)."""
    from conftest import test_device

    if replay and not test_device().startswith("cuda"):
        pytest.skip("needs --device cuda")
    stack, config = load_layers(tiny_model, list(range(6)), test_device() if replay else "cpu", "f32", 1024)
    stack.graphs = DecodeGraphs(stack) if replay else EagerGraphs(stack)
    head = load_head(tiny_model, config, stack.device, stack.dtype)
    ids = torch.randint(0, 128000, (4, 270), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = reference_model(tiny_model)(ids).logits
    caches = [stack.new_cache() for _ in range(3)]
    assert all(bool((c.k == 0).all()) for c in caches)  # zeroed: masked attention reads unwritten positions
    lengths = [254, 100, 7]
    with torch.inference_mode():
        ids = ids.to(stack.device)
        for r in range(3):
            stack.forward(head.embed(ids[r:r + 1, :lengths[r]]), [Row(caches[r], 0)], 0, 6)
        for step in range(4):  # rows cross the 256 span while batched; then one row alone
            rows = [Row(caches[r], lengths[r] + step) for r in range(3)]
            x = head.embed(torch.stack([ids[r, lengths[r] + step:lengths[r] + step + 1] for r in range(3)]))
            got = head.logits(stack.forward(x, rows, 0, 6)[:, -1]).cpu()
            for r in range(3):
                assert torch.allclose(got[r], want[r, lengths[r] + step], atol=1e-4, rtol=0)
        p = lengths[0] + 4
        one = head.logits(stack.forward(head.embed(ids[:1, p:p + 1]), [Row(caches[0], p)], 0, 6)[:, -1]).cpu()
        assert torch.allclose(one[0], want[0, p], atol=1e-4, rtol=0)
        assert caches[0].lengths == [p + 1] * 6 and caches[2].lengths == [lengths[2] + 4] * 6
        serials = tuple(c.serial for c in caches)
        # Spans 256 and 512 each: stepped eagerly once, then captured.
        assert set(stack.graphs.batched) == {(0, 6, 256, serials), (0, 6, 512, serials)}

        # A new session takes the ended one's cache, emptied, graphs kept, and computes the same.
        batched = set(stack.graphs.batched)
        stack.release(caches[1])
        assert stack.spares == [caches[1]] and set(stack.graphs.batched) == batched  # same memory: still valid
        reused = stack.new_cache()
        assert reused is caches[1] and reused.lengths == [0] * 6 and bool((reused.k == 0).all())
        assert not stack.spares
        stack.forward(head.embed(ids[3:4, :20]), [Row(reused, 0)], 0, 6)
        for q in range(20, 23):
            got = head.logits(stack.forward(head.embed(ids[3:4, q:q + 1]), [Row(reused, q)], 0, 6)[:, -1]).cpu()
            assert torch.allclose(got[0], want[3, q], atol=1e-4, rtol=0)
        # The first batch again, its middle row now another session: the graph captured for these three
        # caches at span 512 replays at once over the reused one.
        pos = [p + 1, 23, lengths[2] + 4]
        x = head.embed(torch.stack([ids[r, q:q + 1] for r, q in zip((0, 3, 2), pos)]))
        got = head.logits(stack.forward(x, [Row(c, q) for c, q in zip(caches, pos)], 0, 6)[:, -1]).cpu()
        for b, (r, q) in enumerate(zip((0, 3, 2), pos)):
            assert torch.allclose(got[b], want[r, q], atol=1e-4, rtol=0)
        # The same three sessions in another order: rows come back in the order asked, and the batch's
        # graph replays (no new one).
        keys = set(stack.graphs.batched)
        order = [2, 0, 1]
        pos = [pos[i] + 1 for i in range(3)]
        x = head.embed(torch.stack([ids[(0, 3, 2)[i], pos[i]:pos[i] + 1] for i in order]))
        got = head.logits(stack.forward(x, [Row(caches[i], pos[i]) for i in order], 0, 6)[:, -1]).cpu()
        for b, i in enumerate(order):
            assert torch.allclose(got[b], want[(0, 3, 2)[i], pos[i]], atol=1e-4, rtol=0)
        assert set(stack.graphs.batched) == keys


def test_caches_are_kept_for_reuse_only_with_graphs(tiny_model):
    """Without CUDA graphs an ended session's cache is freed, not kept; with them at most MAX_SPARES are."""
    from cake.model.stack import MAX_SPARES

    stack, _ = load_layers(tiny_model, [0, 1], "cpu", "f32", 64)
    stack.release(stack.new_cache())
    assert stack.spares == []
    stack.graphs = EagerGraphs(stack)
    caches = [stack.new_cache() for _ in range(MAX_SPARES + 2)]
    for c in caches:
        stack.release(c)
    assert stack.spares == caches[:MAX_SPARES]
    assert stack.drop_spares() == MAX_SPARES * caches[0].nbytes and stack.spares == []


def test_failed_cuda_graph_capture_falls_back_to_eager(tiny_model, caplog):
    """A step that cannot be captured (here: a host sync inside it) is computed eagerly, graphs are
    turned off with one warning, and the process's CUDA state stays usable (stream, allocator)."""
    from conftest import test_device

    if not test_device().startswith("cuda"):
        pytest.skip("needs --device cuda")
    stack, config = load_layers(tiny_model, list(range(6)), test_device(), "f32", 512)
    head = load_head(tiny_model, config, stack.device, stack.dtype)
    real = stack.decode_static

    def syncs_when_captured(x, caches, pos, start, end, span):
        if torch.cuda.is_current_stream_capturing():
            pos.item()  # not allowed while capturing
        return real(x, caches, pos, start, end, span)

    stack.decode_static = syncs_when_captured
    ids = torch.randint(0, 128000, (1, 12), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        want = reference_model(tiny_model)(ids).logits[0, -1]
    cache = stack.new_cache()
    with torch.inference_mode():
        d = ids.to(stack.device)
        stack.forward(head.embed(d[:, :11]), [Row(cache, 0)], 0, 6)
        got = head.logits(stack.forward(head.embed(d[:, 11:]), [Row(cache, 11)], 0, 6))[0, -1].cpu()
    assert torch.allclose(got, want, atol=1e-4, rtol=0)
    assert not stack.graphs.active and "CUDA graph capture failed" in caplog.text
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    torch.cuda.empty_cache()  # asserts inside the allocator if the failed capture were left open


def test_worker_kv_budget_counts_kept_caches(tiny_model):
    """A worker with CUDA graphs keeps ended sessions' caches for new sessions; they count toward
    --kv-budget, a new session takes one instead of allocating, and eviction still holds the budget."""
    import asyncio

    from cake import wire
    from cake.worker import Conn, Worker

    stack, config = load_layers(tiny_model, [0, 1], "cpu", "f32", 64)
    stack.graphs = EagerGraphs(stack)  # the bookkeeping of a GPU worker, on the CPU
    worker = Worker("w", stack, config, kv_budget=2 * stack.new_cache_bytes())
    a, b = worker.store.cache(1, "a", 0, 0, 2), worker.store.cache(1, "b", 0, 0, 2)
    assert asyncio.run(worker._dispatch(Conn(1, "t", None), wire.End(["a"]), None, "test"))[0] == wire.Ok()
    assert stack.spares == [a]
    c = worker.store.cache(1, "c", 0, 0, 2)
    assert c is a and not stack.spares and set(worker.sessions) == {(1, "b"), (1, "c")}
    d = worker.store.cache(1, "d", 0, 0, 2)  # over budget: b (least recently used) goes, d takes its memory
    assert d is b and set(worker.sessions) == {(1, "c"), (1, "d")} and not stack.spares
    assert worker.store.free_connection(1) == 2 and len(stack.spares) == 2
    assert sum(x.nbytes for x in stack.spares) <= worker.kv_budget


def test_worker_never_evicts_a_session_of_the_batch_it_serves(tiny_model):
    """At its KV budget, a worker making room for a new session of a batch evicts an idle session before
    another row of that batch, and a row it must evict keeps its own cache for this step (never handed to
    another row): every row's output is exact, and the evicted session is replayed on its next step.
    With kept caches (the GPU bookkeeping, on the CPU) and without."""
    import asyncio

    from cake import wire
    from cake.worker import Conn, Worker

    ids = torch.randint(0, 128000, (3, 24), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        want = reference_model(tiny_model)(ids).logits
    for keep_caches in (False, True):
        stack, config = load_layers(tiny_model, list(range(6)), "cpu", "f32", 64)
        if keep_caches:
            stack.graphs = EagerGraphs(stack)
        head = load_head(tiny_model, config, stack.device, stack.dtype)
        worker = Worker("w", stack, config, kv_budget=2 * stack.new_cache_bytes())

        def forward(rid, sessions, positions, x):
            return asyncio.run(worker._dispatch(Conn(1, "t", None), wire.Forward(rid, 0, 6, sessions, positions), x, "test"))

        with torch.inference_mode():
            forward(1, ["b"], [0], head.embed(ids[1:2, :5]))  # b first: the least recently used
            forward(2, ["a"], [0], head.embed(ids[0:1, :20]))
            x = head.embed(torch.stack([ids[0, 20:21], ids[2, 0:1]]))
            reply, out = forward(3, ["a", "c"], [20, 0], x)  # c needs room: b goes, not a
            assert isinstance(reply, wire.Result) and set(worker.sessions) == {(1, "a"), (1, "c")}
            got = head.logits(out[:, -1])
            assert torch.allclose(got[0], want[0, 20], atol=1e-4, rtol=0)
            assert torch.allclose(got[1], want[2, 0], atol=1e-4, rtol=0)
            # Three rows, room for two: a row of the batch is evicted, yet each row computes on its own cache.
            x = head.embed(torch.stack([ids[0, 21:22], ids[2, 1:2], ids[1, 0:1]]))
            reply, out = forward(4, ["a", "c", "b"], [21, 1, 0], x)
            assert isinstance(reply, wire.Result) and len(worker.sessions) == 2 and not stack.spares
            got = head.logits(out[:, -1])
            for row, (r, q) in enumerate([(0, 21), (2, 1), (1, 0)]):
                assert torch.allclose(got[row], want[r, q], atol=1e-4, rtol=0)
            (gone,) = {"a", "c", "b"} - {s for _, s in worker.sessions}
            reply, _ = forward(5, [gone], [{"a": 22, "c": 2, "b": 1}[gone]], head.embed(ids[0:1, :1]))
            assert isinstance(reply, wire.Error) and reply.code == "cache_behind" and reply.cached == 0


def test_master_keeps_ended_local_caches_for_new_sessions(tiny_model, tmp_path):
    """A master's local layers with kept caches (the GPU bookkeeping, on the CPU): a session's cache is
    released when it ends and the next session reuses it; both generations match transformers."""
    import asyncio

    from cake.generate import generate
    from cake.master import Master
    from cake.sampling import SamplingParams
    from cake.topology import load_topology
    from conftest import EOS, reference_greedy

    master = Master(tiny_model, load_topology(None), device="cpu")
    master.stack.graphs = EagerGraphs(master.stack)
    prompts = [[128000, 791, 4062, 315], [128000, 40, 1093, 856, 1205, 13]]

    async def run(prompt):
        return [t async for t in generate(master, prompt, SamplingParams(), 12, EOS)]

    async def both():
        await master.connect()
        first = await run(prompts[0])
        kept = list(master.stack.spares)
        second = await run(prompts[1])
        await master.close()
        return first, kept, second

    first, kept, second = asyncio.run(both())
    assert len(kept) == 1 and master.stack.spares == kept  # taken by the second session, kept again
    assert first == reference_greedy(tiny_model, prompts[0], 12)
    assert second == reference_greedy(tiny_model, prompts[1], 12)


def test_worker_refuses_to_pass_on_non_finite_hidden_states(tiny_model):
    """Layers that overflow (here: a weight set to inf) give an error naming the worker, its layers and
    the fix, not NaN for the next node to compute on; the master's sampler refuses NaN logits too."""
    import asyncio

    from cake import wire
    from cake.errors import CakeError
    from cake.sampling import Sampler, SamplingParams
    from cake.worker import Conn, Worker

    stack, config = load_layers(tiny_model, [2, 3], "cpu", "f32", 64)
    worker = Worker("w", stack, config)
    x = torch.randn(1, 3, config.hidden_size)
    forward = wire.Forward(1, 2, 4, ["s"], [0])
    assert isinstance(asyncio.run(worker._dispatch(Conn(1, "t", None), forward, x, "test"))[0], wire.Result)
    stack.layers[3].w2.view(-1)[0] = float("inf")
    reply, out = asyncio.run(worker._dispatch(Conn(1, "t", None), wire.Forward(2, 2, 4, ["s"], [0]), x, "test"))
    assert out is None and reply.code == "non_finite" and reply.id == 2
    assert reply.message == ("worker 'w' layers 2-3 produced NaN or inf in f32; check its model files: a weight may "
                             "be corrupt")
    logits = torch.randn(128256)
    logits[777] = float("nan")
    for params in (SamplingParams(), SamplingParams(temperature=0.7, top_k=40)):
        with pytest.raises(CakeError, match="NaN or inf logits"):
            Sampler(params)(logits.clone(), [1, 2])


def test_worker_evicts_from_the_connection_that_holds_the_most_caches(tiny_model):
    """At its KV budget a worker evicts the least recently used idle session of the connection holding the
    most caches: a client that opens many sessions evicts its own before another master's."""
    from cake.worker import Worker

    stack, config = load_layers(tiny_model, [0, 1], "cpu", "f32", 64)
    worker = Worker("w", stack, config, kv_budget=3 * stack.new_cache_bytes())
    worker.store.cache(2, "x", 0, 0, 2)  # the least recently used of all
    worker.store.cache(1, "a", 0, 0, 2)
    worker.store.cache(1, "b", 0, 0, 2)
    worker.store.cache(2, "y", 0, 0, 2)  # connection 1 holds two, 2 holds one: 1's oldest goes, not x
    assert set(worker.sessions) == {(2, "x"), (1, "b"), (2, "y")}
    for s in ("z1", "z2", "z3"):  # connection 2 floods: from now on it evicts its own
        worker.store.cache(2, s, 0, 0, 2)
    assert set(worker.sessions) == {(1, "b"), (2, "z2"), (2, "z3")}


@pytest.mark.parametrize("batch, tokens, chunk", [(1, 70, 16), (2, 33, 16), (1, 17, 16), (3, 5, 4)])
def test_a_prompt_in_steps_is_the_prompt_in_one_go(tiny_model, batch, tokens, chunk):
    """forward_steps (chunks of at most `chunk` rows, one layer a step, as servers run prompts) gives
    forward()'s output and caches to float rounding, whatever the batch, including a chunk size that
    leaves a one-token tail (merged into the chunk before it)."""
    config = load_config(tiny_model)
    x = torch.randn(batch, tokens, config.hidden_size, generator=torch.Generator().manual_seed(batch * tokens))
    outs, caches = [], []
    for steps in (False, True):
        stack, _ = load_layers(tiny_model, list(range(6)), "cpu", "f32", 128)
        rows = [Row(stack.new_cache(), 0) for _ in range(batch)]
        if steps:
            got = list(stack.forward_steps(x, rows, 0, 6, chunk=chunk))
            size = max(2, chunk // batch)
            chunks = -(-tokens // size) - (tokens % size == 1 and tokens > size)
            assert got[:-1] == [None] * (6 * chunks) and got[-1] is not None
            out = got[-1]
        else:
            out = stack.forward(x, rows, 0, 6)
        outs.append(out)
        caches.append([(r.cache.k[:, :, :tokens], r.cache.v[:, :, :tokens], r.cache.lengths) for r in rows])
    assert torch.allclose(outs[0], outs[1], atol=1e-5, rtol=1e-5)  # the same sums, in other blocks
    for (k0, v0, n0), (k1, v1, n1) in zip(*caches):
        assert torch.allclose(k0, k1, atol=1e-5, rtol=1e-5) and torch.allclose(v0, v1, atol=1e-5, rtol=1e-5)
        assert n0 == n1 == [tokens] * 6
