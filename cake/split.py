"""`cake-split-model`: write one bundle per worker holding only that worker's layer tensors.

Tensors are copied byte for byte from the source safetensors files (no dtype change), one tensor at a
time, so memory stays flat whatever the model size; with --quantize the matrices are quantized a block
of rows at a time instead (docs/quantization.md). Each bundle is a folder a worker runs from directly:
safetensors shards + index, config, generation config, tokenizer files, topology.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click

from cake.command import Command

import torch

from cake.errors import CakeError, ModelError
from cake.model import quant
from cake.model.config import load_config
from cake.model.loader import (META_GROUP, META_SCHEME, META_VERSION, Quantization, choose_quantization,
                               matrix_shape, quantizable, read_quantized)
from cake.model.tensor_names import layer_tensor_names
from cake.model.weights import DTYPES, INDEX, Entry, WeightFiles
from cake.topology import load_topology

SHARD_BYTES = 4 << 30
COPY_CHUNK = 16 << 20
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
EXTRA_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja")


@dataclass
class Part:
    """One tensor of a bundle: what its header says, and how its bytes are written when its turn comes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    write: Callable[[object], None]  # writes exactly size bytes to the open file

    @property
    def size(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def copied(name: str, e: Entry) -> Part:
    return Part(name, e.dtype, e.shape, lambda f: _copy_range(e.path, e.start, e.end - e.start, f))


class Quantizer:
    """The parts of quantized matrices; each matrix is quantized (a block of rows at a time) when its
    first part is written, and only the latest one is kept."""

    def __init__(self, files: WeightFiles, config, fmt: Quantization):
        self.files, self.config, self.fmt = files, config, fmt
        self._last: tuple[str, quant.Quantized] | None = None

    def parts(self, name: str) -> list[Part]:
        out, k = matrix_shape(name, self.config)
        base = name.removesuffix(".weight")
        if self.fmt.scheme == "int8":
            shapes = {"qweight": (torch.int8, (out, k)), "scales": (quant.STORE_DTYPE, (out,))}
        else:
            groups = -(-k // self.fmt.group)
            shapes = {"qweight": (torch.uint8, (out, groups * self.fmt.group // 2)),
                      "scales": (quant.STORE_DTYPE, (out, groups)), "zeros": (quant.STORE_DTYPE, (out, groups))}
        return [Part(f"{base}.{p}", dt, shape, lambda f, p=p: self._write(name, p, f))
                for p, (dt, shape) in shapes.items()]

    def _write(self, name: str, part: str, f) -> None:
        if self._last is None or self._last[0] != name:
            self._last = (name, read_quantized(self.files, name, self.fmt, self.config))
        t = getattr(self._last[1], part).contiguous()
        f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))


class ShardWriter:
    """Streams tensors into safetensors shards of at most SHARD_BYTES each."""

    def __init__(self, out: Path, metadata: dict[str, str] | None = None):
        self.out = out
        self.metadata = {"format": "pt", **(metadata or {})}
        self.plan: list[list[Part]] = [[]]
        self.sizes = [0]

    def add(self, part: Part) -> None:
        if self.plan[-1] and self.sizes[-1] + part.size > SHARD_BYTES:
            self.plan.append([])
            self.sizes.append(0)
        self.plan[-1].append(part)
        self.sizes[-1] += part.size

    def write(self, progress) -> dict[str, str]:
        weight_map: dict[str, str] = {}
        n = len(self.plan)
        for i, shard in enumerate(self.plan):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            header: dict = {"__metadata__": self.metadata}
            offset = 0
            for part in shard:
                header[part.name] = {"dtype": DTYPE_NAMES[part.dtype], "shape": list(part.shape),
                                     "data_offsets": [offset, offset + part.size]}
                offset += part.size
                weight_map[part.name] = fname
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)  # data must start 8-byte aligned
            with open(self.out / fname, "wb") as f:
                f.write(struct.pack("<Q", len(blob)) + blob)
                for part in shard:
                    start = f.tell()
                    part.write(f)
                    if f.tell() - start != part.size:
                        raise ModelError(f"'{part.name}' wrote {f.tell() - start} bytes, not {part.size}; "
                                         f"the source folder is corrupt")
                    progress(part.name, part.size)
        return weight_map


def _copy_range(src: Path, offset: int, size: int, dst) -> None:
    with open(src, "rb") as f:
        f.seek(offset)
        while size:
            chunk = f.read(min(COPY_CHUNK, size))
            if not chunk:
                raise ModelError(f"'{src}' ends early; the file is truncated")
            dst.write(chunk)
            size -= len(chunk)


def split_model(model_path: str | Path, topology_path: str | Path, output: str | Path, quiet: bool = False,
                quantize: str = "none", group_size: int = quant.DEFAULT_GROUP) -> list[Path]:
    src = Path(model_path)
    out = Path(output)
    config = load_config(src)
    topology = load_topology(topology_path)
    topology.check_layers(config.num_hidden_layers)
    if not topology.workers:
        raise CakeError(f"topology '{topology_path}' names no workers; nothing to split")
    files = WeightFiles(src)
    fmt = choose_quantization(files, "", quantize, group_size)
    quantizer = Quantizer(files, config, fmt)
    metadata = {} if fmt.scheme == "none" else {META_SCHEME: fmt.scheme, META_GROUP: str(fmt.group),
                                                META_VERSION: str(quant.FORMAT_VERSION)}

    def parts(name: str) -> list[Part]:
        e = files.entry(name)  # every tensor checked before anything is written
        if fmt.scheme != "none" and quantizable(name):
            if e.shape != matrix_shape(name, config):
                raise ModelError(f"tensor '{name}' is {list(e.shape)}, config.json says "
                                 f"{list(matrix_shape(name, config))}; the folder is corrupt")
            return quantizer.parts(name)
        return [copied(name, e)]

    entries = {w.name: [p for i in w.layers for n in layer_tensor_names(i, config) for p in parts(n)]
               for w in topology.workers.values()}
    terminal = sys.stderr.isatty()

    def progress(name: str, size: int) -> None:
        """On a terminal one line rewritten in place; in a log, a line every 5 seconds and the last."""
        nonlocal done, shown
        done += size
        if not quiet and (time.monotonic() - shown > (0.25 if terminal else 5) or done == total):
            shown = time.monotonic()
            rate = done / max(time.monotonic() - t0, 1e-6) / (1 << 20)
            line = (f"  {100 * done / max(total, 1):5.1f}%  {done >> 20} / {total >> 20} MiB  {rate:.0f} MiB/s  "
                    f"{name[:60]}")
            sys.stderr.write(f"\r{line:<100}" if terminal else line + "\n")
            sys.stderr.flush()

    bundles = []
    for w in topology.workers.values():
        # Progress counts the bytes of the bundle being written.
        done, total, t0, shown = 0, sum(p.size for p in entries[w.name]), time.monotonic(), 0.0
        dest = out / w.name
        dest.mkdir(parents=True, exist_ok=True)
        for old in dest.glob("*.safetensors"):
            old.unlink()
        if not quiet:
            what = "" if fmt.scheme == "none" else f", quantized {fmt}"
            sys.stderr.write(f"{w.name}: {len(w.layers)} layer(s){what} -> {dest}\n")
        writer = ShardWriter(dest, metadata)
        for part in entries[w.name]:
            writer.add(part)
        weight_map = writer.write(progress)
        (dest / INDEX).write_text(json.dumps({"metadata": {"total_size": sum(writer.sizes)},
                                              "weight_map": weight_map}, indent=2))
        for extra in EXTRA_FILES:
            if (src / extra).exists():
                shutil.copy2(src / extra, dest / extra)
        shutil.copy2(topology_path, dest / "topology.yml")
        bundles.append(dest)
        if not quiet and terminal:
            sys.stderr.write("\n")
    return bundles


@click.command("cake-split-model", cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model-path", required=True, type=click.Path(exists=True, file_okay=False), help="Source model folder.")
@click.option("--topology", required=True, type=click.Path(dir_okay=False), help="Topology YAML.")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Where the bundles go.")
@click.option("--quantize", type=click.Choice(["none", "int8", "int4"], case_sensitive=False), default="none",
              show_default=True, help="Write the matrices quantized (docs/quantization.md); workers load them as stored.")
@click.option("--group-size", type=int, default=quant.DEFAULT_GROUP, show_default=True,
              help="int4: weights per scale and zero, along a row.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
def main(model_path: str, topology: str, output: str, quantize: str, group_size: int, quiet: bool) -> None:
    """Write OUTPUT/<worker>/ for each worker: only its layers, ready for `cake --mode worker --model`."""
    try:
        for b in split_model(model_path, topology, output, quiet, quantize, group_size):
            if not quiet:
                click.echo(f"wrote {b}", err=True)
    except CakeError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
