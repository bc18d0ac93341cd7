"""Llama 3 in plain torch: config, layers, weights."""

from cake.model.config import LlamaConfig, load_config
from cake.model.llama import DecoderLayer, Head, KVCache, LayerStack

__all__ = ["LlamaConfig", "load_config", "DecoderLayer", "Head", "KVCache", "LayerStack"]
