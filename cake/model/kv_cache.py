"""The keys and values a session keeps, per node, and a batch row pointing at them."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from cake.model.config import LlamaConfig

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
