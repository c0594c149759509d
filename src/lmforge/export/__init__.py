"""Exports of lmforge models to the formats other runtimes read, one module per format: GGUF for llama.cpp and
ollama (`lmforge.export.gguf`), ONNX for onnxruntime (`lmforge.export.onnx`), and the small runtime wrapper that
lets lmforge's commands run an exported ONNX folder (`lmforge.export.onnx_runtime`)."""
