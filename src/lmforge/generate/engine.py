"""The decoding loop: prompt in, new tokens out, one token per row per step, reusing a KV cache.

Autoregressive decoding factorises p(y | x) = prod_t p(y_t | x, y_<t). The prompt is run once ("prefill"),
which fills the KV cache with its keys and values; each later step feeds only the newest token, whose query
attends to the cached keys, so a step costs O(layers * (weights + context)) instead of re-running the whole
sequence. The cache is a `StaticKVCache`: buffers sized for prompt + max_new_tokens, written in place.

Batches are LEFT-padded: every row's last prompt token sits in the last column, so all rows append their
new token at the same index. The attention mask (1 = real token) covers cached and new positions; the
models derive positions from it, so a padded row's tokens get the same positions as when it runs alone.
Each row stops on its own, at an end-of-sequence token or when its text contains a stop string; a stopped
row keeps receiving the pad token until every row is done or max_new_tokens is reached.

Encoder-decoder models (T5, the Transformer) encode the source once; the decoder starts from its start
token and caches its self-attention and the cross-attention keys/values of the encoder output.

`stream` holds the loop and yields each step's tokens (and text deltas when given a tokenizer);
`generate` collects them. Beam search (`num_beams > 1`) keeps the K highest-scoring partial sequences
per row instead of one; it has its own loop in `beam_search`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.generate.compiled import CompiledDecoder, bucket_length, resolve_compile
from lmforge.generate.sampling import SamplingParams, choose_next_token, process_logits
from lmforge.nn.attention import Attention, StaticKVCache
from lmforge.nn.kernels import kernel_fast
from lmforge.nn.quant import (
    MATVEC_MAX_ROWS,
    Int4Linear,
    MatvecLinear,
    PackedLinear,
    QuantizedLinear,
    has_packed_bf16_kernel,
)


@dataclass
class StreamChunk:
    """One decoding step. token_ids (B,): each row's new token, the pad id for rows already finished.
    text_deltas: each row's newly final text (with a tokenizer; held back while a multi-byte character or a
    possible stop string is incomplete). finish_reasons: None while a row runs, then "stop" (EOS or stop
    string) or "length" (max_new_tokens reached)."""

    token_ids: torch.Tensor
    text_deltas: list[str] | None
    finish_reasons: list[str | None]


@dataclass
class GenerationOutput:
    """tokens (B, N): the new tokens, pad after a row's end (an EOS that ended a row is kept);
    finish_reasons: "stop" or "length" per row; texts: the decoded new text per row, cut before any
    stop string (with a tokenizer); scores: beam search's length-normalised log-probability per row."""

    tokens: torch.Tensor
    finish_reasons: list[str]
    texts: list[str] | None = None
    scores: torch.Tensor | None = None


