"""Baselines beside the Transformers, on the folds and splits the fine-tuning results use.

1. kfold: `pang-lee-sentences`, stratified 10-fold cross-validation over the 3,200 training sentences, the
   pool and folds of benchmarks/results/finetune_classification.json (same catalog split, seed 0,
   val_fraction 0.1, the recipe's `stratified_kfold_indices`): lstm-seed (the seed's Keras LSTM) trained by
   `lmforge finetune`, with the tfidf and frozen-lr baselines (`--baseline`) fitted on the very same folds.
   The TF-IDF row must equal that file's `tfidf_logreg` row, fold for fold: the check that the folds agree,
   so its fine-tuned MiniLM figure sits in the same table.
2. lowdata: lstm-seed (from scratch, and over MiniLM's embedding table) and all-MiniLM-L6-v2 fine-tuned on
   the first 100 / 200 / 500 / all shuffled training sentences, with and without EDA (the training set x4:
   each sentence plus 3 variants), 3 seeds each (one for all), scored on the catalog's 800 test sentences.
3. pos: a BiLSTM tagger (`bilstm`) on `wsj-pos`, from scratch and over MiniLM's embedding table
   (`--model.embeddings`), with the most-frequent-tag baseline, against the MiniLM tagger
   of benchmarks/results/finetune_pos.json (same splits: the catalog's).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_baselines.py [--only kfold,lowdata,pos] [--out DIR]

Each part writes benchmarks/results/baselines_<part>.json with the exact `lmforge finetune` commands.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from lmforge.finetune.config import FINETUNE
from lmforge.finetune.recipe import finetune
from lmforge.train.config import parse_args

RESULTS = Path(__file__).resolve().parent / "results"
QUIET = ["--train.progress=false", "--train.tensorboard=false"]
# lstm-seed from scratch: 4 epochs (validation accuracy peaks near there on this set), batch 64 to halve the
# sequential steps on 2 shared CPU cores
LSTM = ["--epochs=4", "--optim.lr=3e-3", "--optim.warmup_steps=0", "--model.vocab_size=8000", "--train.batch_size=64"]


def run(flags: list[str]) -> tuple[dict, float]:
    start = time.perf_counter()
    summary = finetune(parse_args([*QUIET, *flags], FINETUNE))
    return summary, time.perf_counter() - start


def command(flags: list[str]) -> str:
    return "lmforge finetune " + " ".join(f"'{f}'" if "{" in f else f for f in flags)


def mean_std(summary: dict, name: str) -> list[float]:
    return [summary[name]["mean"], summary[name]["std"]]


def recurrent_row(folds: dict) -> dict:
    return {
        "accuracy": mean_std(folds, "accuracy"),
        "f1_macro": mean_std(folds, "f1_macro"),
        "train_seconds_per_fold": mean_std(folds, "train_seconds"),
    }


def kfold(args) -> dict:
    flags = [
        "--task=classification", "--model=lstm-seed", "--data=pang-lee-sentences", "--kfold=10", *LSTM,
        "--data.max_length=64", f"--baseline={args.kfold_baselines}", f"--train.threads={args.threads}",
        f"--out={args.out}", "--train.name=lstm-seed-pang-lee-kfold",
    ]  # fmt: skip
    summary, seconds = run(flags)
    folds, baselines = summary["folds"], summary["baselines"]
    recorded = json.loads((RESULTS / "finetune_classification.json").read_text())
    rows = {"lstm-seed": recurrent_row(folds)}
    commands = [command(flags)]
    for preset in args.kfold_recurrent:  # the same recipe and folds with other cells (gru-seed: GRU, same widths)
        other = [f for f in flags if not f.startswith("--baseline")]
        other = [f"--model={preset}" if f == "--model=lstm-seed" else f for f in other]
        other = [f"--train.name={preset}-pang-lee-kfold" if f.startswith("--train.name") else f for f in other]
        rows[preset] = recurrent_row(run(other)[0]["folds"])
        commands.append(command(other))
    for name, scores in baselines.items():
        rows[name] = {
            "accuracy": mean_std(scores, "accuracy"),
            "f1_macro": mean_std(scores, "f1_macro"),
            "seconds_per_fold": mean_std(scores, "seconds"),
        }
    same_folds = all(
        abs(a - b) < 1e-9 for a, b in zip(rows["tfidf"]["accuracy"], recorded["tfidf_logreg"]["accuracy"], strict=True)
    )
    rows["minilm-finetuned (recorded)"] = {
        "accuracy": recorded["minilm"]["accuracy"],
        "f1_macro": recorded["minilm"]["f1_macro"],
        "seconds_all_folds": recorded["minilm"]["seconds"],
        "command": recorded["command"],
    }
    return {
        "examples": summary["examples"],
        "folds": 10,
        "rows": rows,
        "tfidf_equals_recorded_tfidf": same_folds,
        "seconds": round(seconds, 1),
        "command": commands[0],
        "commands": commands,
    }


# all-MiniLM-L6-v2 fine-tuned as in the recorded k-fold recipe (lr 1e-4, warmup 10), in batches of 16 and for
# about 1,500 sentences' worth of steps on the small sets (10 epochs of 90, 8 of 180, 3 of 450; 1 of all): a
# few-shot run needs more passes than one epoch's handful of steps
MINILM = ["--train.batch_size=16", "--optim.lr=1e-4", "--optim.warmup_steps=10"]
# lstm-seed: the k-fold recipe without its fixed 4 epochs; on the small sets it gets about 3,000 sentences' worth
# of steps (33 epochs of 90, 17 of 180, 7 of 450; 4 of all), else 90 sentences would be 8 steps of 64
RECURRENT = [f for f in LSTM if not f.startswith("--epochs")]
EMBEDDED = [f for f in RECURRENT if not f.startswith("--model.vocab_size")] + ["--model.embeddings=all-MiniLM-L6-v2"]


def minilm_epochs(n: int) -> int:
    return max(1, min(10, round(1500 / n))) if n else 1


def recurrent_epochs(n: int) -> int:
    return max(4, round(3000 / n)) if n else 4


# row label -> (preset, recipe, epochs for n sentences); the embedded row is the seed's LSTM over MiniLM's
# (frozen-at-start, then trained) embedding table and tokenizer: the pretrained word vectors Wei & Zou used
LOWDATA_MODELS = {
    "lstm-seed": ("lstm-seed", RECURRENT, recurrent_epochs),
    "lstm-seed+minilm-embeddings": ("lstm-seed", EMBEDDED, recurrent_epochs),
    "all-MiniLM-L6-v2": ("all-MiniLM-L6-v2", MINILM, minilm_epochs),
}


def lowdata(args) -> dict:
    """Each (model, size, augmentation) at every seed: train.seed draws the subset (the first N of the training
    sentences shuffled by it), the initialisation, the batch order and EDA's edits, so the spread is the spread a
    user drawing N labelled sentences would see. `--lowdata-models` reruns some rows and keeps the others from
    the results file."""
    path = RESULTS / "baselines_lowdata.json"
    keep = set(LOWDATA_MODELS) - set(args.lowdata_models)
    old = json.loads(path.read_text()) if path.exists() and keep else {"runs": [], "table": [], "commands": []}
    out = {"test_sentences": old.get("test_sentences"), "seeds": args.seeds, "runs": [], "table": [], "commands": []}
    for label in LOWDATA_MODELS:
        if label in keep:
            out["runs"] += [r for r in old["runs"] if r["model"] == label]
            out["table"] += [r for r in old["table"] if r["model"] == label]
            out["commands"] += [c for c in old["commands"] if f"--train.name={label}-" in c]
            continue
        model, recipe, epochs_for = LOWDATA_MODELS[label]
        for n in args.sizes:
            for augment in ("", "eda"):
                accuracies = []
                for seed in args.seeds if n else args.seeds[:1]:
                    name = f"{label}-n{n or 'all'}{'-eda' if augment else ''}-s{seed}"
                    flags = [
                        "--task=classification", f"--model={model}", "--data=pang-lee-sentences", *recipe,
                        f"--epochs={epochs_for(n)}", "--data.max_length=64", f"--data.max_examples={n}",
                        "--eval-every=0", f"--train.seed={seed}", f"--train.threads={args.threads}",
                        f"--out={args.out}", f"--train.name={name}",
                    ]  # fmt: skip
                    if augment:
                        flags += ["--data.augment=eda", "--data.augment_factor=4"]
                    summary, seconds = run(flags)
                    out["test_sentences"] = summary["examples"]["test"]
                    original = summary.get("augmented", {}).get("original", summary["examples"]["train"])
                    out["runs"].append(
                        {
                            "model": label,
                            "seed": seed,
                            "train_sentences": original,
                            "augment": augment or "none",
                            "trained_on": summary["examples"]["train"],
                            "test_accuracy": summary["test"]["accuracy"],
                            "test_f1_macro": summary["test"]["f1_macro"],
                            "seconds": round(seconds, 1),
                        }
                    )
                    out["commands"].append(command(flags))
                    accuracies.append(summary["test"]["accuracy"])
                    print(json.dumps(out["runs"][-1]), flush=True)
                out["table"].append(
                    {
                        "model": label,
                        "train_sentences": original,
                        "augment": augment or "none",
                        "test_accuracy_mean": float(np.mean(accuracies)),
                        "test_accuracy_std": float(np.std(accuracies)),
                        "seeds": len(accuracies),
                    }
                )
    return out


def pos(args) -> dict:
    flags = [
        "--task=token-classification", "--model=bilstm", "--data=wsj-pos", f"--epochs={args.pos_epochs}",
        "--optim.lr=2e-3", "--optim.warmup_steps=0", "--model.vocab_size=8000", "--data.max_length=128",
        "--train.batch_size=16", "--eval-every=0", "--baseline=most-frequent-tag", f"--train.threads={args.threads}",
        f"--out={args.out}", "--train.name=bilstm-wsj-pos",
    ]  # fmt: skip
    summary, seconds = run(flags)
    # the same tagger over MiniLM's embedding table and tokenizer: pretrained word vectors, no Transformer
    embedded = [f for f in flags if not f.startswith(("--baseline", "--model.vocab_size", "--train.name"))]
    embedded += ["--model.embeddings=all-MiniLM-L6-v2", "--train.name=bilstm-minilm-emb-wsj-pos"]
    with_embeddings = run(embedded)[0]
    recorded = json.loads((RESULTS / "finetune_pos.json").read_text())
    return {
        "train_sentences": summary["examples"]["train"],
        "test_sentences": summary["examples"]["test"],
        "bilstm_token_accuracy": summary["test"]["token_accuracy"],
        "bilstm_f1_macro": summary["test"]["f1_macro"],
        "bilstm_train_seconds": round(summary["train_seconds"], 1),
        "bilstm_minilm_embeddings_token_accuracy": with_embeddings["test"]["token_accuracy"],
        "bilstm_minilm_embeddings_f1_macro": with_embeddings["test"]["f1_macro"],
        "bilstm_minilm_embeddings_train_seconds": round(with_embeddings["train_seconds"], 1),
        "most_frequent_tag_token_accuracy": summary["baselines"]["most-frequent-tag"]["test"]["token_accuracy"],
        "minilm_token_accuracy (recorded)": recorded["minilm_token_accuracy"],
        "minilm_f1_macro (recorded)": recorded["minilm_f1_macro"],
        "minilm_command": recorded["command"],
        "seconds": round(seconds, 1),
        "command": command(flags),
        "command_embeddings": command(embedded),
    }


PARTS = {"kfold": kfold, "lowdata": lowdata, "pos": pos}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(PARTS), help="comma-separated parts")
    parser.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[100, 200, 500, 0])
    parser.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--pos-epochs", type=int, default=10)
    parser.add_argument(
        "--lowdata-models", type=lambda s: s.split(","), default=list(LOWDATA_MODELS), help="lowdata rows to (re)run"
    )
    parser.add_argument("--kfold-baselines", default="tfidf,frozen-lr")
    parser.add_argument("--kfold-recurrent", type=lambda s: [v for v in s.split(",") if v], default=["gru-seed"])
    parser.add_argument("--out", default="runs/bench-baselines")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    for part in args.only.split(","):
        print(f"== {part}", flush=True)
        result = PARTS[part](args)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"baselines_{part}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(json.dumps(result, indent=2), flush=True)


if __name__ == "__main__":
    main()
