"""Mutual HMAC-SHA256 challenge/response over a shared cluster key.

Both sides contribute a fresh nonce; each proves knowledge of the key over both nonces with its own
label, so a proof can be neither replayed nor reflected back at its sender.
"""

from __future__ import annotations

import hashlib
import hmac
import os

NONCE_BYTES = 32
ENV_KEY = "CAKE_CLUSTER_KEY"


def nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def proof(key: str, role: str, client_nonce: bytes, worker_nonce: bytes) -> bytes:
    msg = b"cake-v1|" + role.encode() + b"|" + client_nonce + b"|" + worker_nonce
    return hmac.new(key.encode(), msg, hashlib.sha256).digest()


def verify(key: str, role: str, client_nonce: bytes, worker_nonce: bytes, given: bytes) -> bool:
    return hmac.compare_digest(proof(key, role, client_nonce, worker_nonce), given)


def is_loopback(host: str) -> bool:
    """Whether a listening address is reachable from this machine only (no key needed there)."""
    return host in ("localhost", "::1") or host.startswith("127.")
