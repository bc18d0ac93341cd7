"""Read only the tensors asked for, by name, from a folder of safetensors files.

Works on a full Hugging Face folder (single `model.safetensors` or sharded with an index) and on a
`cake-split-model` bundle alike. Files are memory-mapped; a tensor is materialised only when asked for.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from cake.errors import ModelError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class WeightFiles:
    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self.where: dict[str, str] = {}
        index = self.dir / INDEX
        if index.exists():
            try:
                self.where = dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError):
                raise ModelError(f"'{index}' is not a valid safetensors index (needs 'weight_map')") from None
        elif (self.dir / SINGLE).exists():
            with safe_open(self.dir / SINGLE, framework="pt") as f:
                self.where = {name: SINGLE for name in f.keys()}
        else:
            raise ModelError(
                f"no {SINGLE} or {INDEX} in '{self.dir}'; --model must point at a Llama 3 folder "
                f"or a cake-split-model bundle"
            )
        self._open: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def _file(self, name: str):
        fname = self.where.get(name)
        if fname is None:
            raise ModelError(
                f"tensor '{name}' is not in '{self.dir}'; point --model at the full model or at the bundle "
                f"cake-split-model built for this node"
            )
        if fname not in self._open:
            path = self.dir / fname
            if not path.exists():
                raise ModelError(f"'{path}' (listed in {INDEX} for '{name}') is missing; copy the whole model folder")
            self._open[fname] = safe_open(path, framework="pt", device="cpu")
        return self._open[fname]

    def get(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        t = self._file(name).get_tensor(name)
        if t.dtype != dtype:
            t = t.to(dtype)
        return t.to(device) if t.device != device else t

    def load(self, names: list[str], dtype: torch.dtype, device: torch.device, prefix: str = "") -> dict[str, torch.Tensor]:
        """Tensors by name; keys have `prefix` stripped. Checks all names exist before reading any."""
        for n in names:
            self._file(n)
        return {n[len(prefix):]: self.get(n, dtype, device) for n in names}

    def close(self) -> None:
        self._open.clear()
