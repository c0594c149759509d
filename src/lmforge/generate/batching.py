"""Continuous batching: sequences at different lengths, each decoding one token per step in one shared forward.

`stream` decodes a fixed batch from start to end: a row that finishes early keeps its place (fed pad tokens)
and no new row can join. A server wants the opposite: requests come and go at any step. So each sequence owns
a *slot* of a `KVSlotPool`, fixed-size K/V buffers (n_slots, H_kv, max_len, d_head) per layer, and keeps its
own length L_i (the positions its slot holds). A decode step feeds one token per running sequence:

    x (B, 1) at positions L_i  ->  K/V written at [slot_i, :, L_i]  ->  attention over keys 0..max_i L_i,
    key j of row i masked unless j <= L_i

so rows of different lengths share one forward, with the per-row positions passed as `position_ids` and the
padding mask hiding the unused tail of shorter rows (exact zeros after the softmax; the models already take
both). A new sequence is prefilled into its slot on its own (chunk by chunk: `prefill` continues at the
slot's length, with the causal mask over cached + new keys) and then joins the decode batch; a finished one
frees its slot at once. Slots are handed out lowest-first, so the running slots are usually a contiguous
range and the decode step reads them as a view; otherwise it gathers the rows' key windows.

The compiled step (`BatchedDecoder(compile=...)`, vLLM's padded batch sizes on a slot pool). A compiled graph
needs fixed shapes, and the step above changes shape with every token (keys 0..max L_i) and every arrival
(B). So the fixed step runs rows 0..R-1 of the pool, R = the next power of two above the highest running
slot (at most n_slots), and attends over the first K positions, K = the next power of two >= max L_i + 1
(at least 64, at most the slot length): row r is slot r, so the step never gathers. A slot that is not
decoding this step (free, or still prefilling) is fed a dummy token at the slot's last position max_len - 1,
which no sequence can read before writing it itself (a prefill chunk or a decode step writes a position
before attending to it), and its logits are dropped. So one process compiles at most
(log2 n_slots + 1) x (log2(max_len / 64) + 1) graphs per model, kept on disk by inductor's FX graph cache;
on a GPU each is replayed as a CUDA graph over the pool's fixed buffers.

`PrefixCache` keeps the K/V of prompt prefixes already computed, block by block, so a prompt that starts like
an earlier one (a shared system prompt) copies them into its slot instead of prefilling them again.

`SequenceSampler` chooses one sequence's tokens as `stream` chooses a row's: the same logits processors
(`sampling`), its own `torch.Generator` for a seed, its own end-of-sequence ids, stop strings and
incremental detokenizer. A seeded sequence therefore draws the same tokens in a batch as alone, up to the
rounding differences between a batched and a single-row forward. With `logprobs=k` it also records, per token
it returns, the token's log-probability and the k most likely alternatives (`TokenLogprob`), as OpenAI's
`logprobs` report them.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.generate.compiled import bucket_length, compile_static_step, resolve_compile
from lmforge.generate.engine import _generator, _IncrementalText, _token_ids
from lmforge.generate.sampling import SamplingParams, choose_next_token, process_logits


class KVSlotPool:
    """`n_slots` KV buffers of `max_len` positions per layer, allocated on first use (their dtype and device
    are the model's keys'); `allocate` hands out the lowest free slot, `release` takes it back."""

    def __init__(self, n_slots: int, max_len: int) -> None:
        if n_slots < 1 or max_len < 1:
            raise ValueError(f"n_slots={n_slots} and max_len={max_len} must be >= 1")
        self.n_slots, self.max_len = n_slots, max_len
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._free = set(range(n_slots))

    @property
    def used(self) -> int:
        return self.n_slots - len(self._free)

    @property
    def free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError(f"all {self.n_slots} KV slots are in use")
        slot = min(self._free)
        self._free.remove(slot)
        return slot

    def release(self, slot: int) -> None:
        self._free.add(slot)

    def layer(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (n_slots, H_kv, max_len, d_head) K and V buffers of `layer`, made like `like` (B, H_kv, T, d)."""
        if layer not in self.buffers:
            _, H, _, d = like.shape
            self.buffers[layer] = tuple(like.new_zeros(self.n_slots, H, self.max_len, d) for _ in range(2))
            if like.device.type == "cuda":  # the compiled step's CUDA graph replays these very addresses
                for buffer in self.buffers[layer]:
                    torch._dynamo.mark_static_address(buffer)
        return self.buffers[layer]


