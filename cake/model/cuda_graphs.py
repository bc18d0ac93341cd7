"""One-token decode steps replayed as CUDA graphs.

On a GPU a decode step of a small batch is bound by launching kernels, not by the GPU: each of a layer's
~30 operations costs the CPU several µs to launch and the GPU less to run. A CUDA graph records a whole
stage's launches once and replays them with one call. Graphs fix every address and shape, so:

- a graph belongs to its session caches, a layer range and an attention span: it reads the caches in
  place. A one-session step's graphs live on its cache; a batch's (several sessions' tokens, products
  shared, attention per row) in an LRU keyed by the caches' serial numbers (in order, whatever order
  the rows came in), captured the second time that batch is stepped (the first runs eagerly: a batch
  seen once is not worth a capture);
- the positions live in a device tensor, keys are written with index_copy_, and attention covers a span
  of the cache rounded up to a power of two (at least SPAN_MIN) with positions past the current one
  masked, so one graph serves every position up to its span (`LayerStack.decode_static`);
- an ended session's cache is kept, graphs and all, for the next session (`LayerStack.release`), so a
  server does not capture anew for every request; prompts run eagerly.

`CAKE_CUDA_GRAPHS=0` (or `cake --no-cuda-graphs`) turns them off. A capture that fails logs one warning
and turns them off for the process: the eager path computes the same step. What they save: docs/benchmarks.md,
The cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass

import torch

log = logging.getLogger("cake.model")

ENV = "CAKE_CUDA_GRAPHS"
SPAN_MIN = 256
MAX_BATCH_GRAPHS = 32  # batched graphs kept; the least recently replayed goes first


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def span_for(length: int, capacity: int) -> int:
    """The attention span a graph uses for a step that needs `length` positions: a power of two, so a
    session needs a handful of graphs, and attention reads at most twice what it must."""
    span = SPAN_MIN
    while span < length:
        span *= 2
    return min(span, capacity)


def _remember(keys: set, key) -> None:
    """Add to a set of keys that must not grow without bound (forgetting all costs one extra step each)."""
    if len(keys) > 4096:
        keys.clear()
    keys.add(key)


@dataclass
class Captured:
    graph: "torch.cuda.CUDAGraph"
    x: torch.Tensor  # [B, 1, H] input, copied in before each replay
    pos: torch.Tensor  # [B] long: each row's position
    out: torch.Tensor  # [B, 1, H] output, overwritten by each replay


class DecodeGraphs:
    """A stack's captured one-token steps, for one session or a batch of several."""

    def __init__(self, stack):
        self.stack = stack
        self.active = True
        self.batched: OrderedDict[tuple, Captured] = OrderedDict()  # (start, end, span, cache serials)
        self._seen: set[tuple] = set()  # batches stepped once, eagerly
        self._no_memory: set[tuple] = set()  # keys whose capture ran out of GPU memory: eager until a cache is freed
        self._warm: set[tuple[int, int, int, int]] = set()
        # One memory pool and capture stream for all of this stack's graphs: replays are serialized on
        # one stream and each output is cloned before the next replay, so graphs can share temporaries
        # (one pool per graph would cost a 2 MiB segment or more per session and span).
        self._pool = None
        self._stream = None

    def decode(self, hidden: torch.Tensor, rows, start: int, end: int, eager) -> torch.Tensor:
        """Layers [start, end) for one token of each row; `eager` computes the same without graphs."""
        with self._on_device():
            out = self.step(hidden, rows, start, end)
            return eager() if out is None else out

    def step(self, hidden: torch.Tensor, rows, start: int, end: int) -> torch.Tensor | None:
        """Layers [start, end) for one token of each row; None when the caller should run it eagerly
        (a batch seen for the first time, or graphs turned off after a failed capture)."""
        s = self.stack
        caches, positions = [r.cache for r in rows], [r.start for r in rows]
        span = span_for(max(positions) + 1, s.capacity)
        # A batch runs with its rows in cache-serial order, so the same sessions arriving in another
        # order (their clients were served in another order) replay one graph instead of capturing again.
        order = sorted(range(len(rows)), key=lambda i: caches[i].serial)
        unsort = None
        if order != list(range(len(rows))):
            caches, positions, hidden = [caches[i] for i in order], [positions[i] for i in order], hidden[order]
            unsort = [0] * len(order)
            for j, i in enumerate(order):
                unsort[i] = j
        if len(rows) == 1:
            key, store = (start, end, span), caches[0].graphs
        else:
            key, store = (start, end, span, tuple(c.serial for c in caches)), self.batched
        cap = store.get(key)
        if cap is None:
            if key in self._no_memory or (len(rows) > 1 and key not in self._seen):
                _remember(self._seen, key)
                return None
            cap = self._capture(hidden, caches, positions, start, end, span)
            if cap is None:
                if self.active:  # out of memory: run this key eagerly until memory is freed
                    _remember(self._no_memory, key)
                return None
            store[key] = cap
            if len(self.batched) > MAX_BATCH_GRAPHS:
                self.batched.popitem(last=False)
        else:
            cap.x.copy_(hidden)
            if len(rows) == 1:
                cap.pos.fill_(positions[0])
            else:
                cap.pos.copy_(torch.tensor(positions))
        if store is self.batched:
            store.move_to_end(key)
        cap.graph.replay()
        # A copy either way: the next replay overwrites cap.out.
        out = cap.out.clone() if unsort is None else cap.out[unsort]
        for cache, p in zip(caches, positions):
            for i in range(start, end):
                cache.lengths[cache.slot[i]] = p + 1
        return out

    def forget(self, cache) -> None:
        """`cache` is being freed: drop the batched graphs that read it (never replayed again anyway:
        serial numbers are not reused), and let captures that ran out of memory try again."""
        for key in list(self.batched):
            if cache.serial in key[3]:
                self.batched.pop(key, None)
        self._no_memory.clear()

    def _on_device(self):
        if self.stack.device.type == "cuda":
            return torch.cuda.device(self.stack.device)  # capture and replay on the stack's GPU
        return contextlib.nullcontext()

    def _capture(self, hidden: torch.Tensor, caches, positions: list[int], start: int, end: int,
                 span: int) -> Captured | None:
        s = self.stack
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream(s.device)
        x = torch.empty((len(caches), 1, s.config.hidden_size), dtype=s.dtype, device=s.device)
        x.copy_(hidden)
        pos = torch.tensor(positions, dtype=torch.long, device=s.device)
        current = torch.cuda.current_stream(s.device)
        warm = (start, end, span, len(caches))
        if warm not in self._warm:
            # Run once outside capture first, as PyTorch asks: lazy initialisation (cuBLAS workspaces,
            # kernel loading) must not happen inside a graph. It writes this step's keys and values,
            # which the replay writes again, identically.
            self._stream.wait_stream(current)
            try:
                with torch.cuda.stream(self._stream):
                    s.decode_static(x, caches, pos, start, end, span)
            finally:
                current.wait_stream(self._stream)
            self._warm.add(warm)
        graph = torch.cuda.CUDAGraph()
        try:
            # The outer stream context restores the caller's stream even when capture_end raises
            # (torch.cuda.graph's own exit would leave this thread on the capture stream).
            # thread_local: the master's event loop thread may copy a hidden state off the GPU meanwhile.
            with torch.cuda.stream(self._stream), torch.cuda.graph(
                    graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"):
                out = s.decode_static(x, caches, pos, start, end, span)
        except RuntimeError as e:  # torch.AcceleratorError too: CUDA reports a failed capture with it.
            # A CUDA context broken for good fails the eager step that follows, with its own error.
            self._end_pool_capture()
            if isinstance(e, torch.OutOfMemoryError):
                log.warning("no GPU memory to capture a decode step; this step runs eagerly")
                return None
            self.active = False
            self.batched.clear()
            s.drop_spares()  # and with them their graphs: nothing will replay them
            log.warning("CUDA graph capture failed (%s); running decode steps eagerly from now on",
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
            return None
        return Captured(graph, x, pos, out)

    def _end_pool_capture(self) -> None:
        """After a failed capture: stop routing this thread's allocations to the graph pool (capture_end
        never got that far), or the allocator would keep the capture open and never release memory."""
        try:
            torch._C._cuda_endAllocateToPool(torch.cuda.current_device(), self._pool)
        except (AttributeError, RuntimeError):
            pass  # not begun, already ended, or a torch without this hook
