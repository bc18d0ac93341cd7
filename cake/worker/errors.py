"""What a worker refuses: a request (an error answer, the connection goes on) or a client (closed)."""

from __future__ import annotations

from cake import wire
from cake.errors import CakeError, ProtocolError


class AuthFailed(ProtocolError):
    """A client did not prove it knows the cluster key (logged, rate-limited, by handshake.AuthLog)."""


class RequestError(CakeError):
    """A request this worker will not serve: answered with an error of `code` (`cached`: with
    cache_behind, where to replay from; `peer`: the next worker a relay could not reach)."""

    def __init__(self, code: str, message: str, cached: int = 0, peer: str = ""):
        super().__init__(message)
        self.code, self.cached, self.peer = code, cached, peer

    def reply(self, rid: int = 0) -> wire.Error:
        return wire.Error(self.code, str(self), self.cached, self.peer, rid)


def gone() -> RequestError:
    return RequestError("gone", "the connection this forward was for has closed")
