"""Nothing lost when a worker dies: real processes killed, restarted, stopped and starved."""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest
import torch

from cake.client import Options
from cake.errors import WorkerError
from cake.generate import generate
from cake.master import Master
from cake.sampling import SamplingParams
from cake.tokenizer import Tokenizer
from cake.topology import load_topology
from conftest import EOS, cancel_after, reference_greedy, reference_model, run

N = 20
LAYOUT = {"a": ["model.layers.0-2"], "b": ["model.layers.3-5"]}


@pytest.fixture(scope="module")
def prompt(tiny_model):
    return Tokenizer(tiny_model).encode_prompt("Keep going no matter what.")


async def generate_with(master: Master, prompt: list[int], on_token) -> list[int]:
    await master.connect()
    out = []
    try:
        async for t in generate(master, prompt, SamplingParams(), N, EOS):
            out.append(t)
            on_token(len(out))
    finally:
        await master.close()
    return out


def test_kill_9_and_restart_mid_generation_loses_nothing(tiny_model, cluster, prompt, caplog):
    c = cluster(tiny_model, LAYOUT)
    master = Master(tiny_model, load_topology(c.topology), options=Options(retry_timeout=30))

    def chaos(n: int) -> None:
        if n == 6:
            c.kill("b")
            c.start("b")  # same port; it takes a while to boot, the master waits and replays
        if n == 12:
            c.kill("a")
            c.start("a")

    with caplog.at_level(logging.INFO, logger="cake"):
        got = run(generate_with(master, prompt, chaos))
    assert got == reference_greedy(tiny_model, prompt, N)
    text = caplog.text
    for name in ("a", "b"):
        addr = f"127.0.0.1:{c.ports[name]}"
        assert f"worker '{name}' at {addr}: connection lost; reconnecting" in text
        assert f"worker '{name}' at {addr} is back after" in text
    assert "replaying" in text


def test_a_replay_larger_than_a_workers_frame_limit_goes_in_groups(tiny_model, cluster):
    """Three sessions decoding in step, then worker b restarts: the master must replay 3 x 454 tokens,
    over the 972 rows b takes per request (--max-frame-mb 0.3), so it replays in groups that fit, through
    the relay, and every session still gets transformers' answer."""
    import asyncio

    from cake.sampling import greedy

    c = cluster(tiny_model, LAYOUT)
    c.extras["b"] = ("--max-frame-mb", "0.3")
    c.kill("b")
    c.start("b")
    c.wait("b")
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 128000, (450,), generator=gen).tolist() for _ in range(3)]

    async def go():
        master = Master(tiny_model, load_topology(c.topology), options=Options(retry_timeout=30))
        try:
            await master.connect()
            sessions = [master.new_session() for _ in prompts]
            outs = [[greedy(await master.step(s, p))] for s, p in zip(sessions, prompts)]
            for i in range(6):  # decode steps of all three, batched
                if i == 3:
                    c.kill("b")
                    c.start("b")  # the three sessions' caches on b are gone: replayed together
                logits = await asyncio.gather(*(master.step(s, [o[-1]]) for s, o in zip(sessions, outs)))
                for o, x in zip(outs, logits):
                    o.append(greedy(x))
            return outs, master.relayed_steps
        finally:
            await master.close()

    outs, relayed = run(go())
    for p, o in zip(prompts, outs):
        assert o == reference_greedy(tiny_model, p, 7)
    assert relayed > 0
    assert "outside the limit" not in c.log("b").read_text()


def test_worker_gone_for_good_is_a_clear_error_within_the_timeout(tiny_model, cluster, prompt):
    c = cluster(tiny_model, LAYOUT)
    master = Master(tiny_model, load_topology(c.topology), options=Options(retry_timeout=2))
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as e:
        run(generate_with(master, prompt, lambda n: c.kill("b") if n == 3 else None))
    assert time.monotonic() - t0 < 15
    assert f"worker 'b' at 127.0.0.1:{c.ports['b']} is unreachable" in str(e.value)


def test_stuck_worker_is_detected_and_recovers_when_it_resumes(tiny_model, cluster, prompt, caplog):
    """a is frozen inside the relay chain a -> b: nobody answers, so after the timeout the master
    reconnects, replays, and carries a's output to b itself for a while (a stuck relay cannot stall
    every retry)."""
    c = cluster(tiny_model, LAYOUT)
    master = Master(tiny_model, load_topology(c.topology), options=Options(retry_timeout=20, request_timeout=1))
    pid = c.procs["a"].pid

    def freeze(n: int) -> None:
        if n == 4:
            os.kill(pid, signal.SIGSTOP)

    class ResumeOnTimeout(logging.Handler):
        """a resumes once the master has timed out waiting for it (not after a guessed 2.5 s)."""

        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("worker 'a' at ") and "timed out" in record.getMessage():
                os.kill(pid, signal.SIGCONT)

    resume = ResumeOnTimeout(logging.WARNING)
    logging.getLogger("cake.master").addHandler(resume)
    try:
        with caplog.at_level(logging.WARNING, logger="cake.master"):
            assert run(generate_with(master, prompt, freeze)) == reference_greedy(tiny_model, prompt, N)
    finally:
        logging.getLogger("cake.master").removeHandler(resume)
        os.kill(pid, signal.SIGCONT)
    assert ("a", "b") in master._no_relay
    assert "a relay from worker 'a' to 'b' timed out; for the next 30s its output goes to 'b'" in caplog.text


