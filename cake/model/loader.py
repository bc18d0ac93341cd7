"""Build a node's part of the model from a folder: only the tensors that node needs, quantized or not."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cake.devices import dtype_name, pick_device, pick_dtype
from cake.errors import ModelError
from cake.memory import check_room, free_memory, gb
from cake.model import quant
from cake.model.config import LlamaConfig, load_config
from cake.model.head import Head
from cake.model.layer import DecoderLayer
from cake.model.stack import LayerStack
from cake.model.tensor_names import head_tensor_names, is_matrix, layer_parts, layer_tensor_names
from cake.model.weights import WeightFiles

log = logging.getLogger("cake.model")

DEFAULT_CONTEXT = 4096
# safetensors metadata of a quantized bundle (docs/quantization.md)
META_SCHEME, META_GROUP, META_VERSION = "cake.quantization", "cake.group_size", "cake.format_version"


def resolve_context(config: LlamaConfig, context: int | None) -> int:
    """KV-cache capacity: the asked size (default 4096), never more than the model's trained length."""
    want = context or DEFAULT_CONTEXT
    if want < 1:
        raise ModelError(f"--context must be at least 1, got {want}")
    if context and context > config.max_position_embeddings and context not in _said_capped:
        _said_capped.add(context)  # once per process, not once per load
        log.warning("--context %d is more than the model's %d positions: capped to %d", context,
                    config.max_position_embeddings, config.max_position_embeddings)
    return min(want, config.max_position_embeddings)


_said_capped: set[int] = set()


@dataclass(frozen=True)
class Quantization:
    """How a node keeps its matrices: 'none', 'int8' or 'int4' (with its group size)."""

    scheme: str = "none"
    group: int = quant.DEFAULT_GROUP

    def __str__(self) -> str:
        return f"int4 (group {self.group})" if self.scheme == "int4" else self.scheme

    @staticmethod
    def parse(text: str) -> Quantization | None:
        """The format a node's handshake names (its str()); None for one it does not name."""
        m = re.fullmatch(r"none|int8|int4 \(group (\d+)\)", text)
        if m is None:
            return None
        return Quantization("int4", int(m[1])) if m[1] else Quantization("int8", 0) if text == "int8" else Quantization()


def stored_quantization(files: WeightFiles, name: str) -> Quantization | None:
    """The quantization the folder stores matrix `name` ('...weight') in; None when stored as floats."""
    base = name.removesuffix(".weight")
    if base + ".qweight" not in files:
        return None
    meta = files.metadata(base + ".qweight")
    where = f"'{files.dir / files.where[base + '.qweight']}'"
    if meta.get(META_VERSION) != str(quant.FORMAT_VERSION):
        raise ModelError(f"{where} is a cake quantized bundle of format version {meta.get(META_VERSION)!r}; this cake "
                         f"reads version {quant.FORMAT_VERSION}: split the model again with this version")
    scheme = meta.get(META_SCHEME)
    try:
        group = int(meta.get(META_GROUP, 0))
    except ValueError:
        group = -1
    if scheme not in ("int8", "int4") or (scheme == "int4" and (group < 2 or group % 2)):
        raise ModelError(f"{where} has unreadable quantization metadata ({META_SCHEME}={scheme!r}, "
                         f"{META_GROUP}={meta.get(META_GROUP)!r}); split the model again")
    return Quantization(scheme, group if scheme == "int4" else 0)


def choose_quantization(files: WeightFiles, probe: str, asked: str | None, group: int) -> Quantization:
    """What a node runs: the folder's stored quantization, or `asked` applied at load to a float folder.
    A quantized folder with another --quantize is refused: re-quantizing lossy weights compounds the loss."""
    stored = stored_quantization(files, probe) if probe else None
    if stored is not None:
        if asked not in (None, "none", stored.scheme) or (asked == "int4" and group != stored.group):
            raise ModelError(f"'{files.dir}' holds {stored} weights, not {asked}"
                             f"{f' (group {group})' if asked == 'int4' else ''}; leave out --quantize (and "
                             f"--group-size) to run them as stored, or start from the full-precision model")
        return stored
    if asked in (None, "none"):
        return Quantization()
    if asked == "int4" and (group < 2 or group % 2):
        raise ModelError(f"--group-size {group} must be an even number of 2 or more (32 is the default)")
    return Quantization(asked, group if asked == "int4" else 0)


