"""Text generation: logits processors and sampling (`sampling`), the KV-cache decoding loop with batching,
streaming and beam search (`engine`)."""

from lmforge.generate.engine import (
    GenerationOutput,
    StreamChunk,
    beam_search,
    encode_prompts,
    generate,
    prepare_for_decoding,
    stream,
)
from lmforge.generate.sampling import SamplingParams

__all__ = [
    "GenerationOutput",
    "SamplingParams",
    "StreamChunk",
    "beam_search",
    "encode_prompts",
    "generate",
    "prepare_for_decoding",
    "stream",
]
