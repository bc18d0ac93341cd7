"""The benchmark's models: their shapes, the family each is built as, and their folders (built once)."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, replace
from pathlib import Path

from . import children

SPECIAL_IDS = 128000  # Llama 3 ids from here up are special tokens; prompts avoid them

# family -> (transformers' name for it, its config's settings beyond the shape). Each is built with
# transformers' own <name>Config and <name>ForCausalLM; the shape's head_dim is set where a family's
# default differs (Qwen3 128, Gemma 3 256). Llama is cake.synthetic's (llama3 rope, as the tests use).
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("Llama", {}),
    "mistral": ("Mistral", {}),
    "qwen2": ("Qwen2", {}),
    "qwen3": ("Qwen3", {}),
    "phi3": ("Phi3", {"pad_token_id": 0}),
    "gemma3": ("Gemma3Text", {}),
    "mixtral": ("Mixtral", {}),
    "qwen3_moe": ("Qwen3Moe", {"norm_topk_prob": True}),
}
# A mixture of experts' shape, relative to the dense shape: (experts, experts per token, expert
# intermediate / dense intermediate). Mixtral's own ratios (8, top 2, full-size experts); Qwen3-MoE's
# many small experts (Qwen3-30B-A3B: 128, top 8, each 1/4 of a dense MLP), scaled down.
MOE_SHAPES = {"mixtral": (8, 2, 1.0), "qwen3_moe": (16, 4, 0.25)}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 128256
    seed: int = 1234
    stored: str = "f32"  # the dtype the folder's safetensors hold
    arch: str = "llama"  # a key of FAMILIES
    experts: int = 0  # a mixture of experts: experts per layer (0: dense)
    experts_per_token: int = 0
    expert_intermediate: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def label(self) -> str:
        """The size, and the family where it is not Llama: "tiny", "qwen3_moe-tiny"."""
        return self.name if self.arch == "llama" else f"{self.arch}-{self.name}"

    @property
    def folder(self) -> str:
        # The shape is in the name, so a changed spec never reuses a stale cached model.
        family = "" if self.arch == "llama" else f"{self.arch}-"
        moe = f"-e{self.experts}k{self.experts_per_token}i{self.expert_intermediate}" if self.experts else ""
        return (f"{family}{self.name}-h{self.hidden}-i{self.intermediate}-l{self.layers}-a{self.heads}-kv{self.kv_heads}"
                f"{moe}-v{self.vocab}-s{self.seed}" + ("" if self.stored == "f32" else f"-{self.stored}"))

    def describe(self) -> str:
        moe = (f", {self.experts} experts of intermediate {self.expert_intermediate} ({self.experts_per_token} a "
               f"token)" if self.experts else "")
        return (f"{self.arch}, hidden {self.hidden}, intermediate {self.intermediate}, {self.layers} layers, "
                f"{self.heads}/{self.kv_heads} heads{moe}, vocab {self.vocab}")

    def as_family(self, arch: str) -> ModelSpec:
        """The same shape built as another family (a mixture of experts gets MOE_SHAPES' experts)."""
        if arch not in MOE_SHAPES:
            return replace(self, arch=arch)
        experts, top, ratio = MOE_SHAPES[arch]
        return replace(self, arch=arch, experts=experts, experts_per_token=top,
                       expert_intermediate=int(self.intermediate * ratio) // 16 * 16)


SPECS = {
    # Small layers, full Llama 3 vocabulary: per-token overheads (Python, asyncio, sockets) dominate.
    "tiny": ModelSpec("tiny", hidden=256, intermediate=704, layers=8, heads=8, kv_heads=2),
    # ~1.8 GB fp32: decode is bound by memory bandwidth.
    "big": ModelSpec("big", hidden=1024, intermediate=2816, layers=16, heads=16, kv_heads=4),
    # Llama 3 8B's shape (16 GB in bf16), for a GPU machine: never part of --model both.
    "8b": ModelSpec("8b", hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, stored="bf16"),
}


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    """A fixed prompt of ordinary token ids, so timing needs no tokenizer."""
    rng = random.Random(seed)
    return [rng.randrange(SPECIAL_IDS) for _ in range(n)]


def family_config(spec: ModelSpec):
    """transformers' config of `spec`'s family with its shape (and experts)."""
    import transformers

    from cake.synthetic import END_OF_TEXT

    kind, extra = FAMILIES[spec.arch]
    shape = dict(hidden_size=spec.hidden, intermediate_size=spec.intermediate, num_hidden_layers=spec.layers,
                 num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim,
                 vocab_size=spec.vocab, max_position_embeddings=8192, tie_word_embeddings=False,
                 eos_token_id=END_OF_TEXT, bos_token_id=SPECIAL_IDS,
                 architectures=[f"{kind.removesuffix('Text')}ForCausalLM"])
    if spec.arch == "mixtral":
        shape.update(num_local_experts=spec.experts, num_experts_per_tok=spec.experts_per_token,
                     intermediate_size=spec.expert_intermediate)
    elif spec.arch == "qwen3_moe":
        shape.update(num_experts=spec.experts, num_experts_per_tok=spec.experts_per_token,
                     moe_intermediate_size=spec.expert_intermediate)
    return getattr(transformers, f"{kind}Config")(**shape, **extra)


def build_model(spec: ModelSpec, out: Path) -> None:
    """Write `spec`'s seeded random-weight folder to `out` (the Llama 3 tokenizer files included)."""
    import torch
    import transformers

    from cake.synthetic import make_model, write_tokenizer

    dtype = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}[spec.stored]
    if spec.arch == "llama":
        make_model(out, hidden=spec.hidden, intermediate=spec.intermediate, layers=spec.layers, heads=spec.heads,
                   kv_heads=spec.kv_heads, vocab=spec.vocab, seed=spec.seed, dtype=dtype)
        return
    torch.manual_seed(spec.seed)
    kind = FAMILIES[spec.arch][0].removesuffix("Text")
    config = family_config(spec)
    with torch.device("cpu"):
        model = getattr(transformers, f"{kind}ForCausalLM")(config).to(getattr(torch, dtype)).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    write_tokenizer(out)


class Build(children.Subject):
    def __init__(self, job: children.Job):
        final = Path(job.model_dir)
        tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        build_model(spec_of(job), tmp)
        tmp.rename(final)  # a half-written folder is never mistaken for a cached model


def spec_of(job: children.Job) -> ModelSpec:
    return SPECS[job.model].as_family(job.arch)


def ensure_model(spec: ModelSpec, workdir: Path) -> Path:
    path = workdir / "models" / spec.folder
    if not (path / "config.json").exists():
        children.progress(f"building the {spec.arch} {spec.name} model in {path} (once; reused by later runs)")
        path.parent.mkdir(parents=True, exist_ok=True)
        with children.child(children.Job("build", spec.name, str(path), arch=spec.arch), path.parent) as c:
            c.ask()
            c.ask("finish")
    return path


def default_workdir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cake-bench"
