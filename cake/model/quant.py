"""Weight-only quantization: int8 per output channel, int4 in groups along the input dimension.

The stored form (`Quantized`, and cake-split-model's quantized bundles; docs/quantization.md) is the
same on every device. At load a node turns it into a `QuantLinear`, whose products run through torch's
own weight-only kernel where that kernel exists, agrees with the stored form and measures faster, and
otherwise dequantize a block of rows at a time into F.linear: the whole matrix is never expanded.

  int8: w = q * scale                      q int8 in -127..127, scale bf16 per row
  int4: w = (q - 8) * scale + zero         q 0..15 two per byte, scale and zero bf16 per row and group

Scales and zeros are bf16 so that every compute dtype a node may choose holds them exactly: an f32 node's
products are then those of the dequantized weights, to f32 rounding.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cake.errors import ModelError

log = logging.getLogger("cake.model")

SCHEMES = ("none", "int8", "int4")
FORMAT_VERSION = 1
DEFAULT_GROUP = 32
GROUPS = (32, 64, 128, 256)  # what torch's int4 kernels take; the stored form takes any even size
STORE_DTYPE = torch.bfloat16
DEQUANT_BLOCK = 8 << 20  # bytes of dequantized rows the fallback product makes at a time
_CHOICE: dict[tuple, bool] = {}  # (scheme, dtype, device type, big) -> use torch's kernel (QuantLinear._choose)
# The same key -> whether a product of MANY_ROWS rows or more (a prompt) is faster from dequantized blocks:
# torch's weight-only kernels loop over rows, a GEMM on dequantized blocks barely notices them.
_MANY: dict[tuple, bool] = {}
MANY_ROWS = 16


@dataclass
class Quantized:
    """One matrix [out, in] in the stored form: qweight, scales (and zeros for int4)."""

    scheme: str
    qweight: torch.Tensor  # int8 [out, in]; int4: uint8 [out, padded_in // 2], even column in the low nibble
    scales: torch.Tensor  # bf16 [out] (int8) or [out, groups] (int4)
    zeros: torch.Tensor | None  # bf16 [out, groups] (int4)
    in_features: int
    group: int = 0  # int4 only

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros) if t is not None)

    def dequantize(self, start: int = 0, end: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows [start, end) as `dtype`, computed in f32 from the documented formula."""
        end = self.out_features if end is None else end
        s = self.scales[start:end].float()
        if self.scheme == "int8":
            return (self.qweight[start:end].float() * s[:, None]).to(dtype)
        q = unpack_int4(self.qweight[start:end]).float()
        rows, padded = q.shape
        z = self.zeros[start:end].float()
        w = (q.view(rows, -1, self.group) - 8) * s[..., None] + z[..., None]
        return w.view(rows, padded)[:, :self.in_features].to(dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized rows at `ids` (an embedding lookup), [*ids.shape, in]."""
        flat = ids.reshape(-1)
        pick = Quantized(self.scheme, self.qweight.index_select(0, flat), self.scales.index_select(0, flat),
                         None if self.zeros is None else self.zeros.index_select(0, flat), self.in_features, self.group)
        return pick.dequantize(dtype=dtype).view(*ids.shape, self.in_features)

    def to(self, device: torch.device) -> "Quantized":
        move = (lambda t: None if t is None else t.to(device))
        return Quantized(self.scheme, move(self.qweight), move(self.scales), move(self.zeros), self.in_features,
                         self.group)


def stored_bytes(scheme: str, out_features: int, in_features: int, group: int, dtype_bytes: int) -> int:
    """Bytes a matrix takes in `scheme` (dtype_bytes: its element size unquantized)."""
    if scheme == "none":
        return out_features * in_features * dtype_bytes
    if scheme == "int8":
        return out_features * (in_features + 2)
    groups = math.ceil(in_features / group)
    return out_features * (groups * group // 2 + 4 * groups)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[rows, cols] values 0..15 (cols even) -> uint8 [rows, cols // 2], even column in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """pack_int4's inverse: uint8 [rows, n] -> uint8 [rows, 2n]."""
    return torch.stack((p & 15, p >> 4), dim=-1).view(p.shape[0], -1)


def quantize(w: torch.Tensor, scheme: str, group: int = DEFAULT_GROUP) -> Quantized:
    """Quantize a float matrix [out, in] (any float dtype; computed in f32). Round half to even."""
    w = w.float()
    out, k = w.shape
    if scheme == "int8":
        scale = (w.abs().amax(dim=1) / 127).to(STORE_DTYPE)
        s = scale.float()
        s = torch.where(s == 0, 1.0, s)  # an all-zero row: any scale gives q = 0
        q = torch.round(w / s[:, None]).clamp_(-127, 127).to(torch.int8)
        return Quantized("int8", q, scale, None, k)
    if scheme != "int4":
        raise ValueError(f"unknown quantization scheme {scheme!r}")
    if group < 2 or group % 2:
        raise ModelError(f"--group-size {group} must be an even number of 2 or more (32 is the default)")
    padded = math.ceil(k / group) * group
    if padded != k:  # the last group is padded with copies of the row's last value: no effect on its range
        w = torch.cat([w, w[:, -1:].expand(out, padded - k)], dim=1)
    g = w.view(out, -1, group)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15).to(STORE_DTYPE)
    zero = (lo + 8 * scale.float()).to(STORE_DTYPE)  # a constant group: scale 0, zero its value, q 8
    s = scale.float()
    s = torch.where(s == 0, 1.0, s)
    q = torch.round((g - zero.float()[..., None]) / s[..., None] + 8).clamp_(0, 15)
    return Quantized("int4", pack_int4(q.view(out, padded)), scale, zero, k, group)


