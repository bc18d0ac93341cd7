"""The one exception type users see: a message that names the thing and the fix."""


class CakeError(Exception):
    """An error a user can act on. Caught once, at the edge (CLI, server loop), printed as one line."""


class TopologyError(CakeError):
    pass


class ModelError(CakeError):
    pass


class ProtocolError(CakeError):
    """The peer sent something that breaks the protocol (bad frame, bad field, bad tensor)."""


class WorkerError(CakeError):
    """A worker answered a request with an error, or could not be reached."""
