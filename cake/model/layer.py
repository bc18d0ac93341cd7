"""One decoder layer in plain torch: RMSNorm, fused Q/K/V, RoPE, GQA attention over a KV cache, a gated
MLP, and the named ways other families vary it (biases, q/k norms, sliding windows, Gemma 3's sandwich
norms and local rope, mixtures of experts; see LlamaConfig).

Weights are plain tensors (no nn.Module init cost for 70B-sized layers). Every call takes a batch of
rows; each row is a session with its own KV cache and start position, so concurrent sessions share one
pass over the weights (the bandwidth cost) while attention stays per session.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from cake.model.config import LlamaConfig
from cake.model.kernels import add_linear, linear, rms_norm
from cake.model.kv_cache import KVCache, Row
from cake.model.moe import MixtureOfExperts
from cake.model.quant import QuantLinear
from cake.model.rope import apply_rope


class DecoderLayer:
    """h = x + attention(norm(x)); out = h + mlp(norm(h)).

    `forward` is the layer as written above, for any number of tokens a row. `decode` and `decode_static`
    are the same layer for one token a row, the hot loop of generation: `decode` with as few operations
    as the CPU can do it in, `decode_static` with every shape fixed so that a CUDA graph can replay it.
    They differ only in how queries and keys are rotated and how the cache is written and read.
    """

    def __init__(self, index: int, config: LlamaConfig, w: dict[str, torch.Tensor | QuantLinear]):
        self.index = index
        self.config = config
        if config.gemma_norms:  # Gemma's norms scale by (1 + w), in f32
            w = {k: (1 + v.float() if k.endswith("norm") else v) for k, v in w.items()}
        self.weights = w  # by the names of cake.model.tensor_names.layer_parts
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.gqa = self.heads != self.kv_heads
        self.eps, self.scale = config.rms_norm_eps, config.attn_scale  # scale None: 1 / sqrt(head_dim)
        self.attn_norm, self.mlp_norm = w["attn_norm"], w["mlp_norm"]
        self.wqkv, self.bqkv = w["wqkv"], w.get("bqkv")
        self.wo, self.bo = w["wo"], w.get("bo")
        self.w13, self.b13 = w.get("w13"), w.get("b13")
        self.w2, self.b2 = w.get("w2"), w.get("b2")
        self.act = F.silu if config.mlp_act == "silu" else partial(F.gelu, approximate="tanh")
        # How other families differ from Llama (None or False: they do not)
        # q/k norms: one weight per head of the fused q|k block, so both are normalised in one operation
        self.qk_norm = None if "q_norm" not in w else torch.cat(
            (w["q_norm"].expand(self.heads, -1), w["k_norm"].expand(self.kv_heads, -1)))
        self.window = config.sliding_window if config.sliding(index) else None  # keys a query sees
        self.local_rope = config.local_rope_theta is not None and config.sliding(index)  # Gemma 3's own base
        self.post_attn_norm, self.post_mlp_norm = w.get("post_attn_norm"), w.get("post_mlp_norm")  # Gemma 3
        self.moe = None if "router" not in w else MixtureOfExperts(
            config, w["router"], [(w[f"w13.{e}"], w[f"w2.{e}"]) for e in range(config.num_experts)], self.act)

    # The reference: T tokens a row.

    def forward(self, x: torch.Tensor, rows: list[Row], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, H] -> [B, T, H]; row b's tokens sit at positions rows[b].start + t, whose rope angles
        cos, sin [B, T, 1, rotary_dim] hold; their keys and values go into the row's cache."""
        B, T, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        if B == 1:
            out = self._attend(q, k[0], v[0], rows[0])
        else:
            out = torch.cat([self._attend(q[b:b + 1], k[b], v[b], row) for b, row in enumerate(rows)])
        return self._output(x, out.transpose(1, 2).reshape(B, T, -1))

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Queries [B, heads, T, hd], keys and values [B, kv_heads, T, hd], rotated."""
        B, T, _ = x.shape
        nh, nkv, hd = self.heads, self.kv_heads, self.head_dim
        qkv = linear(rms_norm(x, self.attn_norm, self.eps), self.wqkv, self.bqkv)
        # Rotate queries and keys in one go: they sit side by side in the fused projection.
        qk = qkv[..., :(nh + nkv) * hd].view(B, T, nh + nkv, hd)
        if self.qk_norm is not None:
            qk = rms_norm(qk, self.qk_norm, self.eps)
        qk = apply_rope(qk, cos, sin)
        q, k = qk[:, :, :nh].transpose(1, 2), qk[:, :, nh:].transpose(1, 2)
        v = qkv[..., (nh + nkv) * hd:].view(B, T, nkv, hd).transpose(1, 2)
        return q, k, v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row: Row) -> torch.Tensor:
        """One row's queries [1, heads, T, hd] over its cache, after writing its keys and values [kv_heads, T, hd]."""
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
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=self.gqa,
                                                  scale=self.scale)
        # A chunk after a cached prefix: query i sees keys 0..start+i (of those, the last `window`).
        mask = torch.ones(T, end - lo, dtype=torch.bool, device=q.device).tril(diagonal=start - lo)
        if self.window is not None:
            mask &= ~torch.ones_like(mask).tril(diagonal=start - lo - self.window)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=self.gqa,
                                              scale=self.scale)

    def _output(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The attention output [..., heads * hd] -> the layer's output: output projection and residual,
        then the MLP (dense or a mixture of experts) and its residual."""
        if self.post_attn_norm is not None:
            return self._sandwich(x, linear(attn, self.wo, self.bo))
        h = add_linear(x, attn, self.wo, self.bo)
        if self.moe is not None:
            return h + self.moe(rms_norm(h, self.mlp_norm, self.eps))
        return add_linear(h, self._gated(h), self.w2, self.b2)

    def _gated(self, h: torch.Tensor) -> torch.Tensor:
        """The MLP up to its down projection: silu(gate) * up of the normalised residual stream."""
        gate, up = linear(rms_norm(h, self.mlp_norm, self.eps), self.w13, self.b13).chunk(2, dim=-1)
        return self.act(gate) * up

    def _sandwich(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Gemma 3's residual stream: a norm after attention and after the MLP, before each add."""
        h = x + rms_norm(attn, self.post_attn_norm, self.eps)
        return h + rms_norm(linear(self._gated(h), self.w2, self.b2), self.post_mlp_norm, self.eps)

    # The same layer for one token a row.

    def decode(self, x: torch.Tensor, rows: list[Row], rot: torch.Tensor) -> torch.Tensor:
        """One position per row: x [B, H] -> [B, H], rot [B, hd, hd] (rope_rotations). Written for few
        operations: 2-D tensors, rope as one product, residual adds inside the matrix products, cache
        views read with narrow/select instead of Python indexing (each saves dispatches: docs/benchmarks.md,
        CPU kernels)."""
        q, k, v = self._qkv_one(x, rot)
        outs = []
        for b, row in enumerate(rows):
            cache, pos = row.cache, row.start
            slot = cache.slot[self.index]
            ck, cv = cache.k_of[slot], cache.v_of[slot]  # [kv_heads, capacity, hd]
            ck.select(1, pos).copy_(k[b])
            cv.select(1, pos).copy_(v[b])
            cache.lengths[slot] = pos + 1
            lo = 0 if self.window is None else max(0, pos + 1 - self.window)
            keys, values = ck.narrow(1, lo, pos + 1 - lo).unsqueeze(0), cv.narrow(1, lo, pos + 1 - lo).unsqueeze(0)
            outs.append(F.scaled_dot_product_attention(q.narrow(0, b, 1), keys, values, enable_gqa=self.gqa,
                                                       scale=self.scale))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return self._output(x, out.reshape(x.shape[0], -1))

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
                                                       enable_gqa=self.gqa, scale=self.scale))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return self._output(x, out.reshape(x.shape[0], -1))

    def _qkv_one(self, x: torch.Tensor, rot: torch.Tensor):
        """x [B, H] -> queries [B, heads, 1, hd], keys and values [B, kv_heads, hd], rotated."""
        B = x.shape[0]
        nh, nkv, hd = self.heads, self.kv_heads, self.head_dim
        qkv = linear(rms_norm(x, self.attn_norm, self.eps), self.wqkv, self.bqkv)
        n = (nh + nkv) * hd
        qk = qkv.narrow(1, 0, n).view(B, nh + nkv, hd)
        if self.qk_norm is not None:
            qk = rms_norm(qk, self.qk_norm, self.eps)
        qk = torch.bmm(qk, rot)
        v = qkv.narrow(1, n, nkv * hd).view(B, nkv, hd)
        return qk.narrow(1, 0, nh).unsqueeze(2), qk.narrow(1, nh, nkv), v
