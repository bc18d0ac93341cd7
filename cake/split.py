"""`cake-split-model`: write one bundle per worker holding only that worker's layer tensors.

Tensors are copied byte for byte from the source safetensors files (no dtype change, no torch), one
tensor at a time, so memory stays flat whatever the model size. Each bundle is a folder a worker runs
from directly: safetensors shards + index, config, generation config, tokenizer files, topology.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
import time
from pathlib import Path

import click

from cake.errors import CakeError, ModelError
from cake.model.config import load_config
from cake.model.llama import DecoderLayer
from cake.model.weights import DTYPES, INDEX, Entry, WeightFiles
from cake.topology import load_topology

SHARD_BYTES = 4 << 30
COPY_CHUNK = 16 << 20
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
EXTRA_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja")


class ShardWriter:
    """Streams tensors into safetensors shards of at most SHARD_BYTES each."""

    def __init__(self, out: Path):
        self.out = out
        self.plan: list[list[tuple[str, Entry]]] = [[]]
        self.sizes = [0]

    def add(self, name: str, e: Entry) -> None:
        size = e.end - e.start
        if self.plan[-1] and self.sizes[-1] + size > SHARD_BYTES:
            self.plan.append([])
            self.sizes.append(0)
        self.plan[-1].append((name, e))
        self.sizes[-1] += size

    def write(self, progress) -> dict[str, str]:
        weight_map: dict[str, str] = {}
        n = len(self.plan)
        for i, shard in enumerate(self.plan):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            header: dict = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name, e in shard:
                size = e.end - e.start
                header[name] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape),
                                "data_offsets": [offset, offset + size]}
                offset += size
                weight_map[name] = fname
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)  # data must start 8-byte aligned
            with open(self.out / fname, "wb") as f:
                f.write(struct.pack("<Q", len(blob)) + blob)
                for name, e in shard:
                    _copy_range(e.path, e.start, e.end - e.start, f)
                    progress(name, e.end - e.start)
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


def split_model(model_path: str | Path, topology_path: str | Path, output: str | Path, quiet: bool = False) -> list[Path]:
    src = Path(model_path)
    out = Path(output)
    config = load_config(src)
    topology = load_topology(topology_path)
    topology.check_layers(config.num_hidden_layers)
    if not topology.workers:
        raise CakeError(f"topology '{topology_path}' names no workers; nothing to split")
    files = WeightFiles(src)
    entries = {w.name: [(n, files.entry(n)) for i in w.layers for n in DecoderLayer.tensor_names(i, config)]
               for w in topology.workers.values()}  # every tensor checked before anything is written
    def progress(name: str, size: int) -> None:
        nonlocal done, shown
        done += size
        if not quiet and (time.monotonic() - shown > 0.25 or done == total):  # and always its last line
            shown = time.monotonic()
            rate = done / max(time.monotonic() - t0, 1e-6) / (1 << 20)
            sys.stderr.write(f"\r  {100 * done / max(total, 1):5.1f}%  {done >> 20} / {total >> 20} MiB  "
                             f"{rate:.0f} MiB/s  {name[:60]:<60}")
            sys.stderr.flush()

    bundles = []
    for w in topology.workers.values():
        # Progress counts the bytes of the bundle being written.
        done, total, t0, shown = 0, sum(e.end - e.start for _, e in entries[w.name]), time.monotonic(), 0.0
        dest = out / w.name
        dest.mkdir(parents=True, exist_ok=True)
        for old in dest.glob("*.safetensors"):
            old.unlink()
        if not quiet:
            sys.stderr.write(f"{w.name}: {len(w.layers)} layer(s) -> {dest}\n")
        writer = ShardWriter(dest)
        for name, e in entries[w.name]:
            writer.add(name, e)
        weight_map = writer.write(progress)
        (dest / INDEX).write_text(json.dumps({"metadata": {"total_size": sum(writer.sizes)},
                                              "weight_map": weight_map}, indent=2))
        for extra in EXTRA_FILES:
            if (src / extra).exists():
                shutil.copy2(src / extra, dest / extra)
        shutil.copy2(topology_path, dest / "topology.yml")
        bundles.append(dest)
        if not quiet:
            sys.stderr.write("\n")
    return bundles


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model-path", required=True, type=click.Path(exists=True, file_okay=False), help="Source model folder.")
@click.option("--topology", required=True, type=click.Path(dir_okay=False), help="Topology YAML.")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Where the bundles go.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
def main(model_path: str, topology: str, output: str, quiet: bool) -> None:
    """Write OUTPUT/<worker>/ for each worker: only its layers, ready for `cake --mode worker --model`."""
    try:
        for b in split_model(model_path, topology, output, quiet):
            if not quiet:
                click.echo(f"wrote {b}", err=True)
    except CakeError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
