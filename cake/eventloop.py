"""The asyncio event loop every cake node runs on, with optional busy-polling.

A node that blocks in epoll is woken by the kernel for each message, several times a token. With
busy-polling the loop polls its sockets without sleeping for a window before it blocks, at the price of a
spinning core. That pays where cores are idle (a GPU node) and costs where the spinner takes the core the
maths runs on, hence `auto`: on for CUDA nodes, off elsewhere; and only while the node serves one stream,
since batched sessions measured slower with it (`note_rows`). Figures: docs/benchmarks.md, "Threads and
the event loop".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import selectors
import sys
import time
import weakref
from collections.abc import Callable, Coroutine, Iterator

ENV = "CAKE_BUSY_POLL_US"
AUTO_CUDA_US = 20_000  # a token's round trip on a GPU cluster; past it the node sleeps as usual

_selectors: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, BusyPollSelector] = weakref.WeakKeyDictionary()


class BusyPollSelector(selectors.DefaultSelector):
    """Polls without sleeping for `window_s` before each blocking wait. Spinning pauses while another
    thread of this process computes (`no_spin`): the spinner would take the GIL from it at every
    torch call, for up to the interpreter's 5 ms switch interval each time. It also pauses while the
    node steps batches of several sessions (`batched`, see `note_rows`)."""

    def __init__(self, window_s: float):
        super().__init__()
        self.window_s = window_s
        self.paused = 0
        self.batched = False
        self.spins = 0  # polls made while spinning (tests and diagnostics)

    def select(self, timeout: float | None = None):
        if timeout is not None and timeout <= 0 or self.window_s <= 0 or self.paused or self.batched:
            return super().select(timeout)
        start = time.perf_counter()
        deadline = start + (self.window_s if timeout is None else min(self.window_s, timeout))
        while True:
            self.spins += 1
            ready = super().select(0)
            if ready:
                return ready
            now = time.perf_counter()
            if now >= deadline:
                break
        return super().select(None if timeout is None else max(0.0, timeout - (now - start)))


def busy_poll_us(device: str = "cpu", setting: str | None = None) -> int:
    """The window in µs for a node computing on `device`: `setting` (or $CAKE_BUSY_POLL_US), a number
    or 'auto'. One-line error for anything else."""
    from cake.errors import CakeError

    raw = (setting if setting is not None else os.environ.get(ENV, "auto")).strip().lower()
    if raw == "auto":
        return AUTO_CUDA_US if device.split(":")[0] == "cuda" else 0
    try:
        us = int(raw)
    except ValueError:
        us = -1
    if not 0 <= us <= 1_000_000:
        raise CakeError(f"--busy-poll / {ENV} '{raw}' must be 'auto' or microseconds from 0 to 1000000")
    return us


def new_loop(window_us: int = 0) -> asyncio.AbstractEventLoop:
    """An event loop that busy-polls for `window_us` before blocking (0: asyncio's plain loop)."""
    if window_us <= 0:
        return asyncio.new_event_loop()
    selector = BusyPollSelector(window_us / 1e6)
    loop = asyncio.SelectorEventLoop(selector)
    _selectors[loop] = selector
    return loop


def run(main: Coroutine, window_us: int = 0):
    """asyncio.run on `new_loop(window_us)`."""
    if window_us <= 0:
        return asyncio.run(main)
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=lambda: new_loop(window_us)) as runner:
            return runner.run(main)
    loop = new_loop(window_us)  # Python 3.10: asyncio.run has no loop factory; this is what it does
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main)
    finally:
        try:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:  # after Ctrl-C or an error: let main's cleanup (closing sockets) run
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def note_rows(rows: int) -> None:
    """The node is stepping `rows` sessions at once: the running loop spins only after single rows."""
    selector = _selectors.get(asyncio.get_running_loop())
    if selector is not None:
        selector.batched = rows > 1


@contextlib.contextmanager
def no_spin() -> Iterator[None]:
    """While the body awaits work on another thread: the running loop does not spin meanwhile."""
    selector = _selectors.get(asyncio.get_running_loop())
    if selector is None:
        yield
        return
    selector.paused += 1
    try:
        yield
    finally:
        selector.paused -= 1


async def wait_for(aw, timeout: float | None):
    """asyncio.wait_for without its flaw before Python 3.12: there, an awaitable that finishes as its
    caller is being cancelled hands back its result and the cancel is lost (cpython gh-86296; a
    pipelined step hung on it). On a timeout the awaitable is cancelled and TimeoutError raised."""
    task = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait([task], timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        await asyncio.wait([task])
        if task.cancelled():
            raise asyncio.TimeoutError()
    return task.result()


# ---- long computations without blocking the loop -------------------------------------------------

class Abandoned(Exception):
    """run_steps stopped because its `abandon` check said nobody wants the result any more."""


async def run_steps(steps: Iterator, abandon: Callable[[], bool] | None = None) -> object:
    """Drive a computation that yields None between its steps (LayerStack.forward_steps) and finally
    its result, letting the loop serve other connections between steps; `abandon()` true between two
    steps stops it (Abandoned). Inline, not on a thread: a second thread's OpenMP team slows every later
    CPU step of the process (docs/benchmarks.md, "Threads and the event loop")."""
    for out in steps:
        if out is not None:
            return out
        await asyncio.sleep(0)
        if abandon is not None and abandon():
            steps.close()
            raise Abandoned()
    raise RuntimeError("the computation ended without a result")