def test_stuck_worker_that_stays_stuck_fails_in_time(tiny_model, cluster, prompt):
    c = cluster(tiny_model, LAYOUT)
    master = Master(tiny_model, load_topology(c.topology), options=Options(retry_timeout=2, request_timeout=1))
    t0 = time.monotonic()
    try:
        with pytest.raises(WorkerError, match="worker 'a' at 127.0.0.1:"):
            run(generate_with(master, prompt, lambda n: os.kill(c.procs["a"].pid, signal.SIGSTOP) if n == 2 else None))
        assert time.monotonic() - t0 < 15
    finally:
        os.kill(c.procs["a"].pid, signal.SIGCONT)


def test_ending_sessions_on_a_stuck_worker_does_not_wait_for_the_request_timeout(tiny_model, cluster, prompt):
    """The answer is complete; freeing its sessions on a worker that froze meanwhile gives up after
    END_TIMEOUT (a best effort), not after --request-timeout + --retry-timeout (330 s by default)."""
    from cake.client import END_TIMEOUT

    c = cluster(tiny_model, LAYOUT)
    master = Master(tiny_model, load_topology(c.topology))

    async def go():
        await master.connect()
        session = master.new_session()
        await master.step(session, prompt)
        os.kill(c.procs["b"].pid, signal.SIGSTOP)
        t0 = time.monotonic()
        await master.end(session)
        took = time.monotonic() - t0
        await master.close()
        return took

    try:
        took = run(go())
    finally:
        os.kill(c.procs["b"].pid, signal.SIGCONT)
    assert END_TIMEOUT - 0.5 < took < END_TIMEOUT + 3


def test_unreachable_worker_at_start_up_through_the_cli(tiny_model, cluster):
    c = cluster(tiny_model, LAYOUT, start=False)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "cake", "--model", str(tiny_model), "--topology", str(c.topology),
                           "--prompt", "hi", "--retry-timeout", "1", "-q"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: worker '") and "is unreachable" in lines[-1], proc.stderr
    # Before it, at once, one line per worker saying what is awaited (not seconds of silence).
    waiting = sorted(lines[:-1])
    assert len(waiting) == 2 and all("retrying for up to" in w and "is it started" in w for w in waiting), proc.stderr
    assert "worker 'a'" in waiting[0] and "worker 'b'" in waiting[1]
    assert time.monotonic() - t0 < 30


def reset_connections(port: int, n: int, then: Callable[[], None] = lambda: None) -> threading.Thread:
    """Listen on 127.0.0.1:port (bound before this returns), reset each of the first n connections as it is
    accepted (SO_LINGER 0, then close), then stop listening and call `then`: a port in the moment its
    worker restarts, or a proxy that drops connections."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen()

    def serve() -> None:
        with listener:
            for _ in range(n):
                conn, _ = listener.accept()
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
        then()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_connections_reset_as_they_are_accepted_are_retried_mid_generation(tiny_model, cluster, prompt, caplog):
    """Worker b is killed mid-generation and its port resets the master's next 4 connections as they are
    accepted, before b is back. A reset that comes in before the master tunes the socket closed it under
    the master (EBADF from setsockopt): that crashed the master with a traceback. Each is a failed attempt
    like any other: the master retries, b comes back, and the text is exact."""
    c = cluster(tiny_model, LAYOUT)
    master = Master(tiny_model, load_topology(c.topology), options=Options(retry_timeout=30, relay=False))
    resets: list[threading.Thread] = []

    def chaos(n: int) -> None:
        if n == 6:
            c.kill("b")
            resets.append(reset_connections(c.ports["b"], 4, then=lambda: c.start("b")))

    with caplog.at_level(logging.INFO, logger="cake"):
        got = run(generate_with(master, prompt, chaos))
    assert got == reference_greedy(tiny_model, prompt, N)
    resets[0].join(10)
    assert not resets[0].is_alive()  # all 4 connections were made (and reset) before b came back
    assert "replaying 1 session(s) from position 0 after 'b' lost them" in caplog.text


def test_check_reports_a_worker_nothing_listens_for_at_once(tiny_model, cluster):
    """`cake --check` with one worker down (its port refuses connections): its row says so without
    waiting --retry-timeout (it took the full 30 s), the other worker's row is still checked."""
    c = cluster(tiny_model, LAYOUT)
    c.kill("b")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "cake", "--model", str(tiny_model), "--topology", str(c.topology),
                           "--check", "--retry-timeout", "30"], capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert proc.returncode == 1 and took < 20, (took, proc.stderr)
    rows = {line.split(" ")[0]: line for line in proc.stdout.splitlines()}
    assert "ok, layers 0-2" in rows["a"]
    assert f"ERROR worker 'b' at 127.0.0.1:{c.ports['b']} is unreachable" in rows["b"] and "nothing listens" in rows["b"]
    assert proc.stderr.strip().splitlines()[-1] == "error: 1 of 2 worker(s) not ready: b; see above"


