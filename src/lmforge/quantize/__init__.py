"""Weight-only quantisation (int8 per channel, int4 per group) by round-to-nearest or GPTQ: `quantize_model`,
`quantize_checkpoint`; the layers live in `lmforge.nn.quant`, the saved format in `lmforge.hf.quantized`."""

from lmforge.quantize.recipe import quantize_checkpoint, quantize_model

__all__ = ["quantize_checkpoint", "quantize_model"]
