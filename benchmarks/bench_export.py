"""ONNX export: onnxruntime against lmforge eager on a fine-tuned MiniLM classifier, and exactness for every family.

1. Speed: sentences/s of the classifier on the pang-lee test sentences, batch 32, 2 threads, lmforge eager (fp32,
   `torch.inference_mode`) against the ONNX export on onnxruntime (fp32 and int8), each through the same
   `OnnxModel` forward that `lmforge evaluate` uses (numpy conversion included). The runs alternate and each
   figure is the median of the repeats. Target: onnxruntime fp32 >= 1.3x eager.
2. Accuracy: `lmforge evaluate` (the task's own metrics) of eager, ONNX fp32 and ONNX int8 (onnxruntime's dynamic
   quantisation) on the pang-lee test split. Target: int8 within 1 point of fp32.
3. Exactness (`--families`): max |onnxruntime - eager| over the logits of a tiny preset of every family and
   head kind at two batch/sequence sizes, and for the generating heads whether greedy tokens agree.

    python benchmarks/bench_export.py --model runs/minilm-pang-lee/model [--threads 2] [--batch 32]
                                      [--repeats 5] [--families] [--out benchmarks/results/export.json]

The classifier comes from a short fine-tuning run (README, "ONNX export"):
    lmforge finetune --task classification --model all-MiniLM-L6-v2 --data pang-lee-sentences --epochs 1
        --data.max_examples 3200 --data.max_length 64 --out runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lmforge.export.onnx import export_onnx
from lmforge.export.onnx_runtime import load_onnx_model
from lmforge.finetune.batches import collate
from lmforge.finetune.datasets import catalog_dataset, catalog_splits
from lmforge.finetune.evaluation import evaluate_saved, load_finetuned
from lmforge.finetune.tasks.base import batched, model_inputs
from lmforge.generate import generate
from lmforge.models import build_model

FAMILY_CASES = [
    ("bert-tiny", "sequence_classification"),
    ("bert-tiny", "token_classification"),
    ("roberta-tiny", "sequence_classification"),
    ("gpt-tiny", "causal_lm"),
    ("llama-tiny", "causal_lm"),
    ("t5-tiny", "seq2seq_lm"),
    ("transformer-tiny", "seq2seq_lm"),
]


def sentences_per_second(model, batches: list[dict], repeats: int) -> list[float]:
    """One figure per repeat: every batch once, through the model's forward."""
    n = sum(b["input_ids"].shape[0] for b in batches)
    figures = []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.inference_mode():
            for batch in batches:
                model(**model_inputs(model, batch))
        figures.append(n / (time.perf_counter() - start))
    return figures


def speed(model_dir: Path, exports: dict[str, Path], args: argparse.Namespace) -> dict:
    eager, _, task, config = load_finetuned(model_dir)
    records = catalog_splits("pang-lee-sentences", catalog_dataset("pang-lee-sentences"), config)["test"]
    features = task.encode(records, "benchmark")
    batches = [collate(list(chunk), task.pad_id) for chunk in batched(features, args.batch)]
    models = {"eager": eager, **{name: load_onnx_model(path, threads=args.threads) for name, path in exports.items()}}
    runs: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():  # warm-up: onnxruntime plans its first run, PyTorch its kernels
        sentences_per_second(model, batches[:2], 1)
    for _ in range(args.repeats):
        for name, model in models.items():
            runs[name] += sentences_per_second(model, batches, 1)
    medians = {name: statistics.median(figures) for name, figures in runs.items()}
    return {
        "sentences": len(features),
        "batch": args.batch,
        "threads": args.threads,
        "sentences_per_s": medians,
        "ratio_vs_eager": {name: medians[name] / medians["eager"] for name in exports},
    }


def accuracy(model_dir: Path, exports: dict[str, Path], work: Path) -> dict:
    scores = {}
    for name, folder in {"eager": model_dir, **exports}.items():
        result = evaluate_saved(folder, "pang-lee-sentences", "test", work / f"eval-{name}")
        scores[name] = {k: result["metrics"][k] for k in ("accuracy", "f1_macro")}
    return scores


def family_exactness(work: Path) -> list[dict]:
    rows = []
    for preset, head in FAMILY_CASES:
        torch.manual_seed(0)
        eager = build_model(preset, n_layer=2, head=head).eval()
        start = time.perf_counter()
        export_onnx(eager, work / f"{preset}-{head}")
        seconds = time.perf_counter() - start
        runtime = load_onnx_model(work / f"{preset}-{head}")
        c, worst = eager.config, 0.0
        for rows_, columns in ((1, 7), (4, 3)):
            ids = torch.randint(3, c.vocab_size, (rows_, columns), generator=torch.Generator().manual_seed(rows_))
            mask = torch.ones_like(ids)
            mask[0, : columns // 2] = 0 if head == "causal_lm" else 1
            kwargs = {"decoder_input_ids": ids[:, :2]} if head == "seq2seq_lm" else {}
            with torch.no_grad():
                expected = eager(ids, attention_mask=mask, **kwargs).logits
            worst = max(worst, float((runtime(ids, attention_mask=mask, **kwargs).logits - expected).abs().max()))
        greedy = None
        if head in ("causal_lm", "seq2seq_lm"):
            ids = torch.randint(3, c.vocab_size, (2, 5), generator=torch.Generator().manual_seed(5))
            greedy = bool(
                torch.equal(
                    generate(eager, ids, max_new_tokens=16).tokens, generate(runtime, ids, max_new_tokens=16).tokens
                )
            )
        rows.append(
            {
                "preset": preset,
                "head": head,
                "max_abs_diff": worst,
                "greedy_16_tokens_equal": greedy,
                "export_s": round(seconds, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="fine-tuned MiniLM classifier folder (run_dir/model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--families", action="store_true", help="also the exactness table of every family")
    parser.add_argument("--out", default="benchmarks/results/export.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    results: dict = {"model": str(model_dir), "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        work = Path(tmp)
        exports = {"onnx_fp32": work / "fp32", "onnx_int8": work / "int8"}
        eager, *_ = load_finetuned(model_dir)
        for name, quantize in (("onnx_fp32", None), ("onnx_int8", "int8")):
            start = time.perf_counter()
            export_onnx(eager, exports[name], source=model_dir, quantize=quantize)
            results[f"{name}_export_s"] = round(time.perf_counter() - start, 1)
        results["speed"] = speed(model_dir, exports, args)
        print(json.dumps(results["speed"], indent=2), flush=True)
        results["accuracy"] = accuracy(model_dir, exports, work)
        print(json.dumps(results["accuracy"], indent=2), flush=True)
        if args.families:
            results["families"] = family_exactness(work)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
