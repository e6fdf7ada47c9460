"""Post hoc evaluation as a library: the probe on saved checkpoints, model families, hub models.

``evaluate_models(["out/"], "heldout.txt")`` probes every ``checkpoint-*`` of a run, in step
order, and returns one row per model x layer with the columns of ``metrics.csv``
(:data:`~mnn_callback.core.schema.CSV_COLUMNS`). With ``results_file`` it is resumable: each model's
result is appended as it finishes, and models already evaluated with the same configuration
are read back instead of evaluated again.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mnn_callback.core.errors import MNNWarning, UsageError
from mnn_callback.output.files import append_jsonl, read_jsonl
from mnn_callback.output.sinks import Sink
from mnn_callback.output.tables import evaluation_rows
from mnn_callback.posthoc.models import (
    Target,
    discover,
    find_tokenizer,
    load_model,
    looks_local,
    model_config,
    untrained_model,
)
from mnn_callback.posthoc.placement import Placement
from mnn_callback.probing.distributed import all_gather_object, broadcast_object, world
from mnn_callback.probing.probe import Probe
from mnn_callback.probing.results import Measurement, ProbeResult

__all__ = ["UNTRAINED", "evaluate_models", "latest_rows"]

UNTRAINED = "untrained"  # reference=UNTRAINED: each model's own config, randomly initialised with the seed
_NOT_ARCHITECTURE = ("_name_or_path", "transformers_version", "torch_dtype", "dtype")  # config keys of no effect


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def latest_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The long-table rows of a results file: the latest record of each model (references left out)."""
    latest: dict[str, dict[str, Any]] = {}
    for record in records:
        if record.get("role") != "reference":
            latest[record["path"]] = record
    return [row for record in latest.values() for row in evaluation_rows(record)]


def _read_results(path: str | None) -> list[dict[str, Any]]:
    """The records of a results file (none when it does not exist); ``UsageError`` for a foreign file."""
    if path is None or not os.path.isfile(path):
        return []
    try:
        records = read_jsonl(path)
    except ValueError as error:
        raise UsageError(f"{error}; choose another output directory") from None
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict) or "path" not in record:
            raise UsageError(
                f"{path}: record {number} was not written by mnn-callback evaluate; choose another output directory"
            )
    return records


def _error_record(target: Target, error: Exception) -> dict[str, Any]:
    """The record of a model that failed: its error in one line."""
    message = f"{type(error).__name__}: {error}".splitlines()[0][:500]
    return {"model": target.name, "path": target.key, "base": target.base_key, "step": target.step, "error": message}


