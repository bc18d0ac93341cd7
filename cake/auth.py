"""Mutual HMAC-SHA256 challenge/response over a shared cluster key, and the keys that seal a connection.

Both sides contribute a fresh nonce; the side that connects proves first that it knows the key, over both
nonces with its own label, so a proof can be neither replayed nor reflected back at its sender, and a
worker shows nothing derived from the key to a stranger. Once both have proved it, each derives the same
two per-connection keys (HKDF over the key and both nonces), one per direction, that seal every later
frame (cake.seal). The key is a passphrase stretched once per process with scrypt, so a recorded
handshake costs a guesser that much per guess; `cake keygen` makes a random key that needs no stretching.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import secrets

NONCE_BYTES = 32
ENV_KEY = "CAKE_CLUSTER_KEY"
LABEL = b"cake-v3|"
# scrypt at OWASP's recommended cost (N=2^17, r=8, p=1: 128 MiB): ~1.2 s once per process on a 2-core EPYC,
# and as much for every guess at a weak passphrase tested against a recorded handshake (docs/security.md).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 17, 8, 1
SALT = b"cake cluster key v3"  # fixed: every node must derive the same secret with nothing exchanged first


@functools.lru_cache(maxsize=4)
def stretch(key: str) -> bytes:
    """The 32-byte secret behind a cluster key (a passphrase, or cake keygen's hex), once per process."""
    return hashlib.scrypt(key.encode(), salt=SALT, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                          maxmem=2 * 128 * SCRYPT_R * SCRYPT_N, dklen=32)


def keygen() -> str:
    """A random 256-bit cluster key, as 64 hex digits."""
    return secrets.token_hex(32)


def nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def proof(secret: bytes, role: str, client_nonce: bytes, worker_nonce: bytes) -> bytes:
    msg = LABEL + role.encode() + b"|" + client_nonce + b"|" + worker_nonce
    return hmac.new(secret, msg, hashlib.sha256).digest()


def verify(secret: bytes, role: str, client_nonce: bytes, worker_nonce: bytes, given: bytes) -> bool:
    return hmac.compare_digest(proof(secret, role, client_nonce, worker_nonce), given)


def link_keys(secret: bytes, client_nonce: bytes, worker_nonce: bytes) -> tuple[bytes, bytes]:
    """This connection's sealing keys: (client -> worker, worker -> client), 32 bytes each. Fresh nonces
    on both sides make them new for every connection, whoever recorded an earlier one."""
    from cryptography.hazmat.primitives.hashes import SHA256  # here: `cake --help` imports this module
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    okm = HKDF(SHA256(), 64, salt=client_nonce + worker_nonce, info=LABEL + b"seal").derive(secret)
    return okm[:32], okm[32:]


def is_loopback(host: str) -> bool:
    """Whether a listening address is reachable from this machine only (no key needed there)."""
    return host in ("localhost", "::1") or host.startswith("127.")
