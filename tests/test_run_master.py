"""The master's command on one prompt: what reaches the terminal, where stdout and stderr share it."""

from __future__ import annotations

import io
import logging
import os
import pty
import select
import signal
import subprocess
import sys
import time

from cake.run_master import TextOut, fresh_log_lines


def read_until_exit(fd: int, proc: subprocess.Popen, on_text=None, timeout: float = 120) -> bytes:
    """Everything written to the pty whose other end is `fd` until `proc` exits; `on_text(got)` after each read."""
    got = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: every process holding the terminal has closed it
                chunk = b""
            if not chunk:
                break
            got += chunk
            if on_text is not None:
                on_text(got)
        elif proc.poll() is not None:
            break
    proc.wait(10)
    return got


def test_a_warning_in_the_middle_of_the_text_starts_on_a_fresh_line(tiny_model, cluster):
    """Through the real command on a terminal (a pty as stdout and stderr): worker b stops, then dies, while
    text streams; the master's warning about it must start on a line of its own, not be glued to the
    text, and so must the error line that ends the run."""
    c = cluster(tiny_model, {"a": ["model.layers.0-2"], "b": ["model.layers.3-5"]})
    terminal, side = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "cake", "--model", str(tiny_model), "--topology", str(c.topology),
                             "--prompt", "Tell me a long story.", "--max-tokens", "2000", "--retry-timeout", "1",
                             "-q"], stdin=subprocess.DEVNULL, stdout=side, stderr=side)
    os.close(side)
    stopped = []

    def on_text(got: bytes) -> None:  # with -q nothing but text comes before b's loss
        if got.strip() and not stopped:
            os.kill(c.procs["b"].pid, signal.SIGSTOP)  # the stream halts mid-line, waiting for b
            stopped.append(got)
            c.kill("b")  # its connections reset: the master warns while the line is open

    try:
        out = read_until_exit(terminal, proc, on_text).decode(errors="replace").replace("\r\n", "\n")
    finally:
        os.close(terminal)
        if proc.poll() is None:
            proc.kill()
    assert stopped, out
    assert proc.returncode == 1, out
    logged = [i for i in range(len(out)) if out.startswith("[cake.", i) or out.startswith("error: ", i)]
    assert logged and logged[0] > 0, out  # text came first
    assert all(out[i - 1] == "\n" for i in logged), out
    assert "worker 'b'" in out[logged[0]:].splitlines()[0], out


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_no_newline_is_added_where_stdout_is_not_the_terminal(tmp_path):
    """Text piped to a file (stderr on the terminal) gets nothing of the log's: the text stays as generated."""
    with open(tmp_path / "out.txt", "w") as out:
        text = TextOut(out, FakeTerminal())
        logger = logging.getLogger("test-fresh-lines")
        logger.propagate = False
        handler = logging.StreamHandler(text.err)
        logger.addHandler(handler)
        try:
            with fresh_log_lines(text, logger):
                text.write("Once upon")
                logger.warning("careful")
                text.write(" a time\n")
        finally:
            logger.removeHandler(handler)
    assert (tmp_path / "out.txt").read_text() == "Once upon a time\n"
    assert text.err.getvalue() == "careful\n"
