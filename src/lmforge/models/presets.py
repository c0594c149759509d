"""Named model sizes: a family plus the config fields that differ from that family's defaults.

Presets are data, not classes. Full sizes reproduce published architectures (and their parameter counts);
`<family>-tiny` sizes train at interactive speed on two CPU cores.
"""

from __future__ import annotations

TINY = {"vocab_size": 1024, "d_model": 128, "n_head": 4, "d_ff": 512, "max_seq_len": 256}

PRESETS: dict[str, tuple[str, dict]] = {
    # GPT-2 (Radford et al., 2019): 124M and 355M.
    "gpt2": ("gpt", {"n_layer": 12, "n_head": 12, "d_model": 768}),
    "gpt2-medium": ("gpt", {"n_layer": 24, "n_head": 16, "d_model": 1024}),
    "gpt-tiny": ("gpt", {**TINY, "n_layer": 4}),
    # SmolLM2-135M shapes (HuggingFaceTB/SmolLM2-135M config.json).
    "llama-135m": (
        "llama",
        {
            "vocab_size": 49152,
            "max_seq_len": 8192,
            "n_layer": 30,
            "n_head": 9,
            "n_kv_heads": 3,
            "d_model": 576,
            "d_ff": 1536,
            "rope_theta": 100000.0,
            "norm_eps": 1e-5,
            "tie_embeddings": True,
        },
    ),
    "llama-tiny": ("llama", {**TINY, "n_layer": 4, "n_kv_heads": 2, "d_ff": 352, "tie_embeddings": True}),
    # BERT-base (Devlin et al., 2019) and RoBERTa-base (Liu et al., 2019): family defaults are the base sizes.
    "bert-base": ("bert", {}),
    "bert-tiny": ("bert", {**TINY, "n_layer": 2}),
    "roberta-base": ("roberta", {}),
    "roberta-tiny": ("roberta", {**TINY, "n_layer": 2, "max_seq_len": 258}),
    # T5 (Raffel et al., 2020): small = 60.5M, base = 223M.
    "t5-small": ("t5", {}),
    "t5-base": ("t5", {"d_model": 768, "d_ff": 3072, "n_layer": 12, "n_head": 12}),
    "t5-tiny": (
        "t5",
        {"vocab_size": 1024, "d_model": 128, "head_dim": 32, "n_head": 4, "d_ff": 512, "n_layer": 2},
    ),
    # The original Transformer, base size (Vaswani et al., 2017, table 3).
    "transformer-base": ("transformer", {}),
    "transformer-tiny": ("transformer", {**TINY, "n_layer": 2}),
    # Recurrent baselines (models/lstm.py). lstm-seed: the seed's Keras sentiment model (embedding, two LSTM
    # layers, a dense sigmoid output), with the widths of the usual Keras example, Embedding(128) ->
    # LSTM(64, return_sequences=True) -> LSTM(64), and a 2-way softmax head in place of the sigmoid unit.
    "lstm-seed": ("lstm", {"d_model": 128, "hidden_size": 64, "n_layer": 2, "pooling": "last"}),
    # The same shapes with GRU cells (Cho et al., 2014): two gates instead of three, 3/4 of the LSTM's weights.
    "gru-seed": ("gru", {"d_model": 128, "hidden_size": 64, "n_layer": 2, "pooling": "last"}),
    # A BiLSTM tagger (and sentence encoder) in the manner of Huang et al. (2015), without the CRF.
    "bilstm": ("lstm", {"d_model": 128, "hidden_size": 128, "n_layer": 2, "bidirectional": True, "pooling": "max"}),
    "lstm-tiny": ("lstm", {"vocab_size": 1024, "d_model": 32, "hidden_size": 32, "n_layer": 2}),
    "gru-tiny": ("gru", {"vocab_size": 1024, "d_model": 32, "hidden_size": 32, "n_layer": 2}),
}
