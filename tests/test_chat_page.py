"""The chat page in a real headless Chromium driven by Selenium: a person types a message, presses Enter,
sees the streamed answer with its speed, hovers a token for its log-probabilities, sets max tokens and
stops an answer."""

from __future__ import annotations

import json
import re

import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By

from conftest import screenshot, wait_js
from test_api import MESSAGES, start_server


@pytest.fixture(scope="module")
def chat_server(peaked_model):
    s = start_server(peaked_model, max_tokens=12, temperature=0.0)
    yield s
    s.stop()


def open_page(browser, url: str) -> None:
    browser.get(url)
    wait_js(browser, "document.getElementById('model').textContent.length > 0")


def type_and_send(browser, text: str) -> None:
    browser.execute_script(f"""const i = document.getElementById('input'); i.value = {json.dumps(text)};
        i.dispatchEvent(new KeyboardEvent('keydown', {{key: 'Enter', bubbles: true}}));""")


def quoted(token: str) -> str:
    """A token's name as the page shows it (JSON.stringify)."""
    return json.dumps(token, ensure_ascii=False)


def test_a_person_chats_through_the_page(chat_server, browser, tmp_path):
    open_page(browser, chat_server.url + "/")
    type_and_send(browser, "Explain pipelines.")
    meta = wait_js(browser, "document.querySelector('.meta') && document.querySelector('.meta').textContent")
    seen = browser.execute_script("""return {answer: document.querySelector('.assistant').textContent,
        errors: document.querySelectorAll('.error').length}""")
    whole = chat_server.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Explain pipelines."}], max_tokens=12, temperature=0,
        logprobs=True, top_logprobs=5)
    assert seen["errors"] == 0
    assert seen["answer"] == whole.choices[0].message.content  # streamed into the page, token by token
    assert f"{whole.usage.prompt_tokens} prompt + 12 generated tokens" in meta
    ttft, speed = re.search(r"time to first token (\d+) ms · ([\d.]+) tokens/s", meta).groups()
    assert int(ttft) >= 0 and float(speed) > 0

    # hovering the first token shows its log-probability and the most likely tokens there, as the API has them
    first = whole.choices[0].logprobs.content[0]
    ActionChains(browser).move_to_element(browser.find_element(By.CSS_SELECTOR, ".assistant .tok")).perform()
    head = wait_js(browser, "!document.getElementById('tip').hidden && document.querySelector('#tip .head').textContent")
    assert head.startswith(f"{quoted(first.token)} · logprob {first.logprob:.3f} (")
    rows = browser.execute_script(
        "return [...document.querySelectorAll('#tip tr')].map(r => [...r.cells].slice(0, 2).map(c => c.textContent))")
    assert rows == [[quoted(t.token), f"{t.logprob:.3f}"] for t in first.top_logprobs]
    assert len(rows) == 5
    screenshot(browser, "chat.png", tmp_path)


def test_max_tokens_and_the_stop_button(chat_server, browser):
    open_page(browser, chat_server.url + "/")
    browser.find_element(By.ID, "max-tokens").send_keys("5")
    type_and_send(browser, "Explain pipelines.")
    meta = wait_js(browser, "document.querySelector('.meta') && document.querySelector('.meta').textContent")
    assert "+ 5 generated tokens" in meta

    # long enough that finishing it, rather than stopping, would take many seconds
    browser.execute_script("document.getElementById('max-tokens').value = '3000'")
    type_and_send(browser, MESSAGES[1]["content"])
    wait_js(browser, "document.querySelectorAll('.assistant')[1].textContent.length > 0")
    assert browser.find_element(By.ID, "send").get_attribute("disabled")
    browser.find_element(By.ID, "stop").click()
    meta = wait_js(browser, "document.querySelectorAll('.meta').length === 2 && "
                            "document.querySelectorAll('.meta')[1].textContent")
    generated = int(re.search(r"(\d+) generated tokens", meta).group(1))
    assert meta.endswith("stopped") and 0 < generated < 3000
    assert browser.find_element(By.ID, "stop").get_attribute("disabled")
    assert not browser.find_element(By.ID, "send").get_attribute("disabled")
    assert browser.execute_script("return history.length") == 4  # the stopped answer stays in the conversation


def test_a_conversation_past_the_context_says_so_and_new_chat_starts_over(tiny_model, browser):
    """Turns that no longer fit the context give one clear error and stay out of the conversation;
    New chat clears it, and the next message is answered."""
    server = start_server(tiny_model, max_tokens=30, temperature=0.0, context=80)
    try:
        open_page(browser, server.url + "/")
        answered = 0
        for turn in range(4):  # the third or fourth turn overflows 80 tokens
            type_and_send(browser, f"Turn {turn}: tell me more about pipelines.")
            wait_js(browser, f"document.querySelectorAll('.meta').length > {answered} || "
                             f"document.querySelectorAll('.error').length > 0")
            if browser.execute_script("return document.querySelectorAll('.error').length > 0"):
                break
            answered += 1
        wait_js(browser, "!document.getElementById('send').disabled")
        failed = browser.execute_script("""return {error: document.querySelector('.error').textContent,
            history: history.length, empty: document.querySelectorAll('.assistant:empty').length}""")
        browser.find_element(By.ID, "new").click()
        cleared = browser.execute_script(
            "return {log: document.getElementById('log').children.length, history: history.length}")
        type_and_send(browser, "Explain pipelines.")
        wait_js(browser, "document.querySelector('.meta') !== null || document.querySelector('.error') !== null")
        after = browser.execute_script(
            "return {errors: document.querySelectorAll('.error').length, history: history.length}")
        assert answered >= 1
        assert failed == {"error": "This conversation no longer fits the model's context: press New chat to start "
                                   "over.", "history": 2 * answered, "empty": 0}
        assert cleared == {"log": 0, "history": 0}
        assert after == {"errors": 0, "history": 2}
    finally:
        server.stop()
