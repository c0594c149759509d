"""Chat messages -> prompt text -> token ids, for the API's chat endpoint and the terminal chat.

A tokenizer with a chat template renders the conversation the way the model was trained to read it
(`apply_chat_template(messages, add_generation_prompt=True)`, Hugging Face's convention); the rendered text
already holds its special tokens, so it is encoded without adding more. A tokenizer without one (a preset
with random weights, a base model) gets a plain transcript instead:

    System: You are terse.
    User: Hello
    Assistant:

and generation also stops at "\\nUser:", where such a model would start writing the user's next turn.
"""

from __future__ import annotations

from collections.abc import Sequence

PLAIN_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}
PLAIN_STOPS = ("\nUser:",)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) and callable(getattr(tokenizer, "apply_chat_template", None))


def render_chat(tokenizer, messages: Sequence[dict[str, str]]) -> tuple[str, bool, list[str]]:
    """(prompt text, whether it came from the tokenizer's template, stop strings the format needs)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True), True, []
    lines = [f"{PLAIN_ROLES.get(m['role'], m['role'].title())}: {m['content']}" for m in messages]
    return "\n".join([*lines, "Assistant:"]), False, list(PLAIN_STOPS)


def encode(tokenizer, text: str, templated: bool = False) -> list[int]:
    """Token ids of `text`; a rendered chat template is encoded without adding special tokens again."""
    ids = tokenizer.encode(text, add_special_tokens=False) if templated else tokenizer.encode(text)
    return list(getattr(ids, "ids", ids))
