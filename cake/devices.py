"""Per-node device and dtype selection, and what hardware a node computes on."""

from __future__ import annotations

import functools
import hashlib
import socket
import uuid

import torch

from cake.dtypes import ALIASES
from cake.errors import CakeError

DTYPES = {name: getattr(torch, full) for name, full in ALIASES.items()}


def pick_device(spec: str = "auto") -> torch.device:
    """`auto`: cuda, then mps, then cpu. Explicit choices are checked so a typo fails at start-up."""
    spec = (spec or "auto").lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise CakeError(f"unknown device '{spec}'; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CakeError(f"device '{spec}' asked for but this torch build sees no CUDA GPU; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CakeError(f"device '{spec}' does not exist ({torch.cuda.device_count()} CUDA devices)")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise CakeError("device 'mps' asked for but Metal is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise CakeError(f"unsupported device '{spec}'; use auto, cpu, cuda, cuda:N or mps")
    return dev


def pick_dtype(spec: str, device: torch.device, checkpoint_dtype: str) -> torch.dtype:
    """`auto`: the checkpoint's dtype where the device computes in it well.

    - CUDA: bf16 checkpoints stay bf16 (f16 on GPUs without bf16); f32 stays f32.
    - MPS: bf16 -> f16 (bf16 support on Metal is partial).
    - CPU: f16 -> f32 (CPU f16 kernels are slow or missing); bf16 stays bf16 (half the memory, and
      decode is memory-bound); f32 stays f32.
    """
    spec = (spec or "auto").lower()
    if spec != "auto":
        if spec not in DTYPES:
            raise CakeError(f"unknown dtype '{spec}'; use auto, f32, f16 or bf16")
        return DTYPES[spec]
    ckpt = DTYPES.get(str(checkpoint_dtype).replace("torch.", ""), torch.float32)
    if device.type == "cuda":
        if ckpt == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            return torch.float16
        return ckpt
    if device.type == "mps":
        return torch.float16 if ckpt == torch.bfloat16 else ckpt
    return torch.float32 if ckpt == torch.float16 else ckpt


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]


@functools.lru_cache(maxsize=1)
def machine_id() -> str:
    """A fingerprint of this machine, so nodes can tell which of them share one: its host name, its
    /etc/machine-id where it has one, and its network hardware address unless it has none (uuid then
    makes up a random one per process, with the multicast bit set). Separate containers on one host
    count as separate machines."""
    try:
        with open("/etc/machine-id") as f:
            system = f.read().strip()
    except OSError:
        system = ""
    node = uuid.getnode()
    hardware = "" if node >> 40 & 1 else str(node)
    return hashlib.sha256(f"{socket.gethostname()}|{system}|{hardware}".encode()).hexdigest()[:16]


def compute_unit(device: torch.device) -> str:
    """What a node on `device` computes with, the same name from every process: the GPU's UUID (so
    'cuda' and 'cuda:0' match, and CUDA_VISIBLE_DEVICES renumbering does not), else 'mps' or 'cpu'."""
    if device.type == "cuda":
        try:
            index = device.index if device.index is not None else torch.cuda.current_device()
            unit = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        except (RuntimeError, AssertionError):  # CUDA would not start: name it as the user did
            return str(device)
        return f"cuda-{unit}" if unit else f"cuda:{index}"
    return device.type
