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


def test_a_person_chats_through_the_page(tiny_model, tmp_path):
    import aiohttp

    server = start_server(tiny_model, max_tokens=12, temperature=0.0)
    port = launch.free_port()
    browser = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--remote-debugging-port={port}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        launch.wait_ready(port, browser, timeout=60)

        async def go():
            targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
            url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            async with aiohttp.ClientSession() as http, http.ws_connect(url, max_msg_size=0) as ws:
                page = Page(ws)
                await page.call("Page.navigate", url=server.url + "/")
                await page.wait("document.getElementById('model').textContent.length > 0")
                await page.js("""(() => { const i = document.getElementById('input'); i.value = 'Explain pipelines.';
                    i.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', bubbles: true})); })()""")
                await page.wait("document.querySelector('.meta') !== null")
                return await page.js("""({answer: document.querySelector('.assistant').textContent,
                    meta: document.querySelector('.meta').textContent,
                    errors: document.querySelectorAll('.error').length})""")

        seen = asyncio.run(go())
        whole = server.client().chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Explain pipelines."}], max_tokens=12, temperature=0)
        assert seen["errors"] == 0
        assert seen["answer"] == whole.choices[0].message.content  # streamed into the page, token by token
        assert f"{whole.usage.prompt_tokens} prompt + 12 generated tokens" in seen["meta"]
    finally:
        launch.stop(browser)
        server.stop()
