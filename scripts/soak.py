"""Soak: concurrent API clients against a keyed loopback cluster while workers are killed and restarted and
a proxy corrupts a byte now and then. Bounded in time and in requests; 127.0.0.1 only.

    python scripts/soak.py [--minutes 10] [--clients 8] [--max-requests 100000] [--json out.json]

Set-up: a small random-weight Llama 3 (or --model), two workers (a, b) with a cluster key, each behind a
proxy on 127.0.0.1 that the topology names (so master -> a, a -> b (relay) and master -> b all cross a
proxy), and `cake --api` as the master. Each prompt's answer is first taken alone (greedy), then the clients
loop: streamed or whole at random, some leaving mid-stream. Meanwhile, every --kill-every seconds one
worker is killed (SIGKILL) and started again on its port, and every --corrupt-every seconds one proxy
inverts one byte of a frame past the handshake (sealed: the receiver drops that connection; the master
replays). Reported: requests served, answers that differ from their solo answer (must be 0), requests
failed and why, left on purpose, p50/p99 latency, sessions the workers hold after the end (must be 0),
peak RSS of each process. Exit code 1 when a must-be-0 is not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp

from cake import launch
from cake.auth import keygen

PROMPTS = ["Tell me about the sea.", "Why is the sky blue?", "Count to ten.", "Name three colours.",
           "What is a cake?", "Explain relays.", "Write a haiku.", "Say hello."]
HANDSHAKE_BYTES = 1024  # the proxy corrupts only past this many bytes of a connection (frames sealed by then)


class Proxy:
    """127.0.0.1:port -> 127.0.0.1:target; `corrupt()` inverts one byte of the next chunk it passes on any
    connection past HANDSHAKE_BYTES, either way."""

    def __init__(self, target: int):
        self.target, self.pending, self.flips, self.port = target, False, 0, 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def corrupt(self) -> None:
        self.pending = True

    async def _handle(self, creader, cwriter) -> None:
        try:
            sreader, swriter = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            cwriter.close()
            return
        try:
            await asyncio.gather(self._pump(creader, swriter), self._pump(sreader, cwriter), return_exceptions=True)
        except asyncio.CancelledError:  # the soak is over: its loop is closing
            pass

    async def _pump(self, reader, writer) -> None:
        seen = 0
        try:
            while data := await reader.read(1 << 16):
                if self.pending and seen >= HANDSHAKE_BYTES:
                    self.pending = False
                    self.flips += 1
                    i = random.randrange(len(data))
                    data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
                seen += len(data)
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()


def peak_rss_mb(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    m = re.search(r"VmHWM:\s+(\d+) kB", text)
    return int(m.group(1)) / 1024 if m else 0.0


class Soak:
    def __init__(self, args, tmp: Path):
        self.args, self.tmp = args, tmp
        self.key = keygen()
        self.served, self.mismatched, self.left = 0, 0, 0
        self.failed: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.solo: dict[str, str] = {}
        self.kills, self.started = 0, 0
        self.rss: dict[str, float] = {}

    # ---- the cluster ---------------------------------------------------------------------------------

    async def setup(self) -> None:
        if self.args.model:
            self.model = Path(self.args.model)
        else:
            from cake.synthetic import make_model

            self.model = make_model(self.tmp / "model", hidden=64, intermediate=160, layers=6, heads=4,
                                    kv_heads=2, seed=7)
        self.ports = {"a": launch.free_port(), "b": launch.free_port()}
        self.proxies = {n: Proxy(p) for n, p in self.ports.items()}
        for p in self.proxies.values():
            await p.start()
        layout = {"a": ["model.layers.0-2"], "b": ["model.layers.3-5"]}
        self.topology = launch.write_topology(self.tmp / "topology.yml",
                                              {n: (self.proxies[n].port, layout[n]) for n in layout})
        self.workers = {n: self.start_worker(n) for n in self.ports}
        for n in self.ports:
            await asyncio.to_thread(launch.wait_ready, self.ports[n], self.workers[n], 120)
        self.api_port = launch.free_port()
        self.api_log = open(self.tmp / "api.log", "wb")
        self.api = subprocess.Popen([sys.executable, "-m", "cake", "--model", str(self.model), "--topology",
                                     str(self.topology), "--api", f"127.0.0.1:{self.api_port}", "--cluster-key",
                                     self.key, "--retry-timeout", "60", "--temperature", "0"],
                                    stdout=self.api_log, stderr=subprocess.STDOUT)
        await asyncio.to_thread(launch.wait_ready, self.api_port, self.api, 180)
        self.url = f"http://127.0.0.1:{self.api_port}"

    def start_worker(self, name: str) -> subprocess.Popen:
        self.started += 1
        return launch.start_worker(self.model, name, self.topology, self.ports[name], "--device", "cpu",
                                   "--cluster-key", self.key, "-vv",
                                   log=self.tmp / f"worker-{name}-{self.started}.log")

    async def chaos(self, until: float) -> None:
        rng = random.Random(self.args.seed)
        next_kill = time.monotonic() + self.args.kill_every
        next_flip = time.monotonic() + self.args.corrupt_every
        while time.monotonic() < until:
            await asyncio.sleep(0.2)
            now = time.monotonic()
            if self.args.corrupt_every and now >= next_flip:
                rng.choice(list(self.proxies.values())).corrupt()
                next_flip = now + self.args.corrupt_every
            if self.args.kill_every and now >= next_kill:
                name = rng.choice(list(self.workers))
                old = self.workers[name]
                self.rss[f"worker {name} (killed)"] = max(self.rss.get(f"worker {name} (killed)", 0),
                                                          peak_rss_mb(old.pid))
                old.kill()
                await asyncio.to_thread(old.wait)
                self.kills += 1
                self.workers[name] = self.start_worker(name)
                await asyncio.to_thread(launch.wait_ready, self.ports[name], self.workers[name], 120)
                next_kill = time.monotonic() + self.args.kill_every

    # ---- the clients ---------------------------------------------------------------------------------

    def body(self, prompt: str, stream: bool) -> dict:
        return {"model": "any", "prompt": prompt, "max_tokens": self.args.tokens, "temperature": 0,
                "stream": stream}

    async def ask(self, session: aiohttp.ClientSession, prompt: str, stream: bool, leave: bool) -> str | None:
        async with session.post(f"{self.url}/v1/completions", json=self.body(prompt, stream)) as r:
            if r.status != 200:
                error = (await r.json()).get("error", {})
                raise RuntimeError(f"{r.status} {error.get('code') or error.get('type')}: "
                                   f"{error.get('message', '')[:80]}")
            if not stream:
                return (await r.json())["choices"][0]["text"]
            text, events = "", 0
            async for line in r.content:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                events += 1
                if leave and events == 2:
                    return None  # leaving mid-stream: the server must stop and free the session
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"stream error: {chunk['error'].get('message', '')[:80]}")
                text += chunk["choices"][0]["text"]
            return text

    async def client(self, i: int, until: float, budget: list[int]) -> None:
        rng = random.Random(self.args.seed * 1000 + i)
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while time.monotonic() < until and budget[0] > 0:
                budget[0] -= 1
                prompt = rng.choice(PROMPTS)
                stream, leave = rng.random() < 0.5, rng.random() < self.args.leave
                t0 = time.monotonic()
                try:
                    text = await self.ask(session, prompt, stream, leave and stream)
                except (RuntimeError, aiohttp.ClientError, asyncio.TimeoutError) as e:
                    self.failed[re.sub(r"\d+\.\d+\.\d+\.\d+:\d+", "ADDR", str(e) or type(e).__name__)] += 1
                    continue
                if text is None:
                    self.left += 1
                    continue
                self.latencies.append(time.monotonic() - t0)
                self.served += 1
                if text != self.solo[prompt]:
                    self.mismatched += 1
                    print(f"MISMATCH for {prompt!r}: {text!r} != {self.solo[prompt]!r}", file=sys.stderr)

    # ---- the run -------------------------------------------------------------------------------------

    async def run(self) -> dict:
        await self.setup()
        async with aiohttp.ClientSession() as session:
            for prompt in PROMPTS:  # each prompt's answer alone, before anything is broken
                self.solo[prompt] = await self.ask(session, prompt, False, False)
        t0 = time.monotonic()
        until = t0 + 60 * self.args.minutes
        budget = [self.args.max_requests]
        chaos = asyncio.ensure_future(self.chaos(until))
        await asyncio.gather(*(self.client(i, until, budget) for i in range(self.args.clients)))
        chaos.cancel()
        await asyncio.gather(chaos, return_exceptions=True)
        spent = time.monotonic() - t0
        for n, w in self.workers.items():
            self.rss[f"worker {n}"] = peak_rss_mb(w.pid)
        self.rss["api master"] = peak_rss_mb(self.api.pid)
        left = await self.sessions_left()
        self.stop()
        lat = sorted(self.latencies)
        return {
            "seconds": round(spent, 1), "clients": self.args.clients, "kills": self.kills,
            "flips": sum(p.flips for p in self.proxies.values()), "served": self.served,
            "mismatched": self.mismatched, "left_mid_stream": self.left, "failed": dict(self.failed),
            "p50_s": round(statistics.median(lat), 3) if lat else None,
            "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3) if lat else None,
            "sessions_left": left, "peak_rss_mb": {k: round(v) for k, v in self.rss.items()},
        }

    async def sessions_left(self) -> dict[str, int]:
        """Sessions each running worker holds once every request is over: the last 'N held' its log shows
        after the master ended its sessions (waited for, up to 30 s)."""
        deadline = time.monotonic() + 30
        while True:
            held = {}
            for n in self.workers:
                text = (self.tmp / f"worker-{n}-{self._last_log(n)}.log").read_text(errors="replace")
                counts = re.findall(r"; (\d+) held", text)
                held[n] = int(counts[-1]) if counts else 0
            if not any(held.values()) or time.monotonic() > deadline:
                return held
            await asyncio.sleep(0.2)

    def _last_log(self, name: str) -> int:
        logs = sorted(self.tmp.glob(f"worker-{name}-*.log"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
        return int(logs[-1].stem.rsplit("-", 1)[1])

    def stop(self) -> None:
        launch.stop(self.api)
        for w in self.workers.values():
            launch.stop(w)
        for p in self.proxies.values():
            p.server.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-requests", type=int, default=100_000)
    p.add_argument("--tokens", type=int, default=24, help="max tokens per answer")
    p.add_argument("--kill-every", type=float, default=30.0, help="seconds between worker kills (0: none)")
    p.add_argument("--corrupt-every", type=float, default=10.0, help="seconds between corrupted bytes (0: none)")
    p.add_argument("--leave", type=float, default=0.1, help="share of streamed requests left mid-stream")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--model", default=None, help="model folder (default: a small random one, made here)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if not 1 <= args.clients <= 64 or args.minutes <= 0 or args.minutes > 120:
        p.error("--clients must be 1..64 and --minutes in (0, 120]")
    with tempfile.TemporaryDirectory(prefix="cake-soak-") as tmp:
        soak = Soak(args, Path(tmp))
        try:
            report = asyncio.run(soak.run())
        finally:
            for proc in [*getattr(soak, "workers", {}).values(), *([soak.api] if hasattr(soak, "api") else [])]:
                launch.stop(proc)
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    bad = report["mismatched"] or any(report["sessions_left"].values()) or not report["served"]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
