"""Mutual HMAC-SHA256 challenge/response over a shared cluster key, and the keys that seal a connection.

Both sides contribute a fresh nonce; each proves knowledge of the key over both nonces with its own
label, so a proof can be neither replayed nor reflected back at its sender. Once both have proved it,
each derives the same two per-connection keys (HKDF over the key and both nonces), one per direction,
that seal every later frame (cake.seal).
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

NONCE_BYTES = 32
ENV_KEY = "CAKE_CLUSTER_KEY"


def nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def proof(key: str, role: str, client_nonce: bytes, worker_nonce: bytes) -> bytes:
    msg = b"cake-v1|" + role.encode() + b"|" + client_nonce + b"|" + worker_nonce
    return hmac.new(key.encode(), msg, hashlib.sha256).digest()


def verify(key: str, role: str, client_nonce: bytes, worker_nonce: bytes, given: bytes) -> bool:
    return hmac.compare_digest(proof(key, role, client_nonce, worker_nonce), given)


def link_keys(key: str, client_nonce: bytes, worker_nonce: bytes) -> tuple[bytes, bytes]:
    """This connection's sealing keys: (client -> worker, worker -> client), 32 bytes each. Fresh nonces
    on both sides make them new for every connection, whoever recorded an earlier one."""
    okm = HKDF(SHA256(), 64, salt=client_nonce + worker_nonce, info=b"cake-v2 seal").derive(key.encode())
    return okm[:32], okm[32:]


def is_loopback(host: str) -> bool:
    """Whether a listening address is reachable from this machine only (no key needed there)."""
    return host in ("localhost", "::1") or host.startswith("127.")
