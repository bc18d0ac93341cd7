"""Bad input never hurts a worker: garbage, fuzzed and malformed frames against a real worker process,
then an exact generation through it."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cake import auth, wire
from conftest import Cluster, handshake, reference_greedy, reference_model, run
from test_pipeline import cake_generate

H = 64


@pytest.fixture(scope="module")
def target(tiny_model, tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("fuzz"), tiny_model, {"w": ["model.layers.2-4"]})
    yield c
    c.stop()


async def connect(port: int, hello: bool = True, layers=(2, 3, 4)):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if hello:
        await wire.write_message(writer, wire.Hello(wire.PROTOCOL, wire.VERSION, auth.nonce()))
        welcome, _ = await wire.read_message(reader, 1 << 20)
        assert isinstance(welcome, wire.Welcome) and not welcome.auth
        info, _ = await wire.read_message(reader, 1 << 20)
        assert isinstance(info, wire.Info) and info.layers == list(layers)
    return reader, writer


async def reply_to(port: int, data: bytes, hello: bool = True, timeout: float = 5.0, layers=(2, 3, 4)):
    """Send raw bytes; return the reply message, or None when the worker closed the connection."""
    reader, writer = await connect(port, hello, layers)
    writer.write(data)
    await writer.drain()
    try:
        msg, _ = await asyncio.wait_for(wire.read_message(reader, 1 << 26), timeout)
        return msg
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    finally:
        writer.close()


async def replies_until_closed(port: int, data: bytes, hello: bool = True, timeout: float = 5.0) -> list:
    """Send raw bytes; every message the worker sends until it closes the connection (a timeout fails)."""
    reader, writer = await connect(port, hello)
    writer.write(data)
    await writer.drain()
    got = []
    try:
        while True:
            msg, _ = await asyncio.wait_for(wire.read_message(reader, 1 << 26), timeout)
            got.append(msg)
    except (asyncio.IncompleteReadError, ConnectionError):
        return got
    finally:
        writer.close()


def frame(header: dict, payload: bytes = b"") -> bytes:
    head = msgpack.packb(header, use_bin_type=True)
    return struct.pack(">II", 4 + len(head) + len(payload), len(head)) + head + payload


def forward(positions=(0,), sessions=("s",), start=2, end=5, shape=(1, 3, H), dtype="f32", data=None, **extra) -> bytes:
    n = 1
    for d in shape:
        n *= d
    payload = data if data is not None else bytes(4 * n if dtype == "f32" else 2 * n)
    return frame({"type": "forward", "id": 1, "start": start, "end": end, "sessions": list(sessions),
                  "positions": list(positions), "tensor": {"dtype": dtype, "shape": list(shape)}, **extra}, payload)


def assert_serving(port: int, layers=(2, 3, 4)) -> None:
    msg = run(reply_to(port, frame({"type": "ping"}), layers=layers))
    assert isinstance(msg, wire.Ok)


@pytest.fixture(scope="module")
def layers_2_to_4(tiny_model):
    """What layers 2-4 of tiny_model make of a 3-token prompt's hidden states, from transformers (its
    hidden states before layer 2 and after layer 4): the input of a real forward and its answer."""
    ids = torch.tensor([[9906, 1917, 13]])
    with torch.no_grad():
        states = reference_model(tiny_model)(ids, output_hidden_states=True).hidden_states
    return states[2], states[5]


async def exact_forward(port: int, x: torch.Tensor, session: str) -> torch.Tensor:
    """A real forward of layers 2-4 on a connection of its own (closed after: its session goes)."""
    reader, writer = await connect(port)
    try:
        await wire.write_message(writer, wire.Forward(1, 2, 5, [session], [0]), x)
        reply, out = await asyncio.wait_for(wire.read_message(reader, 1 << 26), 30)
        assert isinstance(reply, wire.Result), reply
        return out
    finally:
        writer.close()


def assert_exact(got: torch.Tensor, want: torch.Tensor) -> None:
    assert torch.allclose(got, want, rtol=0, atol=1e-4 * max(1.0, float(want.abs().max()))), \
        float((got - want).abs().max())


async def until(predicate, what: str, timeout: float = 60.0) -> None:
    """Poll `predicate` between the event loop's turns until it holds; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout:g}s waiting for {what}"
        await asyncio.sleep(0.001)


LONG = 64  # tokens of a prompt a test holds computing (HeldPrompts): its length no longer makes it last


class HeldPrompts:
    """The test's hand on an in-process worker's computation (no sleep guesses how long a prompt takes):
    a prompt of `tokens` tokens computes its first step, then holds there, yielding between idle steps as
    it does between real ones (the worker serves others meanwhile and may stop it), until release(); then
    it computes the rest. `started()` waits until one holds; `stopped` says the worker stopped one while
    it held. After `limit` seconds a hold lets go by itself, so a worker that serves nothing between steps
    fails the test's assertions rather than hanging it."""

    def __init__(self, worker, tokens: int, limit: float = 60.0):
        self.tokens, self.limit = tokens, limit
        self.holding, self.go, self.stopped = False, False, False
        self._steps = worker.stack.forward_steps
        worker.stack.forward_steps = self._held

    def _held(self, hidden, rows, start, end, *args, **kwargs):
        steps = self._steps(hidden, rows, start, end, *args, **kwargs)
        if hidden.shape[1] != self.tokens:
            return (yield from steps)
        try:
            out = next(steps)
            self.holding = True
            deadline = time.monotonic() + self.limit
            while not self.go and time.monotonic() < deadline:
                yield None
                time.sleep(0.0005)
            self.holding = False
            while out is None:
                yield None
                out = next(steps)
            yield out
        except GeneratorExit:
            self.stopped = True
            raise
        finally:
            steps.close()

    async def started(self) -> None:
        await until(lambda: self.holding, f"a {self.tokens}-token prompt to compute")

    def release(self) -> None:
        self.go = True


CLOSES = {
    "garbage": b"\x00\xffgarbage" * 50,
    "http": b"GET /v1/models HTTP/1.1\r\nHost: worker\r\n\r\n",
    "2GiB-length": struct.pack(">I", 2**31) + b"\0" * 64,
    "max-length": struct.pack(">I", 2**32 - 1) + b"\0" * 64,
    "header-longer-than-frame": struct.pack(">II", 16, 1000) + b"\0" * 12,
    "header-not-msgpack": struct.pack(">II", 12, 8) + b"\xc1" * 8,
}