def slot_rows(slots: list[int], device: torch.device) -> tuple[torch.Tensor, slice | None]:
    """The pool rows of `slots` as an index tensor, and as a slice when they are consecutive (a view, no copy)."""
    contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
    return torch.tensor(slots, device=device), slice(slots[0], slots[0] + len(slots)) if contiguous else None


class _PrefillView:
    """The cache the prefill chunks of one or more sequences see: their slots, each already holding `start`
    positions; row i's T new keys go to positions start..start+T-1 of slots[i]."""

    def __init__(self, pool: KVSlotPool, slots: list[int], start: int, device: torch.device) -> None:
        self.pool, self.start = pool, start
        self.index, self.rows = slot_rows(slots, device)

    def seq_len(self) -> int:
        return self.start

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.start + k.shape[-2]
        buffer_k, buffer_v = self.pool.layer(layer, k)
        if self.rows is not None:
            buffer_k[self.rows, :, self.start : end] = k
            buffer_v[self.rows, :, self.start : end] = v
            return buffer_k[self.rows, :, :end], buffer_v[self.rows, :, :end]
        buffer_k[self.index, :, self.start : end] = k
        buffer_v[self.index, :, self.start : end] = v
        return buffer_k[:, :, :end].index_select(0, self.index), buffer_v[:, :, :end].index_select(0, self.index)


class _DecodeView:
    """The cache a decode step sees: row i's new key goes to position lengths[i] of slot slots[i]; attention
    reads every row's first max(lengths) + 1 positions (the mask hides what a row has not written)."""

    def __init__(self, pool: KVSlotPool, slots: list[int], lengths: torch.Tensor) -> None:
        self.pool, self.lengths = pool, lengths
        self.past = int(lengths.max())
        self.index, self.rows = slot_rows(slots, lengths.device)

    def seq_len(self) -> int:
        return self.past

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.past + 1
        buffer_k, buffer_v = self.pool.layer(layer, k)
        buffer_k[self.index, :, self.lengths] = k[:, :, 0]  # (B, H_kv, d_head) at each row's own position
        buffer_v[self.index, :, self.lengths] = v[:, :, 0]
        if self.rows is not None:
            return buffer_k[self.rows, :, :end], buffer_v[self.rows, :, :end]
        return buffer_k[:, :, :end].index_select(0, self.index), buffer_v[:, :, :end].index_select(0, self.index)


class _FixedDecodeView:
    """The cache the compiled step sees: rows 0..R-1 of the pool (R = len(positions)), row r's new key written
    at positions[r], attention over the first `keys` positions of each row; `seq_len` is keys - 1, so the new
    token is the last of `keys` and the padding mask alone says which keys a row has."""

    def __init__(self, pool: KVSlotPool, positions: torch.Tensor, keys: int) -> None:
        self.pool, self.positions, self.keys = pool, positions, keys
        self.rows = torch.arange(positions.shape[0], device=positions.device)

    def seq_len(self) -> int:
        return self.keys - 1

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        buffer_k, buffer_v = self.pool.buffers[layer]
        buffer_k[self.rows, :, self.positions] = k[:, :, 0]
        buffer_v[self.rows, :, self.positions] = v[:, :, 0]
        R = self.positions.shape[0]
        return buffer_k[:R, :, : self.keys], buffer_v[:R, :, : self.keys]


def _fixed_decode_step(
    model: nn.Module, pool: KVSlotPool, tokens: torch.Tensor, positions: torch.Tensor, keys: int, extra: dict
) -> torch.Tensor:
    """One token for each of rows 0..R-1 (tokens, positions: (R,)); their next-token logits (R, V), fp32."""
    view = _FixedDecodeView(pool, positions, keys)
    mask = (torch.arange(keys, device=positions.device)[None, :] <= positions[:, None]).long()  # (R, keys)
    out = model(
        tokens[:, None], attention_mask=mask, position_ids=positions[:, None], past_key_values=view, use_cache=True,
        **extra,
    )  # fmt: skip
    return out.logits[:, -1].float()


_compiled_fixed_step = None


def compiled_fixed_decode_step():
    """`_fixed_decode_step` compiled once per process (`compile_static_step`): one graph per model, R and K."""
    global _compiled_fixed_step
    if _compiled_fixed_step is None:
        _compiled_fixed_step = compile_static_step(_fixed_decode_step)
    return _compiled_fixed_step


