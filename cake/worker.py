"""The worker: an asyncio TCP server that runs its decoder layers for masters.

Each connection is its own task, so a silent or broken client blocks nobody. A bad request gets an
error reply; a broken frame closes that connection only. KV caches belong to (connection, session):
they are freed on `end`, when the connection closes, or when idle sessions are evicted to stay under
the memory budget.

Relay: a forward can ask this worker to pass its output straight on to the next worker (found by name
in this worker's topology file) instead of back to the master, which saves the master a round trip
per worker per token. The next worker answers on the master's own connection, named by the token the
master got in `info`, so sessions and KV caches stay the master connection's.

Concurrency: a forward that needs the compute lock (a prompt, or a step that makes a new KV cache) runs
on a task of its own, so its connection goes on reading. A decode step of sessions already cached runs
at once, between two steps of a prompt in progress: one user's long prompt does not freeze the others'
streams for its whole length, only for one layer of one chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import socket
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cake import auth, eventloop, wire
from cake.client import Options, WorkerLink
from cake.devices import compute_unit, dtype_name, machine_id, pick_device
from cake.errors import CakeError, ProtocolError
from cake.memory import free_memory
from cake.seal import Seal
from cake.model.config import LlamaConfig, load_config
from cake.model.kv_cache import KVCache, Row
from cake.model.stack import LayerStack
from cake.model.loader import load_layers
from cake.topology import Topology, format_layers, load_topology, split_address

log = logging.getLogger("cake.worker")

HANDSHAKE_TIMEOUT = 10.0
MAX_BATCH = 256
RELAYS_REMEMBERED = 8  # per next worker: the last forwards to tell their masters about if that connection breaks
MAX_CONNECTIONS = 64  # masters and relaying workers at once (a cluster needs a handful)
MAX_HANDSHAKING = 32  # connections not yet through the handshake (each gets HANDSHAKE_TIMEOUT)
IDLE_TIMEOUT = 300.0  # seconds a connection may send nothing before a new one replaces it, when the worker is full
FRAME_STALL = 60.0  # seconds the rest of a frame may take once it has begun
MAX_PENDING_ANSWERS = 64  # relayed answers queued for one connection that does not read them: then it is closed
MAX_QUEUED_FORWARDS = 16  # forwards of one connection on tasks (waiting for the compute lock, computing, answering)
AUTH_LOG_EVERY = 1.0  # seconds: at most one line per this about failed authentications (a flood fills no disk)
RELAY_BACKLOG = 16  # forwards waiting to be passed on to one next worker; past it they fail over to the master
QUEUED_BYTES = 1 << 30  # their hidden states, all connections together (at least one frame); past it a connection waits
SHIP_FRAME = wire.FORWARD_OVERHEAD + (4 << 20)  # a worker with no model yet: a chunk of the weights shipped to it


class AuthFailed(ProtocolError):
    """A client did not prove it knows the cluster key (logged, rate-limited, by Worker._auth_failed)."""


class RequestError(CakeError):
    def __init__(self, code: str, message: str, cached: int = 0, peer: str = ""):
        super().__init__(message)
        self.code, self.cached, self.peer = code, cached, peer


@dataclass
class Conn:
    """One client connection: its id (the key of its sessions), the token a relayed forward names it
    by, and a write lock (relayed answers arrive from other connections' tasks)."""

    id: int
    token: str
    writer: asyncio.StreamWriter
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    pending: int = 0  # answers from relaying workers' connections waiting to be written here
    closed: bool = False  # its sessions were freed: nothing may create new ones for it
    queued: set[asyncio.Task] = field(default_factory=set)  # forwards read here that run on tasks (_queue)
    seal: Seal | None = None  # with a cluster key: the sealing of what this side sends (set by the handshake)
    last_read: float = field(default_factory=time.monotonic)  # when its last frame came (see Worker._close_idle)

    async def send(self, msg: wire.Message, tensor: torch.Tensor | None = None) -> None:
        async with self.lock:
            await wire.write_message(self.writer, msg, tensor, self.seal)


@dataclass
class SessionEntry:
    cache: KVCache
    conn: int
    last_used: float


@dataclass
class InUse:
    """The sessions a computation in steps holds: one ended meanwhile is freed after it (never under it);
    once all are ended, the computation stops at its next step."""

    ended: set[tuple[int, str]] = field(default_factory=set)


class Worker:
    def __init__(self, name: str, stack: LayerStack | None, config: LlamaConfig | None, key: str | None = None,
                 kv_budget: int = 2 << 30, max_frame: int | None = None, topology: Topology | None = None,
                 placement: Placement | None = None, fetch: Fetch | None = None):
        self.name = name
        self.fetch = fetch  # no --model: the master sends the config, then the layers (cake.weight_cache)
        self.placement = placement  # a worker the master places: what it measured, and how it loads layers
        self.topology = topology or Topology()
        self.conns: dict[str, Conn] = {}  # by token
        self.peers: dict[str, WorkerLink] = {}  # relay connections to other workers, by name
        # Per next worker: (forward id, master connection token) of the last forwards relayed to it.
        self._relayed: dict[str, deque[tuple[int, str]]] = {}
        self._answers: set[asyncio.Task] = set()
        self.stack = stack
        self.config = config
        self.key = key or None
        if self.key:
            auth.stretch(self.key)  # once per process, before serving: a failed proof costs nothing more
        self._auth_logged, self._auth_unlogged = float("-inf"), 0  # see _auth_failed
        # Seconds: a silent connection replaced when full, a frame begun and stalled (both env-settable).
        self.idle_timeout = float(os.environ.get("CAKE_IDLE_TIMEOUT", IDLE_TIMEOUT))
        self.stall_timeout = float(os.environ.get("CAKE_FRAME_STALL", FRAME_STALL))
        self.kv_budget = kv_budget
        self._frame_asked = max_frame
        self.max_frame, self.max_rows = frame_limits(stack, config, max_frame)
        self.sessions: OrderedDict[tuple[int, str], SessionEntry] = OrderedDict()
        self._conn_ids = itertools.count(1)
        self._handshaking: OrderedDict[int, asyncio.StreamWriter] = OrderedDict()  # connection id -> writer
        self._computing = asyncio.Lock()
        self._in_use: dict[tuple[int, str], InUse] = {}  # sessions of the computation in steps, if any
        self._waiting: Counter[tuple[int, str]] = Counter()  # sessions of queued forwards (_queue)
        self._ended_waiting: set[tuple[int, str]] = set()  # of those, ended meanwhile: they make no cache
        self._queued: dict[asyncio.Task, Conn] = {}  # every queued forward's task -> the connection it answers
        self._queued_bytes = 0
        self._computed: dict[asyncio.Task, Callable[[asyncio.Task], None]] = {}  # see _queue
        self._freed = asyncio.Event()  # set whenever a queued forward frees its slot or its bytes
        self._relaying: Counter[str] = Counter()  # next worker -> forwards being passed on to it
        self.queue_budget = max(QUEUED_BYTES, self.max_frame)
        self._aside_s = 0.0  # seconds of decode steps run between a prompt's steps (not the prompt's compute)

    # ---- server ------------------------------------------------------------------------------------

    async def serve(self, host: str = "", port: int = 0, sockets: list[socket.socket] | None = None) -> None:
        """Serve on host:port, or on `sockets` already bound there (see bind)."""
        if sockets:
            servers = [await asyncio.start_server(self.handle, sock=s, limit=1 << 20) for s in sockets]
        else:
            servers = [await asyncio.start_server(self.handle, host, port, limit=1 << 20)]
        addrs = ", ".join(f"{s.getsockname()[0]}:{s.getsockname()[1]}" for server in servers for s in server.sockets)
        if self.stack is None:
            log.info("worker '%s' on %s has no model files: it takes the model's config and its layers from the "
                     "master, into %s", self.name, addrs, self.fetch.root)
        else:
            log.info("worker '%s' serving layers %s on %s (%s, %s)", self.name, format_layers(self.stack.indices),
                     addrs, self.stack.device, dtype_name(self.stack.dtype))
        try:
            await asyncio.gather(*(server.serve_forever() for server in servers))
        finally:
            for server in servers:
                server.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(next(self._conn_ids), secrets.token_hex(16), writer)
        peer = writer.get_extra_info("peername")
        peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if len(self._handshaking) >= MAX_HANDSHAKING:  # a flood of connections that say nothing: the
            oldest = next(iter(self._handshaking))     # oldest goes (a real client's handshake takes ms)
            log.warning("closed a connection still in its handshake: %d are", MAX_HANDSHAKING)
            self._handshaking.pop(oldest).close()
        try:
            wire.tune_socket(writer)  # a ConnectionError when the client reset it at once: closed quietly
            self._handshaking[conn.id] = writer
            try:
                opener = await asyncio.wait_for(self._handshake(reader, conn, peer), HANDSHAKE_TIMEOUT)
            finally:
                self._handshaking.pop(conn.id, None)
            self.conns[conn.token] = conn
            log.info("client connected from %s", peer)
            while True:
                try:
                    msg, tensor = await wire.read_message(reader, self.max_frame, opener, self.stall_timeout)
                except wire.FrameError as e:  # the byte stream is broken: say why (best effort), then close
                    if e.oversized:
                        e.args = (f"{e} (this worker's --max-frame-mb)",)
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.send(wire.Error("bad_frame", f"worker '{self.name}' closed "
                                                                     f"the connection: {e}")), 1.0)
                    raise
                except ProtocolError as e:
                    log.warning("bad request from %s: %s", peer, e)
                    await conn.send(wire.Error("bad_request", str(e), id=getattr(e, "request_id", 0)))
                    continue
                conn.last_read = time.monotonic()
                await self._serve(conn, msg, tensor, peer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.TimeoutError:
            log.warning("client %s did not finish the handshake in %.0fs; closed", peer, HANDSHAKE_TIMEOUT)
        except AuthFailed:
            pass  # logged by _auth_failed
        except ProtocolError as e:
            log.warning("closed connection from %s: %s", peer, e)
        except Exception:  # never let one connection take the worker down
            log.exception("internal error on connection from %s", peer)
        finally:
            conn.closed = True
            self.conns.pop(conn.token, None)
            dropped = [t for t, dest in self._queued.items() if dest is conn and not t.done()]
            for task in dropped:  # nobody is left to answer: they stop (a prompt at its next step), frames freed
                task.cancel()
            if dropped:
                log.info("connection from %s closed: stopped %d forward(s) for it", peer, len(dropped))
            freed = self._free_connection(conn.id)
            if freed:
                log.info("connection from %s closed; freed %d session(s)", peer, freed)
            writer.close()

    async def _handshake(self, reader: asyncio.StreamReader, conn: Conn, peer: str) -> Seal | None:
        """Hello, proofs (the client's first: one that cannot prove it gets nothing derived from the key),
        then this worker's info: with a key, sealed, like everything after (conn.seal). Returns the seal
        of what the client sends (None without a key)."""
        writer, opener = conn.writer, None
        msg, _ = await wire.read_message(reader, wire.MAX_HEADER + 8)
        if not isinstance(msg, wire.Hello) or msg.proto != wire.PROTOCOL:
            raise wire.FrameError("first frame is not a cake hello")
        if msg.version != wire.VERSION:
            await wire.write_message(writer, wire.Error(
                "version", f"worker '{self.name}' speaks protocol v{wire.VERSION}, master v{msg.version}; "
                           f"run the same cake version on every node"))
            raise ProtocolError(f"protocol version {msg.version} != {wire.VERSION}")
        mine = auth.nonce()
        await wire.write_message(writer, wire.Welcome(wire.VERSION, mine, bool(self.key)))
        if self.key:
            secret = auth.stretch(self.key)
            try:
                reply, _ = await wire.read_message(reader, wire.MAX_HEADER + 8)
            except ProtocolError as e:
                reply = e
            if not (isinstance(reply, wire.Auth) and auth.verify(secret, "client", msg.nonce, mine, reply.proof)):
                self._auth_failed(peer, "a proof made with another key" if isinstance(reply, wire.Auth) else
                                  f"no proof ({reply.TYPE if isinstance(reply, wire.Message) else reply})")
                with contextlib.suppress(ConnectionError):
                    await wire.write_message(writer, wire.Error(
                        "auth", f"worker '{self.name}' refused the cluster key; give every node the same "
                                f"--cluster-key"))
                raise AuthFailed("client failed authentication")
            await wire.write_message(writer, wire.Auth(auth.proof(secret, "worker", msg.nonce, mine)))
            theirs, mine_out = auth.link_keys(secret, msg.nonce, mine)
            opener, conn.seal = Seal(theirs), Seal(mine_out)
        if len(self.conns) >= MAX_CONNECTIONS and not self._close_idle():
            await conn.send(wire.Error(
                "busy", f"worker '{self.name}' already serves {MAX_CONNECTIONS} connections, the most it takes; "
                        f"stop masters you no longer use"))
            raise ProtocolError(f"over {MAX_CONNECTIONS} connections")
        await conn.send(self.info(conn.token))
        return opener

    def _close_idle(self) -> bool:
        """The worker is full: close the connection that has sent nothing for longest, if that is over
        idle_timeout and nothing of it is in progress, to make room (its sessions are freed; its master
        reconnects and replays if it comes back). False if none is."""
        now = time.monotonic()
        idle = [c for c in self.conns.values() if now - c.last_read > self.idle_timeout and not c.queued]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.last_read)
        log.warning("closed a connection silent for %.0fs to make room: this worker serves %d, the most it takes",
                    now - oldest.last_read, MAX_CONNECTIONS)
        self.conns.pop(oldest.token, None)
        oldest.writer.close()
        return True

    def _auth_failed(self, peer: str, why: str) -> None:
        """A warning naming the client that failed to prove the key: at most one a second, each saying how
        many came since the one before."""
        now = time.monotonic()
        if now - self._auth_logged < AUTH_LOG_EVERY:
            self._auth_unlogged += 1
            return
        more = f" ({self._auth_unlogged} more since the last such line)" if self._auth_unlogged else ""
        log.warning("failed authentication from %s: %s%s", peer, why, more)
        self._auth_logged, self._auth_unlogged = now, 0

    def take_model(self, config: LlamaConfig, stack: LayerStack, placement: Placement) -> None:
        """A worker without --model, once the master's config came (cake.weight_cache): its stack, still
        empty, and how it loads the layers it is given."""
        self.config, self.stack, self.placement = config, stack, placement
        self.max_frame, self.max_rows = frame_limits(stack, config, self._frame_asked)
        if not self._frame_asked:  # a chunk of its weights fits, whatever the model's shape
            self.max_frame = max(self.max_frame, SHIP_FRAME)

    def info(self, token: str = "") -> wire.Info:
        if self.config is None:  # no model yet: the master sends its config first
            return self.fetch.bare_info(self, token)
        return wire.Info(
            name=self.name, layers=self.stack.indices, device=str(self.stack.device),
            dtype=dtype_name(self.stack.dtype), hidden_size=self.config.hidden_size,
            num_layers=self.config.num_hidden_layers, capacity=self.stack.capacity,
            memory=free_memory(self.stack.device), conn=token, max_rows=self.max_rows, max_batch=MAX_BATCH,
            topology=self.topology.digest, machine=machine_id(), unit=compute_unit(self.stack.device),
            quantization=str(self.stack.quantization or "none"), weight_bytes=self.stack.weight_bytes,
            arch=self.config.arch, **(self.placement.said(self.stack) if self.placement else {}),
        )

    # ---- requests ----------------------------------------------------------------------------------

    async def _serve(self, conn: Conn, msg: wire.Message, tensor: torch.Tensor | None, peer: str) -> None:
        """Answer one request: on its own connection, or, for a relayed forward, on the connection its
        token names (the master's), whose sessions it uses."""
        dest = conn
        if isinstance(msg, wire.Forward) and msg.reply_conn:
            dest = self.conns.get(msg.reply_conn)
            if dest is None:  # that master disconnected; it replays on its new connection
                log.warning("relayed forward from %s names a connection that is gone; dropped", peer)
                return
        # A forward with an id (every master's) that cannot run now goes on a task; one without keeps its
        # place in the order of answers, as everything else, by being served here.
        if isinstance(msg, wire.Forward) and msg.id > 0 and not self._runs_now(dest, msg, tensor):
            await self._queue(conn, dest, msg, tensor, peer)
            return
        await self._serve_on(conn, dest, msg, tensor, peer)

    async def _serve_on(self, conn: Conn, dest: Conn, msg: wire.Message, tensor: torch.Tensor | None,
                        peer: str) -> None:
        """Serve `msg` for `dest` and answer it: here if it came on `dest`, else on `dest` from a task."""
        reply, out = await self._dispatch(dest, msg, tensor, peer)
        if reply is None:  # relayed on: the last worker of the chain answers
            return
        if dest is conn:
            await conn.send(reply, out)
            return
        self._answer_later(dest, reply, out)

    def _runs_now(self, dest: Conn, msg: wire.Forward, x: torch.Tensor | None) -> bool:
        """A decode step of sessions `dest` already holds, none of them computing or waiting to: it needs
        no new cache, so no lock, and it runs at once (between two steps of a prompt, if one is running)
        without overtaking an earlier forward of its sessions. Anything else (malformed ones too: they
        get their error in turn) waits for the compute lock."""
        return (x is not None and x.dim() == 3 and x.shape[1] == 1
                and all((k := (dest.id, s)) in self.sessions and k not in self._in_use and k not in self._waiting
                        for s in msg.sessions))

    async def _queue(self, conn: Conn, dest: Conn, msg: wire.Forward, tensor: torch.Tensor | None,
                     peer: str) -> None:
        """Serve a forward on a task of its own. Its sessions count as waiting from now (an `end` for them
        must find them, see _end). This connection waits first while it has MAX_QUEUED_FORWARDS on tasks
        (one answered here holds its place until the answer is written, so a master that does not read
        stops being read), or, for a master's own forward, while the hidden states of forwards not yet
        computed would pass queue_budget. A relayed forward (answered elsewhere, or passed on) frees its
        place once computed: two workers relaying to each other must never wait for each other to read
        (RELAY_BACKLOG and MAX_PENDING_ANSWERS bound what it holds after)."""
        keys = {(dest.id, s) for s in msg.sessions}
        size = tensor.nbytes if tensor is not None and dest is conn else 0
        early = dest is not conn or bool(msg.relay_workers)
        self._waiting.update(keys)
        try:
            while len(conn.queued) >= MAX_QUEUED_FORWARDS or (
                    size and self._queued_bytes and self._queued_bytes + size > self.queue_budget):
                if self._freed.is_set():
                    self._freed = asyncio.Event()
                await self._freed.wait()
        except BaseException:  # this connection closed meanwhile
            self._unwait(keys)
            raise
        task = asyncio.ensure_future(self._serve_queued(conn, dest, msg, tensor, peer))
        conn.queued.add(task)
        self._queued[task] = dest
        self._queued_bytes += size

        def computed(t: asyncio.Task) -> None:  # once only; also for a task cancelled before it started
            if self._queued.pop(t, None) is not None:
                self._queued_bytes -= size
                self._unwait(keys)
                if early:
                    conn.queued.discard(t)
                self._freed.set()

        def done(t: asyncio.Task) -> None:
            self._computed.pop(t, computed)(t)
            if t in conn.queued:
                conn.queued.discard(t)
                self._freed.set()

        self._computed[task] = computed
        task.add_done_callback(done)

    def _unwait(self, keys: set[tuple[int, str]]) -> None:
        """A queued forward has computed, or never will: a session of it ended meanwhile (and not waited on
        by another forward) is freed now."""
        self._waiting.subtract(keys)
        for k in keys:
            if self._waiting[k] <= 0:
                del self._waiting[k]
                if k in self._ended_waiting:
                    self._ended_waiting.discard(k)
                    self._end_session(k)

    async def _serve_queued(self, conn: Conn, dest: Conn, msg: wire.Message, tensor: torch.Tensor | None,
                            peer: str) -> None:
        """_serve_on for a forward on a task of its own."""
        try:
            await self._serve_on(conn, dest, msg, tensor, peer)
        except (ConnectionError, OSError) as e:  # the connection broke; its own task cleans up
            log.debug("could not answer %s: %s", peer, e)
        except Exception:
            log.exception("internal error serving %s", peer)

    def _answer_later(self, dest: Conn, reply: wire.Message, out: torch.Tensor | None) -> None:
        """An answer for a master's connection from another connection's task (a relaying worker's): sent
        on its own task, so a slow master does not hold up the relays to this worker for everyone else
        (its lock keeps the order). A connection that lets answers pile up unread is closed: its master
        is gone or hostile, and each answer holds its hidden states."""
        if dest.closed:  # its master has gone: nobody to answer
            return
        if dest.pending >= MAX_PENDING_ANSWERS:
            log.warning("closed a connection that left %d relayed answers unread", dest.pending)
            dest.writer.close()
            return
        dest.pending += 1
        task = asyncio.ensure_future(self._answer(dest, reply, out))
        self._answers.add(task)
        task.add_done_callback(self._answers.discard)

    async def _answer(self, dest: Conn, reply: wire.Message, out: torch.Tensor | None) -> None:
        try:
            await dest.send(reply, out)
        except (ConnectionError, OSError) as e:  # that master's connection broke; its own task cleans up
            log.warning("could not answer a relayed forward: %s", e)
        finally:
            dest.pending -= 1

    async def _dispatch(self, dest: Conn, msg: wire.Message, tensor: torch.Tensor | None, peer: str):
        """Serve `msg` for the connection `dest` (whose sessions it uses and which gets the answer)."""
        try:
            if isinstance(msg, (wire.ModelConfig, wire.Manifest, wire.Chunk)):
                if self.fetch is None:
                    raise RequestError("bad_request", f"worker '{self.name}' loads its layers from its --model "
                                                      f"folder: it takes no weights from a master")
                return await self.fetch.serve(self, dest, msg, tensor), None
            if self.stack is None and isinstance(msg, (wire.Forward, wire.Assign)):
                raise RequestError("bad_layers", f"worker '{self.name}' has no model yet: its master sends it first")
            if isinstance(msg, wire.Forward):
                return await self._forward(dest, msg, tensor)
            if isinstance(msg, wire.End):
                ended = sum(self._end(dest.id, s) for s in msg.sessions)
                log.debug("%s ended %d session(s); %d held", peer, ended, len(self.sessions))
                return wire.Ok(), None
            if isinstance(msg, wire.Ping):
                return wire.Ok(), None
            if isinstance(msg, wire.Assign):
                return await self._assign(dest, msg, peer), None
            raise RequestError("bad_request", f"'{msg.TYPE}' is not a request a worker serves")
        except RequestError as e:
            log.warning("request from %s refused: %s", peer, e)
            return wire.Error(e.code, str(e), e.cached, e.peer, getattr(msg, "id", 0)), None
        except Exception as e:  # a bug or an out-of-memory: answer it (the master must not wait), keep serving
            log.exception("request from %s failed", peer)
            first = (str(e).strip().splitlines() or [""])[0][:200]
            return wire.Error("internal", f"worker '{self.name}' failed ({type(e).__name__}: {first}); see its log",
                              id=getattr(msg, "id", 0)), None

    async def _assign(self, dest: Conn, msg: wire.Assign, peer: str) -> wire.Info:
        """Take the layers a master's plan gives this worker (loaded from its model folder, off the event
        loop), and the plan's topology for relays. One assignment at a time: another master's open
        sessions refuse it."""
        if self.placement is None:
            raise RequestError("bad_request", f"worker '{self.name}' serves the layers its topology file lists; "
                                              f"leave out its 'layers' there to let the master place it")
        if not (len(msg.names) == len(msg.starts) == len(msg.ends)) or self.name not in msg.names:
            raise RequestError("bad_request", f"the plan does not name worker '{self.name}'")
        i = msg.names.index(self.name)
        layers = list(range(max(0, msg.starts[i]), min(self.config.num_hidden_layers, msg.ends[i])))
        others = {conn for conn, _ in self.sessions if conn != dest.id}
        if others and layers != self.stack.indices:
            raise RequestError("busy", f"worker '{self.name}' holds sessions of another master; stop that master or "
                                       f"let its answers end, then start this one")
        plan = {n: list(range(a, b)) for n, a, b in zip(msg.names, msg.starts, msg.ends) if n in self.topology.workers}
        if layers != self.stack.indices:
            log.info("%s assigns layers %s; loading them", peer, format_layers(layers))
            for key in list(self.sessions):
                self._end_session(key)
            self.stack = await asyncio.to_thread(self.placement.load, layers)
        self.topology = self.topology.with_layers(plan)
        return self.info(dest.token)

    async def _forward(self, dest: Conn, msg: wire.Forward, x: torch.Tensor | None):
        c, conn = self.config, dest.id
        if x is None:
            raise RequestError("bad_request", "forward carries no hidden-state tensor")
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise RequestError("bad_tensor", f"hidden states must be f32/f16/bf16, not {x.dtype}")
        if x.dim() != 3 or x.shape[2] != c.hidden_size:
            raise RequestError("bad_tensor", f"hidden states must be [batch, tokens, {c.hidden_size}], got {list(x.shape)}")
        B, T, _ = x.shape
        if B == 0 or T == 0 or B > MAX_BATCH:
            raise RequestError("bad_tensor", f"batch {B} x tokens {T} is empty or over {MAX_BATCH} rows")
        if len(msg.sessions) != B or len(msg.positions) != B or len(set(msg.sessions)) != B:
            raise RequestError("bad_request", f"need {B} distinct sessions and {B} positions for a batch of {B}")
        if not (0 <= msg.start < msg.end) or any(i not in self.stack.layers for i in range(msg.start, msg.end)):
            raise RequestError("bad_layers", f"worker '{self.name}' serves layers {format_layers(self.stack.indices)}, "
                                             f"not {msg.start}-{msg.end - 1}; check the topology file")
        try:
            hops = msg.relay_hops()
        except ProtocolError as e:
            raise RequestError("bad_request", str(e)) from None
        names = [h[0] for h in hops]
        if len(set(names)) != len(names) or self.name in names or len(names) > len(self.topology.workers):
            raise RequestError("bad_request", "a relay must go on to distinct other workers")
        if hops and msg.id <= 0:  # the answer comes back by id, from another worker
            raise RequestError("bad_request", "a relayed forward needs a positive id")
        if hops and hops[0][0] not in self.topology.workers:
            raise RequestError("relay", f"has no worker '{hops[0][0]}' in its topology file (give every node "
                                        f"the same topology)", peer=hops[0][0])
        for s, p in zip(msg.sessions, msg.positions):
            if p < 0 or p + T > self.stack.capacity:
                raise RequestError("capacity", f"positions {p}..{p + T - 1} of session {s} exceed this worker's "
                                               f"context of {self.stack.capacity}; start it with a larger --context")
        if not bool(torch.isfinite(x).all()):  # on the wire's CPU copy: microseconds for a decode step
            raise RequestError("bad_tensor", "hidden states to this worker contain NaN or inf; the node before "
                                             "it overflowed (run it in bf16 or f32) or is faulty")
        eventloop.note_rows(B)  # busy-polling pays for one stream, not for batches
        # One computation in steps at a time (a prompt; the loop serves others in between). Caches are
        # made and evicted only under the lock, so none changes hands while a prompt uses it. A decode
        # step of cached sessions (_runs_now) needs none: it runs whole, between two steps of a prompt.
        now = self._runs_now(dest, msg, x)
        batch = {(conn, s) for s in msg.sessions}  # never evicted to make room for each other
        async with contextlib.nullcontext() if now else self._locked(batch):
            if dest.closed:  # its master left while this waited (a relayed forward): no caches for the dead
                raise _gone()
            rows = [Row(self._cache(conn, s, p, msg.start, msg.end, batch), p)
                    for s, p in zip(msg.sessions, msg.positions)]
            t0, aside = time.perf_counter(), self._aside_s
            if self.stack.device.type == "cpu" and not now:
                # A prompt runs in steps, serving pings, handshakes, relay connections and other sessions'
                # decode steps in between, and stops if the master it is for goes or ends its sessions.
                # (A GPU only queues kernels in a step: no point.)
                out = await self._in_steps(x, rows, msg, batch, dest)
            else:
                out = self.stack.forward(x, rows, msg.start, msg.end).cpu()  # also the sync, so compute_us is real
            spent = time.perf_counter() - t0
            us = int((spent - (self._aside_s - aside)) * 1e6)  # less the decode steps run in between
            if now:
                self._aside_s += spent
        task = asyncio.current_task()
        if task in self._computed:  # a queued forward: its slot goes before it relays or answers
            self._computed.pop(task)(task)
        if not bool(torch.isfinite(out).all()):
            fix = ("run it with --dtype bf16 or f32" if self.stack.dtype == torch.float16
                   else "check its model files: a weight may be corrupt")
            raise RequestError("non_finite", f"worker '{self.name}' layers {msg.start}-{msg.end - 1} produced NaN or "
                                             f"inf in {dtype_name(self.stack.dtype)}; {fix}")
        if hops:
            await self._relay(msg, hops, out, us, dest.token)
            return None, None
        return wire.Result(msg.id, us, msg.upstream_us), out

    @contextlib.asynccontextmanager
    async def _locked(self, keys: set[tuple[int, str]]):
        """Hold the compute lock. Sessions whose master sent `end` while this forward waited (see _end)
        are freed when it is done; a forward all of whose sessions were ended is refused instead of
        computed: nobody wants its answer."""
        async with self._computing:
            ended = keys & self._ended_waiting  # the marks stay for any later forward of these (_unwait)
            try:
                if ended == keys:
                    raise RequestError("gone", "the sessions of this forward were ended while it waited")
                yield
            finally:
                for k in ended:
                    self._end_session(k)

    async def _in_steps(self, x: torch.Tensor, rows: list[Row], msg: wire.Forward, keys: set[tuple[int, str]],
                        dest: Conn) -> torch.Tensor:
        use = InUse()
        for k in keys:
            self._in_use[k] = use
        try:
            return await eventloop.run_steps(self.stack.forward_steps(x, rows, msg.start, msg.end),
                                             lambda: dest.closed or use.ended == keys)
        except eventloop.Abandoned:
            if dest.closed:
                raise _gone() from None
            raise RequestError("gone", "the sessions of this forward were ended while it computed") from None
        finally:
            for k in keys:
                del self._in_use[k]
            for k in use.ended:
                self._end_session(k)

    async def _relay(self, msg: wire.Forward, hops: list[tuple[str, int, int, str]], out: torch.Tensor,
                     us: int, master: str) -> None:
        """Send our output on to the next worker of the chain, which answers the master directly."""
        (name, start, end, token), rest = hops[0], hops[1:]
        fwd = wire.Forward(msg.id, start, end, msg.sessions, msg.positions, [h[0] for h in rest],
                           [h[1] for h in rest], [h[2] for h in rest], [h[3] for h in rest], reply_conn=token,
                           upstream_us=[*msg.upstream_us, us])
        link = self.peers.get(name)
        if link is None:
            link = self.peers[name] = WorkerLink(self.topology.workers[name], Options(key=self.key, connect_timeout=5.0))
            link.on_drop = lambda: self._relay_lost(name)
        if self._relaying[name] >= RELAY_BACKLOG:  # it is not reading them: the master carries these instead
            raise RequestError("relay", f"has {RELAY_BACKLOG} forwards waiting to be passed on to {link.label}, "
                                        f"which is not taking them", peer=name)
        self._relaying[name] += 1
        try:
            # The link's reader notices when the next worker goes away (a restart), so this reconnects
            # rather than writing into a dead socket.
            await link.connect_once()
            await link.send(fwd, out)
        except (ConnectionError, OSError, CakeError) as e:
            link.close()
            raise RequestError("relay", f"cannot pass hidden states on to {link.label} ({e})", peer=name) from None
        finally:
            self._relaying[name] -= 1
        self._relayed.setdefault(name, deque(maxlen=RELAYS_REMEMBERED)).append((msg.id, master))

    def _relay_lost(self, name: str) -> None:
        """The connection to worker `name` broke: the forwards relayed on it may never be answered (it
        refused one, or restarted and lost their sessions). Tell each one's master, which replays them,
        rather than leave it waiting for --request-timeout. One already answered is ignored there."""
        for rid, token in self._relayed.pop(name, ()):
            dest = self.conns.get(token)
            if dest is not None:
                self._answer_later(dest, wire.Error("relay_lost", f"worker '{self.name}' lost its connection to "
                                                    f"'{name}' after relaying a forward to it", peer=name, id=rid), None)

    def _cache(self, conn: int, session: str, pos: int, start: int, end: int,
               batch: set[tuple[int, str]] = frozenset()) -> KVCache:
        key = (conn, session)
        entry = self.sessions.get(key)
        if entry is None:
            if pos != 0:
                raise RequestError("cache_behind", f"session {session} is not cached here (worker restarted or "
                                                   f"evicted it); replay from position 0", cached=0)
            if not self.stack.spares:  # else new_cache reuses an ended session's, already counted
                self._make_room(self.stack.new_cache_bytes(), batch)
            entry = SessionEntry(self.stack.new_cache(), conn, 0.0)
            self.sessions[key] = entry
        cached = min(entry.cache.lengths[entry.cache.slot[i]] for i in range(start, end))
        if pos > cached:
            raise RequestError("cache_behind", f"session {session} has {cached} cached positions, request starts "
                                               f"at {pos}; replay from {cached}", cached=cached)
        entry.last_used = time.monotonic()
        self.sessions.move_to_end(key)
        return entry.cache

    def _make_room(self, need: int, batch: set[tuple[int, str]] = frozenset()) -> None:
        """Evict sessions until a new cache fits the budget (the caches kept for reuse count: they hold
        memory). Idle sessions go first: the least recently used of the connection that holds the most
        caches, so one master (or a hostile client) opening many sessions evicts its own before another
        master's. Sessions of the request being served (`batch`) go last, and their caches are never kept
        for reuse: their rows still use them in this step (the master replays such a session on its next
        step)."""
        if need > self.kv_budget:
            raise RequestError("memory", f"one session needs {need / (1 << 20):.2f} MiB of KV cache, over this "
                                         f"worker's budget of {self.kv_budget / (1 << 20):.2f} MiB; raise "
                                         f"--kv-budget or lower --context")
        used = sum(e.cache.nbytes for e in self.sessions.values()) + sum(c.nbytes for c in self.stack.spares)
        while used + need > self.kv_budget and self.sessions:
            idle = [k for k in self.sessions if k not in batch]  # least recently used first
            if idle:
                held = Counter(conn for conn, _ in self.sessions)
                key = min(idle, key=lambda k: -held[k[0]])  # the first (LRU) of the heaviest connection's
            else:
                key = next(iter(self.sessions))
            used -= self.sessions[key].cache.nbytes
            if key in batch:
                self.stack.discard(self.sessions.pop(key).cache)
                log.info("evicted session %s (of the batch being served) to stay under the KV budget", key[1])
            else:
                self._end_session(key)  # its cache is kept as a spare (new_cache takes it) or freed
                log.info("evicted idle session %s to stay under the KV budget", key[1])

    def _free_connection(self, conn: int) -> int:
        return sum(self._end_session(k) for k in [k for k in self.sessions if k[0] == conn])

    def _end(self, conn: int, session: str) -> bool:
        """The master ends a session. One with a forward still queued is ended after that forward (which
        is refused if all its sessions were ended): the master may end a session of a batch in flight,
        and the batch's other sessions must still get their answer. (An eviction, by contrast, frees the
        cache at once, and the queued forward finds none: its master replays.)"""
        key = (conn, session)
        if key not in self._waiting:
            return self._end_session(key)
        self._ended_waiting.add(key)
        held = key in self.sessions
        if key in self._in_use:  # computing now: it stops once all its sessions are ended (_end_session)
            self._end_session(key)
        return held

    def _end_session(self, key: tuple[int, str]) -> bool:
        """Forget a session; its cache goes back to the stack (kept for another session, or freed). One
        that a prompt computes with is freed when that stops, at its next step."""
        use = self._in_use.get(key)
        if use is not None:
            use.ended.add(key)
            return key in self.sessions
        entry = self.sessions.pop(key, None)
        if entry is not None:
            self.stack.release(entry.cache)
        return entry is not None


