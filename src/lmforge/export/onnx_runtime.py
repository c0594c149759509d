"""`OnnxModel`: an exported folder (`lmforge.export.onnx`) run by onnxruntime behind the forward of an lmforge model.

It takes the arguments lmforge's models take and returns the same `ModelOutput`, so the code that runs models
runs it unchanged: the fine-tuning tasks' evaluate and predict (`lmforge evaluate|predict DIR`), and the decoding
loop (`lmforge generate DIR`), whose KV cache it fills from the graph's presents. A decoding step is one
session run: the cache's keys/values of layer i go in as past_key_values.i.key/value, and the new positions of
present.i.key/value (those after the past) are appended to the cache the loop owns, so greedy search, sampling
and beam search (which reorders the cache's rows) work as with the eager model.

The sessions run on the CPU (onnxruntime's CPUExecutionProvider) with `threads` intra-op threads (0:
onnxruntime's default, one per core).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from lmforge.export.onnx import read_manifest
from lmforge.models import ModelOutput, config_from_dict
from lmforge.models.heads import head_loss, shift_right
from lmforge.nn.attention import KVCache, StaticKVCache


class OnnxModel(nn.Module):
    """An ONNX export as an lmforge model (see the module docstring); `config` is the exported model's."""

    def __init__(self, folder: str | Path, threads: int = 0) -> None:
        import json

        import onnxruntime

        super().__init__()
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        stored = json.loads((self.folder / "config.json").read_text(encoding="utf-8"))
        self.config = config_from_dict(stored["model"], where="model.")
        self.kind = self.manifest["kind"]
        cache = self.manifest["cache"] or {}
        self.cache_layers, self.kv_heads, self.head_dim = (cache.get(k, 0) for k in ("layers", "kv_heads", "head_dim"))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        self.sessions = {
            name: onnxruntime.InferenceSession(
                str(self.folder / graph["file"]), options, providers=["CPUExecutionProvider"]
            )
            for name, graph in self.manifest["graphs"].items()
        }
        self.inputs = {name: list(graph["inputs"]) for name, graph in self.manifest["graphs"].items()}
        self.outputs = {name: list(graph["outputs"]) for name, graph in self.manifest["graphs"].items()}
        # lmforge's tasks and decoding loop place inputs on the device of the model's first parameter; the
        # sessions run on the CPU, and this empty tensor says so.
        self.device_anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    def _run(self, graph: str, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        arrays = {name: np.ascontiguousarray(feeds[name].detach().cpu().numpy()) for name in self.inputs[graph]}
        return [torch.from_numpy(a) for a in self.sessions[graph].run(self.outputs[graph], arrays)]

    def _past(self, cache: KVCache | StaticKVCache | None, batch: int) -> dict[str, torch.Tensor]:
        """past_key_values.i.key/value from the cache (empty (B, H_kv, 0, d) tensors before the first step)."""
        empty = torch.zeros(batch, self.kv_heads, 0, self.head_dim)
        feeds = {}
        for i in range(self.cache_layers):
            k, v = cache.self_kv[i] if cache is not None and i in cache.self_kv else (empty, empty)
            feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = k.float(), v.float()
        return feeds

    def _store(self, cache: KVCache | StaticKVCache | None, presents: list[torch.Tensor], past: int) -> None:
        """Append the new positions of each layer's presents to the cache."""
        if cache is None:
            return
        for i in range(self.cache_layers):
            k, v = presents[2 * i], presents[2 * i + 1]
            cache.append(i, k[:, :, past:], v[:, :, past:])

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder-decoders: source ids (B, S) -> encoder output (B, S, d_model)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self._run("encoder", {"input_ids": input_ids, "attention_mask": attention_mask})[0]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: KVCache | StaticKVCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: torch.Tensor | None = None,
    ) -> ModelOutput:
        """The eager models' arguments (see `lmforge.models`); `labels` give the head's loss as they do."""
        if self.kind == "seq2seq":
            return self._seq2seq(
                input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, encoder_outputs, labels,
                past_key_values, use_cache,
            )  # fmt: skip
        B, T = input_ids.shape
        cache = past_key_values if past_key_values is not None else (KVCache() if use_cache else None)
        past = cache.seq_len() if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long)
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in self.inputs["model"]:
            feeds["token_type_ids"] = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        if self.cache_layers:
            feeds.update(self._past(cache, B))
        outputs = self._run("model", feeds)
        self._store(cache, outputs[1:], past)
        logits = outputs[0]
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        if self.config.head == "none":
            return ModelOutput(last_hidden_state=logits)
        return ModelOutput(logits=logits, loss=head_loss(self.config.head, logits, labels), past_key_values=cache)

    def _seq2seq(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        decoder_input_ids: torch.Tensor | None,
        decoder_attention_mask: torch.Tensor | None,
        encoder_outputs: torch.Tensor | None,
        labels: torch.Tensor | None,
        cache: KVCache | StaticKVCache | None,
        use_cache: bool,
    ) -> ModelOutput:
        c = self.config
        if encoder_outputs is None:
            if input_ids is None:
                raise ValueError("pass input_ids (the source tokens) or encoder_outputs (from `encode`)")
            encoder_outputs = self.encode(input_ids, attention_mask)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids, or labels to build them by shifting right")
            start = getattr(c, "decoder_start_token_id", getattr(c, "bos_token_id", 0))
            decoder_input_ids = shift_right(labels, start, c.pad_token_id)
        B, T = decoder_input_ids.shape
        cache = cache if cache is not None else (KVCache() if use_cache else None)
        past = cache.seq_len() if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, encoder_outputs.shape[1], dtype=torch.long)
        if decoder_attention_mask is None:
            decoder_attention_mask = torch.ones(B, past + T, dtype=torch.long)
        feeds = {
            "decoder_input_ids": decoder_input_ids,
            "decoder_attention_mask": decoder_attention_mask,
            "encoder_hidden_states": encoder_outputs,
            "encoder_attention_mask": attention_mask,
            **self._past(cache, B),
        }
        outputs = self._run("decoder", feeds)
        self._store(cache, outputs[1:], past)
        logits = outputs[0]
        return ModelOutput(
            logits=logits,
            loss=head_loss(c.head, logits, labels),
            past_key_values=cache,
            encoder_last_hidden_state=encoder_outputs,
        )


def load_onnx_model(folder: str | Path, threads: int = 0) -> OnnxModel:
    """The ONNX export in `folder`, ready to run (a FileNotFoundError or ValueError says why it is not one)."""
    return OnnxModel(folder, threads).eval()