def matrix_shape(name: str, config: LlamaConfig) -> tuple[int, int]:
    """[out, in] of a checkpoint matrix, from the config (a quantized file no longer says its width)."""
    c = config
    q, kv, h, i = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.hidden_size, \
        c.intermediate_size
    if ".experts." in name:  # a mixture's expert: Mixtral's w1/w3/w2, Qwen3-MoE's gate/up/down
        i = c.expert_intermediate_size
    shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q), "gate_proj": (i, h),
              "up_proj": (i, h), "down_proj": (h, i), "embed_tokens": (c.vocab_size, h), "lm_head": (c.vocab_size, h),
              "qkv_proj": (q + 2 * kv, h), "gate_up_proj": (2 * i, h), "w1": (i, h), "w3": (i, h), "w2": (h, i),
              "gate": (c.num_experts, h)}
    return shapes[name.removesuffix(".weight").rsplit(".", 1)[-1]]


def quantizable(name: str) -> bool:
    """Whether checkpoint tensor `name` is a matrix of a decoder layer that --quantize applies to."""
    return bool(_QUANTIZABLE.search(name))


_QUANTIZABLE = re.compile(r"\.(\w+_proj|experts\.\d+\.w[123])\.weight$")


def read_quantized(files: WeightFiles, name: str, fmt: Quantization, config: LlamaConfig) -> quant.Quantized:
    """Matrix `name` in the stored form: read as stored, or quantized a block of rows at a time."""
    out, k = matrix_shape(name, config)
    base = name.removesuffix(".weight")
    if base + ".qweight" in files:
        parts = {p: files.get(f"{base}.{p}", files.entry(f"{base}.{p}").dtype, torch.device("cpu"))
                 for p in ("qweight", "scales", "zeros") if f"{base}.{p}" in files}
        q = quant.Quantized(fmt.scheme, parts["qweight"], parts.get("scales"), parts.get("zeros"), k, fmt.group)
        if q.scales is None:
            raise ModelError(f"{files.dir}: '{base}.scales' is missing; the bundle is incomplete, split the model again")
        quant.check_shapes(q, out, k, f"{files.dir}: '{base}'")
        return q
    e = files.entry(name)
    if e.shape != (out, k):
        raise ModelError(f"tensor '{name}' is {list(e.shape)}, config.json says [{out}, {k}]; the folder is corrupt")
    return quant.quantize_rows(lambda a, b: files.read_rows(name, a, b), out, k, fmt.scheme, fmt.group)


def stored_names(files: WeightFiles, names: list[str]) -> list[str]:
    """The tensors to read for `names`: a quantized matrix's parts in place of its '.weight'."""
    out = []
    for n in names:
        base = n.removesuffix(".weight")
        out += [f"{base}.{p}" for p in ("qweight", "scales") ] if base + ".qweight" in files else [n]
    return out


def load_matrix(files: WeightFiles, names: list[str], fmt: Quantization, config: LlamaConfig, dtype: torch.dtype,
                device: torch.device):
    """The named matrices stacked along their rows: a tensor, or a quant.QuantLinear."""
    if fmt.scheme == "none":
        return files.get_cat(names, dtype, device)
    return quant.QuantLinear(quant.concat([read_quantized(files, n, fmt, config) for n in names]), device, dtype)


def share_bytes(config: LlamaConfig, layers: list[int], fmt: Quantization, dtype: torch.dtype,
                head: bool = False) -> int:
    """Bytes a node's weights take: its layers (and the embedding, norm and head where `head`)."""
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for i in layers:
        names = [n for names in layer_parts(config, i).values() for n in names]
        total += sum(quant.stored_bytes(fmt.scheme if quantizable(n) else "none", *matrix_shape(n, config), fmt.group,
                                        size) for n in names if n.endswith("weight") and "norm" not in n)
        total += 2 * config.hidden_size * size  # the two norms (biases and q/k norms are not counted)
    if head:
        table = quant.stored_bytes(fmt.scheme, config.vocab_size, config.hidden_size, fmt.group, size)
        total += table * (1 if config.tie_word_embeddings else 2) + config.hidden_size * size
    return total


