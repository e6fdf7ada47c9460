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
import csv
import gc
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from mnn_callback.files import json_safe, read_jsonl
from mnn_callback.guard import Guard
from mnn_callback.probe import Probe, ProbeResult

__all__ = ["CSV_COLUMNS", "Evaluation", "discover", "main", "write_csv"]

CSV_COLUMNS = (
    "model",
    "step",
    "params",
    "layer",
    "mnn",
    "nuclear_norm",
    "matrix_entropy",
    "erank",
    "diff_erank",
    "loss",
    "perplexity",
    "sequences",
    "nan_sequences",
    "renyi2_entropy",
    "error",
)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class UsageError(Exception):
    """Bad input: reported in one line, exit code 2."""


@dataclass(frozen=True)
class Target:
    """One model to evaluate: a local directory or a hub id, and its training step if known."""

    name: str
    path: str
    step: int | None
    local: bool


def _is_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def _step_of(path: str) -> int | None:
    state = os.path.join(path, "trainer_state.json")
    if os.path.isfile(state):
        try:
            with open(state, encoding="utf-8") as handle:
                return int(json.load(handle)["global_step"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    match = _CHECKPOINT.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def discover(paths: list[str]) -> list[Target]:
    """Models to evaluate: model directories, run directories holding ``checkpoint-*`` (in step order), hub ids."""
    targets: list[Target] = []
    for path in paths:
        if os.path.isdir(path):
            checkpoints = [
                os.path.join(path, name)
                for name in os.listdir(path)
                if _CHECKPOINT.match(name) and _is_model_dir(os.path.join(path, name))
            ]
            # A run directory: its checkpoints, in step order (a final model saved beside them is
            # normally the last checkpoint again).
            for checkpoint in sorted(checkpoints, key=lambda p: (_step_of(p) or -1, p)):
                targets.append(Target(checkpoint, os.path.abspath(checkpoint), _step_of(checkpoint), True))
            if not checkpoints:
                if not _is_model_dir(path):
                    raise UsageError(f"{path} holds neither a model (config.json) nor checkpoint-* directories")
                targets.append(Target(path, os.path.abspath(path), _step_of(path), True))
        elif os.path.exists(path):
            raise UsageError(f"{path} is not a directory (expected a model or run directory)")
        elif _HUB_ID.match(path) and not path.startswith((".", "/", "~")):
            targets.append(Target(path, path, None, False))  # a hub model id: downloaded by transformers
        else:
            raise UsageError(f"no model or checkpoint found at {path}")
    if not targets:
        raise UsageError("no checkpoints or models found")
    return targets


def _load_tokenizer(source: str, local: bool, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, local_files_only=local, trust_remote_code=trust_remote_code)


def _find_tokenizer(target: Target, args: argparse.Namespace) -> Any:
    """``--tokenizer``, else the model's own, else one saved in its run directory; None if none is found."""
    if args.tokenizer:
        return _load_tokenizer(args.tokenizer, os.path.isdir(args.tokenizer), args.trust_remote_code)
    candidates = [target.path] + ([os.path.dirname(target.path)] if target.local else [])
    for candidate in candidates:
        if target.local and not os.path.isfile(os.path.join(candidate, "tokenizer_config.json")):
            continue
        try:
            return _load_tokenizer(candidate, target.local, args.trust_remote_code)
        except (OSError, ValueError):
            continue
    return None


def _model_dtype(name: str, device: torch.device) -> torch.dtype | str:
    if name == "auto":
        return "auto" if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(path: str, *, local: bool, device: torch.device, dtype: torch.dtype | str, trust_remote_code: bool):
    """A model for probing: the causal-LM class when the config names one (for the loss), else the base model.

    Local files only for local paths; no remote code unless asked; transformers prefers
    safetensors and loads ``.bin`` weights with ``torch.load(weights_only=True)``.
    """
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    options = {"local_files_only": local, "trust_remote_code": trust_remote_code}
    config = AutoConfig.from_pretrained(path, **options)
    causal = any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in (config.architectures or []))
    model_class = AutoModelForCausalLM if causal else AutoModel
    dtype_option = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = model_class.from_pretrained(path, config=config, **{dtype_option: dtype}, **options)
    return model.to(device).eval()


def untrained_model(path: str, *, local: bool, device: torch.device, seed: int, trust_remote_code: bool):
    """A randomly initialised model from ``path``'s config with a fixed seed (the Diff-eRank paper's reference)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, local_files_only=local, trust_remote_code=trust_remote_code)
    causal = any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in (config.architectures or []))
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        model_class = AutoModelForCausalLM if causal else AutoModel
        model = model_class.from_config(config, trust_remote_code=trust_remote_code)
    finally:
        torch.set_rng_state(generator_state)
    return model.to(device).eval()


def _rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The CSV rows of one JSONL record: one per layer, or one error row."""
    if record.get("error"):
        return [{"model": record["model"], "step": record.get("step"), "error": record["error"]}]
    result = ProbeResult.from_dict(record["result"])
    diff = record.get("diff_erank") or {}
    rows = []
    for index, layer in enumerate(result.layers):
        rows.append(
            {
                "model": record["model"],
                "step": record.get("step"),
                "params": record.get("params"),
                "layer": layer,
                **{key: result.per_layer[key][index] for key in ("mnn", "nuclear_norm", "matrix_entropy", "erank")},
                "renyi2_entropy": result.per_layer.get("renyi2_entropy", [None] * len(result.layers))[index],
                "diff_erank": diff.get(f"diff_erank/layer_{layer}"),
                "loss": result.loss,
                "perplexity": result.perplexity,
                "sequences": result.sequences,
                "nan_sequences": result.nan_sequences,
                "error": "",
            }
        )
    return rows


def write_csv(path: str, records: list[dict[str, Any]]) -> int:
    """Write ``metrics.csv`` (atomically) from JSONL records, the latest per model; returns the row count."""
    latest: dict[str, dict[str, Any]] = {}
    for record in records:
        if record.get("role") != "reference":
            latest[record["path"]] = record
    rows = [row for record in latest.values() for row in _rows(record)]
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if value is None else value for key, value in json_safe(row).items()})
    os.replace(temporary, path)
    return len(rows)


