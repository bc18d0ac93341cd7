"""The memory-bandwidth limit: how long a plain matrix-vector product over exactly the bytes a decode step
reads takes here. A decode step can go no faster; its fraction of that speed is the headline figure for
a model that does not fit the caches."""

from __future__ import annotations

import statistics
import time

from .children import Job, Subject
from .models import SPECS
from .weights import ITEMSIZE

MATVEC_ITERS = 10


class Bandwidth(Subject):
    """One matrix-vector product over as many bytes as a decode step reads, on the nodes' device and dtype."""

    def __init__(self, job: Job):
        import torch

        from cake.devices import DTYPES

        hidden = SPECS[job.model].hidden
        dtype, self.device = DTYPES[job.dtype], torch.device(job.device)
        # Written, not torch.empty: untouched pages all map the one shared zero page, which reads from cache.
        self.w = torch.full((-(-job.nbytes // (ITEMSIZE[job.dtype] * hidden)), hidden), 1e-3, dtype=dtype,
                            device=self.device)
        self.x = torch.ones(1, hidden, dtype=dtype, device=self.device)
        # The faster of torch's two kernels for it: F.linear, or torch.mv (faster for bf16 on a CPU).
        kernels = {"F.linear": lambda: torch.nn.functional.linear(self.x, self.w),
                   "torch.mv": lambda: torch.mv(self.w, self.x[0])}
        best = {}
        for name, kernel in kernels.items():
            for _ in range(3):
                self._matvec(kernel)
            best[name] = min(self._matvec(kernel) for _ in range(5))
        self.kernel_name = min(best, key=best.get)
        self.kernel = kernels[self.kernel_name]

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _matvec(self, kernel) -> float:
        self._sync()
        t0 = time.perf_counter()
        kernel()
        self._sync()
        return time.perf_counter() - t0

    def run(self) -> dict:
        return {"matvec_s": statistics.median(self._matvec(self.kernel) for _ in range(MATVEC_ITERS)),
                "kernel": self.kernel_name}


class Reads(Subject):
    """The memory-bandwidth limit for each of several byte counts (one per weight format): the time a
    matrix-vector product over exactly that many bytes takes, with the fastest plain read torch has here.
    The dtype is the faster per byte of f32 and the job's (on an AVX2 CPU bf16's kernels read slower than
    f32's: see docs/benchmarks.md), chosen once on the largest size; the kernel (F.linear or torch.mv) per
    size. One matrix of the largest size is held; a smaller size reads its first rows."""

    def __init__(self, job: Job):
        import torch

        from cake.devices import DTYPES

        self.device, hidden, top = torch.device(job.device), SPECS[job.model].hidden, max(job.sizes)
        per_byte = {}
        for name in dict.fromkeys(("f32", job.dtype)):  # one matrix at a time: a GPU shares its memory
            self._make(DTYPES[name], -(-top // (ITEMSIZE[name] * hidden)), hidden)
            per_byte[name] = self._fastest(self.w)[1] / self.w.nbytes
            self.w = None
        self.dtype = min(per_byte, key=per_byte.get)
        self._make(DTYPES[self.dtype], -(-top // (ITEMSIZE[self.dtype] * hidden)), hidden)
        self.views = [self.w[:-(-n // (ITEMSIZE[self.dtype] * hidden))] for n in job.sizes]
        self.kernels = [self._fastest(v)[0] for v in self.views]

    def _make(self, dtype, rows: int, hidden: int) -> None:
        import torch

        # Written, not torch.empty: untouched pages all map the one shared zero page, which reads from cache.
        self.w = torch.full((rows, hidden), 1e-3, dtype=dtype, device=self.device)
        self.x = torch.ones(1, hidden, dtype=dtype, device=self.device)

    def _kernels(self, w) -> dict:
        import torch

        return {"F.linear": lambda: torch.nn.functional.linear(self.x, w), "torch.mv": lambda: torch.mv(w, self.x[0])}

    def _fastest(self, w) -> tuple[str, float]:
        best = {}
        for name, kernel in self._kernels(w).items():
            for _ in range(2):
                self._read(kernel)
            best[name] = min(self._read(kernel) for _ in range(3))
        name = min(best, key=best.get)
        return name, best[name]

    def _read(self, kernel) -> float:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        kernel()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def run(self) -> dict:
        return {"reads_s": [statistics.median(self._read(self._kernels(v)[k]) for _ in range(MATVEC_ITERS))
                            for v, k in zip(self.views, self.kernels)],
                "read_kernels": self.kernels, "read_dtype": self.dtype,
                "read_bytes": [v.nbytes for v in self.views]}