def supports_batching(model: nn.Module) -> bool:
    """Whether `BatchedDecoder` can drive `model`: a decoder-only causal LM whose forward takes explicit
    positions and a KV cache (lmforge's GPT and Llama families)."""
    parameters = inspect.signature(model.forward).parameters
    return (
        getattr(model.config, "head", None) == "causal_lm"
        and "position_ids" in parameters
        and "past_key_values" in parameters
    )


class BatchedDecoder:
    """A decoder-only model over a `KVSlotPool`: `prefill` runs a chunk of one sequence's prompt into its slot,
    `decode` feeds one token to each of several sequences. Both return fp32 next-token logits.

    compile: decode through the fixed-shape compiled step (see the module docstring); "auto" decides as
    `generate` does for a long generation (`lmforge.generate.compiled.resolve_compile`: weights on lmforge's
    kernels on a CPU, float on a GPU, models of 100M parameters or more; a server lives long enough to pay the
    compile back) and falls back to the eager step, with a warning, if compiling fails; True raises instead.
    Prefill stays eager: its length changes with every prompt chunk.

    defer_compile (a server): a step of a shape (rows R, keys K) not compiled yet in this process runs eagerly,
    and the shape waits in `pending` until `compile_pending()` (the server calls it when it has no requests)
    or `warm_up()` (before it listens) compiles it. Why: a graph inductor has never built costs ~85-125 s on 2
    cores, one from its disk cache ~7-9 s, and requests must not wait on either; vLLM captures its graphs at
    start-up for the same reason. Without it the first step of each shape compiles on the spot."""

    def __init__(
        self, model: nn.Module, n_slots: int, max_len: int, compile: bool | str = False, defer_compile: bool = False
    ) -> None:
        if not supports_batching(model):
            raise ValueError(
                f"{type(model).__name__} cannot be batched step by step; continuous batching needs a decoder-only "
                "causal_lm whose forward takes position_ids and past_key_values"
            )
        limit = getattr(model.config, "max_seq_len", None)
        if limit is not None and max_len > limit:
            raise ValueError(f"max_len={max_len} positions per slot exceed the model's max_seq_len={limit}")
        self.model, self.pool = model, KVSlotPool(n_slots, max_len)
        self.device = next(model.parameters()).device
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        self.compiled = resolve_compile(model, compile)
        self.fall_back = compile == "auto"
        self.defer_compile = defer_compile
        self.ready: set[tuple[int, int]] = set()  # (R, K) shapes compiled in this process
        self.pending: set[tuple[int, int]] = set()  # shapes met while deferring, not compiled yet

    def prefill(self, slot: int, ids: Sequence[int], start: int) -> torch.Tensor:
        """Run prompt tokens `ids` at positions start, start+1, ... of `slot`; the logits (V,) after the last."""
        return self.prefill_rows([slot], [ids], start)[0]

    @torch.inference_mode()
    def prefill_rows(self, slots: list[int], chunks: list[Sequence[int]], start: int) -> torch.Tensor:
        """Prefill several sequences in one forward: chunks[i] at positions start, start+1, ... of slots[i]; the
        logits (B, V) after each chunk's last token.

        Shorter chunks are padded on the right to the longest. The padding writes K/V at positions past its
        row's chunk, which that row writes again before it ever attends to them (its next prefill chunk or decode
        step fills position `length` first, and the mask of every later step stops at the row's own length), and
        causal attention keeps it out of the row's real tokens now. So each row's logits and K/V are what
        prefilling it alone gives, up to the rounding of a batched matmul."""
        longest = max(map(len, chunks))
        if start + longest > self.pool.max_len:
            raise ValueError(f"{start + longest} positions needed, but a KV slot holds {self.pool.max_len}")
        input_ids = torch.tensor([[*c, *[0] * (longest - len(c))] for c in chunks], device=self.device)
        view = _PrefillView(self.pool, slots, start, self.device)
        keep = longest - min(map(len, chunks)) + 1  # the last `keep` positions hold every row's last real token
        extra = {"logits_to_keep": keep} if self.extra else {}
        logits = self.model(input_ids, past_key_values=view, use_cache=True, **extra).logits  # (B, T or keep, V)
        last = torch.tensor([len(c) - 1 - longest for c in chunks], device=self.device)  # from the end
        return logits[torch.arange(len(chunks), device=self.device), logits.shape[1] + last].float()

    @torch.inference_mode()
    def decode(self, slots: list[int], lengths: list[int], tokens: list[int]) -> torch.Tensor:
        """Feed tokens[i] at position lengths[i] of slots[i]; the logits (B, V) of the next tokens."""
        if max(lengths) >= self.pool.max_len:
            raise ValueError(f"position {max(lengths)} is past the {self.pool.max_len} a KV slot holds")
        if self.compiled:
            shape = (self._fixed_rows(slots), bucket_length(max(lengths) + 1, self.pool.max_len))
            if shape in self.ready or not self.defer_compile:
                return self._decode_fixed(slots, lengths, tokens)
            self.pending.add(shape)
        positions = torch.tensor(lengths, device=self.device)
        view = _DecodeView(self.pool, slots, positions)
        keys = torch.arange(view.past + 1, device=self.device)
        attention_mask = (keys[None, :] <= positions[:, None]).long()  # (B, max L + 1): row i keeps keys 0..L_i
        input_ids = torch.tensor(tokens, device=self.device)[:, None]  # (B, 1)
        out = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=positions[:, None],
            past_key_values=view,
            use_cache=True,
            **self.extra,
        )
        return out.logits[:, -1].float()

    def shapes(self, max_keys: int) -> list[tuple[int, int]]:
        """Every (R, K) a decode step can take with up to `max_keys` positions a slot: R a power of two up to
        the slots (or all of them), K a `bucket_length` bucket."""
        rows = sorted({min(self.pool.n_slots, 1 << i) for i in range(self.pool.n_slots.bit_length() + 1)})
        keys = sorted({bucket_length(n, self.pool.max_len) for n in range(1, min(max_keys, self.pool.max_len) + 1)})
        return [(r, k) for r in rows for k in keys]

    def warm_up(self, max_keys: int) -> int:
        """Compile the decode step for every shape of `shapes(max_keys)` now; how many were compiled. A no-op
        without compiling."""
        todo = [shape for shape in self.shapes(max_keys) if shape not in self.ready] if self.compiled else []
        for shape in todo:
            self._compile_shape(shape)
        return len(todo)

    def compile_pending(self) -> bool:
        """Compile one shape that a deferred step met (the smallest first); whether there was one."""
        if not self.pending:
            return False
        shape = min(self.pending)
        self.pending.discard(shape)
        if self.compiled and shape not in self.ready:
            self._compile_shape(shape)
        return True

    @torch.inference_mode()
    def _compile_shape(self, shape: tuple[int, int]) -> None:
        """Run the compiled step of `shape` once on idle rows: each writes a dummy token's K/V at the slot's last
        position, which no sequence reads before writing it (the convention of `_decode_fixed`), so the pool's
        sequences are untouched and it is safe between any two steps."""
        R, K = shape
        if not self.pool.buffers:  # before the first request: one dummy token allocates the pool (last position)
            self.prefill_rows([0], [[0]], self.pool.max_len - 1)
        tokens = torch.zeros(R, dtype=torch.long, device=self.device)
        self._run_fixed(tokens, torch.full((R,), self.pool.max_len - 1, dtype=torch.long, device=self.device), K)

    def _run_fixed(self, tokens: torch.Tensor, positions: torch.Tensor, keys: int) -> torch.Tensor | None:
        """The compiled step over rows 0..R-1 (R = len(tokens)) and keys 0..keys-1: its logits (R, V). If it does
        not compile, the decoder decodes eagerly from then on (no compile retried at every step): under "auto"
        with a warning, returning None; asked for (True), the error is raised."""
        cpu, cuda = compiled_fixed_decode_step()
        step = cuda if self.device.type == "cuda" else cpu
        try:
            logits = step(self.model, self.pool, tokens, positions, keys, self.extra)
        except Exception as error:  # a compile error comes before the graph runs: the pool is untouched
            self.compiled = False
            if not self.fall_back:
                raise
            warnings.warn(f"the batched decode step did not compile ({error}); decoding eagerly", stacklevel=4)
            return None
        self.ready.add((tokens.shape[0], keys))
        return logits

    def _fixed_rows(self, slots: list[int]) -> int:
        """R: the compiled step's rows, the next power of two above the highest running slot."""
        return min(self.pool.n_slots, 1 << max(slots).bit_length())

    def _decode_fixed(self, slots: list[int], lengths: list[int], tokens: list[int]) -> torch.Tensor:
        """`decode` through the compiled fixed-shape step over rows 0..R-1 and keys 0..K-1."""
        R = self._fixed_rows(slots)
        K = bucket_length(max(lengths) + 1, self.pool.max_len)
        index = torch.tensor(slots, device=self.device)
        all_tokens = torch.zeros(R, dtype=torch.long, device=self.device)
        positions = torch.full((R,), self.pool.max_len - 1, dtype=torch.long, device=self.device)  # idle rows
        all_tokens[index] = torch.tensor(tokens, device=self.device)
        positions[index] = torch.tensor(lengths, device=self.device)
        logits = self._run_fixed(all_tokens, positions, K)
        if logits is None:
            return self.decode(slots, lengths, tokens)
        return logits.index_select(0, index)  # a copy: a CUDA graph reuses its output buffer


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the `top` most likely tokens at its step, most likely first:
    (token id, log-probability) pairs. The chosen token is among `top` only if it is that likely."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


