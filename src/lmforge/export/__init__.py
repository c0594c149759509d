"""Exporting lmforge models to the formats other runtimes load, one module per format."""
