"""Bytes: what a node holds of each part of a model, and what one decode step reads (weights, only the
routed experts of a mixture, and the KV cache)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from cake.errors import CakeError

MB = 1e6
ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2}
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
# An expert's tensors (Mixtral's block_sparse_moe.experts.E., Qwen3-MoE's mlp.experts.E.): layer, expert.
EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.")
# The matrices --quantize covers (every linear layer of the blocks, and the master's embedding and head).
QUANTIZED_RE = re.compile(r"(_proj|embed_tokens|lm_head)\.weight$")


def safetensors_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in a model folder, from the safetensors headers alone (cake's reader)."""
    from cake.model.weights import WeightFiles

    try:
        files = WeightFiles(model_dir)
        return {name: tuple(files.entry(name).shape) for name in files.where}
    except CakeError as e:
        raise CakeError(f"cannot read the weights in '{model_dir}' ({e}); "
                        f"delete the folder and the benchmark rebuilds it") from None


def safetensors_sizes(model_dir: Path) -> dict[str, int]:
    """Bytes of every tensor in a model folder, from the safetensors headers alone."""
    from cake.model.weights import WeightFiles

    try:
        files = WeightFiles(model_dir)
        return {name: (e := files.entry(name)).end - e.start for name in files.where}
    except CakeError as e:
        raise CakeError(f"cannot read the weights in '{model_dir}' ({e}); "
                        f"delete the folder and the benchmark rebuilds it") from None


def held_bytes(name: str, shape: tuple[int, ...], dtype: str, scheme: str = "none", group: int = 32) -> int:
    """Bytes a node holds (and a decode step reads) for one checkpoint tensor. Quantized (issue 16's
    formulas, written out here rather than taken from cake): int8 is one byte a weight and a bf16 scale a
    row; int4 half a byte a weight, the last group of a row padded, and a bf16 scale and zero a group.
    Norms, and every tensor with --quantize none, are held in the node's dtype."""
    if scheme != "none" and len(shape) == 2 and QUANTIZED_RE.search(name):
        out, k = shape
        if scheme == "int8":
            return out * k + 2 * out
        groups = -(-k // group)
        return out * groups * (group // 2 + 2 * 2)
    return math.prod(shape) * ITEMSIZE[dtype]


@dataclass
class WeightBytes:
    layers: dict[int, int]  # every tensor of the layer, all its experts included
    embed: int
    head: int  # lm_head; 0 when tied to the embedding
    norm: int
    experts: dict[int, list[int]] = field(default_factory=dict)  # layer -> each expert's bytes (MoE layers)

    @classmethod
    def read(cls, model_dir: Path) -> WeightBytes:
        return cls.of(safetensors_sizes(model_dir))

    @classmethod
    def held(cls, model_dir: Path, dtype: str, scheme: str = "none", group: int = 32) -> WeightBytes:
        """What a node running `--dtype dtype --quantize scheme` holds of each part (see held_bytes)."""
        shapes = safetensors_shapes(model_dir)
        return cls.of({name: held_bytes(name, shape, dtype, scheme, group) for name, shape in shapes.items()})

    @classmethod
    def of(cls, sizes: dict[str, int]) -> WeightBytes:
        """Sum tensor sizes (name -> bytes) into layers, experts, embedding, head and norm."""
        layers: dict[int, int] = {}
        experts: dict[int, dict[int, int]] = {}
        for name, n in sizes.items():
            if m := LAYER_RE.match(name):
                layers[int(m[1])] = layers.get(int(m[1]), 0) + n
            if m := EXPERT_RE.match(name):
                per = experts.setdefault(int(m[1]), {})
                per[int(m[2])] = per.get(int(m[2]), 0) + n
        return cls(layers, sizes["model.embed_tokens.weight"], sizes.get("lm_head.weight", 0),
                   sizes["model.norm.weight"], {i: [per[e] for e in sorted(per)] for i, per in experts.items()})

    def in_dtype(self, dtype: str, stored: str = "f32") -> WeightBytes:
        """The same weights held in another dtype (the tiny and big models are stored in f32)."""
        k = ITEMSIZE[dtype] / ITEMSIZE[stored]
        return WeightBytes({i: int(n * k) for i, n in self.layers.items()}, int(self.embed * k), int(self.head * k),
                           int(self.norm * k), {i: [int(n * k) for n in ns] for i, ns in self.experts.items()})

    def layer_range(self, start: int, end: int) -> int:
        return sum(self.layers[i] for i in range(start, end))

    @property
    def total(self) -> int:
        return sum(self.layers.values()) + self.embed + self.head + self.norm

    @property
    def expert_total(self) -> int:
        """Every expert of every layer."""
        return sum(sum(ns) for ns in self.experts.values())

    @property
    def decode_step(self) -> int:
        """What one dense decode step reads: every layer and the output projection (one embedding row is
        noise). Of a mixture of experts, every expert: see routed_step."""
        return sum(self.layers.values()) + self.norm + (self.head or self.embed)

    def routed_step(self, per_token: int) -> int:
        """What one decode step of one sequence reads when each MoE layer runs `per_token` of its experts
        (its top-k are distinct, and experts of a layer are the same size): decode_step less the rest."""
        return self.decode_step - sum(sum(ns) - per_token * max(ns) for ns in self.experts.values())

    @property
    def master(self) -> int:
        """What a master with no layers holds."""
        return self.embed + self.head + self.norm


def kv_read_bytes(layers: int, kv_heads: int, head_dim: int, dtype: str, position: float) -> int:
    """The KV cache one decode step at `position` reads: keys and values of every earlier position (and
    its own) on every layer; cake reads only the filled part of its preallocated cache."""
    return int(2 * layers * kv_heads * head_dim * ITEMSIZE[dtype] * (position + 1))


@dataclass(frozen=True)
class StepBytes:
    """What one decode step of one sequence reads, in parts, at the run's middle position."""
    weights: int  # everything but the experts: attention, norms, dense MLPs, the output head
    experts: int  # the routed experts only (top-k of each MoE layer); 0 for a dense model
    experts_all: int  # every expert (what a step would read if it ran them all)
    kv: int

    @property
    def total(self) -> int:
        return self.weights + self.experts + self.kv

    @classmethod
    def of(cls, w: WeightBytes, per_token: int, kv: int) -> StepBytes:
        routed = w.routed_step(per_token) if w.experts else w.decode_step
        experts = sum(per_token * max(ns) for ns in w.experts.values())
        return cls(routed - experts, experts, w.expert_total, kv)
