"""Llama 3 in plain torch: config, layers, weights."""

from cake.model.config import LlamaConfig, load_config
from cake.model.head import Head
from cake.model.kv_cache import KVCache
from cake.model.layer import DecoderLayer
from cake.model.stack import LayerStack

__all__ = ["LlamaConfig", "load_config", "DecoderLayer", "Head", "KVCache", "LayerStack"]
