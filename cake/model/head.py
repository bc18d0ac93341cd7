"""What the master always holds: the token embedding, the final norm and the output projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cake.model.config import LlamaConfig
from cake.model.kernels import linear, rms_norm
from cake.model.quant import QuantLinear, Quantized, weight_nbytes


class Head:
    """Token ids to hidden states, and hidden states to logits. Quantized, the embedding is kept as rows
    of the stored form and the projection is a QuantLinear."""

    def __init__(self, config: LlamaConfig, embed: torch.Tensor | Quantized, norm: torch.Tensor,
                 lm_head: torch.Tensor | QuantLinear):
        self.config = config
        self.embed_weight = embed
        self.dtype = norm.dtype
        self.norm = 1 + norm.float() if config.gemma_norms else norm
        self.lm_head = lm_head  # the embedding itself when tie_word_embeddings

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
