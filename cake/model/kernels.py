"""The arithmetic every layer shares: matrix products (`linear`, `add_linear`) and RMSNorm.

`linear` is F.linear's result, through a faster kernel where torch's general one is slow on the CPU
(the choice and its figures: docs/benchmarks.md, CPU kernels); a quantized matrix multiplies through
its own kernel (cake.model.quant).
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F

from cake.model.quant import QuantLinear


def _onednn_linear_op():
    """oneDNN's fp32 linear, when this torch build has it and it agrees with F.linear."""
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return None
    try:
        with torch.inference_mode():
            x, w, b = torch.randn(4, 1, 8), torch.randn(6, 8), torch.randn(6)
            if torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), atol=1e-5):
                return op
    except (RuntimeError, TypeError):
        pass
    return None


_ONEDNN_LINEAR = _onednn_linear_op()


def _wants_onednn(x: torch.Tensor) -> bool:
    """Batched decode steps (4+ sessions, one position each) in f32 on the CPU: MKL's kernel slows
    sharply at four rows, oneDNN's does not (docs/benchmarks.md, CPU kernels)."""
    one_position = x.dim() == 2 or (x.dim() == 3 and x.shape[1] == 1)
    return (_ONEDNN_LINEAR is not None and one_position and x.shape[0] >= 4
            and x.dtype == torch.float32 and x.device.type == "cpu")


def _half_cpu_kernel(x: torch.Tensor, w: torch.Tensor) -> str:
    """For bf16 on the CPU, where torch's general kernel is slow for a few rows: 'mv' for one row,
    'wx' (W @ x^T) for 2-24 rows of a matrix of a million weights or more, else '' (F.linear). Both give
    F.linear's result bit for bit, so a session's logits do not depend on which others share its batch.
    Not in f16 or f32, where they are slower (docs/benchmarks.md, CPU kernels)."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" or not x.shape[-1]:
        return ""
    rows = x.numel() // x.shape[-1]
    return "mv" if rows == 1 else "wx" if rows <= 24 and w.numel() >= 1 << 20 else ""


@functools.cache
def _add_inside_mv() -> bool:
    """Whether torch.addmv beats torch.mv and a separate add for one bf16 row on this CPU, timed once on a
    2048 x 2048 matrix: which wins depends on the CPU (docs/benchmarks.md, CPU kernels). A separate add
    is also the reference's own rounding."""
    g = torch.Generator().manual_seed(0)
    w, x, c = (torch.randn(*shape, generator=g).bfloat16() for shape in ((2048, 2048), (2048,), (2048,)))

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)
    return best(lambda: torch.addmv(c, w, x)) < best(lambda: torch.mv(w, x) + c)


def _half_cpu_product(kernel: str, x: torch.Tensor, w: torch.Tensor, add: torch.Tensor | None) -> torch.Tensor:
    """x @ w^T (+ `add`: a bias [out] or a residual [rows, out], added inside the product) through the
    kernel _half_cpu_kernel chose, computed as w @ x^T."""
    out = w.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    c = None if add is None else add.reshape(-1, out).t()  # [out, 1] for a bias, [out, rows] for a residual
    if kernel == "mv":
        if c is None:
            y = torch.mv(w, x2[0])
        else:
            y = torch.addmv(c.reshape(-1), w, x2[0]) if _add_inside_mv() else torch.mv(w, x2[0]) + c.reshape(-1)
    else:
        y = torch.mm(w, x2.t()) if c is None else torch.addmm(c, w, x2.t())
    return y.reshape(out, -1).t().contiguous().view(*x.shape[:-1], out)


def linear(x: torch.Tensor, w: torch.Tensor | QuantLinear, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with another kernel where that one is slow (see _wants_onednn and _half_cpu_kernel);
    a quantized matrix multiplies through its own kernel."""
    if isinstance(w, QuantLinear):
        return w(x, b)
    if _wants_onednn(x):
        return _ONEDNN_LINEAR(x, w, b, "none", [], "")
    kernel = _half_cpu_kernel(x, w)
    return _half_cpu_product(kernel, x, w, b) if kernel else F.linear(x, w, b)


def add_linear(residual: torch.Tensor, x: torch.Tensor, w: torch.Tensor | QuantLinear,
               b: torch.Tensor | None) -> torch.Tensor:
    """residual + linear(x, w, b). For 2-D [rows, features] tensors (a one-token step) one addmm or addmv,
    the add riding in the matrix product, unless there is a bias, a quantized matrix, or oneDNN should
    take the product; a prompt's [B, T, features] adds after the product."""
    if x.dim() != 2 or b is not None or isinstance(w, QuantLinear) or _wants_onednn(x):
        return residual + linear(x, w, b)
    kernel = _half_cpu_kernel(x, w)
    return _half_cpu_product(kernel, x, w, residual) if kernel else torch.addmm(residual, x, w.t())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 and weight.dim() == 1:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)  # one fused op instead of six
    if weight.dtype == torch.float32:  # Gemma's (1 + w), kept in f32: it scales before the cast
        return (F.rms_norm(x.float(), (x.shape[-1],), None, eps) * weight).to(x.dtype)
    # Normalise in float32, cast back, then scale: the reference's rounding, so f16/bf16 nodes agree with it
    # (and a weight per head, for the q/k norms, broadcasts).
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)