@pytest.mark.parametrize("name", list(CLOSES))
@pytest.mark.parametrize("after_hello", [False, True])
def test_broken_streams_close_only_that_connection(target, name, after_hello):
    """A broken byte stream closes its connection; after the handshake the worker first says why."""
    port = target.ports["w"]
    got = run(replies_until_closed(port, CLOSES[name], hello=after_hello))
    if after_hello:
        assert [(type(m), m.code) for m in got] == [(wire.Error, "bad_frame")], got
        assert got[0].message.startswith("worker 'w' closed the connection: ")
        if name.endswith("length"):
            assert "--max-frame-mb" in got[0].message
    else:
        assert got == []
    assert_serving(port)


def test_truncated_frames_and_silent_clients_block_nobody(target):
    port = target.ports["w"]

    async def go():
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]  # no hello at all
        reader, writer = await connect(port)
        writer.write(forward()[:40])  # a frame cut short, then the client goes quiet
        await writer.drain()
        msg = await reply_to(port, frame({"type": "ping"}))  # others are served meanwhile
        for _, w in silent + [(reader, writer)]:
            w.close()
        return msg

    assert isinstance(run(go()), wire.Ok)


ERRORS = {
    "unknown-type": (frame({"type": "launch_missiles"}), "bad_request"),
    "missing-field": (frame({"type": "forward", "id": 1}), "bad_request"),
    "wrong-field-type": (frame({"type": "end", "sessions": [1, 2]}), "bad_request"),
    "wrong-dtype": (forward(dtype="i64", data=bytes(8 * 3 * H)), "bad_tensor"),
    "unknown-dtype": (frame({"type": "forward", "id": 1, "start": 2, "end": 5, "sessions": ["s"], "positions": [0],
                             "tensor": {"dtype": "complex128", "shape": [1, 1, H]}}, bytes(16 * H)), "bad_request"),
    "wrong-hidden": (forward(shape=(1, 3, H + 1)), "bad_tensor"),
    "wrong-rank": (forward(shape=(3, H)), "bad_tensor"),
    "huge-shape-tiny-data": (forward(shape=(1, 2**30, H), data=b"\0" * 256), "bad_request"),
    "short-data": (forward(data=b"\0" * 100), "bad_request"),
    "unknown-session": (forward(positions=(5,)), "cache_behind"),
    "layers-not-served": (forward(start=0, end=3), "bad_layers"),
    "empty-layer-range": (forward(start=3, end=3), "bad_layers"),
    "position-beyond-context": (forward(positions=(10**9,)), "capacity"),
    "negative-position": (forward(positions=(-1,)), "capacity"),
    "batch-session-mismatch": (forward(sessions=("a", "b")), "bad_request"),
    "duplicate-sessions": (forward(sessions=("a", "a"), positions=(0, 0), shape=(2, 1, H)), "bad_request"),
    "no-tensor": (frame({"type": "forward", "id": 1, "start": 2, "end": 5, "sessions": ["s"], "positions": [0]}),
                  "bad_request"),
    "hello-again": (frame({"type": "hello", "proto": "cake", "version": 1, "nonce": b"x"}), "bad_request"),
    "relay-lists-of-different-lengths": (forward(relay_workers=["x"], relay_starts=[5]), "bad_request"),
    "relay-without-an-id": (frame({"type": "forward", "id": 0, "start": 2, "end": 5, "sessions": ["s"],
                                   "positions": [0], "relay_workers": ["x"], "relay_starts": [5], "relay_ends": [6],
                                   "relay_conns": ["t"], "tensor": {"dtype": "f32", "shape": [1, 3, H]}},
                                  bytes(4 * 3 * H)), "bad_request"),
    "relay-to-a-worker-not-in-the-topology": (forward(relay_workers=["nobody"], relay_starts=[5], relay_ends=[6],
                                                      relay_conns=["t"]), "relay"),
    "nan-hidden-states": (forward(data=struct.pack("<f", float("nan")) * (3 * H)), "bad_tensor"),
    "inf-hidden-states": (forward(shape=(1, 1, H), dtype="f16", data=b"\x00\x7c" * H), "bad_tensor"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_requests_get_error_replies_and_the_connection_goes_on(target, name):
    data, code = ERRORS[name]

    async def go():
        reader, writer = await connect(target.ports["w"])
        writer.write(data)
        await writer.drain()
        err, _ = await wire.read_message(reader, 1 << 26)
        await wire.write_message(writer, wire.Ping())  # the same connection still works
        ok, _ = await wire.read_message(reader, 1 << 26)
        writer.close()
        return err, ok

    err, ok = run(go())
    assert isinstance(err, wire.Error) and err.code == code, err
    assert err.message and "\n" not in err.message
    assert isinstance(ok, wire.Ok)
    # A refused request names its id when it has one, so a master with several requests in flight on
    # this connection hands the error to the right one.
    header = msgpack.unpackb(data[8:8 + struct.unpack(">I", data[4:8])[0]])
    assert err.id == header.get("id", 0)


def test_relayed_forward_naming_no_connection_is_dropped_and_the_connection_goes_on(target):
    """A forward relayed for a master connection that is gone has nobody to answer: nothing comes back,
    and the sender's connection keeps working."""
    async def go():
        reader, writer = await connect(target.ports["w"])
        writer.write(forward(reply_conn="0" * 32))
        writer.write(frame({"type": "ping"}))
        await writer.drain()
        msg, _ = await asyncio.wait_for(wire.read_message(reader, 1 << 26), 10)
        writer.close()
        return msg

    assert isinstance(run(go()), wire.Ok)  # the ping's answer is the first thing on the connection


def test_version_mismatch_is_a_clear_error(target):
    msg = run(reply_to(target.ports["w"], frame({"type": "hello", "proto": "cake", "version": 99, "nonce": b"n"}),
                       hello=False))
    assert isinstance(msg, wire.Error) and msg.code == "version" and f"protocol v{wire.VERSION}" in msg.message


VALID = forward()


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(
    st.binary(min_size=1, max_size=300),
    st.tuples(st.integers(0, len(VALID) - 1), st.binary(min_size=1, max_size=8)).map(
        lambda m: VALID[:m[0]] + m[1] + VALID[m[0] + len(m[1]):]),
    st.integers(1, len(VALID) - 1).map(lambda n: VALID[:n]),
    st.dictionaries(st.sampled_from(["type", "id", "start", "end", "sessions", "positions", "tensor", "x"]),
                    st.one_of(st.integers(-2**63, 2**64 - 1), st.text(max_size=5), st.binary(max_size=5),
                              st.lists(st.integers(-3, 10), max_size=3), st.sampled_from(["forward", "end", "ping"]),
                              st.fixed_dictionaries({"dtype": st.sampled_from(["f32", "bf16", "zz"]),
                                                     "shape": st.lists(st.integers(-1, 2**40), max_size=5)})),
                    max_size=8).map(lambda h: frame(h, b"\0" * 64)),
))
def test_fuzzed_frames(target, layers_2_to_4, data):
    """Whatever a frame holds, the worker lives on and still computes a real forward exactly as
    transformers' layers do."""
    try:
        run(reply_to(target.ports["w"], data, timeout=0.3))
    except asyncio.TimeoutError:
        pass  # a frame that claims more bytes than were sent waits for them; the worker is not stuck
    assert target.alive("w")
    x, want = layers_2_to_4
    assert_exact(run(exact_forward(target.ports["w"], x, "after-fuzz")), want)


def test_generation_is_exact_after_the_abuse(target, tiny_model):
    """Abuse of its own (a frame that is not msgpack, a request of no known type, an impossible layer
    range), each logged in one line; then a generation through the same worker is exact."""
    from cake.tokenizer import Tokenizer

    port, log = target.ports["w"], target.log("w")
    lines = ("closed connection from", "bad request from", "refused: ")

    def counts() -> list[int]:
        text = log.read_text()
        return [text.count(line) for line in lines]

    before = counts()
    run(replies_until_closed(port, CLOSES["header-not-msgpack"]))
    for data in (ERRORS["unknown-type"][0], ERRORS["layers-not-served"][0]):
        assert isinstance(run(reply_to(port, data)), wire.Error)
    deadline = time.monotonic() + 30
    while [a - b for a, b in zip(counts(), before)] != [1, 1, 1]:  # it logs the abuse, one line each
        assert time.monotonic() < deadline, (lines, before, counts())
        time.sleep(0.05)
    assert target.alive("w")
    ids = Tokenizer(tiny_model).encode_prompt("After the storm")
    assert run(cake_generate(tiny_model, target.topology, ids, n=12)) == reference_greedy(tiny_model, ids, 12)
    log = log.read_text()
    assert "Traceback" not in log and "internal error" not in log


def test_port_in_use_is_one_line(tiny_model, tmp_path):
    from click.testing import CliRunner

    from cake.cli import main
    from conftest import write_topology

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        topo = write_topology(tmp_path / "t.yml", {"w": (port, ["model.layers.0"])})
        result = CliRunner().invoke(main, ["--mode", "worker", "--model", str(tiny_model), "--name", "w",
                                           "--topology", str(topo), "--address", f"127.0.0.1:{port}", "-q"])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: cannot listen on 127.0.0.1:{port}: Address already in use; pick " \
                                    f"another --address port"


def test_a_port_in_use_fails_in_one_line_before_the_weights_load(tiny_model, tmp_path):
    """Through the real command: the port is checked before the weights load (minutes on a 70B), not after."""
    import subprocess
    import sys

    from conftest import write_topology

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        topo = write_topology(tmp_path / "t.yml", {"w": (port, ["model.layers.0-5"])})
        proc = subprocess.run([sys.executable, "-m", "cake", "--mode", "worker", "--model", str(tiny_model),
                               "--name", "w", "--topology", str(topo), "--address", f"127.0.0.1:{port}"],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "loaded" not in proc.stderr  # the loader's line (at the default log level): nothing was loaded
    assert proc.stderr.splitlines() == [f"error: cannot listen on 127.0.0.1:{port}: Address already in use; pick "
                                        f"another --address port"], proc.stderr


def test_sigterm_stops_a_worker_cleanly_in_one_line(tiny_model, tmp_path):
    """A service manager's stop: the worker says so in one line on stderr and exits with code 0, its
    connections closed (a client connected at the time sees the end of the stream), no traceback."""
    import signal
    import subprocess

    c = Cluster(tmp_path, tiny_model, {"w": ["model.layers.2-4"]})
    try:
        async def go():
            reader, writer = await connect(c.ports["w"])
            c.procs["w"].send_signal(signal.SIGTERM)
            with pytest.raises(asyncio.IncompleteReadError):
                await asyncio.wait_for(wire.read_message(reader, 1 << 20), 30)
            writer.close()

        run(go())
        try:
            code = c.procs["w"].wait(30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the worker did not exit on SIGTERM:\n{c.log('w').read_text()}") from None
        log = c.log("w").read_text()
        assert code == 0, log
        assert [line for line in log.splitlines() if "SIGTERM" in line] == [
            "[cake.worker] worker 'w' stopped by SIGTERM"], log
        assert "Traceback" not in log, log
    finally:
        c.stop()


def test_a_connection_reset_as_it_is_accepted_ends_quietly(tiny_model, caplog):
    """The worker tunes each connection's socket first; a client that reset the connection at once leaves
    none to tune (the transport closed it). That connection must end like any broken one, not escape the
    handler with a traceback (asyncio's 'Unhandled exception in client_connected_cb')."""
    import logging

    from cake.model.loader import load_layers
    from cake.worker import Worker

    stack, config = load_layers(tiny_model, [2, 3, 4], "cpu", "f32", 64)
    worker = Worker("w", stack, config)

    async def go():
        handled = asyncio.get_running_loop().create_future()

        async def take(reader, writer):  # hands the worker the connection once the reset has come in
            try:
                await reader.read()
            except ConnectionResetError:
                pass
            await asyncio.sleep(0)  # the transport's connection_lost: its socket is closed
            try:
                await worker.handle(reader, writer)
                handled.set_result(None)
            except BaseException as e:
                handled.set_exception(e)

        server = await asyncio.start_server(take, "127.0.0.1", 0)
        client = socket.create_connection(server.sockets[0].getsockname()[:2])
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # a reset
        try:
            await asyncio.wait_for(handled, 10)
        finally:
            server.close()

    with caplog.at_level(logging.WARNING, logger="cake"):
        run(go())
    assert not worker.conns and not worker._handshaking
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


SCHEMA = {  # intact frames (length and msgpack sound) that break the schema: the answer names what is wrong
    "over-long-string": (frame({"type": "end", "sessions": ["s" * 300]}), "'end.sessions' is longer than 256"),
    "unknown-field-type": (frame({"type": "forward", "id": msgpack.ExtType(5, b"x"), "start": 2, "end": 5,
                                  "sessions": ["s"], "positions": [0]}), "'forward.id' must be int, got ExtType"),
    "wrong-type": (frame({"type": "end", "sessions": [1.5]}), "'end.sessions' must be str, got float"),
    "map-key-not-a-string": (frame({"type": "ping", 7: "x"}), "map key that is not a string"),
}


@pytest.mark.parametrize("name", list(SCHEMA))
def test_a_frame_that_breaks_the_schema_gets_an_error_naming_the_field_and_the_connection_goes_on(target, name):
    data, needle = SCHEMA[name]

    async def go():
        reader, writer = await connect(target.ports["w"])
        writer.write(data)
        await wire.write_message(writer, wire.Ping())
        err, _ = await asyncio.wait_for(wire.read_message(reader, 1 << 26), 10)
        ok, _ = await asyncio.wait_for(wire.read_message(reader, 1 << 26), 10)
        writer.close()
        return err, ok

    err, ok = run(go())
    assert (type(err), err.code) == (wire.Error, "bad_request") and needle in err.message, err
    assert isinstance(ok, wire.Ok)


def test_a_workers_internal_error_reaches_the_master_whole(tiny_model, tmp_path):
    """A worker's own failure (here a GPU's out-of-memory, whose message is long) is answered with an error
    naming the worker and the exception. With a 14-character name that answer was over the wire's string
    limit: the master dropped the link and replayed until 'keeps losing sessions', the cause never shown."""
    from cake import launch
    from cake.client import Options
    from cake.errors import WorkerError
    from cake.master import Master
    from cake.topology import load_topology
    from conftest import write_topology
    from test_wire import OOM

    port = launch.free_port()
    topo = load_topology(write_topology(tmp_path / "t.yml", {"linux_server_1": (port, ["model.layers.0-5"])}))

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError(OOM)

    async def go():
        worker, server = await _in_process_worker(tiny_model, port, name="linux_server_1")
        worker.stack.forward = worker.stack.forward_steps = out_of_memory
        master = Master(tiny_model, topo, options=Options(retry_timeout=5))
        try:
            await master.connect()
            with pytest.raises(WorkerError) as e:
                await master.step(master.new_session(), [1, 2, 3])
            return str(e.value)
        finally:
            await master.close()
            server.cancel()

    message = run(go())
    assert message.startswith(f"worker 'linux_server_1' at 127.0.0.1:{port}: worker 'linux_server_1' failed "
                              f"(OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB"), message
    assert "\n" not in message


def test_connection_floods_are_capped_and_the_worker_serves_afterwards(target):
    """Silent connections beyond MAX_HANDSHAKING push out the oldest silent one (so they cannot lock a
    master out); connections beyond MAX_CONNECTIONS get a 'busy' error naming the cap; once they go, the
    worker serves as before."""
    from cake.worker import MAX_CONNECTIONS, MAX_HANDSHAKING

    port = target.ports["w"]

    async def closed(reader) -> bool:
        try:
            return await asyncio.wait_for(reader.read(1), 5) == b""
        except ConnectionError:
            return True

    async def go():
        # The worker accepts connections in the order they came (the listening socket's queue), so it has
        # taken every silent one before the master's below.
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(MAX_HANDSHAKING)]
        reader, writer = await connect(port)  # a master's handshake still goes through
        await wire.write_message(writer, wire.Ping())
        ok, _ = await wire.read_message(reader, 1 << 20)
        oldest_closed = await closed(silent[0][0])
        writer.close()
        for _, w in silent:
            w.close()
        served = await all_served(port, MAX_CONNECTIONS)  # once the worker has seen those close
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await wire.write_message(writer, wire.Hello(wire.PROTOCOL, wire.VERSION, auth.nonce()))
        welcome, _ = await wire.read_message(reader, 1 << 20)
        busy, _ = await wire.read_message(reader, 1 << 20)
        writer.close()
        for _, w in served:
            w.close()
        for _, w in await all_served(port, 1):  # once the worker has seen those close
            w.close()
        return ok, oldest_closed, welcome, busy

    ok, oldest_closed, welcome, busy = run(go())
    assert isinstance(ok, wire.Ok) and oldest_closed
    assert isinstance(welcome, wire.Welcome)
    assert (type(busy), busy.code) == (wire.Error, "busy")
    assert busy.message == (f"worker 'w' already serves {MAX_CONNECTIONS} connections, the most it takes; stop "
                            f"masters you no longer use")
    assert_serving(port)


async def all_served(port: int, n: int, timeout: float = 30.0) -> list:
    """`n` connections through the handshake at once. Connections a client has just closed count against
    the worker's cap until it has read their end: while one of these is refused 'busy', all are closed and
    tried again (a poll with a deadline, not a guess of how long that takes)."""
    deadline = time.monotonic() + timeout
    while True:
        opened = []
        for _ in range(n):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            opened.append((reader, writer))
            await wire.write_message(writer, wire.Hello(wire.PROTOCOL, wire.VERSION, auth.nonce()))
            welcome, _ = await wire.read_message(reader, 1 << 20)
            assert isinstance(welcome, wire.Welcome), welcome
            info, _ = await wire.read_message(reader, 1 << 20)
            if not isinstance(info, wire.Info):
                assert (type(info), info.code) == (wire.Error, "busy") and time.monotonic() < deadline, info
                break
        else:
            return opened
        for _, w in opened:
            w.close()
        await asyncio.sleep(0.05)


def test_a_relayed_forward_for_a_master_that_left_while_it_waited_makes_no_caches(tiny_model):
    """A relayed forward waits for the compute lock behind a long prompt; its master disconnects meanwhile.
    It must not create KV caches for that gone connection (nothing would ever free them)."""
    from cake import launch
    from cake.model.loader import load_layers
    from cake.worker import Worker

    stack, config = load_layers(tiny_model, list(range(6)), "cpu", "f32", 4096)
    worker = Worker("w", stack, config, max_frame=1 << 23)
    port = launch.free_port()

    def hello():
        return handshake(port)

    async def go():
        server = asyncio.ensure_future(worker.serve("127.0.0.1", port))
        launch_deadline = asyncio.get_running_loop().time() + 10
        while True:
            try:
                ra, wa, _ = await hello()
                break
            except OSError:
                assert asyncio.get_running_loop().time() < launch_deadline
                await asyncio.sleep(0.05)
        _, wm, master = await hello()  # the master whose sessions the relayed forward uses
        rr, wr, _ = await hello()  # a relaying worker
        held = HeldPrompts(worker, LONG)
        await wire.write_message(wa, wire.Forward(1, 0, 6, ["a", "b"], [0, 0]), torch.randn(2, LONG, H))
        await held.started()  # that prompt computes, in steps
        await wire.write_message(wr, wire.Forward(2, 0, 6, ["m1", "m2"], [0, 0], reply_conn=master.conn),
                                  torch.randn(2, 4, H))
        await wire.write_message(wr, wire.Ping())
        [(ok, _)] = await _answers(rr, 1)  # read after the forward: that one waits for the compute lock
        assert isinstance(ok, wire.Ok)
        wm.close()  # the master goes while its forward waits its turn
        await until(lambda: master.conn not in worker.conns, "the worker to see the master go")
        held.release()
        reply, _ = await asyncio.wait_for(wire.read_message(ra, 1 << 26), 60)
        assert isinstance(reply, wire.Result)
        await until(lambda: not worker.scheduler.queued, "the relayed forward to be served or refused")
        left = {k for k in worker.sessions if k[0] not in {c.id for c in worker.conns.values()}}
        for w in (wa, wr):
            w.close()
        server.cancel()
        return left

    assert run(go()) == set()


def test_a_prompt_for_a_master_that_leaves_stops_between_steps(tiny_model, caplog):
    """A relayed 2-row prompt computes in steps; its master disconnects meanwhile: the worker
    stops at the next step (nobody could receive the answer) instead of holding its lock to the end."""
    import logging

    from cake import launch
    from cake.model.loader import load_layers
    from cake.worker import Worker

    stack, config = load_layers(tiny_model, list(range(6)), "cpu", "f32", 4096)
    worker = Worker("w", stack, config, max_frame=1 << 23)
    port = launch.free_port()

    async def go():
        server = asyncio.ensure_future(worker.serve("127.0.0.1", port))
        for _ in range(200):
            try:
                _, wm, master = await handshake(port)  # the master whose sessions the relayed prompt uses
                break
            except OSError:
                await asyncio.sleep(0.05)
        _, wr, _ = await handshake(port)  # a relaying worker
        held = HeldPrompts(worker, LONG)  # never released: only the worker's stopping it ends it
        await wire.write_message(wr, wire.Forward(2, 0, 6, ["m1", "m2"], [0, 0], reply_conn=master.conn),
                                  torch.randn(2, LONG, H))
        await held.started()  # computing, in steps
        wm.close()
        await until(lambda: held.stopped and not worker.scheduler.queued, "the worker to stop the prompt")
        wr.close()
        server.cancel()
        return list(worker.sessions)

    with caplog.at_level(logging.INFO, logger="cake.worker"):
        assert run(go()) == []
    assert "closed: stopped 1 forward(s) for it" in caplog.text  # it stopped, rather than finished


def test_a_connection_that_leaves_relayed_answers_unread_is_closed(tiny_model, tmp_path):
    """A client names its connection to b as the reply connection of forwards relayed through a, and never
    reads it: b stops queueing answers (each holds its hidden states) and closes that connection at
    MAX_PENDING_ANSWERS, and serves everyone else."""
    from cake.worker import MAX_PENDING_ANSWERS

    c = Cluster(tmp_path, tiny_model, {"a": ["model.layers.0-2"], "b": ["model.layers.3-5"]})
    try:
        async def go():
            _, wa, _ = await handshake(c.ports["a"])
            _, wb, info_b = await handshake(c.ports["b"])  # never read
            x = torch.randn(1, 1000, H)  # 256 kB answers: the socket buffers fill after a few dozen
            for i in range(1, 301):
                await wire.write_message(wa, wire.Forward(i, 0, 3, ["s"], [0], ["b"], [3], [6], [info_b.conn]), x)
                if i % 20 == 0 and "relayed answers unread" in c.log("b").read_text():
                    break
                await asyncio.sleep(0.01)
            wa.close()
            wb.close()

        run(go())
        log = c.log("b").read_text()
        assert f"closed a connection that left {MAX_PENDING_ANSWERS} relayed answers unread" in log
        assert_serving(c.ports["b"], (3, 4, 5))
        assert_serving(c.ports["a"], (0, 1, 2))
    finally:
        c.stop()


def test_a_long_prompt_does_not_stop_the_worker_answering_others(tiny_model):
    """A prompt computes in steps: another connection's ping is answered between them, while
    the prompt is held computing, before it ends (in one go, the ping would wait for the whole computation)."""
    from cake import launch

    port = launch.free_port()

    async def go():
        worker, server = await _in_process_worker(tiny_model, port)
        held = HeldPrompts(worker, LONG)
        r1, w1, _ = await handshake(port)
        r2, w2, _ = await handshake(port)
        done = {}

        async def answer(name, reader):
            msg, _ = await wire.read_message(reader, 1 << 26)
            done[name] = (asyncio.get_running_loop().time(), msg)

        x = torch.randn(1, LONG, H)
        await wire.write_message(w1, wire.Forward(1, 2, 5, ["long"], [0]), x)
        waiting = asyncio.ensure_future(answer("forward", r1))
        await held.started()  # the worker has started computing
        await wire.write_message(w2, wire.Ping())
        await asyncio.wait_for(answer("ping", r2), 30)
        held.release()
        await asyncio.wait_for(waiting, 60)
        w1.close()
        w2.close()
        server.cancel()
        return done

    done = run(go())
    assert isinstance(done["forward"][1], wire.Result) and isinstance(done["ping"][1], wire.Ok)
    assert done["ping"][0] < done["forward"][0], done


async def _answers(reader, n: int, timeout: float = 60) -> list:
    """The next `n` messages on a connection, in the order they came."""
    got = []
    for _ in range(n):
        msg, out = await asyncio.wait_for(wire.read_message(reader, 1 << 26), timeout)
        got.append((msg, out))
    return got


def test_a_decode_step_runs_between_the_steps_of_a_prompt_on_the_same_connection(tiny_model):
    """A master sends a prompt for one session, then a decode step for another (cached)
    session on the same connection: the decode step is answered first, while the prompt is held
    computing, and exactly as it is without the prompt running. (Served in order, it would wait for the
    whole prompt.)"""
    from cake import launch

    port = launch.free_port()
    torch.manual_seed(3)
    prompt, step = torch.randn(1, 3, H), torch.randn(1, 1, H)

    async def go():
        worker, server = await _in_process_worker(tiny_model, port)
        held = HeldPrompts(worker, LONG)
        r, w, _ = await handshake(port)
        for s in ("a", "alone"):  # the same 3-token prompt in two sessions
            await wire.write_message(w, wire.Forward(1, 2, 5, [s], [0]), prompt)
            await _answers(r, 1)
        await wire.write_message(w, wire.Forward(2, 2, 5, ["alone"], [3]), step)
        [(_, alone)] = await _answers(r, 1)
        await wire.write_message(w, wire.Forward(3, 2, 5, ["long"], [0]), torch.randn(1, LONG, H))
        await held.started()  # computing, in steps
        await wire.write_message(w, wire.Forward(4, 2, 5, ["a"], [3]), step)
        got = await _answers(r, 1, timeout=30)
        held.release()
        got += await _answers(r, 1)
        w.close()
        server.cancel()
        return alone, got

    alone, [(first, out), (second, _)] = run(go())
    assert (type(first), first.id, type(second), second.id) == (wire.Result, 4, wire.Result, 3)
    assert torch.equal(out, alone)


def test_ending_a_session_stops_its_prompt_and_refuses_a_waiting_one(tiny_model):
    """`end` of a session whose prompt computes stops that prompt at its next step; `end` of a session
    whose prompt waits for the compute lock means it makes no cache. Neither waits for the computation
    (the prompt is held computing until the worker stops it), and the worker holds neither session
    afterwards."""
    from cake import launch

    port = launch.free_port()

    async def go():
        worker, server = await _in_process_worker(tiny_model, port)
        held = HeldPrompts(worker, LONG)  # never released
        r1, w1, _ = await handshake(port)
        r2, w2, _ = await handshake(port)
        await wire.write_message(w1, wire.Forward(1, 2, 5, ["long"], [0]), torch.randn(1, LONG, H))
        await held.started()  # computing
        await wire.write_message(w2, wire.Forward(2, 2, 5, ["queued"], [0]), torch.randn(1, 5, H))
        await wire.write_message(w2, wire.End(["queued"]))
        ended_queued = await _answers(r2, 1, timeout=30)  # the end first (answered at once) ...
        await wire.write_message(w1, wire.End(["long"]))
        ended_long = await _answers(r1, 2)  # the stopped prompt's answer and the end's, in either order
        ended_queued += await _answers(r2, 1)  # ... then the refused forward
        assert held.stopped
        for w, r, s in ((w1, r1, "long"), (w2, r2, "queued")):  # no cache left: a step at 1 is refused
            await wire.write_message(w, wire.Forward(9, 2, 5, [s], [1]), torch.randn(1, 1, H))
            [(behind, _)] = await _answers(r, 1)
            assert isinstance(behind, wire.Error) and (behind.code, behind.cached) == ("cache_behind", 0), (s, behind)
        w1.close()
        w2.close()
        server.cancel()
        return ended_queued, ended_long

    ended_queued, ended_long = run(go())
    assert isinstance(ended_queued[0][0], wire.Ok)
    refused = ended_queued[1][0]
    assert (refused.code, refused.id, refused.message) == (
        "gone", 2, "the sessions of this forward were ended while it waited")
    by_type = {type(m): m for m, _ in ended_long}
    assert set(by_type) == {wire.Ok, wire.Error}
    stopped = by_type[wire.Error]
    assert (stopped.code, stopped.id, stopped.message) == (
        "gone", 1, "the sessions of this forward were ended while it computed")


def test_a_session_evicted_while_its_forward_waits_is_replayed_not_refused(tiny_model):
    """Eviction is not an `end`: a session evicted (to make room for another) while its next forward
    waits for the compute lock gets `cache_behind` from 0, so its master replays it."""
    from cake import launch
    from cake.model.loader import load_layers
    from cake.worker import Worker

    stack, config = load_layers(tiny_model, list(range(6)), "cpu", "f32", 4096)
    worker = Worker("w", stack, config, max_frame=1 << 23, kv_budget=2 * stack.new_cache_bytes() + 1)
    port = launch.free_port()

    async def go():
        server = asyncio.ensure_future(worker.serve("127.0.0.1", port))
        for _ in range(200):
            try:
                r1, w1, _ = await handshake(port)
                break
            except OSError:
                await asyncio.sleep(0.05)
        r2, w2, _ = await handshake(port)
        held = HeldPrompts(worker, LONG)
        await wire.write_message(w1, wire.Forward(1, 0, 6, ["s1"], [0]), torch.randn(1, 3, H))
        await _answers(r1, 1)
        await wire.write_message(w2, wire.Forward(2, 0, 6, ["long"], [0]), torch.randn(1, LONG, H))
        await held.started()  # computing; the two below wait, in this order
        await wire.write_message(w1, wire.Forward(3, 0, 6, ["s2"], [0]), torch.randn(1, 3, H))  # evicts s1
        await wire.write_message(w1, wire.Forward(4, 0, 6, ["s1"], [3]), torch.randn(1, 3, H))
        await wire.write_message(w1, wire.Ping())
        [(ok, _)] = await _answers(r1, 1, timeout=30)  # read after both: they wait
        assert isinstance(ok, wire.Ok)
        held.release()
        got = {m.id: m for m, _ in await _answers(r1, 2)}
        await _answers(r2, 1)
        for w in (w1, w2):
            w.close()
        server.cancel()
        return got

    got = run(go())
    assert isinstance(got[3], wire.Result)
    assert (type(got[4]), got[4].code, got[4].cached) == (wire.Error, "cache_behind", 0), got[4]


async def _in_process_worker(tiny_model, port: int, name: str = "w", **kw):
    """A Worker serving all 6 layers in this process (so a test can look at its queues), and its task."""
    from cake.model.loader import load_layers
    from cake.worker import Worker

    stack, config = load_layers(tiny_model, list(range(6)), "cpu", "f32", 4096)
    worker = Worker(name, stack, config, max_frame=1 << 23, **kw)
    server = asyncio.ensure_future(worker.serve("127.0.0.1", port))
    for _ in range(200):
        try:
            _, w, _ = await handshake(port)
            w.close()
            return worker, server
        except OSError:
            await asyncio.sleep(0.05)
    raise AssertionError("the worker did not start")


def test_closing_a_connection_drops_its_queued_forwards(tiny_model):
    """Forwards queued behind a long prompt hold their hidden states; a client that queues some and
    reconnects, over and over, must not pile them up: a closed connection's forwards are dropped."""
    from cake import launch

    port = launch.free_port()

    async def go():
        worker, server = await _in_process_worker(tiny_model, port)
        held = HeldPrompts(worker, LONG)
        r1, w1, _ = await handshake(port)
        await wire.write_message(w1, wire.Forward(1, 0, 6, ["l1", "l2", "l3", "l4"], [0] * 4), torch.randn(4, LONG, H))
        await held.started()  # computing
        async def until(n):  # the worker's queue reaches n forwards (it reads between the prompt's steps)
            for _ in range(2000):
                if len(worker.scheduler.queued) == n:
                    return True
                await asyncio.sleep(0.001)
            return False

        counts = []
        for i in range(3):
            _, w, _ = await handshake(port)
            for j in range(4):
                await wire.write_message(w, wire.Forward(10 + j, 0, 6, [f"s{j}"], [0]), torch.randn(1, 500, H))
            counts.append(await until(5))  # the long prompt and these 4
            w.close()
            counts.append(await until(1))  # only the long prompt, still computing
        left = (len(worker.scheduler.queued), worker.scheduler.queued_bytes)
        held.release()
        [(reply, _)] = await _answers(r1, 1)
        w1.close()
        server.cancel()
        return counts, left, reply

    counts, left, reply = run(go())
    assert counts == [True] * 6, counts
    assert left == (1, 4 * LONG * H * 4)  # only the held prompt's, which then finishes
    assert isinstance(reply, wire.Result)


def test_ending_one_session_of_a_waiting_batch_answers_the_batch(tiny_model):
    """A decode batch of a cached session and a new one waits behind a long prompt; its master ends the
    cached one meanwhile (its request was cancelled). The batch is still answered, for the other session,
    and the ended one is freed after it."""
    from cake import launch

    port = launch.free_port()

    async def go():
        worker, server = await _in_process_worker(tiny_model, port)
        r1, w1, _ = await handshake(port)
        r2, w2, _ = await handshake(port)
        held = HeldPrompts(worker, LONG)
        await wire.write_message(w2, wire.Forward(1, 0, 6, ["a"], [0]), torch.randn(1, 3, H))
        await _answers(r2, 1)
        await wire.write_message(w1, wire.Forward(2, 0, 6, ["long"], [0]), torch.randn(1, LONG, H))
        await held.started()  # computing
        await wire.write_message(w2, wire.Forward(3, 0, 6, ["a", "b"], [3, 0]), torch.randn(2, 1, H))
        await wire.write_message(w2, wire.End(["a"]))
        got = [m for m, _ in await _answers(r2, 1, timeout=30)]  # the end's answer, while the batch waits
        held.release()
        got += [m for m, _ in await _answers(r2, 1)]
        await _answers(r1, 1)
        held = sorted(s for _, s in worker.sessions)
        for w in (w1, w2):
            w.close()
        server.cancel()
        return got, held

    got, held = run(go())
    assert [type(m) for m in got] == [wire.Ok, wire.Result], got
    assert held == ["b", "long"]


def test_forwards_of_one_session_and_id_less_requests_keep_their_order(target):
    """A prompt's next chunk and the decode step after it, sent back to back for one session, are computed
    in order; a forward without an id (whose answer is matched by order) is answered before a ping sent
    after it."""
    port = target.ports["w"]

    async def go():
        r, w = await connect(port)
        await wire.write_message(w, wire.Forward(1, 2, 5, ["s"], [0]), torch.randn(1, 3, H))
        await _answers(r, 1)
        await wire.write_message(w, wire.Forward(2, 2, 5, ["s"], [3]), torch.randn(1, 4, H))
        await wire.write_message(w, wire.Forward(3, 2, 5, ["s"], [7]), torch.randn(1, 1, H))
        ordered = [m for m, _ in await _answers(r, 2)]
        await wire.write_message(w, wire.Forward(0, 2, 5, ["t"], [0]), torch.randn(1, 2000, H))
        await wire.write_message(w, wire.Ping())
        unnumbered = [m for m, _ in await _answers(r, 2)]
        w.close()
        return ordered, unnumbered

    ordered, unnumbered = run(go())
    assert [(type(m), m.id) for m in ordered] == [(wire.Result, 2), (wire.Result, 3)], ordered
    assert [type(m) for m in unnumbered] == [wire.Result, wire.Ok], unnumbered


@pytest.mark.parametrize("first", ["computing", "waiting"])
def test_an_ended_session_with_two_forwards_in_progress_keeps_no_cache(tiny_model, first):
    """A session has two forwards on one worker (a pipelined master: the next chunk for its first range,
    the first chunk for its second, at position 0), the first computing or both waiting behind another
    connection's prompt (each held there until the `end` is answered); its master ends it. Neither
    leaves a cache behind (the second one used to)."""
    from cake import launch

    port = launch.free_port()

    async def go():
        worker, server = await _in_process_worker(tiny_model, port)
        held = HeldPrompts(worker, LONG)
        r0, w0, _ = await handshake(port)
        r, w, _ = await handshake(port)
        if first == "waiting":
            await wire.write_message(w0, wire.Forward(1, 0, 6, ["long"], [0]), torch.randn(1, LONG, H))
            await held.started()
        await wire.write_message(w, wire.Forward(2, 0, 3, ["s"], [0]), torch.randn(1, LONG if first == "computing" else 5, H))
        if first == "computing":
            await held.started()
        await wire.write_message(w, wire.Forward(3, 3, 6, ["s"], [0]), torch.randn(1, 5, H))
        await wire.write_message(w, wire.End(["s"]))
        if first == "waiting":  # the end is answered at once; then 'long' may finish
            got = [m for m, _ in await _answers(r, 1, timeout=30)]
            held.release()
            got += [m for m, _ in await _answers(r, 2)]
        else:  # the held prompt ends only if the worker stops it
            got = [m for m, _ in await _answers(r, 3)]
            assert held.stopped
        await wire.write_message(w, wire.Forward(9, 3, 6, ["s"], [5]), torch.randn(1, 1, H))
        [(probe, _)] = await _answers(r, 1)
        if first == "waiting":
            await _answers(r0, 1)
        w.close()
        w0.close()
        server.cancel()
        return got, probe

    got, probe = run(go())
    assert sorted((type(m).__name__, getattr(m, "code", "")) for m in got) == [
        ("Error", "gone"), ("Error", "gone"), ("Ok", "")], got
    assert (type(probe), probe.code, probe.cached) == (wire.Error, "cache_behind", 0), probe


def test_two_workers_relaying_to_each_other_under_load_do_not_deadlock(tiny_model, tmp_path):
    """Relay chains a -> b and b -> a (each worker holds two ranges), many large forwards each way with a
    small queue budget: each worker's relays wait for the other to read, so the budget must not stop
    either from reading the other's relay connection (it did: no answers, ever)."""
    from cake import launch
    from cake.model.loader import load_layers
    from cake.topology import load_topology
    from cake.worker import Worker

    pa, pb = launch.free_port(), launch.free_port()
    topo = load_topology(launch.write_topology(tmp_path / "t.yml", {
        "a": (pa, ["model.layers.0-1", "model.layers.4"]), "b": (pb, ["model.layers.2-3", "model.layers.5"])}))
    workers = {}
    for name, layers in (("a", [0, 1, 4]), ("b", [2, 3, 5])):
        stack, config = load_layers(tiny_model, layers, "cpu", "f32", 4096)
        workers[name] = Worker(name, stack, config, max_frame=1 << 24, topology=topo, kv_budget=8 << 30)
        workers[name].queue_budget = 3 << 20  # stands for the 1 GiB default at this test's sizes
    n = 30

    async def go():
        servers = [asyncio.ensure_future(workers["a"].serve("127.0.0.1", pa)),
                   asyncio.ensure_future(workers["b"].serve("127.0.0.1", pb))]
        for _ in range(200):
            try:
                ra, wa, ia = await handshake(pa)
                rb, wb, ib = await handshake(pb)
                break
            except OSError:
                await asyncio.sleep(0.05)
        x = torch.randn(1, 4000, H)  # 1 MB of hidden states a frame
        got = {"a": 0, "b": 0}

        async def read(name, r):
            while got[name] < n:
                await wire.read_message(r, 1 << 26)
                got[name] += 1

        async def send(w, prefix, conn, other, s0, e0, s1, e1):
            for i in range(n):
                await wire.write_message(w, wire.Forward(i + 1, s0, e0, [f"{prefix}{i}"], [0], [other], [s1], [e1],
                                                         [conn]), x)

        readers = [asyncio.ensure_future(read("a", ra)), asyncio.ensure_future(read("b", rb))]
        senders = [asyncio.ensure_future(send(wa, "x", ib.conn, "b", 0, 2, 2, 4)),
                   asyncio.ensure_future(send(wb, "y", ia.conn, "a", 2, 4, 4, 5))]
        # A deadlock is no answer ever again, not a slow machine: fail once a minute passes without one.
        loop, answered, last = asyncio.get_running_loop(), -1, 0.0
        while not all(r.done() for r in readers):
            if got["a"] + got["b"] != answered:
                answered, last = got["a"] + got["b"], loop.time()
            elif loop.time() - last > 60:
                break
            await asyncio.wait(readers, timeout=1)
        for t in readers + senders + servers:
            t.cancel()
        await asyncio.gather(*readers, *senders, *servers, return_exceptions=True)
        for w in (wa, wb):
            w.close()
        return got

    assert run(go()) == {"a": n, "b": n}


def test_a_master_that_does_not_read_stalls_only_itself(tiny_model):
    """Master 1 sends many large forwards and never reads the answers; master 2 sends one while the
    worker's queued-bytes budget is full. Once master 1's forwards have computed, master 2 is served
    (it used to wait for ever), and master 1's unread answers stop at MAX_QUEUED_FORWARDS: the worker
    stops reading it rather than holding answers without bound."""
    import socket

    from cake import launch
    from cake.worker import MAX_QUEUED_FORWARDS

    port = launch.free_port()

    async def go():
        worker, server = await _in_process_worker(tiny_model, port, kv_budget=8 << 30)
        worker.queue_budget = 1 << 20  # stands for the 1 GiB default at this test's sizes
        _, w1, _ = await handshake(port)
        w1.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        x = torch.randn(1, 2000, H)  # 512 KB

        async def flood():
            for i in range(60):
                await wire.write_message(w1, wire.Forward(i + 1, 0, 6, [f"m1-{i}"], [0]), x)

        f = asyncio.ensure_future(flood())
        await until(lambda: worker.scheduler.queued_bytes + x.nbytes > worker.queue_budget, "the budget to fill")
        r2, w2, _ = await handshake(port)
        await wire.write_message(w2, wire.Forward(1, 0, 6, ["m2"], [0]), x)
        got = await _answers(r2, 1, timeout=60)
        # Everything the worker took from master 1 has computed, and it took as many as it ever would
        # (it stopped reading at the cap, or master 1 sent all it had).
        await until(lambda: not worker.scheduler.queued and (
            f.done() or max(len(c.queued) for c in worker.conns.values()) >= MAX_QUEUED_FORWARDS),
            "master 1's forwards to pile up", timeout=300)
        held = sum(1 for t in asyncio.all_tasks() if not t.done()
                   and t.get_coro().__qualname__.endswith("_serve_queued"))
        f.cancel()
        for w in (w1, w2):
            w.close()
        server.cancel()
        return got, held

    [(reply, _)], held = run(go())
    assert isinstance(reply, wire.Result)
    assert held <= MAX_QUEUED_FORWARDS, held


def test_relays_to_a_worker_that_takes_none_fail_over_instead_of_piling_up(tiny_model, tmp_path):
    """Worker b stops reading (SIGSTOP): worker a's forwards to pass on to it queue up to RELAY_BACKLOG,
    and the ones after that are answered 'relay' at once (the master then carries them itself) instead
    of each holding its hidden states until b wakes."""
    import os
    import signal

    from cake.worker import RELAY_BACKLOG

    c = Cluster(tmp_path, tiny_model, {"a": ["model.layers.0-2"], "b": ["model.layers.3-5"]})
    try:
        async def go():
            ra, wa, _ = await handshake(c.ports["a"])
            rb, wb, info_b = await handshake(c.ports["b"])
            # One relay through first, so a's link to b is up before b stops (else it is a's handshake with
            # b that times out, not the backlog that fills).
            await wire.write_message(wa, wire.Forward(1 << 20, 0, 3, ["warm"], [0], ["b"], [3], [6], [info_b.conn]),
                                     torch.randn(1, 1, H))
            warm, _ = await asyncio.wait_for(wire.read_message(rb, 1 << 26), 60)
            assert isinstance(warm, wire.Result), warm
            os.kill(c.procs["b"].pid, signal.SIGSTOP)
            try:
                x = torch.randn(1, 2000, H)  # 512 KB: the socket buffers to b fill after a few
                n = RELAY_BACKLOG + 24
                for i in range(1, n + 1):
                    await wire.write_message(wa, wire.Forward(i, 0, 3, [f"s{i}"], [0], ["b"], [3], [6],
                                                              [info_b.conn]), x)
                refused = []
                while len(refused) < n - RELAY_BACKLOG - 8:  # the last ones, at least
                    msg, _ = await asyncio.wait_for(wire.read_message(ra, 1 << 26), 60)
                    refused.append(msg)
                return refused
            finally:
                os.kill(c.procs["b"].pid, signal.SIGCONT)
                wa.close()
                wb.close()

        refused = run(go())
        assert all(isinstance(m, wire.Error) and m.code == "relay" and m.peer == "b" for m in refused), refused
        assert f"has {RELAY_BACKLOG} forwards waiting to be passed on to worker 'b'" in refused[0].message
        assert_serving(c.ports["a"], (0, 1, 2))
    finally:
        c.stop()
