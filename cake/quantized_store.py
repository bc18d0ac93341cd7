"""What a master ships to a worker that keeps its matrices quantized when the master's folder holds floats:
each layer quantized once, into a folder of the master's cache, as cake-split-model --quantize writes it.

The worker then receives int8 or int4 bytes (up to 7x fewer than f32 on the wire and its disk), not floats
it would quantize itself. A layer file is written whole under a temporary name and renamed, so one that
exists is complete; the master hashes it like any file it ships, so the worker still checks every byte.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from cake.errors import CakeError
from cake.memory import gb
from cake.model import quant
from cake.model.config import LlamaConfig
from cake.model.loader import META_GROUP, META_SCHEME, META_VERSION, Quantization, quantizable
from cake.model.tensor_names import layer_tensor_names
from cake.model.weights import INDEX, WeightFiles, read_header
from cake.split import Quantizer, ShardWriter, copied

log = logging.getLogger("cake.shipping")


class QuantizedStore:
    """Layers of one model quantized to one format, in `folder`: made on demand, kept across runs."""

    def __init__(self, source: WeightFiles, config: LlamaConfig, fmt: Quantization, folder: Path):
        self.source, self.config, self.fmt, self.folder = source, config, fmt, folder
        self._lock = threading.Lock()  # layers are made in threads; one writes the index at a time

    def files(self, layers: list[int]) -> WeightFiles:
        """The store with these layers in it (quantizing those it lacks: slow, once)."""
        try:
            return self._files(layers)
        except OSError as e:
            raise CakeError(f"cannot write the master's quantized layers in '{self.folder}': {e.strerror or e}; "
                            f"free space there, or point XDG_CACHE_HOME at a disk with room") from None

    def _files(self, layers: list[int]) -> WeightFiles:
        self.folder.mkdir(parents=True, exist_ok=True)
        todo = [i for i in layers if not self._path(i).exists()]
        if todo:
            t0 = time.monotonic()
            log.info("quantizing layers %s to %s for a worker that keeps them so (once; kept in %s)",
                     ",".join(map(str, todo)), self.fmt, self.folder)
            for i in todo:
                self._make(i)
            log.info("quantized %d layer(s) to %s in %.1fs (%s)", len(todo), self.fmt, time.monotonic() - t0,
                     gb(sum(self._path(i).stat().st_size for i in todo)))
        with self._lock:
            self._write_index()
        return WeightFiles(self.folder)

    def _path(self, index: int) -> Path:
        return self.folder / f"layer-{index:05d}.safetensors"

    def _make(self, index: int) -> None:
        quantizer = Quantizer(self.source, self.config, self.fmt)
        tmp = self.folder / f".making-{index:05d}-{os.getpid()}-{threading.get_ident()}"
        tmp.mkdir(exist_ok=True)
        writer = ShardWriter(tmp, {META_SCHEME: self.fmt.scheme, META_GROUP: str(self.fmt.group),
                                   META_VERSION: str(quant.FORMAT_VERSION)})
        for name in layer_tensor_names(index, self.config):
            parts = quantizer.parts(name) if quantizable(name) else [copied(name, self.source.entry(name))]
            for part in parts:
                writer.add(part)
        writer.write(lambda name, size: None)
        (made,) = tmp.glob("*.safetensors")
        os.replace(made, self._path(index))
        tmp.rmdir()

    def _write_index(self) -> None:
        where = {name: path.name for path in sorted(self.folder.glob("layer-*.safetensors"))
                 for name in read_header(path)[0] if name != "__metadata__"}
        text = json.dumps({"metadata": {}, "weight_map": where})
        tmp = self.folder / f".{INDEX}.{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, self.folder / INDEX)
