"""One-token decode steps replayed as CUDA graphs.

On a GPU a decode step of a small batch is bound by launching kernels, not by the GPU: each of a layer's
~30 operations costs the CPU several µs to launch and the GPU less to run. A CUDA graph records a whole
stage's launches once and replays them with one call. Graphs fix every address and shape, so:

- one graph per (session cache, layer range, attention span): it reads that session's KV cache in place;
- the position lives in a device tensor, keys are written with index_copy_, and attention covers a span
  of the cache rounded up to a power of two (at least SPAN_MIN) with positions past the current one
  masked, so one graph serves every position up to its span (`LayerStack.decode_static`);
- batches of several sessions, and prompts, run eagerly as before.

`CAKE_CUDA_GRAPHS=0` (or `cake --no-cuda-graphs`) turns them off. A capture that fails logs one warning
and turns them off for the process: the eager path computes the same step.
"""

from __future__ import annotations

import logging
import os
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
    def __init__(self, stack):
        self.stack = stack
        self.active = True
        self._warm: set[tuple[int, int, int]] = set()

    def step(self, hidden: torch.Tensor, row, start: int, end: int) -> torch.Tensor | None:
        """Run layers [start, end) for one token of one session; None when the caller should run it
        eagerly (graphs turned off after a failed capture)."""
        with torch.cuda.device(self.stack.device):  # capture and replay on the stack's GPU
            return self._step(hidden, row, start, end)

    def _step(self, hidden: torch.Tensor, row, start: int, end: int) -> torch.Tensor | None:
        cache, p = row.cache, row.start
        span = span_for(p + 1, self.stack.capacity)
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
        for i in range(start, end):
            cache.lengths[cache.slot[i]] = p + 1
        return cap.out.clone()  # the next replay overwrites cap.out

    def _capture(self, hidden: torch.Tensor, cache, p: int, start: int, end: int, span: int) -> Captured | None:
        s = self.stack
        x = torch.empty((1, 1, s.config.hidden_size), dtype=s.dtype, device=s.device)
        x.copy_(hidden)
        pos = torch.full((1,), p, dtype=torch.long, device=s.device)
        try:
            if (start, end, span) not in self._warm:
                # Run once outside capture first, as PyTorch asks: lazy initialisation (cuBLAS
                # workspaces, kernel loading) must not happen inside a graph. It writes this step's
                # keys and values, which the replay below writes again, identically.
                side = torch.cuda.Stream(s.device)
                side.wait_stream(torch.cuda.current_stream(s.device))
                with torch.cuda.stream(side):
                    s.decode_static(x, cache, pos, start, end, span)
                torch.cuda.current_stream(s.device).wait_stream(side)
                self._warm.add((start, end, span))
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = s.decode_static(x, cache, pos, start, end, span)
        except RuntimeError as e:
            self.active = False
            log.warning("CUDA graph capture failed (%s); running decode steps eagerly from now on",
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
            return None
        return Captured(graph, x, pos, out)
