"""Sealed frames: what a connection with a cluster key sends after its handshake.

Each direction of a connection has its own ChaCha20-Poly1305 key (cake.auth.link_keys) and a frame
counter that is the nonce: the receiver opens the n-th sealed piece only with nonce n, so a piece that
was changed, replayed, reordered, dropped or injected fails its tag, and the connection is closed. The
byte layout is in cake.wire (it frames), the keys in cake.auth (they come from the handshake).
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

TAG = 16  # bytes the AEAD adds to each sealed piece


class SealBroken(Exception):
    """A sealed piece failed its tag: changed, replayed, reordered or injected on the way."""


class Seal:
    """One direction of one connection: its key and the number of pieces sealed (or opened) so far."""

    def __init__(self, key: bytes):
        self._aead = ChaCha20Poly1305(key)
        self.count = 0

    def _nonce(self) -> bytes:
        n, self.count = self.count, self.count + 1
        return n.to_bytes(12, "big")  # 2^64 pieces before a repeat would take centuries at any speed

    def seal_into(self, data, aad: bytes, out: memoryview) -> None:
        """Seal `data` into `out` (exactly len(data) + TAG bytes): the AEAD's one copy, no other."""
        self._aead.encrypt_into(self._nonce(), data, aad, out)

    def open(self, data: bytes, aad: bytes = b"") -> bytes:
        try:
            return self._aead.decrypt(self._nonce(), data, aad)
        except InvalidTag:
            raise SealBroken() from None

    def open_into(self, data: bytes, aad: bytes, out: bytearray) -> None:
        """Open `data` into `out` (len(data) - TAG bytes), the buffer a tensor is then made on."""
        try:
            self._aead.decrypt_into(self._nonce(), data, aad, out)
        except InvalidTag:
            raise SealBroken() from None