class _IncrementalText:
    """Turns one row's token ids into text deltas that never need taking back.

    A token may complete a character begun by an earlier one (byte-level tokenizers split multi-byte UTF-8
    characters across tokens), and some decoders render a token differently at the start of a text (a
    SentencePiece word marker loses its space). So each push decodes a short window, the ids from `prefix` on,
    and appends what it adds to the decode of the ids before `read` (the window's already-appended part); the
    window then moves on. It opens on a token that decodes to text (a skipped special token or a lone space
    would be decoded differently at the start). That is O(new tokens) per step where decoding all ids would
    make a sequence quadratic (the incremental detokenizer of vLLM and TGI). While the window ends in U+FFFD,
    the decoder's mark for an incomplete byte sequence, nothing is appended. Text is released up to the
    longest suffix that could begin a stop string; a stop string ends the row, and the text is cut before it.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str]) -> None:
        self.tokenizer, self.stop_strings = tokenizer, [s for s in stop_strings if s]
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.text, self.released, self.stopped = "", 0, False

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        self._append_window(complete_only=True)
        hits = [i for i in (self.text.find(s, self.released) for s in self.stop_strings) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            return self._release(len(self.text))
        final = len(self.text)
        for stop in self.stop_strings:
            for n in range(min(len(stop) - 1, final - self.released), 0, -1):
                if self.text[final - n : final] == stop[:n]:
                    final -= n
                    break
        return self._release(final)

    def flush(self) -> str:
        if not self.stopped:
            self._append_window(complete_only=False)  # an incomplete character at the end stays U+FFFD
        return self._release(len(self.text))

    def _append_window(self, complete_only: bool) -> None:
        if self.read == len(self.ids):
            return
        done = self.tokenizer.decode(self.ids[self.prefix : self.read])
        while not done and self.prefix > 0:  # a window must open on text, not on a skipped or stripped token
            self.prefix -= 1
            done = self.tokenizer.decode(self.ids[self.prefix : self.read])
        window = self.tokenizer.decode(self.ids[self.prefix :])
        if complete_only and window.endswith("\ufffd"):
            return
        self.text += window[len(done) :]
        self.prefix, self.read = self.read, len(self.ids)

    def _release(self, end: int) -> str:
        delta = self.text[self.released : end] if end > self.released else ""
        self.released = max(self.released, end)
        return delta


class _Runner:
    """One interface over decoder-only and encoder-decoder models: `start` runs the prompt, `step` feeds
    one token per row, `reorder` selects rows (beam search). Both return fp32 next-token logits (B, V)."""

    def __init__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        max_new_tokens: int,
        compile: bool | str = False,
    ) -> None:
        config = model.config
        if config.head not in ("causal_lm", "seq2seq_lm"):
            raise ValueError(
                f"model head {config.head!r} cannot generate text; build it with head='causal_lm' (decoders) "
                f"or 'seq2seq_lm' (encoder-decoders)"
            )
        self.model, self.input_ids = model, input_ids
        self.encoder_decoder = config.head == "seq2seq_lm"
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: the models' fast path needs no mask at all
        self.source_mask = attention_mask
        B, T = input_ids.shape
        limit = getattr(config, "max_seq_len", None)
        needed = max_new_tokens if self.encoder_decoder else T + max_new_tokens - 1
        if limit is not None and needed > limit:
            raise ValueError(
                f"{'' if self.encoder_decoder else f'a prompt of {T} tokens + '}{max_new_tokens} new tokens needs "
                f"{needed} positions but the model's max_seq_len is {limit}; shorten the prompt or lower max_new_tokens"
            )
        if self.encoder_decoder:
            self.cache = StaticKVCache(1 + max_new_tokens)
            self.mask = None
        else:
            self.cache = StaticKVCache(T + max_new_tokens)
            self.mask = None
            if attention_mask is not None:  # the mask of prompt + new tokens, read as a growing prefix
                self.mask = torch.ones(B, T + max_new_tokens, dtype=attention_mask.dtype, device=input_ids.device)
                self.mask[:, :T] = attention_mask
        self.length = T
        self.keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.compiled = None
        if resolve_compile(model, compile, max_new_tokens):
            length = bucket_length(needed, limit)  # the last new token is never fed back: T + max_new_tokens - 1
            self.compiled = CompiledDecoder(model, input_ids, attention_mask, length, fall_back=compile == "auto")

    def start(self) -> torch.Tensor:
        if self.compiled is not None:
            return self.compiled.prefill()
        if self.encoder_decoder:
            config = self.model.config
            self.encoder_outputs = self.model.encode(self.input_ids, self.source_mask)
            start_id = getattr(config, "decoder_start_token_id", getattr(config, "bos_token_id", 0))
            start = torch.full((self.input_ids.shape[0], 1), start_id, device=self.input_ids.device)
            return self._decoder_logits(start)
        return self._decoder_logits(self.input_ids)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.length += 1
        if self.compiled is not None:
            return self.compiled.step(tokens)
        return self._decoder_logits(tokens[:, None])

    def _decoder_logits(self, ids: torch.Tensor) -> torch.Tensor:
        if self.encoder_decoder:
            out = self.model(
                attention_mask=self.source_mask,
                decoder_input_ids=ids,
                encoder_outputs=self.encoder_outputs,
                past_key_values=self.cache,
                use_cache=True,
            )
        else:
            mask = None if self.mask is None else self.mask[:, : self.length]
            extra = {"logits_to_keep": 1} if self.keep_last else {}
            out = self.model(ids, attention_mask=mask, past_key_values=self.cache, use_cache=True, **extra)
        return out.logits[:, -1].float()

    def close(self) -> None:
        if self.compiled is not None:
            self.compiled.close()

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder(index)
        if self.mask is not None:
            self.mask = self.mask.index_select(0, index)
        if self.source_mask is not None:
            self.source_mask = self.source_mask.index_select(0, index)
        if self.encoder_decoder:
            self.encoder_outputs = self.encoder_outputs.index_select(0, index)


def _matvec_fast(linear: nn.Linear, rows: int) -> bool:
    """Whether `linear` decodes faster as a MatvecLinear. bf16 steps of more rows than the matvec kernel takes
    run on its pair-interleaved copy; a CPU without one (AVX2, no AVX512-BF16) serves them better from oneDNN's
    packed layout (`PackedLinear`) than from F.linear, so such a server keeps that."""
    if linear.weight.dtype == torch.float32:
        return kernel_fast("fp32")
    many = rows > MATVEC_MAX_ROWS[torch.bfloat16] and has_packed_bf16_kernel() and not kernel_fast("pairs")
    return kernel_fast("bf16") and not many


def prepare_for_decoding(model: nn.Module, rows: int = 1) -> nn.Module:
    """Lay out the Linear weights of a CPU model for fast decoding, in place; returns the model. `rows`: the
    most rows a decoding step will feed it (a server's concurrency; 1 for `generate`).

    Decoding one token per row makes every Linear a matrix-vector product y = W x + b that reads W once and
    does 2 flops per weight, so its speed is the speed at which the kernel streams W from memory.

    Where lmforge's kernels build (`lmforge.nn.kernels`: a C++ compiler, and a CPU with AVX2 and FMA or
    AVX-512, `kernel_fast`), each fp32 or bf16 Linear becomes a
    `MatvecLinear`: the same Parameters (state_dict, ties and dtype kept), its decoding products in lmforge's
    `matvec` kernel, which streams the weight at 25-30 GB/s where MKL and oneDNN reach 10-22 (2 threads).
    With more `rows` than that kernel takes (`MATVEC_MAX_ROWS`), bf16 layers also keep a pair-interleaved copy
    of their weight for those compute-bound steps on AVX512-BF16 (`MatvecLinear.pack`, `pairs_linear`: twice
    the weights' memory). int4 (`Int4Linear`) and int8 (`QuantizedLinear`) layers decode in lmforge's own
    kernels too (`use_matvec_kernel`), and so does fp32 and bf16 self-attention at a decoding step
    (`Attention.decode_kernel`).

    Without the kernels: bf16 Linears become `PackedLinear`s (oneDNN's blocked layout, same results, ~1.5-2x
    faster than `F.linear`; those weights leave the state_dict, and a tied output projection gets its own packed
    copy). fp32 ones with out >= in turn column-major: MKL's kernel reads W^T (in, out) contiguous (y = x W^T as
    a sum of W^T's rows scaled by x_j) at 17-22 GB/s against 11-13 GB/s row-major; for out < in (the MLP's down
    projection) row-major is the faster one (PyTorch 2.13, GPT-2 shapes). Only strides change: values, shapes
    and `state_dict` stay. A tied input embedding turns column-major with it.

    Prepare a model that will only run inference, once, after loading it. GPU models are left as they are.
    """
    if isinstance(model, Attention) and all(t.device.type == "cpu" for t in (*model.parameters(), *model.buffers())):
        model.decode_kernel = kernel_fast("attention")
    for name, child in list(model.named_children()):
        if isinstance(child, (Int4Linear, QuantizedLinear)):
            child.use_matvec_kernel()
        elif not isinstance(child, nn.Linear) or child.weight.device.type != "cpu":
            prepare_for_decoding(child, rows)
        elif child.weight.dtype in MATVEC_MAX_ROWS and (isinstance(child, MatvecLinear) or _matvec_fast(child, rows)):
            if not isinstance(child, MatvecLinear):
                if not child.weight.is_contiguous():  # a layer prepared before the kernels: back to row-major
                    with torch.no_grad():
                        child.weight.data = child.weight.data.contiguous()
                setattr(model, name, child := MatvecLinear(child))
            if rows > MATVEC_MAX_ROWS[child.weight.dtype]:
                child.pack()
        elif child.weight.dtype == torch.bfloat16 and has_packed_bf16_kernel():
            setattr(model, name, PackedLinear(child))
        elif child.weight.dtype == torch.float32 and child.out_features >= child.in_features:
            weight = child.weight
            if not weight.t().is_contiguous():
                with torch.no_grad():
                    weight.data = weight.data.t().contiguous().t()  # the same (out, in) tensor, strides (1, out)
    return model


_SAMPLING_DEFAULTS = {**vars(SamplingParams()), "stop_strings": ()}


def encode_prompts(tokenizer, prompts: Sequence[str], chat: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> left-padded input_ids (B, T) and attention_mask (B, T), ready for `generate`.

    chat=True wraps each prompt as a user message in the tokenizer's chat template
    (`apply_chat_template(messages, add_generation_prompt=True, tokenize=False)`, the Hugging Face API).
    """
    if chat:
        if not callable(getattr(tokenizer, "apply_chat_template", None)):
            raise ValueError("this tokenizer has no chat template; drop chat=True (--chat) or use a chat model's")
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            for p in prompts
        ]
    rows = []
    for prompt in prompts:  # a rendered chat template already holds its special tokens
        encoded = tokenizer.encode(prompt, add_special_tokens=False) if chat else tokenizer.encode(prompt)
        rows.append(list(getattr(encoded, "ids", encoded)))  # `tokenizers` returns an Encoding with .ids
    if not rows or min(map(len, rows)) == 0:
        raise ValueError("every prompt must encode to at least one token; got an empty prompt")
    width = max(map(len, rows))
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return input_ids, attention_mask