def test_check_retries_a_worker_whose_connections_reset_and_reports_it_in_one_line(tiny_model, cluster):
    """`cake --check` against a port that resets connections as it accepts them: each reset is a failed
    attempt (it retried none and printed 'OSError: [Errno 9] Bad file descriptor' on the worker's row),
    and the row says the worker is unreachable, in one line, no traceback."""
    c = cluster(tiny_model, {"w": ["model.layers.0-5"]}, start=False)
    port = c.ports["w"]
    resets = reset_connections(port, 2)
    proc = subprocess.run([sys.executable, "-m", "cake", "--model", str(tiny_model), "--topology", str(c.topology),
                           "--check", "--retry-timeout", "2"], capture_output=True, text=True, timeout=60)
    resets.join(10)
    assert proc.returncode == 1
    assert not resets.is_alive()  # a second connection came after the first was reset
    assert "Traceback" not in proc.stderr and "Bad file descriptor" not in proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("w (")]
    assert len(rows) == 1 and rows[0].startswith(f"w (127.0.0.1:{port}): ERROR worker 'w' at 127.0.0.1:{port} is "
                                                 f"unreachable ("), proc.stdout
    assert proc.stderr.splitlines()[-1] == "error: 1 of 1 worker(s) not ready: w; see above"


def two_alternating_sessions(tiny_model, topology):
    a_ids, b_ids = [128000, 9906, 1917, 11], [128000, 3923, 374, 279, 1888]

    async def go():
        master = Master(tiny_model, load_topology(topology), context=64)
        await master.connect()
        a, b = master.new_session(), master.new_session()
        out_a = [await master.step(a, a_ids)]
        out_b = [await master.step(b, b_ids)]
        for t in (5, 6, 7):  # alternate: each step finds its cache evicted by the other session
            out_a.append(await master.step(a, [t]))
            out_b.append(await master.step(b, [t]))
        await master.close()
        return (a_ids + [5, 6, 7], out_a), (b_ids + [5, 6, 7], out_b)

    return run(go())


def test_evicted_sessions_are_replayed_exactly(tiny_model, cluster):
    # Room for one session's cache only: 6 layers x (k, v) x 2 heads x 64 positions x 16 dims x 4 B = 96 KiB.
    c = cluster(tiny_model, {"w": ["model.layers.0-5"]}, extra=("--kv-budget", "0.1", "--context", "64"))
    ref = reference_model(tiny_model)
    for ids, outs in two_alternating_sessions(tiny_model, c.topology):
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits[0]
        first = len(ids) - len(outs)
        for i, got in enumerate(outs):
            assert torch.allclose(got, want[first + i], atol=1e-4, rtol=0)
    assert c.log("w").read_text().count("evicted idle session") >= 6


def test_a_budget_below_one_session_is_a_clear_error(tiny_model, cluster):
    c = cluster(tiny_model, {"w": ["model.layers.0-5"]}, extra=("--kv-budget", "0.01", "--context", "64"))
    with pytest.raises(WorkerError, match="needs 0.09 MiB of KV cache, over this worker's budget of 0.01 MiB"):
        two_alternating_sessions(tiny_model, c.topology)


