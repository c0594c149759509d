"""Exports of lmforge models to the formats other runtimes read (ONNX for onnxruntime, `lmforge.export.onnx`),
and the small runtime wrappers that let lmforge's commands run an exported folder (`lmforge.export.onnx_runtime`)."""
