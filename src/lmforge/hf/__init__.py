"""Adapters between Hugging Face checkpoints and lmforge models, one mapping per family."""