class _Evaluation:
    """One evaluation: models in order, their probes, the reference, the results file."""

    def __init__(self, models: Sequence[Any], data: Any, options: dict[str, Any]) -> None:
        self.targets = discover(models, options.pop("revisions"))
        if isinstance(data, (str, os.PathLike)) and not os.path.isfile(data):
            raise UsageError(f"data file not found: {os.fspath(data)}")
        self.data = data
        self.tokenizer = options.pop("tokenizer")
        if isinstance(self.tokenizer, (str, os.PathLike)):
            source = os.fspath(self.tokenizer)
            if not os.path.isdir(source) and (os.path.exists(source) or looks_local(source)):
                raise UsageError(f"tokenizer directory not found: {source}")
        self.results_file = options.pop("results_file")
        rank, size = world()
        self.writer = rank == 0  # under torchrun only the main process writes files and logs to sinks
        # one model on several processes: each runs it over its shard of the sample (the training protocol);
        # several models: each process its own models, whole samples
        self.split_sample = size > 1 and len(self.targets) == 1
        self.force = options.pop("force")
        self.trust_remote_code = options.pop("trust_remote_code")
        self.seed = options.pop("seed")
        self.sinks: list[Sink] = list(options.pop("sinks"))
        self.placement: Placement = options.pop("placement")
        self.device, self.dtype = self.placement.device, self.placement.dtype
        reference = options.pop("reference")
        self.reference_mode = self._reference_mode(reference)
        self.probe_options = {**options, "seed": self.seed}
        self.records = _read_results(self.results_file)
        self.first_result: ProbeResult | None = None
        self._probes: dict[str, Probe] = {}
        self._warned_reference = False

    def _reference_mode(self, reference: Any) -> tuple[str, Any]:
        if reference is None:
            return ("first", None)
        if isinstance(reference, str) and reference == UNTRAINED:
            return ("untrained", self.seed)
        (target,) = discover([reference])[-1:]  # a run directory stands for its last checkpoint
        return ("model", target)

    def probe_for(self, target: Target) -> Probe:
        """The probe of ``target``'s tokenizer (one per distinct vocabulary): the same fixed sample."""
        tokenizer = find_tokenizer(target, self.tokenizer, self.trust_remote_code)
        key = "ids" if tokenizer is None else _digest(sorted(tokenizer.get_vocab().items()))
        if key not in self._probes:
            try:
                self._probes[key] = Probe(self.data, tokenizer=tokenizer, **self.probe_options)
            except (ValueError, FileNotFoundError, TypeError) as error:
                if "tokenizer=" in str(error):
                    raise UsageError(
                        f"the data holds text and no tokenizer was found for {target.name}: pass one with --tokenizer "
                        "(from Python: tokenizer=)"
                    ) from None
                raise UsageError(str(error)) from None
        return self._probes[key]

    def config_key(self, probe: Probe) -> str:
        """What must match for a stored result to be reused: sample, layers, dtypes, reference choice."""
        mode, detail = self.reference_mode
        reference = detail.chain_key if isinstance(detail, Target) else detail  # an adapter: with its bases
        return _digest([probe.fingerprint, str(self.dtype), [mode, reference]])

    def _stored(self, role: str | None, path: str, key: str, base: str | None = None) -> dict[str, Any] | None:
        if self.force:
            return None
        for record in reversed(self.records):
            # an adapter: on the same base, down to the model that is not an adapter
            same_model = record.get("path") == path and record.get("base") == base
            if record.get("role") == role and same_model and record.get("config_key") == key:
                return record if "result" in record else None
        return None

    def _append(self, record: dict[str, Any]) -> None:
        if self.results_file and self.writer:
            append_jsonl(self.results_file, record)
        self.records.append(record)

    def reference_for(self, target: Target, probe: Probe) -> ProbeResult | None:
        """The Diff-eRank reference of ``target``: a given model, its untrained twin, or the first result."""
        mode, detail = self.reference_mode
        if mode == "first":
            return self.first_result
        if mode == "model":
            name, make = detail.chain_key, lambda: self._load(detail)
        else:  # untrained: one per architecture, so each model of a family has its own
            config = model_config(target, self.trust_remote_code).to_dict()
            architecture = {key: value for key, value in config.items() if key not in _NOT_ARCHITECTURE}
            name = f"untrained:{_digest(architecture)}:seed={self.seed}"
            make = lambda: untrained_model(  # noqa: E731
                target, placement=self.placement, seed=self.seed, trust_remote_code=self.trust_remote_code
            )
        key = self.config_key(probe)
        stored = self._stored("reference", name, key)
        if stored is not None:
            return ProbeResult.from_dict(stored["result"])
        result = probe.run(make(), per_sequence=True, distributed=self.split_sample)
        self._append({"role": "reference", "path": name, "config_key": key, "result": result.to_dict()})
        return result

    def _comparable(self, result: ProbeResult, reference: ProbeResult, target: Target) -> bool:
        """Whether Diff-eRank against ``reference`` means something: the same token sample, the same depth."""
        if reference.fingerprint == result.fingerprint and reference.num_hidden_states == result.num_hidden_states:
            return True
        if not self._warned_reference:
            self._warned_reference = True
            warnings.warn(
                f"Diff-eRank of {target.name} is left empty: its reference was measured on another token sample "
                f"(another tokenizer) or has another number of hidden states ({reference.num_hidden_states} vs "
                f"{result.num_hidden_states}); --reference-untrained gives each model its own reference",
                MNNWarning,
                stacklevel=4,
            )
        return False

    def warn_if_not_comparable(self, rows: list[dict[str, Any]]) -> None:
        """One warning when the models differ in hidden size or tokenizer: their values are not comparable."""
        sizes = sorted({row["hidden_size"] for row in rows if row.get("hidden_size") is not None})
        reasons = [f"hidden sizes {sizes} (MNN's cap and noise floor depend on d)"] if len(sizes) > 1 else []
        if len(self._probes) > 1:
            reasons.append(f"{len(self._probes)} tokenizers (other token sequences, other n)")
        if reasons:
            warnings.warn(
                "the models differ in " + " and ".join(reasons) + ": their values are not directly comparable; "
                "mnn_vs_noise is the length- and width-fair one",
                MNNWarning,
                stacklevel=3,
            )

    def _load(self, target: Target) -> nn.Module:
        return load_model(target, placement=self.placement, trust_remote_code=self.trust_remote_code)

    def evaluate(self, index: int, target: Target) -> dict[str, Any]:
        """The record of one model: evaluated now, or read back from the results file."""
        return self.completed(index, target, self.measured(index, target))

    def measured(self, index: int, target: Target) -> tuple[str, Any]:
        """One model's measurement, and what it is: ``("stored", record)`` read back, ``("new", record)``
        without differences yet, ``("error", record)``, or ``("usage", message)`` for bad input.

        Writes nothing: with the models shared out over processes, every process measures its own and
        the writing process completes them in order (:meth:`completed`).
        """
        try:
            probe = self.probe_for(target)
            key = self.config_key(probe)
            # a module's weights may have changed since
            stored = None if target.module is not None else self._stored(None, target.key, key, target.base_key)
            return ("stored", stored) if stored is not None else ("new", self._measure(target, probe, key))
        except UsageError as error:
            return ("usage", str(error))
        except Exception as error:
            return ("error", _error_record(target, error))
        finally:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def completed(self, index: int, target: Target, measured: tuple[str, Any]) -> dict[str, Any]:
        """The record of ``measured`` with its Diff-eRank differences, appended and logged (in model order)."""
        kind, record = measured
        if kind == "usage":
            raise UsageError(record)
        if kind == "new":
            try:
                record = self._with_differences(index, target, record)
            except UsageError:
                raise
            except Exception as error:  # the reference failed: this model's row says so
                record = _error_record(target, error)
        if kind != "stored":
            self._append(record)
        if self.first_result is None and "result" in record:
            self.first_result = ProbeResult.from_dict(record["result"])
        return record

    def _with_differences(self, index: int, target: Target, record: dict[str, Any]) -> dict[str, Any]:
        result = ProbeResult.from_dict(record["result"])
        reference = self.reference_for(target, self.probe_for(target)) or result
        compared = reference if self._comparable(result, reference, target) else None
        measurement = Measurement.against(target.step if target.step is not None else index, None, result, compared)
        for sink in self.sinks if self.writer else ():
            sink.log_measurement(measurement)
        errors = {f"{name}_se": values for name, values in measurement.difference_errors.items()}
        return {**record, "differences": {**measurement.differences, **errors}}  # the CSV's columns

    def _measure(self, target: Target, probe: Probe, key: str) -> dict[str, Any]:
        started = time.perf_counter()
        model = self._load(target)
        params = sum(parameter.numel() for parameter in model.parameters())
        result = probe.run(model, per_sequence=True, distributed=self.split_sample)
        del model  # one model in memory at a time
        return {
            "model": target.name,
            "path": target.key,
            "revision": target.revision,
            "base": target.base_key,
            "step": target.step,
            "params": params,
            "hidden_size": result.hidden_size,
            "config_key": key,
            "seconds": time.perf_counter() - started,
            "result": result.to_dict(),
        }

    def shared_over_models(self, progress: Any) -> list[dict[str, Any]]:
        """Every model evaluated by one process (model i by process i mod world size), in rounds; the main
        process completes and writes each round in model order. Every process returns the same rows."""
        rank, size = world()
        rows: list[dict[str, Any]] = []
        for start in range(0, len(self.targets), size):
            index = start + rank
            mine = self.measured(index, self.targets[index]) if index < len(self.targets) else None
            gathered = [item for item in all_gather_object(mine) if item is not None]
            usage = [record for kind, record in gathered if kind == "usage"]
            if usage:  # on every process alike: nobody waits for another
                raise UsageError(usage[0])
            if self.writer:
                for offset, item in enumerate(gathered):
                    rows.extend(evaluation_rows(self.completed(start + offset, self.targets[start + offset], item)))
            if progress is not None:
                progress.update(len(gathered))
        return broadcast_object(rows)


