"""Fine-tuning results on real data with real weights, each next to a reference measured in the same run.

1. classification: all-MiniLM-L6-v2 (real weights) fine-tuned on `pang-lee-sentences`, stratified 10-fold
   cross-validation over the 3,200 training sentences (the 800 test sentences stay unused), against a
   TF-IDF (word 1-2 grams) + logistic-regression baseline from scikit-learn on the very same folds.
2. pos: MiniLM token classification on `wsj-pos` (45 Penn Treebank tags), scored on the catalog's test
   sentences, against the majority-tag-per-word baseline (unknown words: the most frequent tag).
3. translation: the original Transformer trained from scratch on `kjv-spanish` (English -> Spanish) within a
   stated step budget; BLEU and chrF (sacreBLEU definitions) on held-out test verses, with sample translations,
   against copying the source (the score an untrained system gets for shared names and numbers).
4. sft: SmolLM2-135M-Instruct (real weights) with LoRA SFT on sentiment-labelling instructions built from
   `pang-lee-sentences`; held-out accuracy of the generated label before and after.

    .venv/bin/python benchmarks/bench_finetune.py [--only classification,pos,translation,sft] [--folds 10]

Results go to stdout and benchmarks/results/finetune_<part>.json; run folders under --out.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from lmforge.finetune.config import FINETUNE
from lmforge.finetune.recipe import finetune
from lmforge.train.config import parse_args

RESULTS = Path(__file__).resolve().parent / "results"
QUIET = ["--train.progress=false", "--train.tensorboard=false"]


def save(part: str, result: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"finetune_{part}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2), flush=True)


def run(flags: list[str]) -> dict:
    return finetune(parse_args([*QUIET, *flags], FINETUNE))


def classification(args) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    from lmforge.eval import stratified_kfold_indices
    from lmforge.finetune.datasets import load_task_data

    flags = [
        "--task=classification", "--model=all-MiniLM-L6-v2", "--data=pang-lee-sentences", f"--kfold={args.folds}",
        "--epochs=1", "--data.max_length=64", "--train.batch_size=32", "--optim.lr=1e-4",
        "--optim.warmup_steps=10", f"--out={args.out}", "--train.name=minilm-pang-lee-kfold",
    ]  # fmt: skip
    start = time.perf_counter()
    summary = run(flags)
    seconds = time.perf_counter() - start
    config = parse_args([*QUIET, *flags], FINETUNE)
    data = load_task_data(config)  # the recipe's own pool and folds
    pool = data.train + data.validation
    labels = [r.label for r in pool]
    texts = [r.text for r in pool]
    folds = stratified_kfold_indices(labels, args.folds, seed=config.train.seed)
    acc, f1 = [], []
    for train_idx, val_idx in folds:
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
        x_train = vectorizer.fit_transform([texts[i] for i in train_idx])
        model = LogisticRegression(C=10.0, max_iter=2000).fit(x_train, [labels[i] for i in train_idx])
        predicted = model.predict(vectorizer.transform([texts[i] for i in val_idx]))
        truth = [labels[i] for i in val_idx]
        acc.append(accuracy_score(truth, predicted))
        f1.append(f1_score(truth, predicted, average="macro"))
    folds_summary = summary["folds"]
    return {
        "examples": len(pool),
        "folds": args.folds,
        "minilm": {
            "accuracy": [folds_summary["accuracy"]["mean"], folds_summary["accuracy"]["std"]],
            "f1_macro": [folds_summary["f1_macro"]["mean"], folds_summary["f1_macro"]["std"]],
            "roc_auc": [folds_summary["roc_auc"]["mean"], folds_summary["roc_auc"]["std"]],
            "seconds": round(seconds, 1),
        },
        "tfidf_logreg": {
            "accuracy": [float(np.mean(acc)), float(np.std(acc, ddof=1))],
            "f1_macro": [float(np.mean(f1)), float(np.std(f1, ddof=1))],
        },
        "command": "lmforge finetune " + " ".join(flags),
    }


def pos(args) -> dict:
    from lmforge.data import load_dataset

    flags = [
        "--task=token-classification", "--model=all-MiniLM-L6-v2", "--data=wsj-pos", "--epochs=3",
        "--data.max_length=128", "--train.batch_size=16", "--optim.lr=1e-4", "--optim.warmup_steps=10",
        "--eval-every=0", f"--out={args.out}", "--train.name=minilm-wsj-pos",
    ]  # fmt: skip
    start = time.perf_counter()
    summary = run(flags)
    seconds = time.perf_counter() - start
    wsj = load_dataset("wsj-pos")
    by_word: dict[str, Counter] = {}
    for r in wsj["train"]:
        for token, tag in zip(r["tokens"], r["tags"], strict=True):
            by_word.setdefault(token.lower(), Counter())[tag] += 1
    overall = Counter(tag for r in wsj["train"] for tag in r["tags"]).most_common(1)[0][0]
    right = total = 0
    for r in wsj["test"]:
        for token, tag in zip(r["tokens"], r["tags"], strict=True):
            guess = by_word[token.lower()].most_common(1)[0][0] if token.lower() in by_word else overall
            right += guess == tag
            total += 1
    test = summary["test"]
    return {
        "train_sentences": summary["examples"]["train"],
        "test_sentences": summary["examples"]["test"],
        "minilm_token_accuracy": test["token_accuracy"],
        "minilm_f1_macro": test["f1_macro"],
        "majority_tag_baseline_accuracy": right / total,
        "seconds": round(seconds, 1),
        "counts": summary["counts"],
        "command": "lmforge finetune " + " ".join(flags),
    }


def translation(args) -> dict:
    from lmforge.eval import bleu, chrf
    from lmforge.finetune.datasets import load_task_data
    from lmforge.finetune.tasks.generation import eval_subset

    flags = [
        "--task=seq2seq", "--model=transformer-tiny", "--data=kjv-spanish", "--epochs=0",
        f"--max-steps={args.translation_steps}",
        '--model.overrides={"n_layer": 3, "d_model": 256, "n_head": 4, "d_ff": 1024}',
        "--model.vocab_size=4000", "--model.dropout=0.1", "--data.max_length=64", "--data.max_target_length=64",
        "--train.batch_size=48", "--optim.lr=1e-3", "--optim.min_lr=1e-4", "--optim.schedule=cosine",
        "--optim.warmup_steps=100", "--optim.weight_decay=0.01", "--eval-every=0", "--task.eval_examples=300",
        "--task.num_beams=4", "--task.max_new_tokens=64", f"--out={args.out}", "--train.name=transformer-kjv-seq2seq",
    ]  # fmt: skip
    start = time.perf_counter()
    summary = run(flags)
    seconds = time.perf_counter() - start
    config = parse_args([*QUIET, *flags], FINETUNE)
    test = eval_subset(load_task_data(config).test, 300)
    sources, references = [s for s, _ in test], [t for _, t in test]
    from lmforge.finetune.evaluation import load_finetuned

    model, _, task, _ = load_finetuned(Path(summary["run_dir"]) / "model")
    samples = task.generate(model, test[:5])
    return {
        "steps": summary["steps"],
        "seconds": round(seconds, 1),
        "parameters": summary["parameters"],
        "test_verses": len(test),
        "bleu": summary["test"]["bleu"],
        "chrf": summary["test"]["chrf"],
        "copy_source_bleu": bleu(sources, references)["score"],
        "copy_source_chrf": chrf(sources, references),
        "samples": [{"source": s, "reference": r, "output": o} for (s, r), o in zip(test[:5], samples, strict=True)],
        "command": "lmforge finetune " + " ".join(flags),
    }


def sft(args) -> dict:
    from lmforge.data.tokenizers.tokenizer import load_tokenizer
    from lmforge.finetune.datasets import load_task_data
    from lmforge.finetune.tasks.generation import eval_subset
    from lmforge.finetune.tasks.sft import SFTTask
    from lmforge.hf.load import load_model
    from lmforge.hf.real_weights import smollm2_instruct_gguf

    flags = [
        "--task=sft", "--model=SmolLM2-135M-Instruct", "--data=pang-lee-sentences", "--method=lora",
        "--task.lora_targets=qkv,out,gate,up,down", "--task.lora_r=16", "--task.lora_alpha=32",
        f"--data.max_examples={args.sft_examples}", "--data.max_length=128", "--epochs=1", "--train.batch_size=8",
        "--optim.lr=1e-3", "--optim.warmup_steps=10", "--eval-every=0", "--task.eval_examples=200",
        "--task.max_new_tokens=4", "--task.predict_batch_size=16", f"--out={args.out}",
        "--train.name=smollm2-sft-sentiment",
    ]  # fmt: skip
    config = parse_args([*QUIET, *flags], FINETUNE)
    data = load_task_data(config)
    held_out = eval_subset(data.test, 200)  # the recipe's own held-out sample
    path = smollm2_instruct_gguf()
    base, tokenizer = load_model(path).eval(), load_tokenizer(path)
    before = SFTTask(config, tokenizer).text_scores(held_out, SFTTask(config, tokenizer).generate(base, held_out))
    del base
    start = time.perf_counter()
    summary = run(flags)
    seconds = time.perf_counter() - start
    return {
        "train_examples": summary["examples"]["train"],
        "held_out": len(held_out),
        "trainable_parameters": summary["trainable_parameters"],
        "parameters": summary["parameters"],
        "steps": summary["steps"],
        "seconds": round(seconds, 1),
        "before_exact_match": before["exact_match"],
        "after_exact_match": summary["test"]["exact_match"],
        "before": before,
        "after": {k: v for k, v in summary["test"].items() if isinstance(v, float)},
        "loss_curve": str(Path(summary["run_dir"]) / "training_curves.png"),
        "command": "lmforge finetune " + " ".join(flags),
    }


PARTS = {"classification": classification, "pos": pos, "translation": translation, "sft": sft}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(PARTS), help="comma-separated parts")
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--translation-steps", type=int, default=1500)
    parser.add_argument("--sft-examples", type=int, default=1000)
    parser.add_argument("--out", default="runs/bench-finetune")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for part in args.only.split(","):
        print(f"== {part}", flush=True)
        save(part, PARTS[part](args))


if __name__ == "__main__":
    main()