def quantize_rows(read_rows, rows: int, cols: int, scheme: str, group: int, block_bytes: int = 32 << 20) -> Quantized:
    """Quantize a matrix read a block of rows at a time (read_rows(start, end) -> float rows), so the
    full-precision matrix never exists whole."""
    block = max(1, block_bytes // max(1, cols * 4))
    out = None
    for r in range(0, rows, block):  # each block written into the result: the matrix never exists twice
        part = quantize(read_rows(r, min(rows, r + block)), scheme, group)
        if out is None:
            whole = (lambda t: None if t is None else t.new_empty((rows, *t.shape[1:])))
            out = Quantized(scheme, whole(part.qweight), whole(part.scales), whole(part.zeros), cols, part.group)
        for name in ("qweight", "scales", "zeros"):
            if getattr(part, name) is not None:
                getattr(out, name)[r:r + part.out_features] = getattr(part, name)
    return out


def concat(parts: list[Quantized]) -> Quantized:
    """Stack matrices of one scheme along their rows (fused projections: Q/K/V, gate/up)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if any(p.scheme != first.scheme or p.in_features != first.in_features or p.group != first.group for p in parts):
        raise ModelError("the fused projections were quantized differently; quantize the whole model in one run")
    cat = (lambda ts: None if ts[0] is None else torch.cat(ts))
    return Quantized(first.scheme, cat([p.qweight for p in parts]), cat([p.scales for p in parts]),
                     cat([p.zeros for p in parts]), first.in_features, first.group)


def check_shapes(q: Quantized, out: int, k: int, where: str) -> None:
    """A stored matrix that does not fit [out, k] in its scheme is one error naming it."""
    if q.scheme == "int8":
        want = {"qweight": ((out, k), torch.int8), "scales": ((out,), STORE_DTYPE)}
    else:
        groups = math.ceil(k / q.group)
        want = {"qweight": ((out, groups * q.group // 2), torch.uint8), "scales": ((out, groups), STORE_DTYPE),
                "zeros": ((out, groups), STORE_DTYPE)}
    for name, (shape, dtype) in want.items():
        t = getattr(q, name)
        if t is None:
            raise ModelError(f"{where}: the {q.scheme} tensor '{name}' is missing; the bundle is incomplete, "
                             f"split the model again")
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ModelError(f"{where}.{name} is {str(t.dtype).replace('torch.', '')} {list(t.shape)}, expected "
                             f"{str(dtype).replace('torch.', '')} {list(shape)} for {q.scheme} (group {q.group}) "
                             f"of a [{out}, {k}] matrix; the file is corrupt, split the model again")


# --- products --------------------------------------------------------------------------------------------


class QuantLinear:
    """A quantized matrix on its device, multiplied as x @ W^T (+ bias) by the kernel chosen at load."""

    def __init__(self, q: Quantized, device: torch.device, dtype: torch.dtype):
        self.q = q.to(device)
        self.dtype = dtype
        self.out_features, self.in_features = q.out_features, q.in_features
        self.kernel_name, self._kernel = "dequant", None
        self._scales = self._packed = None
        self._many_dequant = False  # prompts from dequantized blocks (only where the stored form is kept)
        self._choose()

    @property
    def nbytes(self) -> int:
        if self._packed is not None:  # the stored qweight was replaced by the kernel's layout
            return sum(t.numel() * t.element_size() for t in (self._packed, self._scales))
        return self.q.nbytes

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        kernel = self._kernel is not None and not (self._many_dequant and x.numel() >= MANY_ROWS * self.in_features)
        y = self._kernel(x) if kernel else self._dequant_product(x)
        return y if bias is None else y + bias

    def _dequant_product(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T from blocks of dequantized rows: a block of W in x's dtype at a time."""
        rows = self.out_features
        block = max(16, DEQUANT_BLOCK // max(1, self.in_features * x.element_size()))
        if block >= rows:
            return F.linear(x, self.q.dequantize(dtype=x.dtype))
        out = torch.empty(*x.shape[:-1], rows, dtype=x.dtype, device=x.device)
        for r in range(0, rows, block):
            e = min(rows, r + block)
            out[..., r:e] = F.linear(x, self.q.dequantize(r, e, x.dtype))
        return out

    # Kernel choice, once per process for each scheme, dtype, device and size class (a million weights):
    # the kernel must agree with the dequantized product on a probe, and is kept unless the fallback is
    # clearly faster on the first matrix of that class (one row, as a decode step runs).
    def _choose(self) -> None:
        make = self._int8_kernel if self.q.scheme == "int8" else self._int4_kernel
        try:
            kernel = make()
        except (RuntimeError, NotImplementedError, TypeError, AttributeError):
            kernel = None
        big = self.out_features * self.in_features >= 1 << 20  # small matrices time mostly overhead
        key = (self.q.scheme, self.dtype, self.q.qweight.device.type, big)
        if kernel is not None and key not in _CHOICE:
            _CHOICE[key] = self._kernel_wins(kernel)
            log.info("%s products in %s on %s: %s", self.q.scheme, str(self.dtype).replace("torch.", ""), key[2],
                     "torch's kernel" if _CHOICE[key] else "dequantized blocks (the kernel is missing or slower)")
        if kernel is not None and _CHOICE[key]:
            self._kernel, self.kernel_name = kernel, f"{self.q.scheme}-kernel"
            if self._packed is None:  # the stored form stays (int8): prompts may take the other way
                if key not in _MANY:
                    many = torch.randn(MANY_ROWS * 4, self.in_features, generator=torch.Generator().manual_seed(1))
                    many = many.to(self.q.qweight.device, self.dtype)
                    _MANY[key] = _time(self._dequant_product, many) < _time(kernel, many)
                    if _MANY[key]:
                        log.info("%s products of %d rows or more on %s: dequantized blocks (faster there)",
                                 self.q.scheme, MANY_ROWS, key[2])
                self._many_dequant = _MANY[key]
            self._adopt()
        else:
            self._scales = self._packed = None

    def _kernel_wins(self, kernel) -> bool:
        probe = torch.randn(2, self.in_features, generator=torch.Generator().manual_seed(0)).to(
            self.q.qweight.device, self.dtype)
        try:
            got = kernel(probe).float()
        except (RuntimeError, NotImplementedError, TypeError):
            return False
        want = self._dequant_product(probe).float()
        tol = 1e-4 if self.dtype == torch.float32 else 3e-2
        if not torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max()) + 1e-6):
            log.warning("%s kernel disagrees with the dequantized product on %s; using the fallback",
                        self.q.scheme, self.q.qweight.device)
            return False
        one = probe[:1]
        return _time(kernel, one) < 1.5 * _time(self._dequant_product, one)  # noise must not lose the kernel

    def _adopt(self) -> None:
        """The kernel is kept: free what only the fallback needed (the int4 CPU layout is a copy)."""
        if self._packed is not None:  # fresh empty tensors: a [:0] view would keep the whole storage alive
            empty = (lambda t: None if t is None else t.new_empty((0, *t.shape[1:])))
            self.q = Quantized(self.q.scheme, empty(self.q.qweight), empty(self.q.scales), empty(self.q.zeros),
                               self.in_features, self.q.group)

    def _int8_kernel(self):
        op = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
        if op is None or self.in_features % 32:  # torch 2.13's CPU kernel crashes on some other widths (300)
            return None
        scales = self.q.scales.to(self.dtype)
        qweight = self.q.qweight

        def run(x: torch.Tensor) -> torch.Tensor:
            x2 = x.reshape(-1, x.shape[-1])
            return op(x2.contiguous(), qweight, scales).view(*x.shape[:-1], -1)
        return run

    def _int4_kernel(self):
        q, dev = self.q, self.q.qweight.device
        if q.group not in GROUPS or q.out_features % 16:
            return None
        padded = q.qweight.shape[1] * 2
        sz = torch.stack((q.scales, q.zeros), dim=-1).transpose(0, 1).contiguous().to(self.dtype)  # [groups, out, 2]
        if dev.type == "cpu":
            op, pack = torch.ops.aten._weight_int4pack_mm_for_cpu, torch.ops.aten._convert_weight_to_int4pack_for_cpu
            packed = torch.cat([pack(unpack_int4(q.qweight[r:r + 1024]).to(torch.int32), 1)
                                for r in range(0, q.out_features, 1024)])
        else:
            op, pack = torch.ops.aten._weight_int4pack_mm, torch.ops.aten._convert_weight_to_int4pack
            if self.dtype != torch.bfloat16:
                return None
            u = unpack_int4(q.qweight)
            packed = pack(((u[:, 0::2] << 4) | u[:, 1::2]).contiguous(), 8)  # that kernel's nibble order
        self._packed, self._scales = packed, sz
        group, k = q.group, q.in_features

        def run(x: torch.Tensor) -> torch.Tensor:
            x2 = x.reshape(-1, k)
            if padded != k:
                x2 = F.pad(x2, (0, padded - k))
            return op(x2.contiguous(), packed, group, sz).view(*x.shape[:-1], -1)
        return run


def weight_nbytes(w: torch.Tensor | QuantLinear | Quantized | None) -> int:
    """Bytes a weight takes where it is kept: a quantized one's stored form, else the tensor's."""
    if w is None:
        return 0
    return w.nbytes if isinstance(w, (QuantLinear, Quantized)) else w.numel() * w.element_size()


def _time(fn, x: torch.Tensor, reps: int = 3) -> float:
    fn(x)
    best = math.inf
    for _ in range(reps):
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        t0 = time.perf_counter()
        fn(x)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        best = min(best, time.perf_counter() - t0)
    return best
