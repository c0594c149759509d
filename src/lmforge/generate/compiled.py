"""A decode step compiled into one graph: fixed shapes through a fixed KV cache, recompiles bounded by buckets.

Eager decoding dispatches every op of every layer from Python, one at a time: at batch 1 a step of a small
model is mostly that overhead (tens of microseconds per op, ~20 ops per layer), not arithmetic. `torch.compile`
(TorchInductor: fused C++ loops on CPU, Triton kernels and CUDA graphs on GPU) replaces the whole step with
one call. It needs the step's shapes to stay the same from one token to the next, and eager decoding's do
not: the cache view and the mask grow by one position per token. So the compiled step uses `FixedKVCache`:

- every layer's keys/values live in zeroed buffers (B, H_kv, L, d_head) and the step attends to all L slots;
- the attention mask (B, L), 1 = a real token, hides the slots not yet written (and left pads);
- the new token's keys/values go to slot `position`, a tensor, so the slot index is data, not a shape.

The model reads its past length as L - 1 (`seq_len`), so the new token is the last query of L keys and sees
every key the causal mask allows, i.e. all of them, the padding mask doing the rest; its position is the
count of real tokens before it (the models' `default_position_ids`), as in eager decoding. Masked slots get
weight exp(-huge) = 0, so the logits match eager decoding's up to rounding (greedy tokens identical, tested).

L is the prompt + new tokens rounded up to a power of two (at least 64, at most the model's context), so one
process compiles at most log2(context / 64) + 1 graphs per batch size; inductor's FX graph cache keeps them on
disk (`inductor_cache_dir`), and a second process reuses them instead of compiling again.

The prompt (prefill) stays eager: it runs once per request at a length that changes with every prompt.

On a CPU, what compiling saves is the Python dispatch between the matrix products: it pays once the products
themselves stream the weights near memory speed, i.e. on lmforge's kernels for int8, int4, fp32 and bf16
weights (`AUTO_COMPILE`); on PyTorch's own fp32 and bf16 kernels it did not. Per step, dynamo would check its
guards over the model's tensors before calling the graph (~1.5 ms at SmolLM2's 272 tensors, torch.profiler's
"TorchDynamo Cache Lookup"); they are replaced by one `model_key` (`_model_guards_only_through_the_key`).

On a GPU the step runs as a CUDA graph (mode="reduce-overhead"): the kernels of a whole step are launched as
one. A graph replays fixed memory addresses, and the step writes the cache, the mask and the position in
place, so inductor captures it only when those tensors are marked static (`torch._dynamo.mark_static_address`);
otherwise it skips the CUDA graph ("skipping cudagraphs due to mutated inputs") and launches kernel by kernel
(measured on an H200, SmolLM2-135M shapes, bf16: 89 tok/s instead of the graph's 513; `benchmarks/bench_gpu.py`).
A graph recorded for one set of addresses is re-recorded for another, and after
`torch._inductor.config.triton.cudagraph_unexpected_rerecord_limit` re-records (128) inductor gives up on
graphs for the step. So the tensors a step writes (`StepBuffers`) are pooled per model and shape and handed
to the next generation of the same shape (`checkout_buffers`/`release_buffers`): a server answering one
request after another replays one graph per bucket; calls that overlap each take their own set.
"""

from __future__ import annotations

import inspect
import os
import threading
import warnings
import weakref
from pathlib import Path

import torch
from torch import nn

COMPILE_MIN_PARAMETERS = 100_000_000
"""`compile="auto"` compiles models of at least this many parameters. Below it (the tiny presets) the first
compile costs more than a short generation can save."""

