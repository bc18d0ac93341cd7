"""The worker: an asyncio TCP server that runs its decoder layers for masters.

Its parts, each a module:
    server      Worker: accepts connections, the handshake, reading requests and answering them
    handshake   the worker's side of the handshake, and the rate-limited log of failed proofs
    connection  Conn: one client connection, and answers written to it from other connections' tasks
    sessions    SessionStore: KV caches by (connection, session), the budget, eviction, deferred ends
    scheduler   Scheduler: decode steps at once, the rest behind the compute lock, prompts in steps,
                back-pressure on connections that send more than they read
    relay       Relay: passing outputs straight on to the next worker
    run         `cake --mode worker`: arguments, binding, loading, serving until SIGTERM
"""

from cake.worker.connection import MAX_PENDING_ANSWERS, Conn
from cake.worker.errors import AuthFailed, RequestError
from cake.worker.relay import RELAY_BACKLOG
from cake.worker.run import WorkerArgs, bind, run_worker
from cake.worker.scheduler import MAX_QUEUED_FORWARDS
from cake.worker.server import MAX_BATCH, MAX_CONNECTIONS, MAX_HANDSHAKING, Placement, Worker

__all__ = ["AuthFailed", "Conn", "MAX_BATCH", "MAX_CONNECTIONS", "MAX_HANDSHAKING", "MAX_PENDING_ANSWERS",
           "MAX_QUEUED_FORWARDS", "Placement", "RELAY_BACKLOG", "RequestError", "Worker", "WorkerArgs", "bind",
           "run_worker"]
