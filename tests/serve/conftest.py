"""Shared fixtures for the serving tests: a chat tokenizer trained here, a small GPT checkpoint with a long
context saved with it, and `lmforge serve` subprocesses on 127.0.0.1 (port 0: the server picks a free port
and prints it)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.data.tokenizers.tokenizer import Tokenizer
from lmforge.hf.save import save_model
from lmforge.models import build_model

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
START_TIMEOUT = 90.0  # seconds for a server to load its model and answer /health


def train_chat_tokenizer() -> Tokenizer:
    """A 512-id byte-level BPE trained on 100,000 characters of the catalog's Shakespeare (a fixed text: a corpus
    that edits change, such as the README, would change the ids and every sampled reply), with ChatML special
    tokens and template."""
    from lmforge.data import load_dataset

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = load_dataset("shakespeare-small", "train")[0][:100_000]
    backend.train_from_iterator(text.splitlines(), trainer)
    special = {"bos": "<|endoftext|>", "eos": "<|im_end|>", "pad": "<|endoftext|>"}
    return Tokenizer(backend, special, chat_template=CHATML)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A 2-layer GPT (random weights, seed 0) with a 4096-token context, saved with its chat tokenizer in
    lmforge's format: long generations take seconds, short ones milliseconds."""
    torch.manual_seed(0)
    model = build_model("gpt-tiny", vocab_size=512, n_layer=2, max_seq_len=4096)
    return save_model(model, tmp_path_factory.mktemp("serve") / "tiny-chat", tokenizer=train_chat_tokenizer())


@pytest.fixture(scope="session")
def long_checkpoint(tmp_path_factory) -> Path:
    """The same model with a 16,384-token context, for tests that need a request which cannot finish before a
    short deadline: 16,000 tokens take ~20 s to decode on one core, 10x any timeout those tests set, where
    4,000 tokens of the 4096-context model take ~1.3 s, too close to a 2 s deadline on a fast machine."""
    torch.manual_seed(0)
    model = build_model("gpt-tiny", vocab_size=512, n_layer=2, max_seq_len=16384)
    return save_model(model, tmp_path_factory.mktemp("serve-long") / "tiny-chat", tokenizer=train_chat_tokenizer())


@pytest.fixture(scope="session")
def variant(checkpoint, tmp_path_factory):
    """variant(chat_template=..., generation_config=...) -> a copy of `checkpoint` (same folder name, so the
    same served name) with that chat_template in its tokenizer_config.json and/or a generation_config.json."""

    def make(chat_template=None, generation_config: dict | None = None) -> Path:
        folder = shutil.copytree(checkpoint, tmp_path_factory.mktemp("variant") / checkpoint.name)
        if chat_template is not None:
            config = json.loads((folder / "tokenizer_config.json").read_text())
            (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": chat_template}))
        if generation_config is not None:
            (folder / "generation_config.json").write_text(json.dumps(generation_config))
        return folder

    return make


class Server:
    """A running `lmforge serve` subprocess; its stderr is collected in `log`."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, log_level: str = "warning") -> None:
        command = [sys.executable, "-m", "lmforge", "serve", *args, "--port", "0", "--log-level", log_level]
        self.process = subprocess.Popen(
            command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env={**os.environ, **(env or {})}
        )
        self.log: list[str] = []
        self.port: int | None = None
        started = threading.Event()

        def read() -> None:
            for line in self.process.stderr:
                self.log.append(line)
                found = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
                if found and self.port is None:
                    self.port = int(found.group(1))
                    started.set()
            started.set()

        threading.Thread(target=read, daemon=True).start()
        if not started.wait(START_TIMEOUT) or self.port is None:
            self.stop()
            raise RuntimeError(f"lmforge serve did not start: {''.join(self.log)[-2000:]}")
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"lmforge serve never answered /health: {''.join(self.log)[-2000:]}")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """(status, parsed JSON or text) of one HTTP request; errors are returned, not raised."""
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=60) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        try:
            return status, json.loads(raw)
        except json.JSONDecodeError:
            return status, raw.decode()

    def get(self, path: str, headers: dict | None = None):
        return self.request("GET", path, headers=headers)

    def post(self, path: str, payload, headers: dict | None = None):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        return self.process.returncode


@pytest.fixture(scope="session")
def start_server():
    """start_server(args, env, log_level) -> a running Server; every server still running is stopped at the end."""
    servers: list[Server] = []

    def start(args: list[str], env: dict[str, str] | None = None, log_level: str = "warning") -> Server:
        servers.append(Server(args, env, log_level))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()
