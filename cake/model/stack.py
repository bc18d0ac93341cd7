"""The decoder layers one node holds, run over a batch of rows: a prompt, a one-token step (eager or
replayed as a CUDA graph), or a prompt in steps a server can interleave with other work."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from cake.model.config import LlamaConfig
from cake.model.kv_cache import KVCache, Row
from cake.model.layer import DecoderLayer
from cake.model.quant import weight_nbytes
from cake.model.rope import RopeTables

MAX_SPARES = 4  # ended sessions' caches kept for new ones (see LayerStack.release)
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
        self.rope = RopeTables(config, capacity, dtype, device)
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

    # Running the layers

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, rows: list[Row], start: int, end: int) -> torch.Tensor:
        """Run layers [start, end) on hidden [B, T, H]; row b's tokens sit at positions rows[b].start + t."""
        if hidden.shape[1] == 1 and self.graphs is not None and self.graphs.active:
            return self.graphs.decode(hidden, rows, start, end, lambda: self.forward_eager(hidden, rows, start, end))
        return self.forward_eager(hidden, rows, start, end)

    def forward_eager(self, hidden: torch.Tensor, rows: list[Row], start: int, end: int) -> torch.Tensor:
        """forward() without CUDA graphs: a prompt through DecoderLayer.forward, one token through .decode."""
        B, T, H = hidden.shape
        x = hidden.to(device=self.device, dtype=self.dtype)  # from the wire (CPU) or a node of another dtype
        if T == 1:
            pos = torch.tensor([r.start for r in rows], device=self.device)
            rots = {}
            x = x.reshape(B, H)  # a view unless the caller handed a strided slice
            for i in range(start, end):
                layer = self.layers[i]
                if layer.local_rope not in rots:
                    rots[layer.local_rope] = self.rope.rotations(pos, layer.local_rope)
                x = layer.decode(x, rows, rots[layer.local_rope])
            return x.view(B, 1, H)
        pos = torch.tensor([r.start for r in rows], device=self.device).unsqueeze(1) + torch.arange(
            T, device=self.device)
        trig = {}
        for i in range(start, end):
            layer = self.layers[i]
            if layer.local_rope not in trig:
                trig[layer.local_rope] = self.rope.trig(pos, layer.local_rope)
            x = layer.forward(x, rows, *trig[layer.local_rope])
        return x

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
        rots = {local: self.rope.rotations(pos, local)
                for local in {self.layers[i].local_rope for i in range(start, end)}}
        seen = torch.arange(span, device=pos.device)
        mask = (seen <= pos.unsqueeze(1)).view(B, 1, 1, span)
        window = self.config.sliding_window
        window_mask = None if window is None else mask & (seen > pos.unsqueeze(1) - window).view(B, 1, 1, span)
        x = x.reshape(B, H)
        for i in range(start, end):
            x = self.layers[i].decode_static(x, caches, pos, rots[self.layers[i].local_rope], mask, window_mask)
        return x.view(B, 1, H)

    # Session caches

    def new_cache(self) -> KVCache:
        if self.spares:
            cache = self.spares.pop()
            cache.reset()
            return cache
        return KVCache(self.indices, self.config, self.capacity, self.dtype, self.device,
                       zeroed=self.graphs is not None)

    def new_cache_bytes(self) -> int:
        c = self.config
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * len(self.layers) * c.num_key_value_heads * self.capacity * c.head_dim * itemsize

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
