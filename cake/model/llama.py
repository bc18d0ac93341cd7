"""Llama 3 arithmetic in plain torch: RMSNorm, RoPE (llama3 scaling), GQA attention, SwiGLU MLP, and the
named variations other families add to that decoder (q/k norms, sliding windows, partial rotary, biases,
mixtures of experts; see LlamaConfig).

Weights are plain tensors (no nn.Module init cost for 70B-sized layers). Q/K/V and gate/up are fused into
one matrix each so a decode step does 4 matrix products per layer instead of 7. Every forward takes
a batch of rows [B, T, H]; each row is a session with its own KV cache and start position, so concurrent
sessions share one pass over the weights (the bandwidth cost) while attention stays per session.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F

from cake.model.config import LlamaConfig
from cake.model.quant import QuantLinear, Quantized
from cake.model.rope import apply_rope, long_from, rope_rotations, rope_swap, rope_table


def _onednn_linear_op():
    """oneDNN's fp32 linear, when this torch build has it and it agrees with F.linear."""
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return None
    try:
        with torch.inference_mode():
            x, w, b = torch.randn(4, 1, 8), torch.randn(6, 8), torch.randn(6)
            if torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), atol=1e-5):
                return op
    except (RuntimeError, TypeError):
        pass
    return None


_ONEDNN_LINEAR = _onednn_linear_op()


def _wants_onednn(x: torch.Tensor) -> bool:
    """Batched decode steps (4+ sessions, one position each) in f32 on the CPU: MKL's kernel slows
    sharply at four rows, oneDNN's does not (docs/benchmarks.md, CPU kernels)."""
    one_position = x.dim() == 2 or (x.dim() == 3 and x.shape[1] == 1)
    return (_ONEDNN_LINEAR is not None and one_position and x.shape[0] >= 4
            and x.dtype == torch.float32 and x.device.type == "cpu")


def _half_cpu_kernel(x: torch.Tensor, w: torch.Tensor) -> str:
    """For bf16 on the CPU, where torch's general kernel is slow for a few rows: 'mv' for one row,
    'wx' (W @ x^T) for 2-24 rows of a matrix of a million weights or more, else '' (F.linear). Both give
    F.linear's result bit for bit, so a session's logits do not depend on which others share its batch.
    Not in f16 or f32, where they are slower (docs/benchmarks.md, CPU kernels)."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" or not x.shape[-1]:
        return ""
    rows = x.numel() // x.shape[-1]
    return "mv" if rows == 1 else "wx" if rows <= 24 and w.numel() >= 1 << 20 else ""


@functools.cache
def _add_inside_mv() -> bool:
    """Whether torch.addmv beats torch.mv and a separate add for one bf16 row on this CPU, timed once on a
    2048 x 2048 matrix: on the AVX-512 Xeons measured it does, on an AVX2 EPYC it was several times
    slower (docs/benchmarks.md, CPU kernels). A separate add is also the reference's own rounding."""
    g = torch.Generator().manual_seed(0)
    w, x, c = (torch.randn(*shape, generator=g).bfloat16() for shape in ((2048, 2048), (2048,), (2048,)))

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)
    return best(lambda: torch.addmv(c, w, x)) < best(lambda: torch.mv(w, x) + c)


def _half_cpu_product(kernel: str, x: torch.Tensor, w: torch.Tensor, add: torch.Tensor | None) -> torch.Tensor:
    """x @ w^T (+ `add`: a bias [out] or a residual [rows, out], added inside the product) through the
    kernel _half_cpu_kernel chose, computed as w @ x^T."""
    out = w.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    c = None if add is None else add.reshape(-1, out).t()  # [out, 1] for a bias, [out, rows] for a residual
    if kernel == "mv":
        if c is None:
            y = torch.mv(w, x2[0])
        else:
            y = torch.addmv(c.reshape(-1), w, x2[0]) if _add_inside_mv() else torch.mv(w, x2[0]) + c.reshape(-1)
    else:
        y = torch.mm(w, x2.t()) if c is None else torch.addmm(c, w, x2.t())
    return y.reshape(out, -1).t().contiguous().view(*x.shape[:-1], out)


