"""How much memory a node has for weights, what its share of the model needs, and sizes people type."""

from __future__ import annotations

import os
import re

import torch

from cake.errors import CakeError, ModelError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]I?B|B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'8GB', '500MB', '12MB', '1.5GiB', '0' -> bytes (GB = 10^9, GiB = 2^30)."""
    m = _SIZE.match(str(text))
    if not m:
        raise CakeError(f"--max-memory '{text}' is not a size; write it like 8GB, 500MB or 12GiB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


def gb(n: int) -> str:
    """Bytes for people: '12.3 MB', '4.82 GB', '141.1 GB'."""
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB" if n < 10e9 else f"{n / 1e9:.1f} GB"


def free_memory(device: torch.device) -> int:
    """Bytes a node can still take on `device`: free VRAM on CUDA, the recommended working set left on
    Metal, available RAM on a CPU; 0 where it cannot tell."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "mps":
            return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, RuntimeError, AttributeError):
        return 0


def check_room(what: str, need: dict[str, int], chosen: str, room: int, where: str) -> None:
    """Refuse, before anything loads, a share of the model that does not fit: `need` maps each format
    ('bf16', 'int8', 'int4', …, least lossy first) to the bytes the share takes in it, `chosen` is this
    node's, `room` what it has (`where` says what bounds it: free memory or --max-memory)."""
    if need[chosen] <= room:
        return
    fits = [f for f, n in need.items() if n <= room and f.startswith("int")]
    fix = (f"--quantize {fits[0]} would fit ({gb(need[fits[0]])})" if fits
           else "give this node fewer layers, or more memory")
    raise ModelError(f"{what} need {gb(need[chosen])} as {chosen}, but only {gb(room)} is {where}; {fix}")
