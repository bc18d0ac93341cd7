"""cake/eventloop.py: the busy-polling selector spins, then sleeps, and pauses while a maths thread works."""

from __future__ import annotations

import asyncio
import selectors
import socket
import subprocess
import sys
import threading
import time

import pytest

from cake import eventloop
from conftest import cancel_after
from cake.errors import CakeError


def test_setting_auto_is_on_for_cuda_only(monkeypatch):
    monkeypatch.delenv(eventloop.ENV, raising=False)
    assert eventloop.busy_poll_us("cuda") == eventloop.busy_poll_us("cuda:1") == eventloop.AUTO_CUDA_US > 0
    assert eventloop.busy_poll_us("cpu") == eventloop.busy_poll_us("mps") == 0
    assert eventloop.busy_poll_us("cpu", "2500") == 2500
    monkeypatch.setenv(eventloop.ENV, "700")
    assert eventloop.busy_poll_us("cuda") == 700  # the environment's setting
    assert eventloop.busy_poll_us("cuda", "0") == 0  # the flag wins


@pytest.mark.parametrize("bad", ["fast", "-1", "2000000", "1.5"])
def test_a_bad_setting_is_one_line_naming_the_flag(bad):
    with pytest.raises(CakeError, match=r"--busy-poll .* must be 'auto' or microseconds") as e:
        eventloop.busy_poll_us("cpu", bad)
    assert "\n" not in str(e.value)


def wait_for_byte(selector, delay_s: float, timeout: float | None) -> tuple[list, float, float]:
    """Select on one end of a socket pair while a thread writes to the other after `delay_s`; return
    the events, the wall time and this thread's CPU time (blocking burns none)."""
    a, b = socket.socketpair()
    try:
        selector.register(a, selectors.EVENT_READ)
        writer = threading.Timer(delay_s, b.send, args=(b"x",))
        writer.start()
        wall, cpu = time.perf_counter(), time.thread_time()
        events = selector.select(timeout)
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
        writer.join()
        selector.unregister(a)
        return events, wall, cpu
    finally:
        a.close()
        b.close()


# Spinning is asserted by counting the selector's polls, not by CPU time, which a loaded machine starves.

def test_spins_through_the_window_and_sees_the_message():
    sel = eventloop.BusyPollSelector(window_s=5.0)
    events, wall, _ = wait_for_byte(sel, delay_s=0.05, timeout=None)
    assert len(events) == 1
    assert sel.spins >= 1 and wall < 4.0  # seen by a poll inside the window, not by a blocking wait after it


def test_after_the_window_it_sleeps():
    sel = eventloop.BusyPollSelector(window_s=0.01)
    events, wall, cpu = wait_for_byte(sel, delay_s=0.3, timeout=5.0)
    assert len(events) == 1 and wall > 0.25 and sel.spins >= 1
    assert cpu < 0.15  # 10 ms of polling, then a blocking wait (a loaded machine only lowers this)


def test_honours_a_shorter_timeout():
    sel = eventloop.BusyPollSelector(window_s=5.0)
    a, b = socket.socketpair()
    try:
        sel.register(a, selectors.EVENT_READ)
        t0 = time.perf_counter()
        assert sel.select(0.02) == []
        assert time.perf_counter() - t0 < 2.0
    finally:
        a.close()
        b.close()


def spins_of(loop: asyncio.AbstractEventLoop) -> int:
    return eventloop._selectors[loop].spins


def test_paused_while_another_thread_computes():
    """`no_spin` around work on a thread: the loop blocks instead of contending for the GIL."""
    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        before = spins_of(loop)
        with eventloop.no_spin():
            await loop.run_in_executor(None, time.sleep, 0.1)
        paused = spins_of(loop) - before
        before = spins_of(loop)
        await loop.run_in_executor(None, time.sleep, 0.1)
        return paused, spins_of(loop) - before

    loop = eventloop.new_loop(window_us=1_000_000)
    try:
        paused, spinning = loop.run_until_complete(main())
    finally:
        loop.close()
    assert paused == 0 < spinning