class SequenceSampler:
    """One sequence's token choice and text, with `stream`'s keywords (`stream` documents them).

    `choose(logits)` processes (V,) logits with this sequence's parameters and draws the next token with its
    own generator; `advance(token)` records it and returns the text it releases; `finish_reason` is then
    "stop" (an end-of-sequence id or a stop string) or "length" (max_new_tokens reached), else None. A shared
    `generator` lets several sequences of one request (n choices) draw from one seeded stream.

    `logprobs=k` (None: off) records a `TokenLogprob` per returned token in `token_logprobs`: the chosen token's
    log-probability and the k most likely alternatives, from the log-softmax of the *raw* logits, before
    temperature, top-k/p, min-p and penalties. That is the model's own distribution, the one a client scores
    text with (perplexity, classification by likelihood), and what OpenAI's API and vLLM (by default) report;
    the processed distribution would change with every sampling knob, and truncation (top-k/p) would make most
    alternatives -inf. An end-of-sequence token that finishes the sequence is not returned content, so it gets
    no entry: entries and returned tokens correspond one to one.
    """

    def __init__(
        self,
        prompt: Sequence[int],
        config,
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
        stop_strings: Sequence[str] = (),
        tokenizer=None,
        seed: int | torch.Generator | None = None,
        device: torch.device | str = "cpu",
        logprobs: int | None = None,
    ) -> None:
        self.params = SamplingParams(
            do_sample, temperature, top_k, top_p, min_p, repetition_penalty, frequency_penalty, presence_penalty
        )
        self.params.validate()
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        if logprobs is not None and logprobs < 0:
            raise ValueError(f"logprobs={logprobs} must be None (off) or >= 0 (alternatives per token)")
        if stop_strings and tokenizer is None:
            raise ValueError("stop_strings need a tokenizer to decode the generated text; pass tokenizer=...")
        self.prompt, self.max_new_tokens = list(prompt), max_new_tokens
        self.eos = set(_token_ids(eos_token_id, config, "eos_token_id"))
        self.generator = _generator(seed, torch.device(device))
        self.text = _IncrementalText(tokenizer, stop_strings) if tokenizer is not None else None
        self.generated: list[int] = []
        self.finish_reason: str | None = None
        self.logprobs = logprobs
        self.token_logprobs: list[TokenLogprob] = []
        self._pending: TokenLogprob | None = None  # the last chosen token's entry, kept by `advance` unless EOS
        self._seen = self._counts = None

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this sequence's logits (V,)."""
        # the raw distribution, taken before any processor sees the logits (see the class docstring)
        log_probs = torch.log_softmax(logits.float(), dim=-1) if self.logprobs is not None else None
        logits = logits[None]  # (1, V): the shape `stream` samples a lone row with, so a seed draws alike
        if self.params.uses_token_history:
            V = logits.shape[-1]
            if self._seen is None:
                prompt = torch.tensor(self.prompt, device=logits.device)
                self._seen = torch.zeros(1, V, dtype=torch.bool, device=logits.device)
                self._seen[0, prompt[prompt < V]] = True
                self._counts = torch.zeros(1, V, device=logits.device)
            logits = process_logits(logits, self.params, self._seen, self._counts)
        else:
            logits = process_logits(logits, self.params)
        token = choose_next_token(logits, self.params, self.generator)
        if self.params.uses_token_history:
            one_hot = F.one_hot(token, logits.shape[-1])
            self._seen |= one_hot.bool()
            self._counts += one_hot.float()
        chosen = int(token)
        if log_probs is not None:
            self._pending = self._logprob_entry(log_probs, chosen)
        return chosen

    def _logprob_entry(self, log_probs: torch.Tensor, chosen: int) -> TokenLogprob:
        """`chosen`'s log-probability and the `logprobs` most likely tokens under `log_probs` (V,)."""
        top = torch.topk(log_probs, min(self.logprobs, log_probs.shape[-1]))
        pairs = list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
        return TokenLogprob(chosen, float(log_probs[chosen]), pairs)

    def advance(self, token: int) -> str:
        """Record `token`; the newly final text (held back while a stop string may be forming)."""
        self.generated.append(token)
        pending, self._pending = self._pending, None
        delta = ""
        if token in self.eos:
            self.finish_reason = "stop"
        else:
            if pending is not None and pending.token == token:
                self.token_logprobs.append(pending)
            if self.text is not None:
                delta = self.text.push(token)
                if self.text.stopped:
                    self.finish_reason = "stop"
        if self.finish_reason is None and len(self.generated) == self.max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None and self.text is not None:
            delta += self.text.flush()
        return delta


