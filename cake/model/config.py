"""Model configuration from a Hugging Face `config.json` (transformers 4.x and 5.x spellings).

One config for every family cake serves: the Llama 3 decoder, and the few named ways each other family
differs from it (biases, q/k norms, sliding windows, partial rotary, mixtures of experts)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cake.errors import ModelError

# architectures in config.json -> the family cake runs it as
ARCHITECTURES = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3", "MixtralForCausalLM": "mixtral", "Qwen3MoeForCausalLM": "qwen3_moe",
    "Phi3ForCausalLM": "phi3", "Gemma3ForCausalLM": "gemma3",
}
MODEL_TYPES = {**{family: family for family in ARCHITECTURES.values()}, "gemma3_text": "gemma3"}
# Multimodal checkpoints whose text model cake serves (Gemma 3 4B and up): its config is `text_config`,
# its tensors are under `language_model.` (cake.model.weights), and the vision tower is never read.
MULTIMODAL = {"Gemma3ForConditionalGeneration": "gemma3"}
# What transformers' Gemma3TextConfig gives the fields the hub's text_config leaves out (its 4B does).
GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0, "query_pre_attn_scalar": 256, "sliding_window": 4096,
    "sliding_window_pattern": 6, "bos_token_id": 2, "eos_token_id": 1, "tie_word_embeddings": True,
}
ROPE_TYPES = ("default", "llama3", "linear", "yarn", "longrope")


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
    attention_bias: bool = False  # biases on q, k and v
    o_bias: bool = False  # a bias on the attention's output projection (Llama's attention_bias; not Qwen2's)
    mlp_bias: bool = False
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    arch: str = "llama"  # the family (ARCHITECTURES)
    qk_norm: bool = False  # RMSNorm over each head of q and k before rope (qwen3, qwen3_moe, gemma3)
    sliding_window: int | None = None  # keys a query sees on a sliding layer, itself included
    layer_types: tuple[str, ...] = ()  # per layer 'full_attention' or 'sliding_attention'; () = all full
    partial_rotary_factor: float = 1.0  # the share of each head that rope rotates (phi3)
    num_experts: int = 0  # mixture of experts: experts per MoE layer (0: dense)
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    norm_topk_prob: bool = True  # renormalise the chosen experts' weights to sum to 1
    dense_layers: tuple[int, ...] = ()  # layers of a MoE model that have a dense MLP (qwen3_moe's mlp_only_layers)
    # Gemma 3: norms scale by (1 + w) before the cast, a norm after attention and around the MLP, a GELU
    # (tanh) MLP, the embedding scaled by sqrt(hidden), queries scaled by query_pre_attn_scalar^-0.5, and
    # sliding layers with a rope of their own base (and no scaling)
    gemma_norms: bool = False
    mlp_act: str = "silu"  # or "gelu_tanh"
    embed_scale: float = 1.0
    attn_scale: float | None = None  # None: 1 / sqrt(head_dim)
    local_rope_theta: float | None = None
    final_softcap: float | None = None

    def sliding(self, layer: int) -> bool:
        return bool(self.layer_types) and self.sliding_window is not None \
            and self.layer_types[layer] == "sliding_attention"

    def moe(self, layer: int) -> bool:
        return self.num_experts > 0 and layer not in self.dense_layers

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor) // 2 * 2

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        d = _text_model(d)
        try:
            heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            # 5.x: rope_parameters holds rope_theta and the scaling; 4.x: rope_theta + rope_scaling.
            rope = dict(d.get("rope_parameters") or {})
            local_theta = None
            if isinstance(rope.get("full_attention"), dict):  # 5.x Gemma 3: one rope per kind of layer
                local_theta = float((rope.get("sliding_attention") or {}).get("rope_theta") or 10000.0)
                rope = dict(rope["full_attention"])
            elif d.get("rope_local_base_freq"):  # the hub's Gemma 3 spelling
                local_theta = float(d["rope_local_base_freq"])
            theta = rope.pop("rope_theta", None) or d.get("rope_theta") or 10000.0
            scaling = rope if rope else d.get("rope_scaling")
            if scaling is not None:
                scaling = dict(scaling)
                kind = scaling.get("rope_type", scaling.get("type", "default"))
                scaling["rope_type"] = kind
                if kind == "default":
                    scaling = None
                elif kind not in ROPE_TYPES:
                    raise ModelError(f"config.json: rope scaling type '{kind}' is not supported; cake supports "
                                     f"{', '.join(ROPE_TYPES[1:])} and none")
                elif kind != "linear" and "original_max_position_embeddings" not in scaling:
                    if "original_max_position_embeddings" not in d:
                        raise ModelError(f"config.json: rope scaling '{kind}' needs original_max_position_embeddings")
                    scaling["original_max_position_embeddings"] = int(d["original_max_position_embeddings"])
            arch = family(d)
            act = d.get("hidden_activation") or d.get("hidden_act") or "silu"
            if act not in ("silu", "gelu_pytorch_tanh"):
                raise ModelError(f"config.json: hidden_act '{act}' is not supported; cake's families use 'silu' or "
                                 f"'gelu_pytorch_tanh'")
            if d.get("attn_logit_softcapping"):
                raise ModelError("config.json: attn_logit_softcapping is not supported (Gemma 2); cake serves Gemma 3")
            layers = int(d["num_hidden_layers"])
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
                attention_bias=bool(d.get("attention_bias", False)) or arch == "qwen2",
                o_bias=bool(d.get("attention_bias", False)) and arch != "qwen2",
                mlp_bias=bool(d.get("mlp_bias", False)),
                torch_dtype=str(d.get("dtype") or d.get("torch_dtype") or "float32"),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=_id_list(d.get("eos_token_id")),
                arch=arch,
                qk_norm=arch in ("qwen3", "qwen3_moe", "gemma3"),
                sliding_window=_window(d, arch),
                layer_types=_layer_types(d, arch, layers),
                partial_rotary_factor=float(d.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0),
                num_experts=int(d.get("num_local_experts") or d.get("num_experts") or 0)
                if arch in ("mixtral", "qwen3_moe") else 0,
                experts_per_token=int(d.get("num_experts_per_tok") or 0),
                expert_intermediate_size=int(d.get("moe_intermediate_size") or d["intermediate_size"]),
                norm_topk_prob=bool(d.get("norm_topk_prob", True)) if arch == "qwen3_moe" else True,
                dense_layers=_dense_layers(d, arch, layers),
                gemma_norms=arch == "gemma3",
                mlp_act="gelu_tanh" if act == "gelu_pytorch_tanh" else "silu",
                embed_scale=hidden ** 0.5 if arch == "gemma3" else 1.0,
                attn_scale=float(d.get("query_pre_attn_scalar") or 256) ** -0.5 if arch == "gemma3" else None,
                local_rope_theta=local_theta,
                final_softcap=float(d["final_logit_softcapping"]) if d.get("final_logit_softcapping") else None,
            )
        except KeyError as e:
            raise ModelError(f"config.json is missing '{e.args[0]}'; is this a Llama model folder?") from None


def _text_model(d: dict) -> dict:
    """A multimodal config's text model as a config of its own (others as they are): transformers' defaults,
    then what the top level says of the whole model (its dtype, end ids, tied embedding), then text_config."""
    archs = d.get("architectures") or []
    multimodal = [a for a in archs if a in MULTIMODAL] if isinstance(archs, list) else []
    if not multimodal:
        return d
    text = d.get("text_config")
    if not isinstance(text, dict):
        raise ModelError(f"config.json: a {multimodal[0]} needs 'text_config' (its text model's settings); "
                         f"restore the file from the model's repository")
    top = {k: d[k] for k in ("dtype", "torch_dtype", "eos_token_id", "bos_token_id", "tie_word_embeddings") if k in d}
    return {**GEMMA3_TEXT_DEFAULTS, **top, **text, "architectures": multimodal}


def family(d: dict) -> str:
    """The family of a config.json, from `architectures` (else `model_type`); unsupported is one error."""
    archs = d.get("architectures") or []
    for a in archs if isinstance(archs, list) else [archs]:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
        if a in MULTIMODAL:
            return MULTIMODAL[a]
    if not archs and d.get("model_type", "llama") in MODEL_TYPES:
        return MODEL_TYPES[d.get("model_type", "llama")]
    named = ", ".join(map(str, archs)) if archs else f"model_type {d.get('model_type')!r}"
    raise ModelError(f"config.json: architecture {named} is not supported; cake serves "
                     f"{', '.join([*ARCHITECTURES, *MULTIMODAL])}")


def _window(d: dict, arch: str) -> int | None:
    window = d.get("sliding_window")
    if not window or (arch in ("qwen2", "qwen3", "qwen3_moe") and not d.get("use_sliding_window")):
        return None
    return int(window)


def _layer_types(d: dict, arch: str, layers: int) -> tuple[str, ...]:
    """Each layer's attention, as transformers decides it: config.json's layer_types where it says, else
    sliding on every layer of a windowed Mistral/Mixtral/Phi-3, from max_window_layers on for Qwen, and
    all but every sliding_window_pattern-th layer for Gemma 3."""
    if _window(d, arch) is None:
        return ()
    given = d.get("layer_types")
    if isinstance(given, list) and len(given) == layers:
        return tuple(str(t) for t in given)
    if arch == "gemma3":
        every = int(d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6)
        return tuple("sliding_attention" if (i + 1) % every else "full_attention" for i in range(layers))
    if arch in ("qwen2", "qwen3", "qwen3_moe"):
        first = int(d.get("max_window_layers", layers))
        return tuple("sliding_attention" if i >= first else "full_attention" for i in range(layers))
    return ("sliding_attention",) * layers


def _dense_layers(d: dict, arch: str, layers: int) -> tuple[int, ...]:
    if arch != "qwen3_moe":
        return ()
    step = int(d.get("decoder_sparse_step") or 1)
    only = set(int(i) for i in d.get("mlp_only_layers") or [])
    return tuple(i for i in range(layers) if i in only or (i + 1) % step)


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