def linear(x: torch.Tensor, w: torch.Tensor | QuantLinear, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with another kernel where that one is slow (see _wants_onednn and _half_cpu_kernel);
    a quantized matrix multiplies through its own kernel."""
    if isinstance(w, QuantLinear):
        return w(x, b)
    if _wants_onednn(x):
        return _ONEDNN_LINEAR(x, w, b, "none", [], "")
    kernel = _half_cpu_kernel(x, w)
    return _half_cpu_product(kernel, x, w, b) if kernel else F.linear(x, w, b)


def add_linear(residual: torch.Tensor, x: torch.Tensor, w: torch.Tensor | QuantLinear,
               b: torch.Tensor | None) -> torch.Tensor:
    """residual + linear(x, w, b) for 2-D [rows, features] tensors; one addmm or addmv (the add rides in
    the matrix product) unless there is a bias, a quantized matrix, or oneDNN should take the product."""
    if b is not None or isinstance(w, QuantLinear) or _wants_onednn(x):
        return residual + linear(x, w, b)
    kernel = _half_cpu_kernel(x, w)
    return _half_cpu_product(kernel, x, w, residual) if kernel else torch.addmm(residual, x, w.t())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 and weight.dim() == 1:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)  # one fused op instead of six
    if weight.dtype == torch.float32:  # Gemma's (1 + w), kept in f32: it scales before the cast
        return (F.rms_norm(x.float(), (x.shape[-1],), None, eps) * weight).to(x.dtype)
    # Normalise in float32, cast back, then scale: the reference's rounding, so f16/bf16 nodes agree with it
    # (and a weight per head, for the q/k norms, broadcasts).
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


_CACHE_SERIALS = itertools.count(1)


class KVCache:
    """Preallocated keys and values of one session over one node's layers.

    `torch.empty` so untouched capacity costs address space, not resident memory; `zeroed` for the
    fixed-shape decode step, whose masked attention reads positions nothing has written yet.
    """

    def __init__(self, layers: list[int], config: LlamaConfig, capacity: int, dtype: torch.dtype,
                 device: torch.device, zeroed: bool = False):
        self.slot = {layer: i for i, layer in enumerate(layers)}
        shape = (len(layers), config.num_key_value_heads, capacity, config.head_dim)
        alloc = torch.zeros if zeroed else torch.empty
        self.k = alloc(shape, dtype=dtype, device=device)
        self.v = alloc(shape, dtype=dtype, device=device)
        self.k_of, self.v_of = list(self.k.unbind(0)), list(self.v.unbind(0))  # per-slot views
        self.capacity = capacity
        self.serial = next(_CACHE_SERIALS)  # names this cache's memory in batched graphs' keys; never reused
        self.graphs: dict = {}  # captured one-row decode steps over this cache (cake.model.cuda_graphs)
        # Per layer: how many positions hold valid keys. A session's layers can be run by separate
        # stages at separate times, so each layer keeps its own count.
        self.lengths = [0] * len(layers)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def reset(self) -> None:
        """Empty, for another session: zeroed (see the class note), captured steps kept (same memory)."""
        self.k.zero_()
        self.v.zero_()
        self.lengths = [0] * len(self.lengths)


@dataclass
class Row:
    """One row of a batch: which session's cache, and the position of its first token."""

    cache: KVCache
    start: int


# A mixture of experts' tensors under model.layers.N.: (router, expert prefix, gate, up, down)
MOE_NAMES = {"mixtral": ("block_sparse_moe.gate.weight", "block_sparse_moe.experts", "w1", "w3", "w2"),
             "qwen3_moe": ("mlp.gate.weight", "mlp.experts", "gate_proj", "up_proj", "down_proj")}


class DecoderLayer:
    def __init__(self, index: int, config: LlamaConfig, w: dict[str, torch.Tensor | QuantLinear]):
        self.index = index
        self.c = config
        if config.gemma_norms:  # Gemma's norms scale by (1 + w), in f32
            w = {k: (1 + v.float() if k.endswith("norm") else v) for k, v in w.items()}
        self.weights = w
        self.attn_norm, self.mlp_norm = w["attn_norm"], w["mlp_norm"]
        self.post_attn_norm, self.post_mlp_norm = w.get("post_attn_norm"), w.get("post_mlp_norm")  # Gemma 3
        self.local_rope = config.local_rope_theta is not None and config.sliding(index)
        self.act = F.silu if config.mlp_act == "silu" else partial(F.gelu, approximate="tanh")
        self.wqkv, self.bqkv = w["wqkv"], w.get("bqkv")
        self.wo, self.bo = w["wo"], w.get("bo")
        self.w13, self.b13 = w.get("w13"), w.get("b13")
        self.w2, self.b2 = w.get("w2"), w.get("b2")
        self.window = config.sliding_window if config.sliding(index) else None
        # q/k norms: one weight per head of the fused q|k block, so both are normalised in one operation
        self.qk_norm = None if "q_norm" not in w else torch.cat(
            (w["q_norm"].expand(config.num_attention_heads, -1), w["k_norm"].expand(config.num_key_value_heads, -1)))
        self.router = w.get("router")
        self.experts = [(w[f"w13.{e}"], w[f"w2.{e}"]) for e in range(config.num_experts)] if "router" in w else []

    @staticmethod
    def is_matrix(key: str) -> bool:
        """Whether weight `key` is a matrix a node may quantize (norms, biases and routers never are)."""
        return key.split(".")[0] in ("wqkv", "wo", "w13", "w2")

    @staticmethod
    def parts(config: LlamaConfig, index: int = 0) -> dict[str, list[str]]:
        """Each weight of layer `index` -> the checkpoint tensors (under model.layers.N.) stacked to make it.
        Q/K/V and gate/up are fused: one matrix product each instead of three and two (Phi-3's checkpoints
        store them fused already)."""
        phi3 = config.arch == "phi3"
        parts = {
            "attn_norm": ["input_layernorm.weight"],
            "mlp_norm": ["pre_feedforward_layernorm.weight" if config.gemma_norms else "post_attention_layernorm.weight"],
            "wqkv": ["self_attn.qkv_proj.weight"] if phi3 else
                    ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
            "wo": ["self_attn.o_proj.weight"],
        }
        if config.moe(index):
            router, experts, gate, up, down = MOE_NAMES[config.arch]
            parts["router"] = [router]
            for e in range(config.num_experts):
                parts[f"w13.{e}"] = [f"{experts}.{e}.{gate}.weight", f"{experts}.{e}.{up}.weight"]
                parts[f"w2.{e}"] = [f"{experts}.{e}.{down}.weight"]
        else:
            parts["w13"] = ["mlp.gate_up_proj.weight"] if phi3 else ["mlp.gate_proj.weight", "mlp.up_proj.weight"]
            parts["w2"] = ["mlp.down_proj.weight"]
        if config.qk_norm:
            parts.update(q_norm=["self_attn.q_norm.weight"], k_norm=["self_attn.k_norm.weight"])
        if config.gemma_norms:
            parts.update(post_attn_norm=["post_attention_layernorm.weight"],
                         post_mlp_norm=["post_feedforward_layernorm.weight"])
        if config.attention_bias:
            parts["bqkv"] = ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
        if config.o_bias:
            parts["bo"] = ["self_attn.o_proj.bias"]
        if config.mlp_bias and not config.moe(index):
            parts.update(b13=["mlp.gate_proj.bias", "mlp.up_proj.bias"], b2=["mlp.down_proj.bias"])
        return parts

    @staticmethod
    def tensor_names(index: int, config: LlamaConfig) -> list[str]:
        return [f"model.layers.{index}.{n}" for names in DecoderLayer.parts(config, index).values() for n in names]

    def forward(self, x: torch.Tensor, rows: list[Row], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        q, k, v = self._qkv(x, cos, sin)
        if B == 1:
            out = self._attend(q, k[0], v[0], rows[0])
        else:
            out = torch.cat([self._attend(q[b:b + 1], k[b], v[b], row) for b, row in enumerate(rows)])
        return self._finish(x, out)

    def decode(self, x: torch.Tensor, rows: list[Row], rot: torch.Tensor) -> torch.Tensor:
        """One position per row: x [B, H] -> [B, H], rot [B, hd, hd] (rope_rotations). The hot loop of
        generation, written for few operations: 2-D tensors, rope as one product, residual adds inside
        the matrix products, cache views read with narrow/select instead of Python indexing (each saves
        dispatches: docs/benchmarks.md, CPU kernels)."""
        q, k, v = self._qkv_one(x, rot)
        outs = []
        for b, row in enumerate(rows):
            cache, pos = row.cache, row.start
            slot = cache.slot[self.index]
            ck, cv = cache.k_of[slot], cache.v_of[slot]  # [kv_heads, capacity, hd]; narrow/select, not indexing
            ck.select(1, pos).copy_(k[b])
            cv.select(1, pos).copy_(v[b])
            cache.lengths[slot] = pos + 1
            lo = 0 if self.window is None else max(0, pos + 1 - self.window)
            keys, values = ck.narrow(1, lo, pos + 1 - lo).unsqueeze(0), cv.narrow(1, lo, pos + 1 - lo).unsqueeze(0)
            outs.append(F.scaled_dot_product_attention(q.narrow(0, b, 1), keys, values, enable_gqa=self._gqa,
                                                       scale=self.c.attn_scale))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return self._finish_one(x, out.reshape(x.shape[0], -1))

    def decode_static(self, x: torch.Tensor, caches: list[KVCache], pos: torch.Tensor, rot: torch.Tensor,
                      mask: torch.Tensor, window_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One token of each of B sessions, x [B, H], with every shape fixed and the positions in a
        device tensor pos [B], so a CUDA graph can replay it at any positions: keys go in with
        index_copy_, and attention reads the first mask.shape[-1] cached positions of each row's
        cache, masked to 0..pos (the caches must be zeroed: a masked NaN would still poison the sum).
        The products run once for the whole batch; cache writes and attention run per row."""
        q, k, v = self._qkv_one(x, rot)
        if self.window is not None:
            mask = window_mask
        n = mask.shape[-1]
        outs = []
        for b, cache in enumerate(caches):
            slot = cache.slot[self.index]
            ck, cv = cache.k_of[slot], cache.v_of[slot]
            p = pos.narrow(0, b, 1)
            ck.index_copy_(1, p, k[b].unsqueeze(1))
            cv.index_copy_(1, p, v[b].unsqueeze(1))
            keys, values = ck.narrow(1, 0, n).unsqueeze(0), cv.narrow(1, 0, n).unsqueeze(0)
            outs.append(F.scaled_dot_product_attention(q.narrow(0, b, 1), keys, values, attn_mask=mask.narrow(0, b, 1),
                                                       enable_gqa=self._gqa, scale=self.c.attn_scale))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return self._finish_one(x, out.reshape(x.shape[0], -1))

    @property
    def _gqa(self) -> bool:
        return self.c.num_attention_heads != self.c.num_key_value_heads

    def _qkv_one(self, x: torch.Tensor, rot: torch.Tensor):
        """x [B, H] -> queries [B, heads, 1, hd], keys and values [B, kv_heads, hd], rotated."""
        c = self.c
        B = x.shape[0]
        nh, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        qkv = linear(rms_norm(x, self.attn_norm, c.rms_norm_eps), self.wqkv, self.bqkv)
        n = (nh + nkv) * hd
        qk = qkv.narrow(1, 0, n).view(B, nh + nkv, hd)
        if self.qk_norm is not None:
            qk = rms_norm(qk, self.qk_norm, c.rms_norm_eps)
        qk = torch.bmm(qk, rot)
        v = qkv.narrow(1, n, nkv * hd).view(B, nkv, hd)
        return qk.narrow(1, 0, nh).unsqueeze(2), qk.narrow(1, nh, nkv), v

    def _finish_one(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Attention output [B, heads * hd] -> the layer's output [B, H]."""
        if self.post_attn_norm is not None:
            return self._sandwich(x, linear(out, self.wo, self.bo))
        h = add_linear(x, out, self.wo, self.bo)
        if self.experts:
            return h + self._moe(rms_norm(h, self.mlp_norm, self.c.rms_norm_eps))
        return add_linear(h, self._gated(h), self.w2, self.b2)

    def _sandwich(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Gemma 3's residual stream: a norm after attention and after the MLP, before each add."""
        eps = self.c.rms_norm_eps
        h = x + rms_norm(attn, self.post_attn_norm, eps)
        return h + rms_norm(linear(self._gated(h), self.w2, self.b2), self.post_mlp_norm, eps)

    def _gated(self, h: torch.Tensor) -> torch.Tensor:
        """The MLP up to its down projection: silu(gate) * up of the normalised residual stream."""
        gate, up = linear(rms_norm(h, self.mlp_norm, self.c.rms_norm_eps), self.w13, self.b13).chunk(2, dim=-1)
        return self.act(gate) * up

    def _moe(self, x: torch.Tensor) -> torch.Tensor:
        """A mixture of experts on normalised rows x [..., H]: each row goes through its top-k experts
        (softmax over all, the top k renormalised where the family does), weighted and summed. Each expert
        runs once, on the rows routed to it, in expert order (transformers' order, so f32 sums agree)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = torch.softmax(linear(x, self.router).float(), dim=-1)
        top, chosen = torch.topk(probs, self.c.experts_per_token, dim=-1)
        if self.c.norm_topk_prob:
            top = top / top.sum(dim=-1, keepdim=True)
        if self.c.arch != "mixtral":  # Qwen3-MoE weighs in the model's dtype, Mixtral in f32
            top = top.to(x.dtype)
        out = torch.zeros_like(x)
        for e in torch.unique(chosen).tolist():
            rows, slot = torch.where(chosen == e)
            w13, w2 = self.experts[e]
            gate, up = linear(x[rows], w13).chunk(2, dim=-1)
            y = linear(self.act(gate) * up, w2) * top[rows, slot, None]
            out.index_add_(0, rows, y.to(out.dtype))
        return out.view(shape)

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Queries [B, heads, T, hd], keys and values [B, kv_heads, T, hd], rotated."""
        c = self.c
        B, T, _ = x.shape
        nh, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        qkv = linear(rms_norm(x, self.attn_norm, c.rms_norm_eps), self.wqkv, self.bqkv)
        # Rotate queries and keys in one go: they sit side by side in the fused projection.
        qk = qkv[..., :(nh + nkv) * hd].view(B, T, nh + nkv, hd)
        if self.qk_norm is not None:
            qk = rms_norm(qk, self.qk_norm, c.rms_norm_eps)
        qk = apply_rope(qk, cos, sin)
        q, k = qk[:, :, :nh].transpose(1, 2), qk[:, :, nh:].transpose(1, 2)
        v = qkv[..., (nh + nkv) * hd:].view(B, T, nkv, hd).transpose(1, 2)
        return q, k, v

    def _finish(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Attention output [B, heads, T, hd] -> the layer's output: projection, residual, MLP."""
        c = self.c
        B, _, T, _ = out.shape
        attn = out.transpose(1, 2).reshape(B, T, c.num_attention_heads * c.head_dim)
        if self.post_attn_norm is not None:
            return self._sandwich(x, linear(attn, self.wo, self.bo))
        h = x + linear(attn, self.wo, self.bo)
        if self.experts:
            return h + self._moe(rms_norm(h, self.mlp_norm, c.rms_norm_eps))
        return h + linear(self._gated(h), self.w2, self.b2)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row: Row) -> torch.Tensor:
        cache, start = row.cache, row.start
        slot = cache.slot[self.index]
        T = q.shape[2]
        end = start + T
        cache.k[slot, :, start:end] = k
        cache.v[slot, :, start:end] = v
        cache.lengths[slot] = end
        lo = 0 if self.window is None else max(0, start + 1 - self.window)
        keys = cache.k[slot, :, lo:end].unsqueeze(0)
        values = cache.v[slot, :, lo:end].unsqueeze(0)
        if start == 0 and self.window is None:
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=self._gqa,
                                                  scale=self.c.attn_scale)
        # A chunk after a cached prefix: query i sees keys 0..start+i (of those, the last `window`).
        mask = torch.ones(T, end - lo, dtype=torch.bool, device=q.device).tril(diagonal=start - lo)
        if self.window is not None:
            mask &= ~torch.ones_like(mask).tril(diagonal=start - lo - self.window)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=self._gqa,
                                              scale=self.c.attn_scale)


MAX_SPARES = 4
PREFILL_CHUNK = 512  # rows of a prompt per step of forward_steps


def chunk_spans(total: int, size: int) -> list[tuple[int, int]]:
    """[a, b) spans of at most `size` covering 0..total, except that a one-token tail joins the span
    before it: a single token would take a node's decode path (and a CUDA graph of its own)."""
    starts = list(range(0, total, size))
    if len(starts) > 1 and total - starts[-1] == 1:
        starts.pop()
    return list(zip(starts, starts[1:] + [total]))


class LayerStack:
    """The decoder layers one node holds; runs any contiguous sub-range of them in one call."""

    def __init__(self, config: LlamaConfig, layers: dict[int, DecoderLayer], capacity: int,
                 dtype: torch.dtype, device: torch.device, quantization=None):
        self.config = config
        self.layers = layers
        self.quantization = quantization  # cake.model.loader.Quantization the matrices are kept in (None: none)
        self.capacity = capacity
        self.dtype = dtype
        self.device = device
        self.cos, self.sin = rope_table(config, capacity, device)
        self.long_from = long_from(config)
        if self.long_from is not None:  # longrope: rows [capacity, 2 capacity) hold the long factors' table
            cos, sin = rope_table(config, capacity, device, long=True)
            self.cos, self.sin = torch.cat((self.cos, cos)), torch.cat((self.sin, sin))
        self.local = None  # Gemma 3's sliding layers: a rope of their own base, unscaled
        if config.local_rope_theta is not None:
            self.local = rope_table(replace(config, rope_theta=config.local_rope_theta, rope_scaling=None), capacity,
                                    device)
        self.eye = torch.eye(config.head_dim, dtype=dtype, device=device)
        self.swap = rope_swap(config.head_dim, dtype, device, config.rotary_dim)
        self.graphs = None  # a cake.model.cuda_graphs.DecodeGraphs when one-token steps are replayed
        self.spares: list[KVCache] = []  # ended sessions' caches kept for new ones (see release)
        if device.type == "cuda" and not config.num_experts:  # which experts run depends on the data
            from cake.model.cuda_graphs import DecodeGraphs, enabled

            if enabled():
                self.graphs = DecodeGraphs(self)

    @property
    def indices(self) -> list[int]:
        return sorted(self.layers)

    @property
    def weight_bytes(self) -> int:
        """Bytes the layers' weights take on the device (quantized matrices as kept)."""
        return sum(weight_nbytes(w) for layer in self.layers.values() for w in layer.weights.values())

    def new_cache(self) -> KVCache:
        if self.spares:
            cache = self.spares.pop()
            cache.reset()
            return cache
        return KVCache(self.indices, self.config, self.capacity, self.dtype, self.device,
                       zeroed=self.graphs is not None)

    def release(self, cache: KVCache) -> None:
        """A session is done with `cache`. With CUDA graphs it is kept for the next session (up to
        MAX_SPARES): the steps captured over it stay valid, so a new session replays them from its
        first token instead of capturing its own for every span (each capture costs about an eager
        step plus the graph's instantiation)."""
        if self.graphs is not None and self.graphs.active and len(self.spares) < MAX_SPARES:
            self.spares.append(cache)
        else:
            self.discard(cache)

    def discard(self, cache: KVCache) -> None:
        """Let `cache` go without keeping it for another session (a batch row may still use it)."""
        if self.graphs is not None:
            self.graphs.forget(cache)

    def drop_spares(self) -> int:
        """Free the kept caches (graphs were turned off, so nothing will replay theirs); the bytes freed."""
        freed = sum(c.nbytes for c in self.spares)
        while self.spares:
            self.discard(self.spares.pop())
        return freed

    def new_cache_bytes(self) -> int:
        c = self.config
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * len(self.layers) * c.num_key_value_heads * self.capacity * c.head_dim * itemsize

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, rows: list[Row], start: int, end: int) -> torch.Tensor:
        """Run layers [start, end) on hidden [B, T, H]; row b's tokens sit at positions rows[b].start + t."""
        if hidden.shape[1] == 1 and self.graphs is not None and self.graphs.active:
            return self.graphs.decode(hidden, rows, start, end, lambda: self.forward_eager(hidden, rows, start, end))
        return self.forward_eager(hidden, rows, start, end)

    def forward_eager(self, hidden: torch.Tensor, rows: list[Row], start: int, end: int) -> torch.Tensor:
        B, T, H = hidden.shape
        x = hidden.to(device=self.device, dtype=self.dtype)  # from the wire (CPU) or a node of another dtype
        if T == 1:
            pos = torch.tensor([r.start for r in rows], device=self.device)
            rots = {}
            x = x.reshape(B, H)  # a view unless the caller handed a strided slice
            for i in range(start, end):
                layer = self.layers[i]
                if layer.local_rope not in rots:
                    rots[layer.local_rope] = self._rotations(pos, layer.local_rope)
                x = layer.decode(x, rows, rots[layer.local_rope])
            return x.view(B, 1, H)
        pos = torch.tensor([r.start for r in rows], device=self.device).unsqueeze(1) + torch.arange(
            T, device=self.device)
        trig = {}
        for i in range(start, end):
            layer = self.layers[i]
            if layer.local_rope not in trig:
                trig[layer.local_rope] = self._trig(pos, layer.local_rope)
            x = layer.forward(x, rows, *trig[layer.local_rope])
        return x

    def _trig(self, pos: torch.Tensor, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, T, 1, rotary_dim] (broadcast over heads) of the positions pos [B, T]."""
        if local:
            cos, sin = self.local
        else:
            cos, sin = self.cos, self.sin
            if self.long_from is not None:
                pos = pos + self.capacity * (pos[:, -1:] + 1 > self.long_from)
        return cos[pos].to(self.dtype).unsqueeze(2), sin[pos].to(self.dtype).unsqueeze(2)

    def forward_steps(self, hidden: torch.Tensor, rows: list[Row], start: int, end: int,
                      chunk: int = PREFILL_CHUNK) -> Iterator[torch.Tensor | None]:
        """forward() in steps a server can interleave with other work: a prompt runs in chunks of at most
        `chunk` rows (batch x tokens), each through one layer at a time, and this yields None after every
        step, then the output [B, T, H]. A chunk attends to the positions cached before it, so the result
        is forward()'s to float rounding (the same sums in other blocks), and the activations of a long
        prompt never exist all at once. A decode step (one token) is one step."""
        B, T, _ = hidden.shape
        if T == 1:
            yield self.forward(hidden, rows, start, end)
            return
        outs = []
        for a, b in chunk_spans(T, max(2, chunk // B)):  # at least two tokens a chunk (see chunk_spans)
            x = hidden[:, a:b]
            at = [Row(r.cache, r.start + a) for r in rows]
            for i in range(start, end):
                x = self.forward(x, at, i, i + 1)
                yield None
            outs.append(x)
        yield outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def decode_static(self, x: torch.Tensor, caches: list[KVCache], pos: torch.Tensor, start: int, end: int,
                      span: int) -> torch.Tensor:
        """One token of each of B sessions, x [B, 1, H] (in this stack's dtype and device), at the
        positions held in `pos` (a [B] long tensor), attending over the first `span` cached positions of
        each row's cache; no host sync and no shape that depends on a position, so it can be captured
        as a CUDA graph. The caller keeps cache.lengths."""
        B, _, H = x.shape
        rots = {local: self._rotations(pos, local) for local in {self.layers[i].local_rope for i in range(start, end)}}
        seen = torch.arange(span, device=pos.device)
        mask = (seen <= pos.unsqueeze(1)).view(B, 1, 1, span)
        window = self.config.sliding_window
        window_mask = None if window is None else mask & (seen > pos.unsqueeze(1) - window).view(B, 1, 1, span)
        x = x.reshape(B, H)
        for i in range(start, end):
            x = self.layers[i].decode_static(x, caches, pos, rots[self.layers[i].local_rope], mask, window_mask)
        return x.view(B, 1, H)

    def _rotations(self, pos: torch.Tensor, local: bool = False) -> torch.Tensor:
        """The rope rotation of each row's position, pos [B] (a device tensor) -> [B, hd, hd]."""
        cos, sin = self.local if local else (self.cos, self.sin)
        if self.long_from is not None and not local:
            pos = pos + self.capacity * (pos + 1 > self.long_from)
        cos, sin = cos.index_select(0, pos).to(self.dtype), sin.index_select(0, pos).to(self.dtype)
        rest = self.config.head_dim - cos.shape[-1]
        if rest:  # partial rotary: the features past the rotated share are kept as they are
            cos = torch.cat((cos, cos.new_ones(cos.shape[0], rest)), dim=-1)
            sin = torch.cat((sin, sin.new_zeros(sin.shape[0], rest)), dim=-1)
        return rope_rotations(cos, sin, self.eye, self.swap)


def weight_nbytes(w: torch.Tensor | QuantLinear | Quantized | None) -> int:
    if w is None:
        return 0
    return w.nbytes if isinstance(w, (QuantLinear, Quantized)) else w.numel() * w.element_size()


class Head:
    """What the master always holds: token embedding, final norm, and the output projection. Quantized,
    the embedding is kept as rows of the stored form and the projection is a QuantLinear."""

    def __init__(self, config: LlamaConfig, embed: torch.Tensor | Quantized, norm: torch.Tensor,
                 lm_head: torch.Tensor | QuantLinear):
        self.config = config
        self.embed_weight = embed
        self.dtype = norm.dtype
        self.norm = 1 + norm.float() if config.gemma_norms else norm
        self.lm_head = lm_head  # the embedding itself when tie_word_embeddings

    @staticmethod
    def tensor_names(config: LlamaConfig) -> list[str]:
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        if not config.tie_word_embeddings:
            names.append("lm_head.weight")
        return names

    @property
    def weight_bytes(self) -> int:
        shared = self.lm_head is self.embed_weight
        return sum(weight_nbytes(w) for w in (self.embed_weight, self.norm, None if shared else self.lm_head))

    @torch.inference_mode()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.embed_weight, Quantized):
            rows = self.embed_weight.rows(ids, self.dtype)
        else:
            rows = F.embedding(ids, self.embed_weight)
        scale = self.config.embed_scale  # Gemma: sqrt(hidden), rounded to the table's dtype first
        return rows if scale == 1 else rows * torch.tensor(scale, dtype=rows.dtype)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> float32 logits [..., V]."""
        h = rms_norm(hidden.to(self.dtype), self.norm, self.config.rms_norm_eps)
        logits = linear(h, self.lm_head).float()
        cap = self.config.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap
