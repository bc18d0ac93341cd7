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
        self.rows_faster: dict[tuple[int, int, int], bool] = {}  # (start, end, batch size) -> choice
        self._warm: set[tuple[int, int, int]] = set()

    def decode(self, hidden: torch.Tensor, rows, start: int, end: int, eager) -> torch.Tensor:
        """Layers [start, end) for one token of each row; `eager` computes the same without graphs."""
        with self._on_device():
            if len(rows) == 1:
                out = self.step(hidden, rows[0], start, end)
                return eager() if out is None else out
            key = (start, end, len(rows))
            choice = self.rows_faster.get(key)
            if choice is False:
                return eager()
            out = self._rows(hidden, rows, start, end)  # captures what it lacks the first time
            if out is None:
                return eager()
            if choice is None:
                # Both ways write the same keys and values, so running each once more to time it is safe.
                t_rows = self._timed(lambda: self._rows(hidden, rows, start, end))
                t_eager = self._timed(eager)
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

    def _timed(self, fn) -> float:
        sync = torch.cuda.synchronize if self.stack.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    def _capture(self, hidden: torch.Tensor, cache, p: int, start: int, end: int, span: int) -> Captured | None:
        s = self.stack
        x = torch.empty((1, 1, s.config.hidden_size), dtype=s.dtype, device=s.device)
        x.copy_(hidden)
        pos = torch.full((1,), p, dtype=torch.long, device=s.device)
        try:
            if (start, end, span) not in self._warm:
                # Run once outside capture first, as PyTorch asks: lazy initialisation (cuBLAS
                # workspaces, kernel loading) must not happen inside a graph. It writes this step's
                # keys and values, which the replay writes again, identically.
                side = torch.cuda.Stream(s.device)
                side.wait_stream(torch.cuda.current_stream(s.device))
                with torch.cuda.stream(side):
                    s.decode_static(x, cache, pos, start, end, span)
                torch.cuda.current_stream(s.device).wait_stream(side)
                self._warm.add((start, end, span))
            graph = torch.cuda.CUDAGraph()
            # thread_local: a GPU copy on another thread of this process (the master's event loop
            # encoding a hidden state for a worker) must not fail the capture, nor the capture it.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = s.decode_static(x, cache, pos, start, end, span)
        except RuntimeError as e:
            self.active = False
            log.warning("CUDA graph capture failed (%s); running decode steps eagerly from now on",
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
            return None
        return Captured(graph, x, pos, out)