def _gone() -> RequestError:
    return RequestError("gone", "the connection this forward was for has closed")


def frame_limits(stack: LayerStack | None, config: LlamaConfig | None, asked: int | None) -> tuple[int, int]:
    """The largest frame a worker reads, and the rows of hidden states a forward may carry under it (in
    f32, the widest wire dtype: masters split larger work). A frame never needs more than a full context
    (or a full batch) of f32 hidden states; with no model yet, a chunk of the weights shipped to it."""
    if config is None:
        return asked or SHIP_FRAME, 0
    frame = asked or (max(stack.capacity, MAX_BATCH) * config.hidden_size * 4 + wire.FORWARD_OVERHEAD)
    return frame, max(1, (frame - wire.FORWARD_OVERHEAD) // (config.hidden_size * 4))


@dataclass
class Placement:
    """A worker whose topology entry lists no layers: it measured one layer and offers its room, then
    loads what the master's plan assigns it."""

    load: Callable[[list[int]], LayerStack]
    layer_us: int
    room: int
    layer_bytes: int
    fetches: bool = False  # no model folder: its layers come from the master (cake.weight_cache)

    def said(self, stack: LayerStack) -> dict:
        return {"placed": bool(stack.layers), "layer_us": self.layer_us, "room": self.room,
                "layer_bytes": self.layer_bytes, "fetches": self.fetches}


@dataclass
class WorkerArgs:
    model_dir: str | None  # None: the master ships the config and the layers, into cache_dir
    name: str
    topology: str
    address: str | None = None  # None: this worker's port in the topology (see run_worker)
    device: str = "auto"
    dtype: str = "auto"
    context: int | None = None
    key: str | None = None
    kv_budget_mb: float = 2048
    max_frame_mb: float = 0  # 0: derived from the model and context
    busy_poll: str | None = None  # µs or 'auto'; None: $CAKE_BUSY_POLL_US, else auto
    quantize: str | None = None  # none, int8, int4; None: as the folder holds (cake.model.loader.choose_quantization)
    group_size: int = 32
    max_memory: int | None = None  # bytes its decoder layers may take (--max-memory)
    cache_dir: str | None = None  # without model_dir: where the shipped layers go (None: the user's cache folder)


def bind(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to host:port (one per address the host stands for, as asyncio.start_server makes),
    not yet listening: a port in use fails here, before the weights load, not minutes later, and
    nothing connects before the worker can answer. OSError when it cannot bind."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):  # the same address can come twice
            s = socket.socket(family, kind, proto)
            sockets.append(s)
            if os.name == "posix":  # a restarted worker rebinds while its old connections linger in TIME_WAIT
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # the IPv4 address has its own
            s.bind(address)
    except OSError:
        for s in sockets:
            s.close()
        raise
    return sockets


def run_worker(args: WorkerArgs) -> None:
    topo = load_topology(args.topology)
    me = topo.worker(args.name)
    config = load_config(args.model_dir) if args.model_dir else None  # without: the master sends it
    if config is not None:
        topo.check_layers(config.num_hidden_layers)
    # By default: this worker's port from the topology, on every interface, unless the topology puts it on
    # loopback (then nothing else could reach it anyway, and nothing else should).
    address = args.address or f"{me.host if auth.is_loopback(me.host) else '0.0.0.0'}:{me.port}"
    parsed = split_address(address)
    if parsed is None:
        raise CakeError(f"--address '{address}' needs host:port with a port between 1 and 65535, "
                        f"e.g. 0.0.0.0:{me.port}")
    host, port = parsed
    if port != me.port:
        log.warning("listening on port %d, but the topology gives worker '%s' %s: the master and other workers "
                    "will look for it there", port, me.name, me.address)
    eventloop.busy_poll_us("cpu", args.busy_poll)  # a bad value fails before the weights load
    max_frame = int(args.max_frame_mb * (1 << 20))
    least = wire.FORWARD_OVERHEAD + (config.hidden_size * 4 if config else 1 << 20)  # a row of f32, or a 1 MiB block
    if args.max_frame_mb != 0 and max_frame < least:
        raise CakeError(f"--max-frame-mb {args.max_frame_mb:g} cannot hold one token's hidden states; give at "
                        f"least {least / (1 << 20):.3f}, or 0 for a full context")
    try:
        sockets = bind(host, port)
    except OSError as e:
        raise _cannot_listen(address, e) from None
    def load(layers: list[int]) -> LayerStack:
        return load_layers(args.model_dir, layers, args.device, args.dtype, args.context, config,
                           quantize=args.quantize, group=args.group_size, max_memory=args.max_memory)[0]
    stack = load(list(me.layers)) if config else None
    placement = fetch = None
    if config is None:
        from cake.weight_cache import open_cache

        fetch = open_cache(args, me)
    elif not me.placed:
        from cake import placement as plan

        fmt = stack.quantization
        placement = Placement(load, plan.measure_layer_us(config, fmt, stack.dtype, stack.device),
                              plan.room(stack.device, args.max_memory),
                              plan.layer_bytes(config, fmt, stack.dtype, stack.capacity))
        log.info("waiting for the master's plan: one layer takes %.3f ms here, room for %d layer(s)",
                 placement.layer_us / 1e3, placement.room // max(1, placement.layer_bytes))
    if not auth.is_loopback(host) and not args.key:
        log.warning("listening on %s without --cluster-key: anyone who can reach this port can use this "
                    "worker; set --cluster-key (or %s) on every node", host, auth.ENV_KEY)
    worker = Worker(args.name, stack, config, key=args.key, kv_budget=int(args.kv_budget_mb * (1 << 20)),
                    max_frame=max_frame, topology=topo, placement=placement, fetch=fetch)
    poll_us = eventloop.busy_poll_us((stack.device if stack else pick_device(args.device)).type, args.busy_poll)
    if poll_us:
        log.info("busy-polling for %d µs after each message (--busy-poll 0 turns it off)", poll_us)
    try:
        eventloop.run(worker.serve(sockets=sockets), poll_us)
    except OSError as e:  # listening failed after all (another worker bound the port while this one loaded)
        raise _cannot_listen(address, e) from None


def _cannot_listen(address: str, e: OSError) -> CakeError:
    return CakeError(f"cannot listen on {address}: {e.strerror or e}; pick another --address port")
