"""Build a node's part of the model from a folder: only the tensors that node needs."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from cake.devices import dtype_name, pick_device, pick_dtype
from cake.errors import ModelError
from cake.model.config import LlamaConfig, load_config
from cake.model.llama import DecoderLayer, Head, LayerStack
from cake.model.weights import WeightFiles

log = logging.getLogger("cake.model")

DEFAULT_CONTEXT = 4096


def resolve_context(config: LlamaConfig, context: int | None) -> int:
    """KV-cache capacity: the asked size (default 4096), never more than the model's trained length."""
    want = context or DEFAULT_CONTEXT
    if want < 1:
        raise ModelError(f"--context must be at least 1, got {want}")
    return min(want, config.max_position_embeddings)


def load_layers(model_dir: str | Path, layers: list[int], device: str, dtype: str, context: int | None,
                config: LlamaConfig | None = None, files: WeightFiles | None = None) -> tuple[LayerStack, LlamaConfig]:
    config = config or load_config(model_dir)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev, config.torch_dtype)
    files = files or WeightFiles(model_dir)
    bad = [i for i in layers if not 0 <= i < config.num_hidden_layers]
    if bad:
        raise ModelError(f"layer {bad[0]} is outside the model's {config.num_hidden_layers} layers")
    files.check([n for i in layers for n in DecoderLayer.tensor_names(i, config)])
    t0 = shown = time.perf_counter()
    built = {}
    for k, i in enumerate(layers):
        prefix = f"model.layers.{i}."
        w = {key: files.get_cat([prefix + n for n in names], dt, dev)
             for key, names in DecoderLayer.parts(config).items()}
        built[i] = DecoderLayer(i, config, w)
        if time.perf_counter() - shown > 5:  # a 70B share takes minutes: show it is moving
            shown = time.perf_counter()
            log.info("loading layers: %d of %d done", k + 1, len(layers))
    if layers:
        log.info("loaded %d layer(s) on %s as %s in %.1fs", len(layers), dev, dtype_name(dt), time.perf_counter() - t0)
    return LayerStack(config, built, resolve_context(config, context), dt, dev), config


def load_head(model_dir: str | Path, config: LlamaConfig, device: torch.device, dtype: torch.dtype,
              files: WeightFiles | None = None) -> Head:
    files = files or WeightFiles(model_dir)
    w = files.load(Head.tensor_names(config), dtype, device)
    embed = w["model.embed_tokens.weight"]
    return Head(config, embed, w["model.norm.weight"], w.get("lm_head.weight", embed))
