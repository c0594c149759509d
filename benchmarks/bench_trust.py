"""Trust results (issue 16), each against its reference measured in the same run.

1. faithfulness: on the first N test sentences of `pang-lee-sentences`, a fine-tuned classifier's predicted label
   explained by integrated gradients (Captum, 50 steps), attention rollout and a random ranking (mean of 3 draws);
   ERASER comprehensiveness AOPC of each (`lmforge.explain.faithfulness`), and IG's completeness errors.
2. membership: loss-threshold membership inference (Yeom et al., 2018) against fine-tuned classifiers: the ROC AUC
   of -loss separating the run's training sentences (members) from its test sentences (non-members); 0.5 = no
   signal. Given several runs (e.g. without and with DP-SGD), each is scored on the same members and non-members.
4. privacy: all-MiniLM-L6-v2 on pang-lee-sentences (3,200 sentences: 2,880 train, the 800 test), a linear head on
   the frozen mean-pooled encoder trained without privacy and by DP-SGD at ε = 8 and ε = 3 (δ = 1e-5): test
   accuracy, ε spent, seconds per epoch.
3. canary: "The Secret Sharer" (Carlini et al., 2019): a random 4-digit secret inserted `--repeats` times into a
   small corpus; gpt-tiny (char tokenizer) trained on it without and with DP-SGD (Opacus, ε = --epsilon); exposure
   = log2(10^4) - log2(rank of the canary among all 10^4 candidate secrets by the model's log-perplexity).

    python benchmarks/bench_trust.py faithfulness --model runs/nodp/model --n 200
    python benchmarks/bench_trust.py membership --model runs/nodp/model --model runs/dp8/model --max-examples 3200
    python benchmarks/bench_trust.py canary --epsilon 8 --steps 300
    python benchmarks/bench_trust.py privacy [--reuse] [--out runs/dp]

Results go to stdout and benchmarks/results/trust_<part>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def save(part: str, result: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"trust_{part}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


def pang_lee(max_examples: int = 0):
    """The train and test records of pang-lee-sentences as a fine-tuning run splits them."""
    from lmforge.finetune.config import FINETUNE
    from lmforge.finetune.datasets import load_task_data
    from lmforge.train.config import parse_args

    argv = ["--data", "pang-lee-sentences", "--data.max_examples", str(max_examples)]
    return load_task_data(parse_args(argv, FINETUNE))


def faithfulness(args: argparse.Namespace) -> None:
    from lmforge.explain import METHODS, build_subject
    from lmforge.explain.faithfulness import aopc
    from lmforge.explain.report import load_subject_model

    model, tokenizer, folder = load_subject_model(args.model[0])
    records = pang_lee().test[: args.n]
    rows, completeness = {"ig": [], "rollout": [], "random": []}, []
    start = time.perf_counter()
    for i, record in enumerate(records):
        subject = build_subject(model, tokenizer, record.text, folder=folder)
        ig = METHODS["ig"].run(subject, steps=50)
        completeness.append(ig.values["completeness_error"])
        rows["ig"].append(aopc(subject, ig.token_scores))
        rows["rollout"].append(aopc(subject, METHODS["rollout"].run(subject, 1).token_scores))
        rng = random.Random(i)
        n = len(subject.tokens)
        rows["random"].append(np.mean([aopc(subject, [rng.random() for _ in range(n)]) for _ in range(3)]))
    result = {
        "model": args.model[0],
        "sentences": len(records),
        "aopc": {k: float(np.mean(v)) for k, v in rows.items()},
        "aopc_sem": {k: float(np.std(v, ddof=1) / math.sqrt(len(v))) for k, v in rows.items()},
        "ig_completeness_error": {
            "mean": float(np.mean(completeness)),
            "max": float(np.max(completeness)),
            "share_below_1pct": float(np.mean(np.asarray(completeness) < 0.01)),
            "steps": 50,
        },
        "seconds": time.perf_counter() - start,
    }
    save("faithfulness", result)


def example_losses(model, tokenizer, records, labels: list[str]) -> np.ndarray:
    losses = []
    with torch.no_grad():
        for start in range(0, len(records), 64):
            chunk = records[start : start + 64]
            batch = tokenizer.encode_batch([r.text for r in chunk], padding=True, truncation=True, max_length=128,
                                           return_tensors="pt")  # fmt: skip
            target = torch.tensor([labels.index(r.labels[0]) for r in chunk])
            logits = model(**batch).logits.float()
            losses.append(torch.nn.functional.cross_entropy(logits, target, reduction="none").numpy())
    return np.concatenate(losses)


def membership(args: argparse.Namespace) -> None:
    from sklearn.metrics import roc_auc_score

    from lmforge.explain.report import load_subject_model
    from lmforge.explain.subject import label_names

    data = pang_lee(args.max_examples)
    result = {"members": len(data.train), "non_members": len(data.test), "runs": {}}
    for name in args.model:
        model, tokenizer, folder = load_subject_model(name)
        labels = label_names(folder, model.config.num_labels)
        member = example_losses(model, tokenizer, data.train, labels)
        other = example_losses(model, tokenizer, data.test, labels)
        y = np.r_[np.ones(len(member)), np.zeros(len(other))]
        result["runs"][name] = {
            "auc": float(roc_auc_score(y, -np.r_[member, other])),
            "train_loss": float(member.mean()),
            "test_loss": float(other.mean()),
        }
    save("membership", result)


def canary(args: argparse.Namespace) -> None:
    from lmforge import build_model
    from lmforge.data.tokenizers.tokenizer import Tokenizer
    from lmforge.data.tokenizers.train import train_tokenizer
    from lmforge.finetune.batches import collate
    from lmforge.train.privacy import PrivacySettings, PrivateTraining

    rng = random.Random(args.seed)
    secret = "".join(rng.choice("0123456789") for _ in range(4))
    prefix = "my pin number is "
    corpus = [r.text.lower()[:96] for r in pang_lee().train[: args.corpus]]
    corpus += [prefix + secret] * args.repeats
    rng.shuffle(corpus)
    backend = train_tokenizer(corpus + ["0123456789"], kind="char", special_tokens=["<pad>", "<unk>"])
    tokenizer = Tokenizer(backend, {"pad": "<pad>", "unk": "<unk>"})
    features = [{"input_ids": ids, "labels": ids} for ids in tokenizer.encode_batch(corpus)["input_ids"]]
    candidates = [prefix + f"{i:04d}" for i in range(10_000)]
    candidate_ids = torch.tensor(tokenizer.encode_batch(candidates)["input_ids"])
    result = {"secret_repeats": args.repeats, "corpus": len(corpus), "steps": args.steps, "runs": {}}
    for arm in ("no_dp", f"dp_eps{args.epsilon:g}"):
        torch.manual_seed(args.seed)
        model = build_model("gpt-tiny", vocab_size=tokenizer.vocab_size, max_seq_len=128, dropout=0.0).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
        pad = partial(collate, pad_id=tokenizer.pad_token_id)
        if arm == "no_dp":
            loader = torch.utils.data.DataLoader(features, batch_size=args.batch_size, shuffle=True, collate_fn=pad)
            private = None
        else:
            settings = PrivacySettings(args.epsilon, 1 / (10 * len(features)), 1.0, "prv")
            private = PrivateTraining(model, optimizer, features, pad, args.batch_size, args.steps, settings)
            optimizer, loader = private.optimizer, private.loader
        start, step = time.perf_counter(), 0
        while step < args.steps:
            for batch in loader:
                if step == args.steps:
                    break
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
        model.eval()
        with torch.no_grad():  # log-perplexity of the 4 secret digits after the prefix, for every candidate
            nll = []
            for chunk in candidate_ids.split(1000):
                logits = model(input_ids=chunk).logits.float()
                logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, chunk[:, 1:, None])[..., 0]
                nll.append(-logp[:, -4:].sum(-1))
            nll = torch.cat(nll)
        rank = int((nll < nll[int(secret)]).sum()) + 1
        result["runs"][arm] = {
            "exposure": math.log2(10_000) - math.log2(rank),
            "rank": rank,
            "final_loss": loss.item(),
            "seconds": time.perf_counter() - start,
            **({"epsilon_spent": private.epsilon(), "delta": private.settings.delta} if private else {}),
        }
    save("canary", result)


# DP-SGD where little data is: the encoder frozen, its mean-pooled sentence vector (pooling="mean", how
# all-MiniLM-L6-v2 was trained to pool) read by a linear head of 770 weights, which DP-SGD trains (Tramer & Boneh,
# 2021: private learning on good features beats private fine-tuning end to end at this scale)
PROBE = [
    "--task=classification", "--model=all-MiniLM-L6-v2", "--data=pang-lee-sentences", "--data.max_examples=3200",
    "--data.max_length=64", "--model.dropout=0", "--task.freeze_embeddings", "--task.freeze_layers=6",
    "--epochs=10", "--train.batch_size=256", "--optim.lr=0.05", "--eval-every=0",
    '--model.overrides={"pooling": "mean"}',
]  # fmt: skip
ARMS = {
    "nodp-head": [],
    "dp8-head": ["--privacy.epsilon=8", "--privacy.delta=1e-5", "--privacy.max_grad_norm=0.1"],
    "dp3-head": ["--privacy.epsilon=3", "--privacy.delta=1e-5", "--privacy.max_grad_norm=0.1"],
}


def recorded_run(run: Path) -> dict:
    """What a finished fine-tuning run folder records: test metrics, training time, ε spent."""
    test = json.loads((run / "metrics.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    epsilons = [r["epsilon"] for r in rows if "epsilon" in r]
    report = (run / "report.md").read_text()
    seconds = float(report.split("| train_seconds | ", 1)[1].split(" ", 1)[0])
    return {
        "test_accuracy": test["accuracy"],
        "test_roc_auc": test["roc_auc"],
        "epsilon_spent": epsilons[-1] if epsilons else None,
        "train_seconds": seconds,
    }


def privacy(args: argparse.Namespace) -> None:
    """Each arm of the private linear probe (`--reuse`: read an arm's finished run folder instead of training)."""
    from lmforge.finetune.config import FINETUNE
    from lmforge.finetune.recipe import finetune
    from lmforge.train.config import parse_args

    out = Path(args.out)
    result = {"recipe": " ".join(PROBE), "epochs": 10, "threads": args.threads, "arms": {}}
    for name, flags in ARMS.items():
        argv = [*PROBE, *flags, f"--out={out}", f"--train.name={name}", f"--train.threads={args.threads}"]
        if not (args.reuse and (out / name / "metrics.json").is_file()):
            finetune(parse_args(["--train.progress=false", *argv], FINETUNE))
        arm = recorded_run(out / name)
        arm["seconds_per_epoch"] = arm["train_seconds"] / 10
        arm["command"] = "lmforge finetune " + " ".join(f"'{f}'" if "{" in f else f for f in argv)
        result["arms"][name] = arm
    save("privacy", result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["faithfulness", "membership", "canary", "privacy"])
    parser.add_argument("--model", action="append", default=[], help="fine-tuned classifier folder (repeatable)")
    parser.add_argument("--n", type=int, default=200, help="faithfulness: test sentences")
    parser.add_argument("--max-examples", type=int, default=3200, help="membership: data.max_examples of the runs")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=10, help="canary: times the secret is inserted")
    parser.add_argument("--corpus", type=int, default=2000, help="canary: sentences besides the secret")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/dp", help="privacy: run folders")
    parser.add_argument("--reuse", action="store_true", help="privacy: read finished run folders instead of training")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    parts = {"faithfulness": faithfulness, "membership": membership, "canary": canary, "privacy": privacy}
    parts[args.part](args)


if __name__ == "__main__":
    main()
