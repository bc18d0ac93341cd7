"""Model configuration from a Hugging Face `config.json` (transformers 4.x and 5.x spellings)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cake.errors import ModelError


@dataclass(frozen=True)
class LlamaConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        try:
            heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            # 5.x: rope_parameters holds rope_theta and the scaling; 4.x: rope_theta + rope_scaling.
            rope = dict(d.get("rope_parameters") or {})
            theta = rope.pop("rope_theta", None) or d.get("rope_theta") or 10000.0
            scaling = rope if rope else d.get("rope_scaling")
            if scaling is not None:
                scaling = dict(scaling)
                kind = scaling.get("rope_type", scaling.get("type", "default"))
                scaling["rope_type"] = kind
                if kind == "default":
                    scaling = None
                elif kind != "llama3":
                    raise ModelError(
                        f"config.json: rope scaling type '{kind}' is not supported; cake supports 'llama3' and none"
                    )
            if d.get("hidden_act", "silu") != "silu":
                raise ModelError(f"config.json: hidden_act '{d['hidden_act']}' is not supported; Llama uses 'silu'")
            return cls(
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                vocab_size=int(d["vocab_size"]),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
                rope_theta=float(theta),
                rope_scaling=scaling,
                max_position_embeddings=int(d.get("max_position_embeddings", 8192)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=bool(d.get("attention_bias", False)),
                mlp_bias=bool(d.get("mlp_bias", False)),
                torch_dtype=str(d.get("dtype") or d.get("torch_dtype") or "float32"),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=_id_list(d.get("eos_token_id")),
            )
        except KeyError as e:
            raise ModelError(f"config.json is missing '{e.args[0]}'; is this a Llama model folder?") from None


def _id_list(value: object) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def _read_json(path: Path) -> object:
    """A model folder's JSON file (FileNotFoundError passes through); broken JSON is one clear error."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"'{path}' is not valid JSON (line {e.lineno}); fix or restore that file") from None


def load_config(model_dir: str | Path) -> LlamaConfig:
    try:
        data = _read_json(Path(model_dir) / "config.json")
    except FileNotFoundError:
        raise ModelError(f"no config.json in '{model_dir}'; --model must be a Hugging Face Llama 3 folder") from None
    return LlamaConfig.from_dict(data)


def load_generation_config(model_dir: str | Path) -> dict:
    """generation_config.json's settings ({} when the folder has none)."""
    path = Path(model_dir) / "generation_config.json"
    gen = _read_json(path) if path.exists() else {}
    return gen if isinstance(gen, dict) else {}


def load_eos_ids(model_dir: str | Path, config: LlamaConfig) -> tuple[int, ...]:
    """The ids that end a generation: generation_config.json's when it names any (as transformers'
    `generate` does: config.json's are then ignored, even where the two files disagree), else config.json's."""
    ids = _id_list(load_generation_config(model_dir).get("eos_token_id"))
    return tuple(dict.fromkeys(ids)) if ids else tuple(config.eos_token_ids)