def test_no_spinning_while_the_node_steps_batches():
    """After a batch of several rows the loop sleeps as a plain one does; after a single row it spins."""
    async def spins_while_idle(rows: int) -> int:
        eventloop.note_rows(rows)
        before = spins_of(asyncio.get_running_loop())
        await asyncio.sleep(0.1)  # the loop's select waits out the timer: spinning or sleeping
        return spins_of(asyncio.get_running_loop()) - before

    async def main() -> tuple[int, int, int]:
        return await spins_while_idle(4), await spins_while_idle(1), await spins_while_idle(2)

    loop = eventloop.new_loop(window_us=1_000_000)
    try:
        batched, single, batched_again = loop.run_until_complete(main())
    finally:
        loop.close()
    assert batched == 0 < single
    assert batched_again == 0


def test_run_returns_the_result_on_either_loop():
    async def main() -> int:
        await asyncio.sleep(0.01)
        return 42

    assert eventloop.run(main(), 0) == 42
    assert eventloop.run(main(), 2000) == 42
    assert asyncio.run(_no_spin_elsewhere()) == "ok"  # outside a busy-polling loop, no_spin does nothing


EXIT_IN_A_TASK = """
import asyncio, sys
from cake import eventloop

async def main():
    async def exit_now():
        raise SystemExit(3)  # escapes the loop, as Ctrl-C's KeyboardInterrupt does

    asyncio.get_running_loop().create_task(exit_now())
    try:
        await asyncio.sleep(10)
    finally:
        print("cleaned up", flush=True)

eventloop.run(main(), int(sys.argv[1]))
"""


@pytest.mark.parametrize("window_us", [0, 2000])
def test_run_lets_the_main_coroutine_clean_up_after_an_exit(window_us):
    """As asyncio.run does: tasks still pending when the loop stops (SystemExit, Ctrl-C) are cancelled
    and awaited, so the main coroutine's `finally` (closing the master, the server) runs. In a child
    process: an exit escaping a task upsets CPython 3.11's recursion bookkeeping in the process it
    happens in."""
    out = subprocess.run([sys.executable, "-c", EXIT_IN_A_TASK, str(window_us)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 3, out.stderr
    assert out.stdout == "cleaned up\n"


async def _no_spin_elsewhere() -> str:
    with eventloop.no_spin():
        await asyncio.sleep(0)
    return "ok"


def _cancel_as_it_finishes(wait) -> list[str]:
    """Await a future through `wait`, set its result, cancel the waiting task 0 to 3 loop turns later: what
    the task did each time ('answered' before the cancel, 'cancelled', or 'cancel lost': it returned the
    result as if no cancel had come)."""
    async def once(turns: int) -> str:
        fut = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(wait(fut, 10))
        await asyncio.sleep(0)
        fut.set_result("answer")
        return await cancel_after(task, turns)

    async def all_turns():
        return [await once(turns) for turns in range(4)]

    return asyncio.run(all_turns())


def test_wait_for_never_loses_a_cancel_that_comes_as_the_awaitable_finishes():
    outcomes = _cancel_as_it_finishes(eventloop.wait_for)
    assert "cancel lost" not in outcomes and "cancelled" in outcomes and outcomes[-1] == "answered", outcomes
    if sys.version_info < (3, 12):  # what it replaces does lose it there (cpython gh-86296)
        assert "cancel lost" in _cancel_as_it_finishes(asyncio.wait_for)


def test_wait_for_times_out_as_asyncio_does_and_passes_results_and_errors_on():
    async def go():
        loop = asyncio.get_running_loop()
        slow = loop.create_future()
        with pytest.raises(asyncio.TimeoutError):
            await eventloop.wait_for(slow, 0.01)
        assert slow.cancelled()  # what it waited on is cancelled, as asyncio.wait_for does

        async def fails():
            raise ConnectionResetError("gone")

        with pytest.raises(ConnectionResetError, match="gone"):
            await eventloop.wait_for(fails(), 1)
        return await eventloop.wait_for(asyncio.sleep(0, result=7), None)

    assert asyncio.run(go()) == 7