def _append_jsonl(path: str, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Evaluation:
    """One ``evaluate`` invocation: models in order, resumable through ``metrics.jsonl``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.targets = discover(args.paths)
        if not os.path.isfile(args.data):
            raise UsageError(f"data file not found: {args.data}")
        os.makedirs(args.out, exist_ok=True)
        self.jsonl_path = os.path.join(args.out, "metrics.jsonl")
        self.csv_path = os.path.join(args.out, "metrics.csv")
        self.records = read_jsonl(self.jsonl_path) if os.path.isfile(self.jsonl_path) else []
        if args.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(args.device)
        self.model_dtype = _model_dtype(args.dtype, self.device)
        layers = args.layers if args.layers in ("all", "last") else [int(i) for i in args.layers.split(",")]
        self.probe_options = {
            "max_samples": args.max_samples,
            "max_length": args.max_length,
            "batch_size": args.batch_size,
            "layers": layers,
            "seed": args.seed,
            "method": args.method,
        }
        if args.reference:
            self.reference_mode = [
                "model",
                os.path.abspath(args.reference) if os.path.isdir(args.reference) else args.reference,
            ]
        elif args.reference_untrained:
            self.reference_mode = ["untrained", args.seed]
        else:
            self.reference_mode = ["first"]
        self.first_result: ProbeResult | None = None
        self._probes: dict[str, Probe] = {}
        self.guard = Guard(strict=False)
        self.sinks = self._make_sinks()

    def _make_sinks(self) -> list[Any]:
        from mnn_callback.sinks import TensorBoardSink, WandbSink

        sinks = []
        if self.args.tensorboard:
            sinks.append(TensorBoardSink(self.args.tensorboard))
        if self.args.wandb_project:
            sinks.append(WandbSink(start_run=True, project=self.args.wandb_project, job_type="evaluate"))
        return sinks

    def probe_for(self, target: Target) -> Probe:
        """The probe of ``target``'s tokenizer (one per distinct vocabulary): the same fixed sample."""
        tokenizer = _find_tokenizer(target, self.args)
        key = "ids" if tokenizer is None else _digest(sorted(tokenizer.get_vocab().items()))
        if key not in self._probes:
            try:
                self._probes[key] = Probe(self.args.data, tokenizer=tokenizer, **self.probe_options)
            except ValueError as error:
                if "tokenizer=" in str(error):
                    raise UsageError(
                        f"{self.args.data} holds text and no tokenizer was found: pass --tokenizer"
                    ) from None
                raise UsageError(str(error)) from None
        return self._probes[key]

    def config_key(self, probe: Probe) -> str:
        """What must match for a stored result to be reused: sample, layers, dtypes, reference choice."""
        return _digest([probe.fingerprint, str(self.model_dtype), self.reference_mode])

    def _load(self, path: str, local: bool):
        return load_model(
            path, local=local, device=self.device, dtype=self.model_dtype, trust_remote_code=self.args.trust_remote_code
        )

    def reference_for(self, target: Target, probe: Probe) -> ProbeResult | None:
        """The Diff-eRank reference of ``target``: a given model, its untrained twin, or the first result."""
        mode = self.reference_mode[0]
        if mode == "first":
            return self.first_result
        if mode == "model":
            name = self.reference_mode[1]
        else:  # untrained: one per architecture, so each model of a family has its own
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(
                target.path, local_files_only=target.local, trust_remote_code=self.args.trust_remote_code
            )
            name = f"untrained:{_digest(config.to_dict())}:seed={self.args.seed}"
        key = self.config_key(probe)
        for record in reversed(self.records):
            if record.get("role") == "reference" and record["path"] == name and record["config_key"] == key:
                if not self.args.force:
                    return ProbeResult.from_dict(record["result"])
                break
        if mode == "model":
            model = self._load(name, local=os.path.isdir(name))
        else:
            model = untrained_model(
                target.path,
                local=target.local,
                device=self.device,
                seed=self.args.seed,
                trust_remote_code=self.args.trust_remote_code,
            )
        result = probe.run(model)
        del model
        self._append({"role": "reference", "path": name, "config_key": key, "result": result.to_dict()})
        return result

    def _append(self, record: dict[str, Any]) -> None:
        _append_jsonl(self.jsonl_path, record)
        self.records.append(record)

    def evaluate(self, index: int, target: Target) -> bool:
        """Evaluate one model (or reuse its stored result); False if it failed."""
        try:
            probe = self.probe_for(target)
            key = self.config_key(probe)
            stored = [r for r in self.records if r.get("path") == target.path and r.get("config_key") == key]
            if stored and "result" in stored[-1] and not self.args.force:
                result = ProbeResult.from_dict(stored[-1]["result"])
            else:
                started = time.perf_counter()
                model = self._load(target.path, target.local)
                params = sum(parameter.numel() for parameter in model.parameters())
                result = probe.run(model)
                del model
                reference = self.reference_for(target, probe) or result
                record = {
                    "model": target.name,
                    "path": target.path,
                    "step": target.step,
                    "params": params,
                    "config_key": key,
                    "seconds": time.perf_counter() - started,
                    "result": result.to_dict(),
                    "diff_erank": result.diff_erank(reference),
                }
                self._append(record)
                step = target.step if target.step is not None else index
                for sink in self.sinks:
                    values = {**result.metrics, **record["diff_erank"]}
                    self.guard.call(f"the {sink.name} sink", sink.log_metrics, values, step)
            if self.first_result is None:
                self.first_result = result
            return True
        except UsageError:
            raise
        except Exception as error:
            message = f"{type(error).__name__}: {error}".splitlines()[0][:500]
            print(f"mnn-callback: {target.name} failed: {message}", file=sys.stderr)
            self._append({"model": target.name, "path": target.path, "step": target.step, "error": message})
            return False
        finally:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def run(self) -> int:
        from tqdm.auto import tqdm

        failures = 0
        progress = tqdm(self.targets, desc="evaluating", unit="model", disable=None)
        for index, target in enumerate(progress):
            progress.set_postfix_str(os.path.basename(target.name.rstrip("/")))
            failures += not self.evaluate(index, target)
            write_csv(self.csv_path, self.records)  # after every model: an interruption loses at most one
        for sink in self.sinks:
            self.guard.call(f"the {sink.name} sink", sink.close)
        evaluated = len(self.targets) - failures
        print(f"wrote {self.csv_path} ({evaluated} of {len(self.targets)} models evaluated)")
        return 1 if failures else 0


def evaluate(args: argparse.Namespace) -> int:
    return Evaluation(args).run()


def plot(args: argparse.Namespace) -> int:
    from mnn_callback.plots import load_table, plot_all

    if not os.path.isfile(args.table):
        raise UsageError(f"file not found: {args.table}")
    rows = load_table(args.table)
    if not rows:
        raise UsageError(f"{args.table} holds no metric rows")
    paths = plot_all(rows, args.out)
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
    plot_parser.add_argument("table", help="metrics.csv, metrics.jsonl or mnn_metrics.jsonl")
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