AUTO_COMPILE: dict[str, tuple[frozenset[str], ...]] = {
    "cuda": (frozenset(),),
    "cpu": (
        frozenset({"MatvecLinear"}),
        frozenset({"QuantizedLinear"}),
        frozenset({"Int4Linear", "QuantizedLinear"}),
    ),
}
"""Where `compile="auto"` compiles, and for which weights: device type -> the sets of `lmforge.nn.quant` layer
kinds the model's Linears may be (an empty set: plain float layers; {MatvecLinear}: fp32 or bf16 layers on
lmforge's matvec kernel, what `prepare_for_decoding` makes of them where the kernels build; {Int4Linear,
QuantizedLinear}: what `--quantize int4` makes, int4 blocks and an int8 output projection). Measured on
SmolLM2-135M, batch 1, 128-token prompt, 64 new tokens (`benchmarks/bench_decode.py`, `bench_generate.py
--smollm`):
- GPU (one H200, bf16): a CUDA graph of the step decodes at 513 tok/s against 34.7 eager; an eager step is
  mostly kernel launches.
- CPU (2 AVX-512 cores): once every product runs on lmforge's kernels (`lmforge.nn.kernels`), the step is
  compiled with `cpp_wrapper` and the model's guards are one `model_key`, and what is left between the
  products is the Python dispatch that compiling removes (`bench_generate.py --smollm`, one run): bf16 80.4
  tok/s compiled against 48.4 eager, fp32 45.9 against 33.2, int8 130.4 against 71.0, int4 blocks with an int8
  output projection 108.4 against 58.5; llama.cpp on the Q4_1 file 95.5. (Before the kernels, float weights
  gained nothing: fp32 35 vs 34 tok/s, and bf16 compiled on `F.linear` (55) lost to eager bf16 with
  oneDNN-packed weights (67-71), which inductor cannot lower.)"""

AUTO_MIN_NEW_TOKENS = 1024
"""`compile="auto"` compiles a `generate`/`stream` call only when it asks for at least this many new tokens
(a server's batching engine, which lives on, always). Compiling costs time before the first token: on 2 CPU
cores, for SmolLM2-135M, ~85-125 s when inductor compiles the step's C++ for the first time, and still ~7-9 s
per process and bucket when it loads the graph from its disk cache (dynamo traces the model again: ~5 s). The
compiled step saves ~6-8 ms a token (bf16 20.7 -> 12.4 ms, fp32 30 -> 22, int8 14 -> 7.7), so even a cached
compile pays only after ~1,000 tokens; a short one-off generation is faster eager."""

MIN_BUCKET = 64
COMPILED_MODES = ("auto", True, False)