def _token_ids(value: int | Sequence[int] | None, config, name: str) -> list[int]:
    value = getattr(config, name, None) if value is None else value
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def _generator(seed: int | torch.Generator | None, device: torch.device) -> torch.Generator | None:
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    return torch.Generator(device=device).manual_seed(int(seed))


@torch.inference_mode()
def stream(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    seed: int | torch.Generator | None = None,
    compile: bool | str = "auto",
) -> Iterator[StreamChunk]:
    """Yield one `StreamChunk` per decoding step. input_ids (B, T) left-padded, attention_mask (B, T).

    eos_token_id (one id or several) defaults to the model config's; stop_strings need a tokenizer
    (anything with `decode(ids) -> str`). `seed` (an int or a torch.Generator) makes sampling reproducible.
    compile: True runs each new token through one compiled graph (`lmforge.generate.compiled`; the prompt
    stays eager), False runs eagerly, "auto" compiles decoder-only models of >= 100M parameters where it was
    measured to pay (`lmforge.generate.compiled.AUTO_COMPILE`: float weights on a GPU; on a CPU, weights on
    lmforge's kernels), for calls of at least `AUTO_MIN_NEW_TOKENS` (1024) new tokens: below that, the compile
    costs more than it saves.
    """
    params = SamplingParams(
        do_sample, temperature, top_k, top_p, min_p, repetition_penalty, frequency_penalty, presence_penalty
    )
    params.validate()
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated text; pass tokenizer=...")
    device = input_ids.device
    eos = torch.tensor(_token_ids(eos_token_id, model.config, "eos_token_id"), dtype=torch.long, device=device)
    pad = pad_token_id if pad_token_id is not None else getattr(model.config, "pad_token_id", None)
    pad = pad if pad is not None else (int(eos[0]) if len(eos) else 0)
    generator = _generator(seed, device)
    B = input_ids.shape[0]
    texts = [_IncrementalText(tokenizer, stop_strings) for _ in range(B)] if tokenizer is not None else None
    reasons: list[str | None] = [None] * B
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    runner = _Runner(model, input_ids, attention_mask, max_new_tokens, compile)
    try:  # the compiled step's buffers go back to their pool however the caller stops
        logits = runner.start()  # (B, V)
        V = logits.shape[-1]
        seen = counts = None
        if params.uses_token_history:
            prompt = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, V)
            seen = torch.zeros(B, V + 1, dtype=torch.bool, device=device).scatter_(1, prompt, True)[:, :V]
            counts = torch.zeros(B, V, device=device)
        for step in range(max_new_tokens):
            logits = process_logits(logits, params, seen, counts)
            tokens = choose_next_token(logits, params, generator).masked_fill(finished, pad)  # (B,)
            if params.uses_token_history:
                running = (~finished).float()[:, None]
                seen = seen | F.one_hot(tokens, V).bool() & running.bool()
                counts += F.one_hot(tokens, V).float() * running
            at_eos = (torch.isin(tokens, eos) & ~finished).tolist()
            deltas = None
            if texts is not None:
                ids = tokens.tolist()
                deltas = ["" if reasons[i] or at_eos[i] else texts[i].push(ids[i]) for i in range(B)]
            for i in range(B):
                if reasons[i] is None and (at_eos[i] or (texts is not None and texts[i].stopped)):
                    reasons[i] = "stop"
            if step == max_new_tokens - 1:
                reasons = [reason or "length" for reason in reasons]
            if texts is not None:  # a row that just ended releases the text it held back
                deltas = [d + texts[i].flush() if reasons[i] else d for i, d in enumerate(deltas)]
            finished = torch.tensor([r is not None for r in reasons], device=device)
            yield StreamChunk(tokens, deltas, list(reasons))
            if bool(finished.all()):
                return
            logits = runner.step(tokens)
    finally:
        runner.close()


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    tokenizer=None,
    **options,
) -> GenerationOutput:
    """New tokens for each prompt row (greedy, sampled or beam search); see `stream` for the options.

    >>> out = generate(model, ids, mask, max_new_tokens=20, do_sample=True, top_p=0.9, seed=0)
    >>> out.tokens.shape, out.finish_reasons
    """
    if num_beams > 1:
        return beam_search(
            model,
            input_ids,
            attention_mask,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            length_penalty=length_penalty,
            tokenizer=tokenizer,
            **options,
        )
    steps, texts = [], [""] * input_ids.shape[0]
    chunk = None
    chunks = stream(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, tokenizer=tokenizer, **options)
    for chunk in chunks:
        steps.append(chunk.token_ids)
        if chunk.text_deltas is not None:
            texts = [text + delta for text, delta in zip(texts, chunk.text_deltas, strict=True)]
    return GenerationOutput(
        tokens=torch.stack(steps, dim=1),
        finish_reasons=list(chunk.finish_reasons),
        texts=texts if tokenizer is not None else None,
    )


