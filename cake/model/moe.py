"""A mixture of experts in place of the dense MLP (Mixtral, Qwen3-MoE)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from cake.model.config import LlamaConfig
from cake.model.kernels import linear
from cake.model.quant import QuantLinear

Matrix = torch.Tensor | QuantLinear


class MixtureOfExperts:
    """Each row goes through its top-k experts (softmax over all, the top k renormalised where the family
    does), weighted and summed. Each expert runs once, on the rows routed to it, in expert order
    (transformers' order, so f32 sums agree)."""

    def __init__(self, config: LlamaConfig, router: torch.Tensor, experts: list[tuple[Matrix, Matrix]],
                 act: Callable[[torch.Tensor], torch.Tensor]):
        self.router = router
        self.experts = experts  # per expert: fused gate|up, down
        self.act = act
        self.top_k = config.experts_per_token
        self.renormalise = config.norm_topk_prob
        self.weigh_in_f32 = config.arch == "mixtral"  # Qwen3-MoE weighs in the model's dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised rows x [..., H] -> the experts' weighted sum [..., H]."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = torch.softmax(linear(x, self.router).float(), dim=-1)
        top, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalise:
            top = top / top.sum(dim=-1, keepdim=True)
        if not self.weigh_in_f32:
            top = top.to(x.dtype)
        out = torch.zeros_like(x)
        if x.shape[0] == 1:  # a decode step: no routing tables, the same sums in the same order
            ids = chosen[0].tolist()
            for slot in sorted(range(self.top_k), key=ids.__getitem__):
                w13, w2 = self.experts[ids[slot]]
                gate, up = linear(x, w13).chunk(2, dim=-1)
                out += (linear(self.act(gate) * up, w2) * top[0, slot]).to(out.dtype)
            return out.view(shape)
        for e in torch.unique(chosen).tolist():
            rows, slot = torch.where(chosen == e)
            w13, w2 = self.experts[e]
            gate, up = linear(x[rows], w13).chunk(2, dim=-1)
            y = linear(self.act(gate) * up, w2) * top[rows, slot, None]
            out.index_add_(0, rows, y.to(out.dtype))
        return out.view(shape)
