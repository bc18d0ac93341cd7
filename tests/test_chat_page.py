"""The chat page in a real headless Chromium, driven over the DevTools protocol: a person types a message,
presses Enter, and sees the streamed answer. Runs where Chromium is installed (apt-get install chromium)."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import subprocess
import time
import urllib.request

import pytest

from cake import launch
from test_api import start_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine")


class Page:
    """Just enough of the DevTools protocol: evaluate JavaScript in one page."""

    def __init__(self, ws):
        self.ws, self.ids = ws, itertools.count(1)

    async def call(self, method: str, **params):
        i = next(self.ids)
        await self.ws.send_json({"id": i, "method": method, "params": params})
        while True:
            msg = json.loads((await self.ws.receive()).data)
            if msg.get("id") == i:
                assert "error" not in msg, msg
                return msg["result"]

    async def js(self, expression: str):
        r = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        return r["result"].get("value")

    async def wait(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.js(expression):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}")


class Browser:
    """A headless Chromium on a free port, and the page it shows, driven from a coroutine."""

    def __init__(self, tmp_path):
        self.port = launch.free_port()
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", f"--remote-debugging-port={self.port}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        launch.wait_ready(self.port, self.proc, timeout=60)

    def run(self, url: str, drive):
        """Open `url`, wait for the page to name its model, then `await drive(page)`; its result."""
        import aiohttp

        async def go():
            targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=10).read())
            ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            async with aiohttp.ClientSession() as http, http.ws_connect(ws_url, max_msg_size=0) as ws:
                page = Page(ws)
                await page.call("Page.navigate", url=url)
                await page.wait("document.getElementById('model').textContent.length > 0")
                return await drive(page)

        return asyncio.run(go())

    def stop(self):
        launch.stop(self.proc)


async def type_and_send(page: Page, text: str) -> None:
    await page.js(f"""(() => {{ const i = document.getElementById('input'); i.value = {json.dumps(text)};
        i.dispatchEvent(new KeyboardEvent('keydown', {{key: 'Enter', bubbles: true}})); }})()""")


def test_a_person_chats_through_the_page(tiny_model, tmp_path):
    server = start_server(tiny_model, max_tokens=12, temperature=0.0)
    browser = Browser(tmp_path)
    try:
        async def drive(page):
            await type_and_send(page, "Explain pipelines.")
            await page.wait("document.querySelector('.meta') !== null")
            return await page.js("""({answer: document.querySelector('.assistant').textContent,
                meta: document.querySelector('.meta').textContent,
                errors: document.querySelectorAll('.error').length})""")

        seen = browser.run(server.url + "/", drive)
        whole = server.client().chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Explain pipelines."}], max_tokens=12, temperature=0)
        assert seen["errors"] == 0
        assert seen["answer"] == whole.choices[0].message.content  # streamed into the page, token by token
        assert f"{whole.usage.prompt_tokens} prompt + 12 generated tokens" in seen["meta"]
    finally:
        browser.stop()
        server.stop()


def test_a_conversation_past_the_context_says_so_and_new_chat_starts_over(tiny_model, tmp_path):
    """Turns that no longer fit the context give one clear error and stay out of the conversation;
    New chat clears it, and the next message is answered."""
    server = start_server(tiny_model, max_tokens=30, temperature=0.0, context=80)
    browser = Browser(tmp_path)
    try:
        async def drive(page):
            answered = 0
            for turn in range(4):  # the third or fourth turn overflows 80 tokens
                await type_and_send(page, f"Turn {turn}: tell me more about pipelines.")
                await page.wait(f"document.querySelectorAll('.meta').length > {answered} || "
                                f"document.querySelectorAll('.error').length > 0")
                if await page.js("document.querySelectorAll('.error').length > 0"):
                    break
                answered += 1
            await page.wait("document.getElementById('send').textContent === 'Send'")
            failed = await page.js("""({error: document.querySelector('.error').textContent,
                history: history.length, empty: document.querySelectorAll('.assistant:empty').length})""")
            await page.js("document.getElementById('new').click()")
            cleared = await page.js("({log: document.getElementById('log').children.length, history: history.length})")
            await type_and_send(page, "Explain pipelines.")
            await page.wait("document.querySelector('.meta') !== null || document.querySelector('.error') !== null")
            after = await page.js("({errors: document.querySelectorAll('.error').length, history: history.length})")
            return answered, failed, cleared, after

        answered, failed, cleared, after = browser.run(server.url + "/", drive)
        assert answered >= 1
        assert failed == {"error": "This conversation no longer fits the model's context: press New chat to start "
                                   "over.", "history": 2 * answered, "empty": 0}
        assert cleared == {"log": 0, "history": 0}
        assert after == {"errors": 0, "history": 2}
    finally:
        browser.stop()
        server.stop()