@torch.inference_mode()
def beam_search(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    num_beams: int = 4,
    max_new_tokens: int = 32,
    length_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    repetition_penalty: float = 1.0,
    tokenizer=None,
    **unsupported,
) -> GenerationOutput:
    """Keep the num_beams best partial sequences per row, scored by the sum of token log-probabilities.

    Each step extends every beam by every token, and the 2K best extensions (K = num_beams) are examined
    in order: one ending in EOS becomes a finished hypothesis (if among the top K), the others fill the K
    beams of the next step. A hypothesis of n new tokens (its EOS included) scores sum log p / n^length_penalty
    (length_penalty > 0 favours longer sequences, 0 ranks by raw log-probability). A row is done when it holds
    K hypotheses and its best running beam, normalised at the current length, cannot beat the worst of them
    (the usual heuristic); at max_new_tokens the running beams join the hypotheses. The best one is returned.
    """
    unsupported.pop("compile", None)  # beams reorder the cache rows at every step: always eager
    if unsupported.pop("do_sample", False):
        raise ValueError("beam search is deterministic; use num_beams=1 to sample")
    unsupported.pop("seed", None)
    unsupported = {k: v for k, v in unsupported.items() if v != _SAMPLING_DEFAULTS.get(k, object())}
    if unsupported:
        raise ValueError(f"beam search does not support {sorted(unsupported)}; drop them or use num_beams=1")
    if num_beams < 1 or max_new_tokens < 1:
        raise ValueError(f"num_beams={num_beams} and max_new_tokens={max_new_tokens} must be >= 1")
    device, (B, K) = input_ids.device, (input_ids.shape[0], num_beams)
    eos = set(_token_ids(eos_token_id, model.config, "eos_token_id"))
    pad = pad_token_id if pad_token_id is not None else getattr(model.config, "pad_token_id", None)
    pad = pad if pad is not None else (min(eos) if eos else 0)
    params = SamplingParams(repetition_penalty=repetition_penalty)
    expand = torch.arange(B, device=device).repeat_interleave(K)  # beam row b*K + k reads prompt row b
    runner = _Runner(
        model, input_ids[expand], None if attention_mask is None else attention_mask[expand], max_new_tokens
    )
    beam_scores = torch.full((B, K), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0  # all beams start identical: expand only the first
    history = torch.empty(B * K, 0, dtype=torch.long, device=device)
    hypotheses: list[list[tuple[float, torch.Tensor, bool]]] = [[] for _ in range(B)]
    done = [False] * B

    def add(b: int, score: float, tokens: torch.Tensor, ended: bool) -> None:
        hypotheses[b].append((score / tokens.numel() ** length_penalty, tokens, ended))
        hypotheses[b].sort(key=lambda h: -h[0])
        del hypotheses[b][K:]

    logits = runner.start()
    V = logits.shape[-1]
    for step in range(max_new_tokens):
        seen = None
        if repetition_penalty != 1.0:  # tokens of each beam's prompt (pads excluded) and history
            prompt = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, V)
            seen = torch.zeros(B * K, V + 1, dtype=torch.bool, device=device)
            seen = seen.scatter_(1, torch.cat([prompt[expand], history], 1), True)[:, :V]
        logprobs = torch.log_softmax(process_logits(logits, params, seen), dim=-1)  # (B*K, V)
        totals = (beam_scores.view(-1, 1) + logprobs).view(B, K * V)
        top_scores, top_index = totals.topk(2 * K, dim=-1)  # (B, 2K)
        next_scores = torch.full((B, K), float("-inf"), device=device)
        next_tokens = torch.full((B, K), pad, dtype=torch.long, device=device)
        next_rows = torch.arange(B * K, device=device).view(B, K).clone()
        for b in range(B):
            if done[b]:
                continue
            filled = 0
            for rank, (score, index) in enumerate(zip(top_scores[b].tolist(), top_index[b].tolist(), strict=True)):
                beam, token = divmod(index, V)
                if token in eos:
                    if rank < K:
                        tokens = torch.cat([history[b * K + beam], torch.tensor([token], device=device)])
                        add(b, score, tokens, True)
                    continue
                next_scores[b, filled], next_tokens[b, filled], next_rows[b, filled] = score, token, b * K + beam
                filled += 1
                if filled == K:
                    break
            best_running = next_scores[b, 0].item() / (step + 1) ** length_penalty
            done[b] = len(hypotheses[b]) == K and best_running <= hypotheses[b][-1][0]
        rows = next_rows.view(-1)
        history = torch.cat([history.index_select(0, rows), next_tokens.view(-1, 1)], dim=1)
        beam_scores = next_scores
        if all(done) or step == max_new_tokens - 1:
            break
        runner.reorder(rows)
        logits = runner.step(next_tokens.view(-1))

    for b in range(B):
        if not done[b]:
            for k in range(K):
                add(b, beam_scores[b, k].item(), history[b * K + k], False)
    best = [hypotheses[b][0] for b in range(B)]
    width = max(h[1].numel() for h in best)
    tokens = torch.full((B, width), pad, dtype=torch.long, device=device)
    for b, (_, seq, _) in enumerate(best):
        tokens[b, : seq.numel()] = seq
    texts = None
    if tokenizer is not None:
        texts = [tokenizer.decode([t for t in seq.tolist() if t not in eos]) for _, seq, _ in best]
    return GenerationOutput(
        tokens=tokens,
        finish_reasons=["stop" if ended else "length" for _, _, ended in best],
        texts=texts,
        scores=torch.tensor([score for score, _, _ in best]),
    )
