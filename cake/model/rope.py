"""Rotary position embeddings: the inverse frequencies of each scaling type (as transformers computes
them), the cos/sin table of a node's positions, and rotation as elementwise maths or one small matrix."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from cake.model.config import LlamaConfig


def rope_inv_freq(config: LlamaConfig, long: bool = False) -> torch.Tensor:
    """Inverse frequencies of the rotated share of a head, for the config's scaling type ('long': longrope's
    long factors, which transformers takes past the original context)."""
    dim = config.rotary_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    s = config.rope_scaling
    kind = s["rope_type"] if s else "default"
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(s["factor"])
    if kind == "longrope":
        factors = torch.tensor(s["long_factor" if long else "short_factor"], dtype=torch.float32)
        return 1.0 / (factors * config.rope_theta ** exponents)
    if kind == "yarn":
        return _yarn(config, s, inv_freq)
    return _llama3(s, inv_freq)


def _llama3(s: dict, inv_freq: torch.Tensor) -> torch.Tensor:
    """Llama 3.1's long-context rescaling."""
    factor = float(s["factor"])
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_ctx = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
    return torch.where(medium, smoothed, scaled)


def _yarn(config: LlamaConfig, s: dict, inv_freq: torch.Tensor) -> torch.Tensor:
    """YaRN: interpolated low frequencies, extrapolated high ones, a linear ramp between."""
    dim, base = config.rotary_dim, config.rope_theta
    factor, old_ctx = _factor(config, s), float(s["original_max_position_embeddings"])
    fast, slow = float(s.get("beta_fast") or 32), float(s.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))
    low, high = correction_dim(fast), correction_dim(slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolated = 1 - ramp
    return inv_freq / factor * (1 - extrapolated) + inv_freq * extrapolated


def _factor(config: LlamaConfig, s: dict) -> float:
    return float(s.get("factor") or config.max_position_embeddings / float(s["original_max_position_embeddings"]))


def attention_factor(config: LlamaConfig) -> float:
    """What yarn and longrope scale cos and sin by (1 for the other types)."""
    s = config.rope_scaling
    if not s or s["rope_type"] not in ("yarn", "longrope"):
        return 1.0
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])
    factor = _factor(config, s)
    if factor <= 1:
        return 1.0
    if s["rope_type"] == "longrope":
        return math.sqrt(1 + math.log(factor) / math.log(float(s["original_max_position_embeddings"])))
    mscale, mscale_all = s.get("mscale"), s.get("mscale_all_dim")
    def get(m: float = 1.0) -> float:
        return 0.1 * m * math.log(factor) + 1.0
    return get(mscale) / get(mscale_all) if mscale and mscale_all else get()


def rope_table(config: LlamaConfig, capacity: int, device: torch.device,
               long: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [capacity, rotary_dim] in float32 for positions 0..capacity-1 (`long`: longrope's
    long factors)."""
    pos = torch.arange(capacity, dtype=torch.float32)
    emb = torch.outer(pos, rope_inv_freq(config, long))
    emb = torch.cat((emb, emb), dim=-1)
    scale = attention_factor(config)
    return (emb.cos() * scale).to(device), (emb.sin() * scale).to(device)


def long_from(config: LlamaConfig) -> int | None:
    """longrope: a forward whose last position reaches this length takes the long factors for all its
    positions, as transformers does (None for the other types)."""
    s = config.rope_scaling
    return int(s["original_max_position_embeddings"]) if s and s["rope_type"] == "longrope" else None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., head_dim] by cos, sin [..., rotary_dim]: the first rotary_dim features of each head
    (all of them, except for partial rotary), the rest passed through."""
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot = x[..., :rd]
    return torch.cat((rot * cos + rotate_half(rot) * sin, x[..., rd:]), dim=-1)


def rope_swap(head_dim: int, dtype: torch.dtype, device: torch.device, rotary_dim: int | None = None) -> torch.Tensor:
    """J with x @ J == rotate_half(x): row j+half has -1 in column j, row j has +1 in column j+half (over
    the first rotary_dim features; zero beyond them)."""
    half = (rotary_dim or head_dim) // 2
    j = torch.zeros(head_dim, head_dim, dtype=dtype)
    idx = torch.arange(half)
    j[idx + half, idx] = -1
    j[idx, idx + half] = 1
    return j.to(device)


def rope_rotations(cos: torch.Tensor, sin: torch.Tensor, eye: torch.Tensor, swap: torch.Tensor) -> torch.Tensor:
    """cos, sin [B, head_dim] -> R [B, head_dim, head_dim] with x @ R == apply_rope(x, cos, sin).

    A decode step rotates every head of a row by the same angles, so one small batched matrix product
    per layer replaces the seven elementwise operations of apply_rope. cos and sin hold each angle twice
    (j and j + half), so scaling row i of I and J by cos_i and sin_i gives exactly the rotation."""
    return torch.addcmul(cos.unsqueeze(-1) * eye, sin.unsqueeze(-1), swap)




class RopeTables:
    """A node's rope angles for every position its caches hold, looked up for a batch's positions: the
    model's table (longrope: the long factors' table after it) and Gemma 3's sliding layers' own (`local`:
    another base, unscaled)."""

    def __init__(self, config: LlamaConfig, capacity: int, dtype: torch.dtype, device: torch.device):
        self.capacity, self.dtype, self.head_dim = capacity, dtype, config.head_dim
        self.cos, self.sin = rope_table(config, capacity, device)
        self.long_from = long_from(config)
        if self.long_from is not None:  # rows [capacity, 2 capacity) hold the long factors' table
            cos, sin = rope_table(config, capacity, device, long=True)
            self.cos, self.sin = torch.cat((self.cos, cos)), torch.cat((self.sin, sin))
        self.local = None
        if config.local_rope_theta is not None:
            self.local = rope_table(replace(config, rope_theta=config.local_rope_theta, rope_scaling=None), capacity,
                                    device)
        self.eye = torch.eye(config.head_dim, dtype=dtype, device=device)
        self.swap = rope_swap(config.head_dim, dtype, device, config.rotary_dim)

    def trig(self, pos: torch.Tensor, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, T, 1, rotary_dim] (broadcast over heads) of the positions pos [B, T], for apply_rope."""
        if local:
            cos, sin = self.local
        else:
            cos, sin = self.cos, self.sin
            if self.long_from is not None:
                pos = pos + self.capacity * (pos[:, -1:] + 1 > self.long_from)
        return cos[pos].to(self.dtype).unsqueeze(2), sin[pos].to(self.dtype).unsqueeze(2)

    def rotations(self, pos: torch.Tensor, local: bool = False) -> torch.Tensor:
        """The rotation of each row's position, pos [B] (a device tensor) -> [B, hd, hd] (rope_rotations)."""
        cos, sin = self.local if local else (self.cos, self.sin)
        if self.long_from is not None and not local:
            pos = pos + self.capacity * (pos + 1 > self.long_from)
        cos, sin = cos.index_select(0, pos).to(self.dtype), sin.index_select(0, pos).to(self.dtype)
        rest = self.head_dim - cos.shape[-1]
        if rest:  # partial rotary: the features past the rotated share are kept as they are
            cos = torch.cat((cos, cos.new_ones(cos.shape[0], rest)), dim=-1)
            sin = torch.cat((sin, sin.new_zeros(sin.shape[0], rest)), dim=-1)
        return rope_rotations(cos, sin, self.eye, self.swap)
