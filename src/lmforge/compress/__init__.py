"""Compression recipes: pruning (`prune`: magnitude, Wanda, SparseGPT, N:M; structured heads/FFN channels)."""
