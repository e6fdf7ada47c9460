"""Command line: evaluate saved checkpoints or model families post hoc, draw the plots, run the demo.

::

    mnn-callback evaluate RUN_DIR_OR_MODELS... --data heldout.txt --out results/
    mnn-callback rank MODELS... --prompts prompts.jsonl --out ranking/
    mnn-callback plot results/metrics.csv --out results/plots
    mnn-callback demo

Exit codes: 0 success; 1 some checkpoint failed (the others were evaluated); 2 bad input
(no models found, a missing data file, an empty sample). The package's INFO lines (the base
model of an adapter, the regime, a sample cut to a model's positions) go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

from mnn_callback.core.errors import UsageError
from mnn_callback.core.schema import CSV_COLUMNS
from mnn_callback.output.files import read_jsonl

__all__ = ["CSV_COLUMNS", "build_parser", "main"]

# What each command imports beyond the bare package, and the extra that installs it.
COMMAND_NEEDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "demo": ("all", ("transformers", "tokenizers", "accelerate", "tensorboard", "matplotlib")),
    "evaluate": ("transformers", ("transformers", "safetensors", "tqdm")),
    "rank": ("transformers,plot", ("transformers", "safetensors", "tqdm", "matplotlib")),
    "plot": ("plot", ("matplotlib",)),
}


def missing_packages(command: str) -> str | None:
    """One line naming what ``command`` needs and how to install it, or None when all is there."""
    extra, modules = COMMAND_NEEDS[command]
    missing = [module for module in modules if importlib.util.find_spec(module) is None]
    if not missing:
        return None
    verb = "is" if len(missing) == 1 else "are"
    install = f"pip install 'mnn-callback[{extra}]'"
    return f"mnn-callback {command} needs {', '.join(missing)}, which {verb} not installed: {install}"


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
    from mnn_callback.output.sinks import TensorBoardSink, WandbSink

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


def _placement_options(parser: Any) -> None:
    from mnn_callback.posthoc.placement import DEVICE_MAPS

    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    parser.add_argument(
        "--device-map", choices=DEVICE_MAPS, help="split each model over the devices (Accelerate big-model inference)"
    )
    parser.add_argument(
        "--max-memory", metavar="DEV=AMOUNT,...", help="with --device-map: memory per device, e.g. 0=20GiB,cpu=60GiB"
    )


def _main_process() -> bool:
    from mnn_callback.probing.distributed import world

    return world()[0] == 0


def evaluate(args: argparse.Namespace) -> int:
    from mnn_callback.probing.distributed import process_group_from_environment

    with process_group_from_environment(args.device):
        return _evaluate(args)


def _evaluate(args: argparse.Namespace) -> int:
    from mnn_callback.output.tables import write_csv
    from mnn_callback.posthoc.evaluation import UNTRAINED, evaluate_models, latest_rows
    from mnn_callback.posthoc.placement import parse_max_memory

    _output_directory(args.out)
    results_file = os.path.join(args.out, "metrics.jsonl")
    csv_path = os.path.join(args.out, "metrics.csv")
    main_process = _main_process()  # under torchrun: the only one that writes and prints
    sinks = _sinks(args) if main_process else []
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
            device_map=args.device_map,
            max_memory=parse_max_memory(args.max_memory),
            seed=args.seed,
            trust_remote_code=args.trust_remote_code,
            sinks=sinks,
            progress=True,
            revisions=args.revisions.split(",") if args.revisions else None,
            max_samples=args.max_samples,
            max_length=args.max_length,
            batch_size=args.batch_size,
            layers=_layers(args.layers),
            method=args.method,
            pack=args.pack,
            skip_first_tokens=args.skip_first_tokens,
        )
    except KeyboardInterrupt:  # what finished is in the results file: the CSV too
        if main_process and os.path.isfile(results_file):
            write_csv(csv_path, latest_rows(read_jsonl(results_file)))
        raise
    finally:
        for sink in sinks:
            sink.close()
    failed = {row["model"]: row["error"] for row in rows if row.get("error")}
    if not main_process:
        return 1 if failed else 0
    write_csv(csv_path, latest_rows(read_jsonl(results_file)))
    for model, error in failed.items():
        print(f"mnn-callback: {model} failed: {error}", file=sys.stderr)
    models = len({row["model"] for row in rows})
    print(f"wrote {csv_path} ({models - len(failed)} of {models} models evaluated)")
    return 1 if failed else 0


def rank(args: argparse.Namespace) -> int:
    from mnn_callback.probing.distributed import process_group_from_environment

    with process_group_from_environment(args.device):
        return _rank(args)


def _rank(args: argparse.Namespace) -> int:
    from mnn_callback.core.regime import MIXED, regime_note
    from mnn_callback.posthoc.placement import parse_max_memory
    from mnn_callback.posthoc.ranking import rank_models

    _output_directory(args.out)
    rows = rank_models(
        args.models,
        args.prompts,
        out=args.out,
        tokenizer=args.tokenizer,
        recipe=args.recipe,
        max_new_tokens=args.max_new_tokens,
        chat_template=not args.no_chat_template,
        layers=_layers(args.layers),
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        device_map=args.device_map,
        max_memory=parse_max_memory(args.max_memory),
        seed=args.seed,
        trust_remote_code=args.trust_remote_code,
        force=args.force,
        progress=True,
        checkpoints=args.checkpoints,
    )
    failed = [row for row in rows if row["error"]]
    if not _main_process():
        return 1 if failed else 0
    print(f"{'rank':>4}  {'MNN':>8}  {'± s.e.':>7}  {'MNN/noise':>9}  {'eRank':>7}  {'rep-4':>5}  {'tokens':>6}  model")
    for row in rows:
        if not row["error"]:
            print(
                f"{row['rank']:>4}  {row['mnn']:>8.4f}  {row['mnn_se']:>7.4f}  {row['mnn_vs_noise']:>9.4f}  "
                f"{row['erank']:>7.2f}  {row['repeated_4grams']:>5.2f}  {row['mean_response_tokens']:>6.1f}  "
                f"{row['model']}"
            )
    regimes = sorted({row["regime"] for row in rows if not row["error"] and row["regime"]})
    if regimes:
        print(f"regime: {', '.join(regimes)}; " + regime_note(regimes[0] if len(regimes) == 1 else MIXED))
    for row in failed:
        print(f"mnn-callback: {row['model']} failed: {row['error']}", file=sys.stderr)
    files = [os.path.join(args.out, name) for name in ("ranking.csv", "ranking.png", "responses.jsonl")]
    print(f"wrote {files[0]}, {files[1]} and {files[2]}")
    return 1 if failed else 0


def plot(args: argparse.Namespace) -> int:
    from mnn_callback.output.plots import plot_all
    from mnn_callback.output.tables import load_table

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


def _add_evaluate_command(commands: Any) -> None:
    evaluate_parser = commands.add_parser("evaluate", help="evaluate checkpoints or models post hoc")
    evaluate_parser.add_argument(
        "paths", nargs="+", metavar="MODEL", help="checkpoint, run or model directories, hub ids (org/name@revision)"
    )
    evaluate_parser.add_argument(
        "--revisions",
        metavar="R1,R2|GLOB",
        help="every hub id at these revisions (step0,step1000), or at the branches a glob names ('step*': online)",
    )
    evaluate_parser.add_argument("--data", required=True, help="held-out sample: a .txt (paragraphs) or .jsonl file")
    evaluate_parser.add_argument("--tokenizer", help="tokenizer directory or id (default: the model's own)")
    evaluate_parser.add_argument("--out", default="mnn_results", help="output directory (default: mnn_results)")
    evaluate_parser.add_argument("--layers", default="all", help="all, last, or indices such as 0,3,6")
    evaluate_parser.add_argument("--max-samples", type=int, default=64)
    evaluate_parser.add_argument("--max-length", type=int, default=512)
    evaluate_parser.add_argument("--batch-size", type=int, default=8)
    evaluate_parser.add_argument(
        "--pack", action="store_true", help="cut the data into chunks of exactly --max-length tokens (the same n)"
    )
    evaluate_parser.add_argument(
        "--skip-first-tokens", type=int, default=0, metavar="K", help="metrics from each sequence's (K+1)-th token on"
    )
    evaluate_parser.add_argument(
        "--seed", type=int, default=0, help="seed of the sample choice and untrained reference"
    )
    _placement_options(evaluate_parser)
    evaluate_parser.add_argument(
        "--method",
        choices=["exact", "fast", "cheap"],
        default="exact",
        help="spectra: eigendecomposition, matmul only, or none (cheap: MNN, Renyi-2 and the loss)",
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


def _add_rank_command(commands: Any) -> None:
    rank_parser = commands.add_parser("rank", help="rank causal LMs by the MNN of their own responses")
    rank_parser.add_argument("models", nargs="+", metavar="MODEL", help="model directories or hub ids (org/name@rev)")
    rank_parser.add_argument("--prompts", required=True, help=".txt (one prompt per paragraph) or .jsonl file")
    rank_parser.add_argument("--out", default="mnn_ranking", help="output directory (default: mnn_ranking)")
    rank_parser.add_argument(
        "--recipe",
        choices=("greedy", "authors"),
        default="greedy",
        help="greedy: deterministic answers measured in context (default); authors: the MNN authors' recipe, "
        "answers sampled at temperature 0.7 (seeded) and measured on their own",
    )
    rank_parser.add_argument(
        "--max-new-tokens", type=int, help="response length limit (default: 128 greedy, 1000 authors)"
    )
    rank_parser.add_argument("--no-chat-template", action="store_true", help="prompt as plain text")
    rank_parser.add_argument("--layers", default="last", help="all, last, or indices; the ranking uses the last")
    rank_parser.add_argument("--tokenizer", help="tokenizer directory or id (default: each model's own)")
    rank_parser.add_argument("--batch-size", type=int, default=8)
    rank_parser.add_argument("--seed", type=int, default=0)
    _placement_options(rank_parser)
    rank_parser.add_argument("--force", action="store_true", help="rank again models already in responses.jsonl")
    rank_parser.add_argument(
        "--checkpoints", action="store_true", help="rank every checkpoint-* of a run directory, not its final model"
    )
    rank_parser.add_argument("--trust-remote-code", action="store_true", help="allow models' own Python code")
    rank_parser.set_defaults(handler=rank)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnn-callback", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    _add_evaluate_command(commands)
    _add_rank_command(commands)

    plot_parser = commands.add_parser("plot", help="draw PNGs from metrics.csv or a run's mnn_metrics.jsonl")
    plot_parser.add_argument("table", help="metrics.csv, metrics.jsonl, a run's mnn_metrics.jsonl or its directory")
    plot_parser.add_argument("--out", default="mnn_plots", help="output directory for the PNGs")
    plot_parser.set_defaults(handler=plot)

    commands.add_parser("demo", help="train a tiny GPT-2 on bundled text and watch it compress (see --help)")
    return parser


@contextlib.contextmanager
def _info_lines() -> Iterator[None]:
    """The ``mnn_callback`` logger's INFO lines (an adapter's base, the regime, a sample cut to a model's
    positions) on stderr while the command runs: a handler on that logger only, removed afterwards."""
    logger = logging.getLogger("mnn_callback")
    if os.environ.get("RANK", "0") != "0":  # under torchrun the main process alone prints them
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    level = logger.level
    if level == logging.NOTSET:  # a level set from Python is kept
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mnn-callback`` command; returns the exit code."""
    with _info_lines():
        return _main(list(sys.argv[1:] if argv is None else argv))


def _main(argv: list[str]) -> int:
    command = argv[0] if argv and argv[0] in COMMAND_NEEDS else None
    if command is not None and "-h" not in argv and "--help" not in argv:
        missing = missing_packages(command)
        if missing:
            print(f"mnn-callback: error: {missing}", file=sys.stderr)
            return 2
    if command == "demo":
        from mnn_callback.demo import main as demo_main

        return demo_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except UsageError as error:
        print(f"mnn-callback: error: {error}", file=sys.stderr)
        return 2
    except ImportError as error:
        if "pip install 'mnn-callback[" not in str(error):
            raise
        print(f"mnn-callback: error: {error}", file=sys.stderr)  # an optional sink's package (--wandb-project)
        return 2


if __name__ == "__main__":
    sys.exit(main())