class PrefixCache:
    """K/V of prompt prefixes already computed, so a prompt that starts the same way (a shared system prompt, a
    chat that grows by one turn) copies them into its slot instead of prefilling them again: vLLM's automatic
    prefix caching, on a slot pool.

    A prompt of n tokens stores its first P = floor((n - 1) / block) x block positions (at least one prompt
    token is always prefilled: its logits choose the first new token). Every block boundary b <= P becomes a key
    (the tuple of the first b tokens) that points to the stored copy, so a later prompt sharing only the first
    b tokens still finds them; `lookup` tries the longest boundary first. K/V at position j depend only on
    tokens 0..j (causal attention; RoPE rotates by the absolute position, which the copy keeps), so the copied
    positions are what a prefill would compute, up to float rounding between prefill chunkings.

    Memory: at most `max_tokens` positions are kept (each layers x 2 x kv-heads x head-dim values), least
    recently used first out."""

    def __init__(self, max_tokens: int, block: int = 32) -> None:
        if max_tokens < 0 or block < 1:
            raise ValueError(f"max_tokens={max_tokens} must be >= 0 and block={block} >= 1")
        self.max_tokens, self.block = max_tokens, block
        self._entries: dict[int, tuple[int, dict[int, tuple[torch.Tensor, torch.Tensor]]]] = {}  # id -> (P, KV)
        self._keys: dict[tuple[int, ...], int] = {}  # the first b tokens -> the id of an entry holding them
        self._next = 0
        self.held = 0  # positions stored

    def cacheable(self, prompt: Sequence[int]) -> int:
        """P: how many of this prompt's positions a store keeps and a lookup may return."""
        return (len(prompt) - 1) // self.block * self.block if self.max_tokens else 0

    def lookup(self, prompt: Sequence[int]) -> tuple[int, dict[int, tuple[torch.Tensor, torch.Tensor]] | None]:
        """(b, per-layer K/V holding at least b positions) for the longest cached prefix of `prompt`, or (0, None)."""
        for b in range(self.cacheable(prompt), 0, -self.block):
            entry = self._keys.get(tuple(prompt[:b]))
            if entry is not None:
                self._entries[entry] = self._entries.pop(entry)  # most recently used: last in order
                return b, self._entries[entry][1]
        return 0, None

    @torch.inference_mode()
    def store(self, prompt: Sequence[int], pool: KVSlotPool, slot: int) -> None:
        """Copy the cacheable prefix of `prompt` out of `slot` (whose first positions hold it)."""
        P = self.cacheable(prompt)
        if P == 0 or self.max_tokens < P or self._keys.get(tuple(prompt[:P])) is not None:
            return
        kv = {layer: (k[slot, :, :P].clone(), v[slot, :, :P].clone()) for layer, (k, v) in pool.buffers.items()}
        entry, self._next = self._next, self._next + 1
        self._entries[entry] = (P, kv)
        self.held += P
        for b in range(self.block, P + 1, self.block):
            self._keys[tuple(prompt[:b])] = entry
        while self.held > self.max_tokens:
            self._evict(next(iter(self._entries)))

    def _evict(self, entry: int) -> None:
        P, _ = self._entries.pop(entry)
        self.held -= P
        for key in [key for key, held_by in self._keys.items() if held_by == entry]:
            del self._keys[key]


@torch.inference_mode()
def copy_prefix(pool: KVSlotPool, slot: int, kv: dict[int, tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
    """Write the first `length` cached positions of every layer into `slot`."""
    for layer, (k, v) in kv.items():
        buffer_k, buffer_v = pool.buffers[layer]
        buffer_k[slot, :, :length] = k[:, :length]
        buffer_v[slot, :, :length] = v[:, :length]