def check_share(config: LlamaConfig, layers: list[int], head: bool, fmt: Quantization, stored: bool,
                dtype: torch.dtype, device: torch.device, max_memory: int | None) -> None:
    """One line before anything loads where this node's share does not fit its memory (all of it) or
    --max-memory (its decoder layers), naming the formats that would."""
    int4 = Quantization("int4", fmt.group or quant.DEFAULT_GROUP)
    formats = [fmt] if stored else [Quantization(), Quantization("int8", 0), int4]
    if fmt not in formats:
        formats.append(fmt)
    label = (lambda f: dtype_name(dtype) if f.scheme == "none" else f.scheme)
    what = f"{len(layers)} layer(s)"
    free = free_memory(device)
    if free:
        need = {label(f): share_bytes(config, layers, f, dtype, head) for f in formats}
        check_room(f"this node's weights ({what}{', embedding and head' if head else ''})", need, label(fmt), free,
                   f"free on {device}")
    if max_memory is not None:
        need = {label(f): share_bytes(config, layers, f, dtype) for f in formats}
        check_room(f"this node's decoder layers ({what})", need, label(fmt), max_memory, "allowed by --max-memory")


def load_layers(model_dir: str | Path, layers: list[int], device: str, dtype: str, context: int | None,
                config: LlamaConfig | None = None, files: WeightFiles | None = None, quantize: str | None = None,
                group: int = quant.DEFAULT_GROUP, max_memory: int | None = None,
                with_head: bool = False) -> tuple[LayerStack, LlamaConfig]:
    """A node's decoder layers; first, the check that they (with the head, for a master: `with_head`) fit."""
    config = config or load_config(model_dir)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev, config.torch_dtype)
    files = files or WeightFiles(model_dir)
    bad = [i for i in layers if not 0 <= i < config.num_hidden_layers]
    if bad:
        raise ModelError(f"layer {bad[0]} is outside the model's {config.num_hidden_layers} layers")
    probe = f"model.layers.{layers[0]}.self_attn.q_proj.weight" if layers else ""
    fmt = choose_quantization(files, probe, quantize, group)
    files.check(stored_names(files, [n for i in layers for n in layer_tensor_names(i, config)]))
    check_share(config, layers, with_head, fmt, bool(probe) and stored_quantization(files, probe) is not None, dt, dev,
                max_memory)
    t0 = shown = time.perf_counter()
    built = {}
    for k, i in enumerate(layers):
        prefix = f"model.layers.{i}."
        w = {key: (load_matrix(files, [prefix + n for n in names], fmt, config, dt, dev) if is_matrix(key)
                   else files.get_cat([prefix + n for n in names], dt, dev))
             for key, names in layer_parts(config, i).items()}
        built[i] = DecoderLayer(i, config, w)
        if time.perf_counter() - shown > 5:  # a 70B share takes minutes: show it is moving
            shown = time.perf_counter()
            log.info("loading layers: %d of %d done", k + 1, len(layers))
    stack = LayerStack(config, built, resolve_context(config, context), dt, dev, fmt)
    if layers:
        log.info("loaded %d layer(s) on %s as %s%s, %s in %.1fs", len(layers), dev, dtype_name(dt),
                 "" if fmt.scheme == "none" else f" with {fmt} matrices", gb(stack.weight_bytes),
                 time.perf_counter() - t0)
    return stack, config


def load_head(model_dir: str | Path, config: LlamaConfig, device: torch.device, dtype: torch.dtype,
              files: WeightFiles | None = None, fmt: Quantization = Quantization()) -> Head:
    """Embedding, final norm and output head; quantized, the embedding stays in rows of the stored form
    (a lookup dequantizes the rows it reads) and the head is a QuantLinear."""
    files = files or WeightFiles(model_dir)
    norm = files.get("model.norm.weight", dtype, device)
    if fmt.scheme == "none":
        w = files.load(head_tensor_names(config), dtype, device)
        embed = w["model.embed_tokens.weight"]
        return Head(config, embed, norm, w.get("lm_head.weight", embed))
    files.check(stored_names(files, head_tensor_names(config)))
    embed_q = read_quantized(files, "model.embed_tokens.weight", fmt, config).to(device)
    head_q = embed_q if config.tie_word_embeddings else read_quantized(files, "lm_head.weight", fmt, config)
    return Head(config, embed_q, norm, quant.QuantLinear(head_q, device, dtype))
