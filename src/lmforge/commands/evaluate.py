"""`lmforge evaluate MODEL --data DATA` and `lmforge predict MODEL --input FILE --output FILE`.

MODEL is a fine-tuned model folder (run_dir/model, or the run folder itself) or its ONNX export (`lmforge export
--to onnx`, run on onnxruntime): it carries task.json, so the task, labels and lengths are the ones the model was
trained with.

    lmforge evaluate runs/minilm-pang-lee/model --data pang-lee-sentences --split test
    lmforge predict runs/minilm-pang-lee/model --input reviews.jsonl --output predictions.csv
"""

from __future__ import annotations

import argparse
import json
import sys


def register(commands, groups) -> None:
    evaluate = commands.add_parser(
        "evaluate", help="score a fine-tuned model on labelled data (metrics, report, plots)"
    )
    evaluate.add_argument("model", help="fine-tuned model folder (run_dir/model), run folder or its ONNX export")
    evaluate.add_argument("--data", required=True, help="catalog name or labelled file")
    evaluate.add_argument("--split", default="test", help="split of a catalog dataset (default: test)")
    evaluate.add_argument("--out", default=None, help="report folder (default: beside the model)")
    evaluate.set_defaults(func=run_evaluate)

    predict = commands.add_parser("predict", help="predictions of a fine-tuned model for a file of inputs")
    predict.add_argument("model", help="fine-tuned model folder (run_dir/model), run folder or its ONNX export")
    predict.add_argument(
        "--input", required=True, help="JSONL objects or text lines (each task's fields: lmforge.finetune.tasks)"
    )
    predict.add_argument("--output", required=True, help="predictions file: .jsonl or .csv")
    predict.set_defaults(func=run_predict)


def fine_tuned_model(name: str) -> str:
    """The model folder `name` stands for (`lmforge.hf.resolve`: a run folder gives its model/ folder)."""
    from lmforge.hf.resolve import resolve_model

    return str(resolve_model(name, presets=False).path)


def run_evaluate(args: argparse.Namespace) -> None:
    from lmforge.finetune.evaluation import evaluate_saved

    result = evaluate_saved(fine_tuned_model(args.model), args.data, args.split, args.out)
    numbers = {k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))}
    print(json.dumps(numbers, indent=2))
    print(f"report: {result['out_dir']}/report.md", file=sys.stderr)


def run_predict(args: argparse.Namespace) -> None:
    from lmforge.finetune.evaluation import predict_saved

    n = predict_saved(fine_tuned_model(args.model), args.input, args.output)
    print(f"{n} predictions written to {args.output}", file=sys.stderr)
