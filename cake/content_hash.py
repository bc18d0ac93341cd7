"""A file's content hash, as both ends of a weight transfer compute it (cake.shipping, cake.weight_cache):
the XXH3-128 of each 1 MiB block, and the SHA-256 of those as the file's digest (as Dropbox's content hash,
there with SHA-256 and 4 MiB blocks). Each block's sum checks a chunk as it arrives, and the same sums make
the file's digest: one pass over the bytes does both.

XXH3 (as rsync's transfer checksum since 3.2.3) because it costs nothing beside the copy, where SHA-256
capped the transfer (docs/benchmarks.md): it catches corrupt bytes, not forged ones. What a master sends is
authenticated by the cluster key (every frame sealed), not by these sums (docs/security.md)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import xxhash

BLOCK = 1 << 20  # bytes summed as one block (a chunk carries whole blocks)
SUM = 16  # bytes of a block's sum
SUM_NAME = "xxh3_128"


def block_sum(data) -> bytes:
    """The sum of one block (bytes, or any buffer)."""
    return xxhash.xxh3_128_digest(data)


def content_digest(sums: list[bytes]) -> bytes:
    """A file's digest from its blocks' sums."""
    return hashlib.sha256(b"".join(sums)).digest()


def block_sums(data: memoryview) -> list[bytes]:
    """The sum of each BLOCK of `data` (the last may be shorter)."""
    return [block_sum(data[i:i + BLOCK]) for i in range(0, len(data), BLOCK)]


def file_sums(path: Path, upto: int | None = None) -> list[bytes]:
    """The block sums of the first `upto` bytes of `path` (all of it by default)."""
    left = path.stat().st_size if upto is None else upto
    sums = []
    buf = bytearray(BLOCK)
    with open(path, "rb", buffering=0) as f:
        while left:
            view = memoryview(buf)[:min(BLOCK, left)]
            got = 0
            while got < len(view) and (n := f.readinto(view[got:])):
                got += n
            if got < len(view):
                break
            sums.append(block_sum(view))
            left -= got
    return sums
