"""Which checkpoint tensors make each weight a node holds, per family.

A decoder layer's weights are keyed by what the computation calls them (`wqkv`, `wo`, `w13`, `w2`, the
norms, biases and experts); each is one checkpoint tensor or several stacked along their rows. Q/K/V and
gate/up are fused: one matrix product each instead of three and two (Phi-3's checkpoints store them fused
already).
"""

from __future__ import annotations

from cake.model.config import LlamaConfig

# A mixture of experts' tensors under model.layers.N.: (router, expert prefix, gate, up, down)
MOE_NAMES = {"mixtral": ("block_sparse_moe.gate.weight", "block_sparse_moe.experts", "w1", "w3", "w2"),
             "qwen3_moe": ("mlp.gate.weight", "mlp.experts", "gate_proj", "up_proj", "down_proj")}


def layer_parts(config: LlamaConfig, index: int = 0) -> dict[str, list[str]]:
    """Each weight of layer `index` -> the checkpoint tensors (under model.layers.N.) stacked to make it."""
    phi3 = config.arch == "phi3"
    parts = {
        "attn_norm": ["input_layernorm.weight"],
        "mlp_norm": ["pre_feedforward_layernorm.weight" if config.gemma_norms else "post_attention_layernorm.weight"],
        "wqkv": ["self_attn.qkv_proj.weight"] if phi3 else
                ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
        "wo": ["self_attn.o_proj.weight"],
    }
    if config.moe(index):
        router, experts, gate, up, down = MOE_NAMES[config.arch]
        parts["router"] = [router]
        for e in range(config.num_experts):
            parts[f"w13.{e}"] = [f"{experts}.{e}.{gate}.weight", f"{experts}.{e}.{up}.weight"]
            parts[f"w2.{e}"] = [f"{experts}.{e}.{down}.weight"]
    else:
        parts["w13"] = ["mlp.gate_up_proj.weight"] if phi3 else ["mlp.gate_proj.weight", "mlp.up_proj.weight"]
        parts["w2"] = ["mlp.down_proj.weight"]
    if config.qk_norm:
        parts.update(q_norm=["self_attn.q_norm.weight"], k_norm=["self_attn.k_norm.weight"])
    if config.gemma_norms:
        parts.update(post_attn_norm=["post_attention_layernorm.weight"],
                     post_mlp_norm=["post_feedforward_layernorm.weight"])
    if config.attention_bias:
        parts["bqkv"] = ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
    if config.o_bias:
        parts["bo"] = ["self_attn.o_proj.bias"]
    if config.mlp_bias and not config.moe(index):
        parts.update(b13=["mlp.gate_proj.bias", "mlp.up_proj.bias"], b2=["mlp.down_proj.bias"])
    return parts


def layer_tensor_names(index: int, config: LlamaConfig) -> list[str]:
    """Every checkpoint tensor layer `index` reads."""
    return [f"model.layers.{index}.{n}" for names in layer_parts(config, index).values() for n in names]


def is_matrix(key: str) -> bool:
    """Whether layer weight `key` is a matrix a node may quantize (norms, biases and routers never are)."""
    return key.split(".")[0] in ("wqkv", "wo", "w13", "w2")


def head_tensor_names(config: LlamaConfig) -> list[str]:
    """The master's tensors: embedding, final norm and (unless tied to the embedding) the output head."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    return names
