"""Request and response bodies of the OpenAI-compatible API, as Pydantic models.

The shapes follow OpenAI's API reference (Completions, Chat Completions, Models, and the error object
`{"error": {"message", "type", "param", "code"}}`), so the official clients parse them. Field checks that
do not depend on the server's settings live here (types, ranges); limits set on the command line
(`--max-tokens-limit`, `--max-prompt-tokens`, the model's context) are checked by the app.

Types are strict, as OpenAI's own server checks them: `true` is not a number of tokens, `"0.5"` is not a
temperature and `"yes"` is not a boolean (Pydantic's default lax mode would convert each); an integer is
a valid float. Every string must be valid Unicode: JSON can spell a lone surrogate (`"\\ud800"`), which no
tokenizer can encode and no UTF-8 reply can echo.

Sampling fields a request leaves out (None here) take the server's defaults: its flags, else the model's
recorded generation defaults, else OpenAI's (`lmforge.generate.defaults`).

Log-probabilities (`logprobs` and `top_logprobs` in chat, the integer `logprobs` in completions) are those of
the model's own distribution, before temperature, truncation and penalties, as OpenAI and vLLM report them
(`lmforge.generate.batching.SequenceSampler` says why).

Extensions beyond OpenAI's fields, named as vLLM names them: `top_k`, `min_p`, `repetition_penalty`,
`ignore_eos` (generate exactly max_tokens tokens, e.g. for benchmarks).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator
from pydantic_core import PydanticCustomError

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_PROMPTS = 16  # prompts in one completions request
MAX_CHOICES = 8  # n
MAX_COMPLETION_LOGPROBS = 5  # alternatives per token in /v1/completions: OpenAI's limit
MAX_TOP_LOGPROBS = 20  # alternatives per token in /v1/chat/completions: OpenAI's limit


def valid_unicode(text: str) -> str:
    """`text` if it encodes as UTF-8; a lone surrogate (U+D800-U+DFFF) does not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        code, at = ord(text[error.start]), error.start
        message = f"contains invalid Unicode (a lone surrogate, U+{code:04X}, at character {at}); send valid UTF-8 text"
        raise PydanticCustomError("invalid_unicode", message) from None
    return text


Text = Annotated[str, Field(strict=True), AfterValidator(valid_unicode)]


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class SamplingFields(BaseModel):
    """What both endpoints share. Unknown fields are ignored, as OpenAI's own server does for new client
    versions; fields it has that we do not implement are rejected where silently ignoring them would mislead."""

    model_config = ConfigDict(extra="ignore")

    model: Text = Field(min_length=1)
    temperature: StrictFloat | None = Field(None, ge=0.0, le=2.0)
    top_p: StrictFloat | None = Field(None, gt=0.0, le=1.0)
    n: StrictInt = Field(1, ge=1, le=MAX_CHOICES)
    best_of: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = Field(None, validate_default=True)
    seed: StrictInt | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes
    frequency_penalty: StrictFloat = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: StrictFloat = Field(0.0, ge=-2.0, le=2.0)
    user: Text | None = None
    top_k: StrictInt | None = Field(None, ge=0)
    min_p: StrictFloat | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: StrictFloat | None = Field(None, gt=0.0)
    ignore_eos: StrictBool = False

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stops)}")
        return [s for s in stops if s]

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None, info) -> None:
        """best_of = k asks for the n most likely of k samples, a ranking of whole samples the server does not
        do; best_of = n (every sample returned) is what the server does anyway."""
        if value is not None and value != info.data.get("n", 1):
            raise ValueError(
                f"best_of={value} is not supported by this server (it returns every one of n samples); "
                "leave best_of unset or equal to n"
            )
        return None

    def logprob_alternatives(self) -> int | None:
        """None when the request asks for no log-probabilities, else how many alternatives to report per
        token besides the chosen one (each endpoint spells the request differently)."""
        return None


class CompletionRequest(SamplingFields):
    """POST /v1/completions. Without max_tokens: the model's recorded max_new_tokens, else 16 (OpenAI's
    default). logprobs is an integer here (how many alternatives per token, 0 to 5), as in OpenAI's API; echo
    with logprobs would need the prompt's log-probabilities, which the server does not compute."""

    prompt: Text | list[Text]
    max_tokens: StrictInt | None = Field(None, ge=1)
    echo: StrictBool = False
    suffix: Text | None = None
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not 1 <= len(value) <= MAX_PROMPTS:
            raise ValueError(f"prompt must be a string or a list of 1 to {MAX_PROMPTS} strings, got {len(value)}")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> None:
        if value:
            raise ValueError("suffix (insertion) is not supported by this server; leave it unset")
        return None

    @field_validator("logprobs")
    @classmethod
    def _no_echoed_logprobs(cls, value: int | None, info) -> int | None:
        if value is not None and info.data.get("echo"):
            raise ValueError(
                "logprobs with echo=true would need the prompt's log-probabilities, which this server does not "
                "compute; leave echo or logprobs unset"
            )
        return value

    def logprob_alternatives(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions. Without max_tokens (or max_completion_tokens, its newer name) the reply may
    fill the model's context (or the model's recorded max_new_tokens), up to the server's --max-tokens-limit.
    logprobs is a boolean here, top_logprobs (0 to 20 alternatives per token) its integer companion, which needs
    logprobs=true, as in OpenAI's API."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError(
                f"top_logprobs={value} needs logprobs=true; set logprobs to true or leave top_logprobs unset"
            )
        return value

    def logprob_alternatives(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# --- responses -------------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """Per returned token (OpenAI's legacy shape): its text, log-probability, {text: log-probability} of the
    most likely tokens and the chosen one, and the character offset of its text in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    """A token's text, log-probability and the UTF-8 bytes of its text (which clients join to rebuild text
    split inside a character)."""

    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobs(TopLogprob):
    """A returned token and the most likely tokens at its step, most likely first."""

    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobs] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatChunkChoice(BaseModel):
    """delta: {"role": "assistant", "content": ""} first, then {"content": "..."}, and {} with the finish."""

    index: int
    delta: dict[str, str]
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lmforge"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
