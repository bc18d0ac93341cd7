"""One-token decode steps replayed as CUDA graphs.

On a GPU a decode step of a small batch is bound by launching kernels, not by the GPU: each of a layer's
~30 operations costs the CPU several µs to launch and the GPU less to run. A CUDA graph records a whole
stage's launches once and replays them with one call. Graphs fix every address and shape, so:

- one graph per (session cache, layer range, attention span): it reads that session's KV cache in place;
- the position lives in a device tensor, keys are written with index_copy_, and attention covers a span
  of the cache rounded up to a power of two (at least SPAN_MIN) with positions past the current one
  masked, so one graph serves every position up to its span (`LayerStack.decode_static`);
- a batch of several sessions' tokens runs as one replay per row or as one eager pass, whichever was
  faster when that batch size was first seen; prompts run eagerly.

`CAKE_CUDA_GRAPHS=0` (or `cake --no-cuda-graphs`) turns them off. A capture that fails logs one warning
and turns them off for the process: the eager path computes the same step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass

import torch

log = logging.getLogger("cake.model")

ENV = "CAKE_CUDA_GRAPHS"
SPAN_MIN = 256


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def span_for(length: int, capacity: int) -> int:
    """The attention span a graph uses for a step that needs `length` positions: a power of two, so a
    session needs a handful of graphs, and attention reads at most twice what it must."""
    span = SPAN_MIN
    while span < length:
        span *= 2
    return min(span, capacity)


@dataclass
class Captured:
    graph: "torch.cuda.CUDAGraph"
    x: torch.Tensor  # [1, 1, H] input, copied in before each replay
    pos: torch.Tensor  # [1] long: the position of the token
    out: torch.Tensor  # [1, 1, H] output, overwritten by each replay


class DecodeGraphs:
    """A stack's captured one-token steps, and for batches of one-token rows the choice between one
    eager pass over the batch (weights read once) and one replay per row (no launch overhead), made by
    timing both the first time each batch size is seen: which wins depends on the layer sizes and the
    GPU (launch-bound small layers favour replays, bandwidth-bound large ones the shared pass).

    `replay=False` runs the fixed-shape step eagerly instead of capturing it: the same bookkeeping on a
    CPU, for tests.
    """

    def __init__(self, stack, replay: bool = True):
        self.stack = stack
        self.replay = replay
        self.active = True
        # (start, end, batch size, span) -> whether per-row replays beat one eager pass
        self.rows_faster: dict[tuple[int, int, int, int], bool] = {}
        self._warm: set[tuple[int, int, int]] = set()
        # One memory pool and capture stream for all of this stack's graphs: replays are serialized on
        # one stream and each output is cloned before the next replay, so graphs can share temporaries
        # (one pool per graph would cost a 2 MiB segment or more per session and span).
        self._pool = None
        self._stream = None

    def decode(self, hidden: torch.Tensor, rows, start: int, end: int, eager) -> torch.Tensor:
        """Layers [start, end) for one token of each row; `eager` computes the same without graphs."""
        with self._on_device():
            if len(rows) == 1:
                out = self.step(hidden, rows[0], start, end)
                return eager() if out is None else out
            span = span_for(max(r.start for r in rows) + 1, self.stack.capacity)
            key = (start, end, len(rows), span)
            choice = self.rows_faster.get(key)
            if choice is False:
                return eager()
            out = self._rows(hidden, rows, start, end)  # captures what it lacks the first time
            if out is None:
                return eager()
            if choice is None:
                # Each way writes this step's keys and values at the same positions (equal up to
                # rounding), so running both to time them is safe; the per-row run goes last so the
                # cache holds exactly what produced the returned output.
                t_eager, _ = self._timed(eager)
                t_rows, out = self._timed(lambda: self._rows(hidden, rows, start, end))
                self.rows_faster[key] = t_rows < t_eager
                log.debug("batch of %d on layers %d-%d: %.2f ms as replays, %.2f ms eager", len(rows), start,
                          end - 1, 1e3 * t_rows, 1e3 * t_eager)
            return out

    def _rows(self, hidden: torch.Tensor, rows, start: int, end: int) -> torch.Tensor | None:
        outs = []
        for b, row in enumerate(rows):
            out = self.step(hidden[b:b + 1], row, start, end)
            if out is None:
                return None
            outs.append(out)
        return torch.cat(outs)

    def step(self, hidden: torch.Tensor, row, start: int, end: int) -> torch.Tensor | None:
        """Layers [start, end) for one token of one session; None when the caller should run it
        eagerly (graphs turned off after a failed capture)."""
        cache, p = row.cache, row.start
        span = span_for(p + 1, self.stack.capacity)
        if not self.replay:
            x = hidden.to(device=self.stack.device, dtype=self.stack.dtype)
            pos = torch.full((1,), p, dtype=torch.long, device=self.stack.device)
            out = self.stack.decode_static(x, cache, pos, start, end, span)
        else:
            key = (start, end, span)
            cap = cache.graphs.get(key)
            if cap is None:
                cap = self._capture(hidden, cache, p, start, end, span)
                if cap is None:
                    return None
                cache.graphs[key] = cap
            else:
                cap.x.copy_(hidden)
                cap.pos.fill_(p)
            cap.graph.replay()
            out = cap.out.clone()  # the next replay overwrites cap.out
        for i in range(start, end):
            cache.lengths[cache.slot[i]] = p + 1
        return out

    def _on_device(self):
        if self.stack.device.type == "cuda":
            return torch.cuda.device(self.stack.device)  # capture and replay on the stack's GPU
        return contextlib.nullcontext()

    def _timed(self, fn):
        """(seconds, result) of fn(), its GPU work included."""
        sync = torch.cuda.synchronize if self.stack.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        result = fn()
        sync()
        return time.perf_counter() - t0, result

    def _capture(self, hidden: torch.Tensor, cache, p: int, start: int, end: int, span: int) -> Captured | None:
        s = self.stack
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream(s.device)
        x = torch.empty((1, 1, s.config.hidden_size), dtype=s.dtype, device=s.device)
        x.copy_(hidden)
        pos = torch.full((1,), p, dtype=torch.long, device=s.device)
        current = torch.cuda.current_stream(s.device)
        if (start, end, span) not in self._warm:
            # Run once outside capture first, as PyTorch asks: lazy initialisation (cuBLAS workspaces,
            # kernel loading) must not happen inside a graph. It writes this step's keys and values,
            # which the replay writes again, identically.
            self._stream.wait_stream(current)
            try:
                with torch.cuda.stream(self._stream):
                    s.decode_static(x, cache, pos, start, end, span)
            finally:
                current.wait_stream(self._stream)
            self._warm.add((start, end, span))
        graph = torch.cuda.CUDAGraph()
        try:
            # The outer stream context restores the caller's stream even when capture_end raises
            # (torch.cuda.graph's own exit would leave this thread on the capture stream).
            # thread_local: the master's event loop thread may copy a hidden state off the GPU meanwhile.
            with torch.cuda.stream(self._stream), torch.cuda.graph(
                    graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"):
                out = s.decode_static(x, cache, pos, start, end, span)
        except RuntimeError as e:  # torch.AcceleratorError too: CUDA reports a failed capture with it.
            # A CUDA context broken for good fails the eager step that follows, with its own error.
            self._end_pool_capture()
            if isinstance(e, torch.OutOfMemoryError):
                log.warning("no GPU memory to capture a decode step; this step runs eagerly")
                return None
            self.active = False
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
