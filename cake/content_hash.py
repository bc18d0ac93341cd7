"""A file's content hash, as both ends of a weight transfer compute it (cake.shipping, cake.weight_cache):
the SHA-256 of the SHA-256s of its 1 MiB blocks (as Dropbox's content hash, there with 4 MiB blocks).
Each block's hash checks a chunk as it arrives, and the same hashes make the file's: one pass over the
bytes does both."""

from __future__ import annotations

import hashlib
from pathlib import Path

BLOCK = 1 << 20  # bytes hashed as one block (a chunk carries whole blocks)


def content_digest(sums: list[bytes]) -> bytes:
    """A file's digest from its blocks' SHA-256s (as Dropbox's content hash, with 1 MiB blocks)."""
    return hashlib.sha256(b"".join(sums)).digest()


def block_sums(data: memoryview) -> list[bytes]:
    """The SHA-256 of each BLOCK of `data` (the last may be shorter)."""
    return [hashlib.sha256(data[i:i + BLOCK]).digest() for i in range(0, len(data), BLOCK)]


def file_sums(path: Path, upto: int | None = None) -> list[bytes]:
    """The block SHA-256s of the first `upto` bytes of `path` (all of it by default)."""
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
            sums.append(hashlib.sha256(view).digest())
            left -= got
    return sums