class StepBuffers:
    """The tensors a compiled step writes in place, for one (batch, max_len): the position of the new token
    (a (1,) long tensor), the attention mask over the cache slots (B, max_len) and each layer's K/V buffers
    (B, H_kv, max_len, d_head), made at the first prefill that needs them. On CUDA each is marked a static
    address, so the step is captured as a CUDA graph (see the module docstring)."""

    def __init__(self, batch: int, max_len: int, device: torch.device) -> None:
        self.batch, self.max_len, self.device = batch, max_len, torch.device(device)
        self.position = self._static(torch.zeros(1, dtype=torch.long, device=device))
        self.mask = self._static(torch.zeros(batch, max_len, dtype=torch.long, device=device))
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _static(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type == "cuda":
            torch._dynamo.mark_static_address(tensor)
        return tensor

    def layer(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s K/V buffers for keys shaped like `like` (B, H_kv, T, d_head), zeroed."""
        batch, heads, _, d_head = like.shape
        shape = (batch, heads, self.max_len, d_head)
        held = self.layers.get(layer)
        if held is None or held[0].shape != shape or held[0].dtype != like.dtype or held[0].device != like.device:
            held = tuple(self._static(like.new_zeros(shape)) for _ in range(2))
            self.layers[layer] = held
        else:
            for buffer in held:
                buffer.zero_()
        return held


POOL_SETS_PER_SHAPE = 4
"""Free `StepBuffers` kept per model and (batch, max_len): as many graphs per bucket as overlapping calls
commonly need, without holding the memory of a burst of them for ever."""

_pool: weakref.WeakKeyDictionary[nn.Module, dict[tuple, list[StepBuffers]]] = weakref.WeakKeyDictionary()
_pool_lock = threading.Lock()


def checkout_buffers(model: nn.Module, batch: int, max_len: int, device: torch.device) -> StepBuffers:
    """A free `StepBuffers` of this model and shape (the one the last generation left, whose addresses a CUDA
    graph was recorded with), or a new one; it is this caller's until `release_buffers`."""
    key = (batch, max_len, torch.device(device))
    with _pool_lock:
        free = _pool.get(model, {}).get(key)
        if free:
            return free.pop()
    return StepBuffers(batch, max_len, device)


def release_buffers(model: nn.Module, buffers: StepBuffers) -> None:
    """Give `buffers` back for the next generation of the same shape (up to `POOL_SETS_PER_SHAPE` kept)."""
    key = (buffers.batch, buffers.max_len, buffers.device)
    with _pool_lock:
        free = _pool.setdefault(model, {}).setdefault(key, [])
        if len(free) < POOL_SETS_PER_SHAPE and all(held is not buffers for held in free):
            free.append(buffers)


class FixedKVCache:
    """Keys and values in buffers of fixed shape (B, H_kv, max_len, d_head) per layer, for a compiled step.

    Before `prefilled` is set, `append` stores the prompt's keys/values in slots [0, T) (zeros after) and
    hands back the prompt's own, as eager prefill needs. After it, `seq_len` is max_len - 1 whatever has been
    written, and `append` writes one token at slot `position` (a (1,) long tensor) and hands back the whole
    buffers: shapes never change, and the caller's attention mask says which slots are real. The tensors
    live in `buffers` (a `StepBuffers`, new unless one is passed).
    """

    def __init__(self, max_len: int, device: torch.device, buffers: StepBuffers | None = None) -> None:
        self.max_len = max_len
        self.step_buffers = buffers if buffers is not None else StepBuffers(1, max_len, device)
        self.buffers = self.step_buffers.layers
        self.cross_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.position = self.step_buffers.position
        self.position.zero_()
        self.prefilled = False

    def __len__(self) -> int:
        return self.seq_len()

    def seq_len(self) -> int:
        return self.max_len - 1 if self.prefilled else 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.prefilled:
            n_prompt = k.shape[2]
            if n_prompt > self.max_len:
                raise ValueError(f"the KV cache holds {self.max_len} positions, the prompt has {n_prompt}")
            buffer_k, buffer_v = self.step_buffers.layer(layer, k)
            buffer_k[:, :, :n_prompt], buffer_v[:, :, :n_prompt] = k, v
            return k, v
        buffer_k, buffer_v = self.buffers[layer]
        buffer_k.index_copy_(2, self.position, k)
        buffer_v.index_copy_(2, self.position, v)
        return buffer_k, buffer_v


def bucket_length(n_positions: int, limit: int | None) -> int:
    """The fixed cache length for n_positions: the next power of two >= n_positions (at least `MIN_BUCKET`),
    capped at the model's context `limit` (the caller has checked that n_positions fits in it)."""
    length = max(MIN_BUCKET, 1 << (max(n_positions, 1) - 1).bit_length())
    return min(length, limit) if limit is not None else length


def supports_compiled_decoding(model: nn.Module) -> bool:
    """Decoder-only lmforge models (gpt, llama families): they take `logits_to_keep` and derive positions from
    the attention mask, which is what the fixed cache relies on. Encoder-decoders (t5, transformer) compute
    position biases from the past length itself, so they decode eagerly."""
    config = getattr(model, "config", None)
    return (
        isinstance(model, nn.Module)
        and getattr(config, "head", None) == "causal_lm"
        and "logits_to_keep" in inspect.signature(model.forward).parameters
    )


def quant_layers(model: nn.Module) -> list[nn.Module]:
    """The `lmforge.nn.quant` layers in `model` (QuantizedLinear, Int4Linear, PackedLinear, MatvecLinear)."""
    return [m for m in model.modules() if type(m).__module__ == "lmforge.nn.quant"]


def quant_layer_kinds(model: nn.Module) -> frozenset[str]:
    """The class names of `model`'s `quant_layers`."""
    return frozenset(type(m).__name__ for m in quant_layers(model))


def weight_count(model: nn.Module) -> int:
    """Parameters plus the weights and biases of quantised or packed layers, which are buffers or opaque
    tensors: the parameter count of the float model they came from (a `MatvecLinear`'s are Parameters)."""
    quant = sum(
        (m.in_features + (m.bias is not None)) * m.out_features
        for m in quant_layers(model)
        if next(m.parameters(recurse=False), None) is None
    )
    return sum(p.numel() for p in model.parameters()) + quant


def resolve_compile(model: nn.Module, compile: bool | str, new_tokens: int | None = None) -> bool:
    """Whether to decode with the compiled step. "auto": decoder-only models of at least
    `COMPILE_MIN_PARAMETERS` whose device and layer kinds `AUTO_COMPILE` lists (float on a GPU; int8, int4 on
    a CPU, and fp32/bf16 on lmforge's matvec kernel), for a call of at least `AUTO_MIN_NEW_TOKENS` new tokens
    (`new_tokens`; None: a long-lived caller such as a server);
    True: compile, and say why not when the model cannot be; False: eager.

    oneDNN-packed bf16 layers (`prepare_for_decoding` on a CPU without lmforge's kernels) have no compiled
    form (inductor cannot lower their op); with True they decode eagerly with a warning, which is also the
    faster of the two there."""
    if compile not in COMPILED_MODES:
        raise ValueError(f"compile={compile!r}; choose 'auto', True or False")
    if compile is False:
        return False
    supported = supports_compiled_decoding(model)
    kinds = quant_layer_kinds(model)
    if compile is True:
        if not supported:
            raise ValueError(
                f"{type(model).__name__} (head {getattr(getattr(model, 'config', None), 'head', None)!r}) has no "
                "compiled decode step: only decoder-only gpt/llama models do; pass compile=False (--no-compile)"
            )
        if "PackedLinear" in kinds:
            warnings.warn(
                "bf16 weights packed for oneDNN have no compiled decode step; decoding eagerly (without lmforge's "
                "kernels that is the faster bf16 path: 67-71 vs 55 tok/s compiled unpacked on SmolLM2-135M)",
                stacklevel=3,
            )
            return False
        return True
    device = next(model.parameters(), torch.empty(0)).device.type
    large = weight_count(model) >= COMPILE_MIN_PARAMETERS
    long_enough = new_tokens is None or new_tokens >= AUTO_MIN_NEW_TOKENS
    return supported and large and long_enough and kinds in AUTO_COMPILE.get(device, ())


def inductor_cache_dir() -> Path:
    """Where inductor keeps compiled graphs: $LMFORGE_INDUCTOR_CACHE, else $TORCHINDUCTOR_CACHE_DIR when the
    user set it, else ~/.cache/lmforge/inductor (under $XDG_CACHE_HOME when set).

    torch writes its own default (/tmp/torchinductor_$USER) into $TORCHINDUCTOR_CACHE_DIR the first time
    anything asks for the cache directory (importing `transformers` does), so that value is not taken for the
    user's choice: before this check every compiled graph went to /tmp, which a reboot empties."""
    if os.environ.get("LMFORGE_INDUCTOR_CACHE"):
        return Path(os.environ["LMFORGE_INDUCTOR_CACHE"])
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen and os.path.abspath(chosen) != _torch_default_cache_dir():
        return Path(chosen)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmforge" / "inductor"


def _torch_default_cache_dir() -> str | None:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # a private module of torch: if it moves, a set $TORCHINDUCTOR_CACHE_DIR is kept
        return None
    return os.path.abspath(default_cache_dir())


_compiled_step = None


def _decode_step(
    model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor, cache: FixedKVCache, key: int
) -> torch.Tensor:
    if key == 0:  # never true (see `model_key`); it makes dynamo guard on the key's value
        raise ValueError("model_key() is never 0")
    mask.index_fill_(1, cache.position, 1)  # the new token's slot becomes real
    out = model(tokens, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
    cache.position.add_(1)
    return out.logits[:, -1].float()


_serials = iter(range(1, 1 << 62))
_model_serials: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()


def model_key(model: nn.Module) -> int:
    """A number that names `model` as the compiled decode step sees it: its identity (a serial number given to
    each model object once, never reused) and everything of it a traced graph depends on: each module's type,
    hooks and plain attributes (flags, sizes, the config), and the dtype, shape, strides and device of each of
    its tensors, the kernels' own weight copies included. Never 0.

    Why: before every call of a compiled function dynamo checks its guards, which cover the same things one by
    one: ~7,700 checks for SmolLM2-135M, 1.3-1.6 ms a step, a tenth of an int4 decode step. The step skips
    the guards on the model (`_model_guards_only_through_the_key`) and is passed this key instead, which it
    guards as one integer: the key is computed once per `generate` call (~8 ms for SmolLM2-135M's 300 modules,
    against a prefill's 150-250 ms), and a different model, or the
    same one changed (cast, quantised, hooked, switched to training), gets a different key and so its own
    graph."""
    if model not in _model_serials:  # kept beside the model, not in it: a deepcopy is another model
        _model_serials[model] = next(_serials)
    parts: list = [_model_serials[model]]
    for name, module in model.named_modules():
        attributes = []
        for attr, value in vars(module).items():
            if attr in ("_parameters", "_buffers", "_modules"):
                continue
            if isinstance(value, torch.Tensor):
                attributes.append((attr, _tensor_meta(value)))
            elif isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
                attributes.append((attr, tuple(_tensor_meta(v) if isinstance(v, torch.Tensor) else v for v in value)))
            elif isinstance(value, dict):  # hooks and other registries: what they hold
                attributes.append((attr, len(value), tuple(map(repr, value.values()))[:8]))
            else:
                attributes.append((attr, repr(value)))
        tensors = [(k, _tensor_meta(t)) for k, t in {**module._parameters, **module._buffers}.items() if t is not None]
        parts.append((name, type(module).__qualname__, tuple(attributes), tuple(tensors)))
    return hash(tuple(parts)) or 1


def _tensor_meta(t: torch.Tensor) -> tuple:
    strides = t.stride() if t.layout == torch.strided else t.layout  # oneDNN's opaque tensors have none
    return (t.dtype, tuple(t.shape), strides, t.device, t.requires_grad, type(t).__name__)


def _model_guards_only_through_the_key(entries: list) -> list[bool]:
    """dynamo's guard_filter_fn for `_decode_step`: keep every guard except those on the model (`model_key`)."""
    return [not (entry.name == "model" or entry.name.startswith(("model.", "model["))) for entry in entries]


def compile_static_step(step):
    """(cpu, cuda) compiled forms of a decode step with static shapes (`dynamic=False`: each shape is one graph,
    so dynamo's per-function cache is raised to hold them all), kept in inductor's on-disk FX graph cache. On
    CUDA, mode="reduce-overhead" replays the step as a CUDA graph; on CPU inductor emits C++ loops, and with
    `cpp_wrapper` the code that calls them in order is C++ too: the Python wrapper's per-kernel overhead was
    ~1.3 ms of a ~12 ms SmolLM2-135M int4 step (150 kernels and 180 calls of lmforge's and PyTorch's ops)."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache_dir())  # read by inductor at each cache access
    torch._inductor.config.fx_graph_cache = True
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    keyed = "key" in inspect.signature(step).parameters
    guards = {"guard_filter_fn": _model_guards_only_through_the_key} if keyed else {}
    cpu = torch.compile(step, dynamic=False, options={"cpp_wrapper": True, **guards})
    cuda = torch.compile(step, dynamic=False, options={"triton.cudagraphs": True, **guards})  # "reduce-overhead"
    return cpu, cuda


def compiled_decode_step():
    """The compiled `_decode_step` (`compile_static_step`), built once per process: one graph per (batch, bucket)."""
    global _compiled_step
    if _compiled_step is None:
        _compiled_step = compile_static_step(_decode_step)
    return _compiled_step


class CompiledDecoder:
    """The decoding state of one `generate`/`stream` call on the compiled path: the fixed cache, the mask
    over its slots and the compiled step. `prefill` runs eagerly; `step` feeds one token per row.

    With `fall_back` (compile="auto", where nobody asked for compiling), a step that fails to compile warns
    and the call goes on with the same fixed-shape step run eagerly: a compile error (no C++ compiler, an op
    inductor cannot lower) is raised before the step has changed the cache, the mask or the position.
    The step is told the model's `model_key`, computed once per call."""

    def __init__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        max_len: int,
        fall_back: bool = False,
    ) -> None:
        B, T = input_ids.shape
        self.model, self.input_ids, self.fall_back = model, input_ids, fall_back
        self.run = None
        self.key = model_key(model)
        self.buffers: StepBuffers | None = checkout_buffers(model, B, max_len, input_ids.device)
        self.cache = FixedKVCache(max_len, input_ids.device, self.buffers)
        self.mask = self.buffers.mask
        self.mask.zero_()
        self.mask[:, :T] = 1 if attention_mask is None else attention_mask
        self.prompt_mask = attention_mask

    def close(self) -> None:
        """Hand the step's buffers back to the pool (once; the decoder is not used after)."""
        if self.buffers is not None:
            release_buffers(self.model, self.buffers)
            self.buffers = None

    def prefill(self) -> torch.Tensor:
        out = self.model(
            self.input_ids,
            attention_mask=self.prompt_mask,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache.prefilled = True
        self.cache.position.fill_(self.input_ids.shape[1])
        return out.logits[:, -1].float()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.run is None:
            cpu, cuda = compiled_decode_step()
            self.run = cuda if tokens.device.type == "cuda" else cpu
        try:
            logits = self.run(self.model, tokens[:, None], self.mask, self.cache, self.key)
        except Exception as error:
            if not self.fall_back or self.run is _decode_step:
                raise
            warnings.warn(f"the decode step did not compile ({error}); decoding eagerly", stacklevel=2)
            self.run = _decode_step
            logits = self.run(self.model, tokens[:, None], self.mask, self.cache, self.key)
        return logits.clone() if tokens.device.type == "cuda" else logits  # a CUDA graph reuses its output
