"""The worker's side of the handshake: hello, the protocol version, and with a cluster key the proofs
(the client's first: one that cannot prove it gets nothing derived from the key) and the link's seals.
See docs/protocol.md and docs/security.md."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from cake import auth, wire
from cake.errors import ProtocolError
from cake.seal import Seal
from cake.worker.connection import Conn
from cake.worker.errors import AuthFailed

log = logging.getLogger("cake.worker")

AUTH_LOG_EVERY = 1.0  # seconds: at most one line per this about failed authentications (a flood fills no disk)


class AuthLog:
    """A warning naming each client that failed to prove the key: at most one a second, each saying how
    many came since the one before."""

    def __init__(self) -> None:
        self._logged, self._unlogged = float("-inf"), 0

    def failed(self, peer: str, why: str) -> None:
        now = time.monotonic()
        if now - self._logged < AUTH_LOG_EVERY:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more since the last such line)" if self._unlogged else ""
        log.warning("failed authentication from %s: %s%s", peer, why, more)
        self._logged, self._unlogged = now, 0


async def greet(reader: asyncio.StreamReader, conn: Conn, peer: str, name: str, key: str | None,
                failures: AuthLog) -> Seal | None:
    """Up to the client's proof, checked: sets conn.seal (what this side sends is sealed from now on,
    with a key) and returns the seal of what the client sends (None without a key). A client of another
    version gets an error answer; one that fails the proof is logged and refused (AuthFailed)."""
    writer, opener = conn.writer, None
    msg, _ = await wire.read_message(reader, wire.MAX_HEADER + 8)
    if not isinstance(msg, wire.Hello) or msg.proto != wire.PROTOCOL:
        raise wire.FrameError("first frame is not a cake hello")
    if msg.version != wire.VERSION:
        await wire.write_message(writer, wire.Error(
            "version", f"worker '{name}' speaks protocol v{wire.VERSION}, master v{msg.version}; "
                       f"run the same cake version on every node"))
        raise ProtocolError(f"protocol version {msg.version} != {wire.VERSION}")
    mine = auth.nonce()
    await wire.write_message(writer, wire.Welcome(wire.VERSION, mine, bool(key)))
    if key:
        secret = auth.stretch(key)
        try:
            reply, _ = await wire.read_message(reader, wire.MAX_HEADER + 8)
        except ProtocolError as e:
            reply = e
        if not (isinstance(reply, wire.Auth) and auth.verify(secret, "client", msg.nonce, mine, reply.proof)):
            failures.failed(peer, "a proof made with another key" if isinstance(reply, wire.Auth) else
                            f"no proof ({reply.TYPE if isinstance(reply, wire.Message) else reply})")
            with contextlib.suppress(ConnectionError):
                await wire.write_message(writer, wire.Error(
                    "auth", f"worker '{name}' refused the cluster key; give every node the same --cluster-key"))
            raise AuthFailed("client failed authentication")
        await wire.write_message(writer, wire.Auth(auth.proof(secret, "worker", msg.nonce, mine)))
        theirs, mine_out = auth.link_keys(secret, msg.nonce, mine)
        opener, conn.seal = Seal(theirs), Seal(mine_out)
    return opener
