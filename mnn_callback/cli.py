"""Command line: evaluate saved checkpoints or model families post hoc, draw the plots, run the demo.

::

    mnn-callback evaluate RUN_DIR_OR_MODELS... --data heldout.txt --out results/
    mnn-callback plot results/metrics.csv --out results/plots
    mnn-callback demo

Exit codes: 0 success; 1 some checkpoint failed (the others were evaluated); 2 bad input
(no models found, a missing data file, an empty sample).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from mnn_callback.errors import UsageError
from mnn_callback.files import read_jsonl
from mnn_callback.schema import CSV_COLUMNS

__all__ = ["CSV_COLUMNS", "build_parser", "main"]


def _layers(text: str) -> str | list[int]:
    if text in ("all", "last"):
        return text
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(
            f"--layers must be all, last or comma-separated integers such as 0,3,-1; got {text!r}"
        ) from None


def _sinks(args: argparse.Namespace) -> list[Any]:
    from mnn_callback.sinks import TensorBoardSink, WandbSink

    sinks = []
    if args.tensorboard:
        sinks.append(TensorBoardSink(args.tensorboard))
    if args.wandb_project:
        sinks.append(WandbSink(start_run=True, project=args.wandb_project, job_type="evaluate"))
    return sinks


def _output_directory(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--out {path} is a file; expected a directory (it is created if missing)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create --out {path}: {error.strerror}") from None


def evaluate(args: argparse.Namespace) -> int:
    from mnn_callback.evaluation import UNTRAINED, evaluate_models, latest_rows
    from mnn_callback.tables import write_csv

    _output_directory(args.out)
    results_file = os.path.join(args.out, "metrics.jsonl")
    csv_path = os.path.join(args.out, "metrics.csv")
    sinks = _sinks(args)
    try:
        rows = evaluate_models(
            args.paths,
            args.data,
            tokenizer=args.tokenizer,
            reference=UNTRAINED if args.reference_untrained else args.reference,
            results_file=results_file,
            force=args.force,
            device=args.device,
            dtype=args.dtype,
            seed=args.seed,
            trust_remote_code=args.trust_remote_code,
            sinks=sinks,
            progress=True,
            max_samples=args.max_samples,
            max_length=args.max_length,
            batch_size=args.batch_size,
            layers=_layers(args.layers),
            method=args.method,
        )
    except KeyboardInterrupt:  # what finished is in the results file: the CSV too
        if os.path.isfile(results_file):
            write_csv(csv_path, latest_rows(read_jsonl(results_file)))
        raise
    finally:
        for sink in sinks:
            sink.close()
    write_csv(csv_path, latest_rows(read_jsonl(results_file)))
    failed = {row["model"]: row["error"] for row in rows if row.get("error")}
    for model, error in failed.items():
        print(f"mnn-callback: {model} failed: {error}", file=sys.stderr)
    models = len({row["model"] for row in rows})
    print(f"wrote {csv_path} ({models - len(failed)} of {models} models evaluated)")
    return 1 if failed else 0


def plot(args: argparse.Namespace) -> int:
    from mnn_callback.plots import plot_all
    from mnn_callback.tables import load_table

    rows = load_table(args.table)
    if not rows:
        raise UsageError(f"{args.table} holds no metric rows")
    _output_directory(args.out)
    paths = plot_all(rows, args.out)
    if not paths:
        raise UsageError(f"{args.table}: nothing to draw (no metric has values at two steps, models or layers)")
    for path in paths:
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnn-callback", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    evaluate_parser = commands.add_parser("evaluate", help="evaluate checkpoints or models post hoc")
    evaluate_parser.add_argument("paths", nargs="+", metavar="PATH", help="checkpoint, run or model directories")
    evaluate_parser.add_argument("--data", required=True, help="held-out sample: a .txt (paragraphs) or .jsonl file")
    evaluate_parser.add_argument("--tokenizer", help="tokenizer directory or id (default: the model's own)")
    evaluate_parser.add_argument("--out", default="mnn_results", help="output directory (default: mnn_results)")
    evaluate_parser.add_argument("--layers", default="all", help="all, last, or indices such as 0,3,6")
    evaluate_parser.add_argument("--max-samples", type=int, default=64)
    evaluate_parser.add_argument("--max-length", type=int, default=512)
    evaluate_parser.add_argument("--batch-size", type=int, default=8)
    evaluate_parser.add_argument(
        "--seed", type=int, default=0, help="seed of the sample choice and untrained reference"
    )
    evaluate_parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    evaluate_parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    evaluate_parser.add_argument(
        "--method", choices=["exact", "fast"], default="exact", help="spectra: eigendecomposition, or matmul only"
    )
    reference = evaluate_parser.add_mutually_exclusive_group()
    reference.add_argument("--reference", help="Diff-eRank reference model (default: the first checkpoint)")
    reference.add_argument(
        "--reference-untrained", action="store_true", help="reference: the first model's config, randomly initialised"
    )
    evaluate_parser.add_argument("--tensorboard", metavar="DIR", help="also log each model at its step to TensorBoard")
    evaluate_parser.add_argument("--wandb-project", metavar="NAME", help="also log to a new W&B run in this project")
    evaluate_parser.add_argument("--force", action="store_true", help="re-evaluate models already in metrics.jsonl")
    evaluate_parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow models' own Python code (off: it runs their code)"
    )
    evaluate_parser.set_defaults(handler=evaluate)

    plot_parser = commands.add_parser("plot", help="draw PNGs from metrics.csv or a run's mnn_metrics.jsonl")
    plot_parser.add_argument("table", help="metrics.csv, metrics.jsonl, a run's mnn_metrics.jsonl or its directory")
    plot_parser.add_argument("--out", default="mnn_plots", help="output directory for the PNGs")
    plot_parser.set_defaults(handler=plot)

    commands.add_parser("demo", help="train a tiny GPT-2 on bundled text and watch it compress (see --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mnn-callback`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from mnn_callback.demo import main as demo_main

        return demo_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except UsageError as error:
        print(f"mnn-callback: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