@pytest.mark.parametrize("maths_thread", [False, True])
def test_closing_the_master_stops_a_generation_in_flight(tiny_model, cluster, prompt, maths_thread):
    """close() is for good: a step in flight fails with one line instead of reconnecting and going on.
    maths_thread: the master holds layers itself and runs its maths on one thread, as a CUDA master
    serving the API does (close() shuts that thread down; ending the session after it must not fail)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from cake.master import LocalStage

    c = cluster(tiny_model, {"b": ["model.layers.3-5"]} if maths_thread else LAYOUT)

    async def go():
        master = Master(tiny_model, load_topology(c.topology), compute_in_thread=maths_thread)
        if maths_thread:
            master._math = ThreadPoolExecutor(1)  # what a CUDA master gets (cake.master.Master.__init__)
            for st in master.stages:
                if isinstance(st, LocalStage):
                    st.executor = master._math
        await master.connect()
        out = []
        with pytest.raises(WorkerError, match="shut down"):
            async for t in generate(master, prompt, SamplingParams(), 200, ()):
                out.append(t)
                if len(out) == 3:
                    asyncio.get_running_loop().call_later(0.001, lambda: asyncio.ensure_future(master.close()))
        return out, [link.writer for link in master.links.values()]

    out, writers = run(go())
    assert 3 <= len(out) < 200 and writers == [None] * len(c.ports)


def test_a_batch_larger_than_the_kv_budget_still_computes_exactly(tiny_model, cluster):
    """Three sessions decoded as one batch on a worker with room for two caches: the worker evicts a
    row of the batch (that row keeps its cache for the step), the master replays it on the next step,
    and every logit matches transformers."""
    import asyncio

    c = cluster(tiny_model, {"w": ["model.layers.0-5"]}, extra=("--kv-budget", "0.2", "--context", "64"))
    prompts = [[128000, 791, 4062, 315], [128000, 40, 1093, 856], [128000, 3923, 374, 279]]

    async def go():
        master = Master(tiny_model, load_topology(c.topology), context=64)
        await master.connect()
        sessions = [master.new_session() for _ in prompts]
        outs = [[await master.step(s, p)] for s, p in zip(sessions, prompts)]  # the third evicts the first
        for t in (5, 6, 7):  # then decode steps of all three, batched
            for o, logits in zip(outs, await asyncio.gather(*(master.step(s, [t]) for s in sessions))):
                o.append(logits)
        await master.close()
        return outs

    outs = run(go())
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            want = reference_model(tiny_model)(torch.tensor([p + [5, 6, 7]])).logits[0]
        for i, got in enumerate(o):
            assert torch.allclose(got, want[len(p) - 1 + i], atol=1e-4, rtol=0)
    assert "of the batch being served" in c.log("w").read_text()


def test_a_ping_cancelled_before_it_is_written_keeps_the_answers_in_order(tiny_model, cluster):
    """A request without an id takes its place in the order of answers only once its frame is written:
    one cancelled while another frame holds the connection must not steal the next request's answer."""
    import asyncio

    from cake import wire
    from cake.client import WorkerLink

    c = cluster(tiny_model, {"w": ["model.layers.0-5"]})

    async def go():
        link = WorkerLink(load_topology(c.topology).workers["w"], Options(request_timeout=5))
        await link.ensure_connected()
        async with link._write:  # as if a long prompt's frame were being written
            ping = asyncio.ensure_future(link.request(wire.Ping()))
            deadline = time.monotonic() + 10
            while not link._write._waiters:  # until the ping waits for the lock (asyncio.Lock's queue)
                assert time.monotonic() < deadline and not ping.done(), ping
                await asyncio.sleep(0)
            ping.cancel()
        t0 = time.monotonic()
        reply, _ = await link.request(wire.Ping())
        link.shutdown()
        return reply, time.monotonic() - t0

    reply, seconds = run(go())
    assert reply.TYPE == "ok" and seconds < 2


def test_a_request_cancelled_as_its_answer_comes_in_raises_cancelled(tiny_model, cluster):
    """The answer has been read off the socket, and before its request resumes the caller is cancelled (a
    pipelined step stops because another stage failed): the request must raise CancelledError, never
    return the answer as if no cancel had come, which asyncio.wait_for did before Python 3.12 and which
    left a pipelined step waiting forever. Real worker, real socket; the test only watches for the
    moment the answer lands, then cancels 0 to 3 event-loop turns later."""
    import asyncio

    from cake.client import WorkerLink
    from cake.model.config import load_config

    c = cluster(tiny_model, {"w": ["model.layers.0-5"]})
    hidden = load_config(tiny_model).hidden_size

    async def once(turns: int) -> str:
        link = WorkerLink(load_topology(c.topology).workers["w"], Options(request_timeout=30))
        await link.ensure_connected()
        answers = []
        expect = link.expect

        def watched(rid):
            answers.append(expect(rid))
            return answers[-1]

        link.expect = watched
        task = asyncio.ensure_future(link.forward(0, 6, [f"s{turns}"], [0], torch.zeros(1, 2, hidden)))
        while not (answers and answers[0].done()):
            await asyncio.sleep(0)
        outcome = await cancel_after(task, turns)
        link.shutdown()
        return outcome

    async def go():
        return [await once(turns) for turns in range(4)]

    outcomes = run(go())
    assert "cancel lost" not in outcomes and "cancelled" in outcomes, outcomes
