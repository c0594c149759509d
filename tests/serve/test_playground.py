"""The playground page: one self-contained file (no external assets: the machines are offline), and, in
headless Chromium driven by Selenium, a prompt typed and sent comes back as streamed text equal to the
API's answer, in chat and in completion mode."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from html.parser import HTMLParser

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ELEMENTS = {"transcript", "prompt", "send", "stop", "mode", "temperature", "top_p", "max_tokens", "seed", "api_key"}
SAMPLING = {"temperature": 1.0, "top_p": 0.95, "seed": 11}  # set in the page, sent to the API for the oracle


class Resources(HTMLParser):
    """Collects element ids and every URL the page would load (scripts, styles, images, frames)."""

    def __init__(self) -> None:
        super().__init__()
        self.ids, self.loads, self.inline_scripts = set(), [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        for name in ("src", "href", "data"):
            if attrs.get(name) and not (tag == "a" and name == "href"):
                self.loads.append(attrs[name])
        self.inline_scripts += tag == "script" and "src" not in attrs


@pytest.fixture(scope="module")
def server(start_server, checkpoint):
    server = start_server([str(checkpoint), "--concurrency", "2"])
    yield server
    server.stop()


def test_playground_is_one_self_contained_page(server):
    status, html = server.get("/")
    assert status == 200 and html.startswith("<!doctype html>")
    page = Resources()
    page.feed(html)
    assert page.loads == [] and page.inline_scripts == 1
    assert page.ids >= ELEMENTS
    for external in ("http://", "https://", "//cdn", "@import", "url("):
        assert external not in html.replace(server.url, ""), external
    assert "getReader()" in html and "[DONE]" in html  # streams with fetch + ReadableStream


def chromium_or_skip() -> None:
    """Install Debian's chromium and chromium-driver when missing and we are root with apt; else skip."""
    if os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(
            f"{CHROMIUM} / {CHROMEDRIVER} missing and not root with apt-get to install chromium chromium-driver"
        )
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium", "chromium-driver"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            pytest.skip(f"could not install chromium from the Debian archive: {result.stderr.strip()[-300:]}")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium_or_skip()
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers online
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def wait_for(condition, seconds: float = 60.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {seconds} s")


def send_from_page(browser, mode: str, prompt: str, max_tokens: int) -> tuple[str, int]:
    """Type `prompt` in the page, click Send; (final text of the reply, number of times it grew)."""
    by = pytest.importorskip("selenium.webdriver.common.by").By
    browser.execute_script(
        "const set = (id, v) => { const e = document.getElementById(id); e.value = v;"
        " e.dispatchEvent(new Event('input')); e.dispatchEvent(new Event('change')); };"
        "set('mode', arguments[0]); set('max_tokens', String(arguments[1]));"
        "set('temperature', String(arguments[2].temperature)); set('top_p', String(arguments[2].top_p));"
        "set('seed', String(arguments[2].seed));"
        "window.__growth = 0;"  # count every change of the reply's text: streaming shows it grow step by step
        "new MutationObserver((records) => { window.__growth += records.length; })"
        ".observe(document.getElementById('transcript'), {childList: true, subtree: true, characterData: true});",
        mode,
        max_tokens,
        SAMPLING,
    )
    browser.find_element(by.ID, "prompt").send_keys(prompt)
    browser.find_element(by.ID, "send").click()
    wait_for(lambda: browser.execute_script("return document.getElementById('transcript').dataset.state === 'done'"))
    texts = browser.execute_script(
        "return [...document.querySelectorAll('#transcript .msg .text')].map(e => e.textContent)"
    )
    assert "error" not in browser.execute_script(
        "return [...document.querySelectorAll('#transcript .msg')].map(e => e.className).join(' ')"
    )
    return texts[-1], browser.execute_script("return window.__growth")


@pytest.mark.slow
def test_playground_streams_chat_and_completion_in_headless_chromium(server, browser):
    browser.get(server.url + "/")
    wait_for(lambda: browser.execute_script("return document.getElementById('model-name').textContent") == "tiny-chat")

    question = "What does the trainer do?"
    reply, growth = send_from_page(browser, "chat", question, 24)
    status, body = server.post(
        "/v1/chat/completions",
        {"model": "tiny-chat", "messages": [{"role": "user", "content": question}], "max_tokens": 24, **SAMPLING},
    )
    assert status == 200 and reply == body["choices"][0]["message"]["content"] and reply.strip()
    assert growth > 3  # the reply arrived in pieces

    prompt = "Serving a model"
    text, growth = send_from_page(browser, "completion", prompt, 16)
    status, body = server.post(
        "/v1/completions", {"model": "tiny-chat", "prompt": prompt, "max_tokens": 16, **SAMPLING}
    )
    assert status == 200 and text == prompt + body["choices"][0]["text"] and text != prompt
    assert growth > 3
