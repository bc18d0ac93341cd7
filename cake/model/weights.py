"""Read only the tensors asked for, by name, from a folder of safetensors files.

Works on a full Hugging Face folder (single `model.safetensors` or sharded with an index) and on a
`cake-split-model` bundle alike. The files are read with plain reads straight into the tensors that keep
the weights (fused matrices included), not memory-mapped: a mapped file's pages count in the process's
resident memory next to the copy, which would double a node's footprint while it loads.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from cake.errors import ModelError
from cake.layer_ranges import format_layers

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MAX_HEADER = 100 << 20
READ_CHUNK = 256 << 20
CONVERT_CHUNK = 32 << 20  # bytes of a tensor stored in another dtype read at a time, then converted

DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's JSON header and the offset where its tensor data starts (the file's
    `__metadata__`, a dict of strings, stays in the header under that key)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ModelError(f"'{path}' is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER:
                raise ModelError(f"'{path}' has an implausible header size; is it a safetensors file?")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelError(f"'{path}' has a corrupt safetensors header") from None
    except OSError as e:
        raise ModelError(f"cannot read '{path}': {e.strerror}") from None
    if not isinstance(header, dict):
        raise ModelError(f"'{path}' has a corrupt safetensors header")
    return header, 8 + n


@dataclass(frozen=True)
class Entry:
    """Where one tensor's bytes are: file, absolute byte range, dtype and shape."""

    path: Path
    start: int
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# Where a multimodal checkpoint keeps its text model (the hub's spelling, and transformers 5's in memory):
# its tensors are read under the text model's own names, so bundles and shipped files carry those.
TEXT_MODEL_PREFIXES = {"language_model.": "", "model.language_model.": "model."}


class WeightFiles:
    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / INDEX
        if index.exists():
            try:
                self.where: dict[str, str] = dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise ModelError(f"'{index}' is not a valid safetensors index (needs 'weight_map')") from None
        elif (self.dir / SINGLE).exists():
            self.where = {name: SINGLE for name in read_header(self.dir / SINGLE)[0] if name != "__metadata__"}
        else:
            raise ModelError(
                f"no {SINGLE} or {INDEX} in '{self.dir}'; --model must point at a Llama 3 folder "
                f"or a cake-split-model bundle"
            )
        self.stored: dict[str, str] = {}  # a name read here -> the checkpoint's name for it, where they differ
        for name in list(self.where):
            for prefix, plain in TEXT_MODEL_PREFIXES.items():
                if name.startswith(prefix):
                    alias = plain + name[len(prefix):]
                    self.where.setdefault(alias, self.where[name])
                    self.stored.setdefault(alias, name)
        self._headers: dict[str, tuple[dict, int]] = {}

    def holds(self) -> str:
        """What the folder holds, in words: 'layers 0-11' (a bundle), and 'the embedding' if it has it."""
        layers = sorted({int(m.group(1)) for n in self.where if (m := _LAYER.match(n))})
        head = "model.embed_tokens.weight" in self.where
        parts = [f"layers {format_layers(layers)}" if layers else "no decoder layers"]
        return " and ".join(parts + (["the embedding"] if head else []))

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def metadata(self, name: str) -> dict:
        """The `__metadata__` of the file that holds tensor `name` ({} when it has none)."""
        self.entry(name)
        meta = self._headers[self.where[name]][0].get("__metadata__")
        return meta if isinstance(meta, dict) else {}

    def read_rows(self, name: str, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of a 2-D tensor, as stored (a block at a time, for quantizing at load)."""
        e = self.entry(name)
        row_bytes = (e.end - e.start) // max(1, e.shape[0])
        out = torch.empty((end - start, *e.shape[1:]), dtype=e.dtype)
        _read_into(e.path, e.start + start * row_bytes, out)
        return out

    def entry(self, name: str) -> Entry:
        fname = self.where.get(name)
        if fname is None:
            raise ModelError(
                f"tensor '{name}' is not in '{self.dir}', which holds {self.holds()}; give this node the full "
                f"model folder (a worker can also take the bundle cake-split-model built for it from the same "
                f"topology)"
            )
        path = self.dir / fname
        if fname not in self._headers:
            if not path.exists():
                raise ModelError(f"'{path}' (listed in {INDEX} for '{name}') is missing; copy the whole model folder")
            self._headers[fname] = read_header(path)
        header, base = self._headers[fname]
        meta = header.get(self.stored.get(name, name)) if name != "__metadata__" else None
        try:
            dtype = DTYPES[meta["dtype"]]
            shape = tuple(int(d) for d in meta["shape"])
            start, end = (base + int(o) for o in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"tensor '{name}' is missing from or malformed in '{path}'; the file is corrupt "
                             f"or of an unsupported dtype") from None
        if end - start != math.prod(shape) * torch.empty((), dtype=dtype).element_size():
            raise ModelError(f"tensor '{name}' in '{path}' has {end - start} bytes for shape {list(shape)}; "
                             f"the file is corrupt")
        return Entry(path, start, end, dtype, shape)

    def get(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self.get_cat([name], dtype, device)

    def get_cat(self, names: list[str], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The named tensors stacked along dim 0 (one name: that tensor), read straight into one buffer."""
        entries = [self.entry(n) for n in names]
        rows = sum(e.shape[0] for e in entries) if entries[0].shape else 0
        shape = (rows, *entries[0].shape[1:]) if entries[0].shape else ()
        if any(e.shape[1:] != entries[0].shape[1:] for e in entries) or (len(entries) > 1 and not shape):
            raise ModelError(f"tensors {', '.join(names)} cannot be stacked; the checkpoint is not a Llama model")
        out = torch.empty(shape, dtype=dtype)
        offset = 0
        for e in entries:
            n = e.shape[0] if e.shape else 1
            part = out[offset:offset + n] if e.shape else out
            if e.dtype == dtype:
                _read_into(e.path, e.start, part)
            else:
                _convert_into(e, part)
            offset += n
        return out.to(device) if device.type != "cpu" else out

    def load(self, names: list[str], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        """Tensors by name. Checks all names exist before reading any."""
        self.check(names)
        return {n: self.get(n, dtype, device) for n in names}

    def check(self, names: list[str]) -> None:
        """Fail on a missing or malformed tensor before spending minutes reading the others."""
        for n in names:
            self.entry(n)


def _convert_into(e: Entry, out: torch.Tensor) -> None:
    """Read a tensor stored in another dtype into `out`, converting a block of rows at a time: the
    stored copy of a whole embedding (a GB in f32) would otherwise sit next to the converted one."""
    row_bytes = (e.end - e.start) // max(1, e.shape[0]) if e.shape else e.end - e.start
    block = max(1, CONVERT_CHUNK // max(1, row_bytes))
    rows = e.shape[0] if e.shape else 1
    buf = torch.empty((min(block, rows), *e.shape[1:]), dtype=e.dtype)
    for r in range(0, rows, block):
        n = min(block, rows - r)
        _read_into(e.path, e.start + r * row_bytes, buf[:n])
        if e.shape:
            out[r:r + n].copy_(buf[:n])
        else:
            out.copy_(buf.reshape(()))


def _read_into(path: Path, start: int, out: torch.Tensor) -> None:
    """Fill `out` (contiguous) with the bytes of `path` from `start`."""
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        got = 0
        while got < len(view):
            n = f.readinto(view[got:got + READ_CHUNK])
            if not n:
                raise ModelError(f"'{path}' ends early; the file is truncated")
            got += n