def evaluate_models(
    models: Sequence[str | os.PathLike | nn.Module],
    data: Any,
    *,
    tokenizer: Any = None,
    reference: Any = None,
    results_file: str | os.PathLike | None = None,
    force: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    device_map: str | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    seed: int = 0,
    trust_remote_code: bool = False,
    sinks: Sequence[Sink] = (),
    progress: bool = False,
    revisions: Sequence[str] | None = None,
    **probe_options: Any,
) -> list[dict[str, Any]]:
    """Probe each model on the same fixed sample; one row per model x layer (``metrics.csv``'s columns).

    Args:
        models: model directories, run directories (their ``checkpoint-*``, in step order), hub ids
            (``org/name`` or ``org/name@revision``: loaded through transformers, from its cache when
            offline) or ``nn.Module`` objects.
        data: the held-out sample, as for :class:`~mnn_callback.probing.probe.Probe`.
        tokenizer: a tokenizer or the directory / id of one; default: each model's own (for text data).
        reference: the Diff-eRank reference: None (the first model), ``"untrained"`` (each model's
            config, randomly initialised with ``seed``), or a model (directory, hub id or module).
        results_file: a JSONL file results are appended to and reused from (resumable).
        force: evaluate again models found in ``results_file``.
        device, dtype: where and in which dtype to load the models (``"auto"``: CUDA if available;
            the checkpoint's dtype on CUDA, float32 on the CPU).
        device_map, max_memory: split each model over the available devices with Accelerate's
            big-model inference (``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``;
            ``max_memory={0: "20GiB", "cpu": "60GiB"}``), the rest offloaded to the CPU and disk.
        seed: the sample's seed and the untrained reference's.
        trust_remote_code: allow models' own Python code (off: nothing of theirs runs).
        sinks: also log each model's measurement, at its training step, to these sinks.
        progress: show a progress bar over models (with an estimate of the time left).
        revisions: evaluate every hub id given at each of these revisions (branch names such as
            ``step1000``; or one glob such as ``"step*"``, listed from the hub: online only).
        **probe_options: passed to :class:`~mnn_callback.probing.probe.Probe` (``max_samples``, ``layers``, ...).

    A model that fails to load or probe gives one row with ``error`` set; the others are
    evaluated. Bad input raises :class:`~mnn_callback.core.errors.UsageError`. Under an initialised
    ``torch.distributed`` process group (``torchrun``) every process must call it: several models
    are shared out (each process its own, whole sample), one model is run by every process over
    its shard of the sample; only the main process writes, and every process returns the rows a
    single process would.
    """
    with tempfile.TemporaryDirectory(prefix="mnn-offload-") as offload:
        evaluation = _Evaluation(
            models,
            data,
            {
                **probe_options,
                "tokenizer": tokenizer,
                "reference": reference,
                "results_file": None if results_file is None else os.fspath(results_file),
                "force": force,
                "placement": Placement.of(device, dtype, device_map, max_memory, offload),
                "seed": seed,
                "trust_remote_code": trust_remote_code,
                "sinks": sinks,
                "revisions": revisions,
            },
        )
        rows = _evaluate_all(evaluation, progress)
    if evaluation.writer:
        evaluation.warn_if_not_comparable(rows)
    return rows


def _evaluate_all(evaluation: _Evaluation, progress: bool) -> list[dict[str, Any]]:
    targets = evaluation.targets
    bar = None
    if progress:
        from tqdm.auto import tqdm

        # on a terminal only (disable=None), on the main process only
        bar = tqdm(total=len(targets), desc="evaluating", unit="model", disable=None if evaluation.writer else True)
    try:
        if world()[1] > 1 and not evaluation.split_sample:
            return evaluation.shared_over_models(bar)
        rows = []
        for index, target in enumerate(targets):
            if bar is not None:
                bar.set_postfix_str(os.path.basename(target.name.rstrip("/")))
            rows.extend(evaluation_rows(evaluation.evaluate(index, target)))
            if bar is not None:
                bar.update(1)
        return rows
    finally:
        if bar is not None:
            bar.close()
