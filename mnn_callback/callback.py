"""MNNCallback: the Hugging Face Trainer callback that watches representations compress.

``trainer.add_callback(MNNCallback(held_out_texts, tokenizer=tokenizer))`` probes the model at
step 0, every ``every_n_steps`` steps and at the end of training, and logs MNN, Matrix
Entropy, eRank, Diff-eRank, the exact nuclear norm and the sample's loss to TensorBoard,
Weights & Biases and ``<output_dir>/mnn_metrics.jsonl``, into ``trainer_state.json``'s
``log_history``, and into every checkpoint (``checkpoint-*/mnn_metrics.json``).
"""

from __future__ import annotations

import inspect
import os
import time
import warnings
from collections.abc import Sequence
from typing import Any

from torch import nn
from transformers import TrainerCallback

from mnn_callback.files import atomic_write_json
from mnn_callback.guard import Guard
from mnn_callback.metrics import MNNWarning
from mnn_callback.probe import Probe, ProbeResult
from mnn_callback.sinks import (
    JSONL_FILE,
    SINKS,
    Dashboards,
    JsonlSink,
    Sink,
    SinkSet,
    TensorBoardSink,
    WandbSink,
    require_package,
)

__all__ = ["CHECKPOINT_FILE", "MNNCallback"]

CHECKPOINT_FILE = "mnn_metrics.json"
STATE_KEY = "mnn_callback"  # our entry in TrainerState.stateful_callbacks (saved in trainer_state.json)
OVERHEAD_WARNING_SHARE = 0.05


def _report_to(args: Any) -> list[str]:
    report_to = getattr(args, "report_to", None) or []
    if isinstance(report_to, str):
        report_to = [report_to]
    if "all" in report_to:
        from transformers.integrations import get_available_reporting_integrations

        report_to = get_available_reporting_integrations()
    return [name for name in report_to if name != "none"]


def _trainer_callback(owner: TrainerCallback, class_name: str) -> TrainerCallback | None:
    """The Trainer's callback of class ``class_name``, or None.

    Trainer events do not pass the other callbacks, so this looks for the ``CallbackHandler``
    calling ``owner`` among the calling frames (its ``self``).
    """
    frame = inspect.currentframe()
    try:
        for _ in range(8):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            callbacks = getattr(frame.f_locals.get("self"), "callbacks", None)
            if isinstance(callbacks, list) and any(callback is owner for callback in callbacks):
                return next((callback for callback in callbacks if type(callback).__name__ == class_name), None)
        return None
    finally:
        del frame


class MNNCallback(TrainerCallback):
    """Probe the model being trained and log how its representations compress.

    Args:
        data: the held-out sample (see :class:`~mnn_callback.probe.Probe`): texts (with
            ``tokenizer``), token-id lists, a tensor of ids, a dataset, or a ``.txt``/``.jsonl`` path.
        every_n_steps: probe every this many optimizer steps (and at step 0 and at the end).
        tokenizer: turns text data into ids.
        sinks: where to log: names from ``"tensorboard"``, ``"wandb"``, ``"jsonl"`` or
            :class:`~mnn_callback.sinks.Sink` objects. Default: those of
            ``TrainingArguments.report_to`` (tensorboard, wandb) plus JSONL, always.
        log_dir: TensorBoard directory; default: the Trainer's (``TENSORBOARD_LOGGING_DIR``,
            else the one its TensorBoardCallback writes to, else ``args.logging_dir``).
        reference: the Diff-eRank reference: a model (e.g. the base model of a fine-tune,
            probed once at the start of training), a :class:`ProbeResult`, or a JSON file
            holding one. Default: the step-0 probe of the model being trained.
        on_evaluate: also probe at every evaluation.
        strict: raise errors instead of turning them into warnings.
        dashboards: the TensorBoard/W&B pictures besides the scalars (a
            :class:`~mnn_callback.sinks.Dashboards`, or True/False for all or none).
        **probe_options: passed to :class:`~mnn_callback.probe.Probe` (``max_samples``,
            ``max_length``, ``batch_size``, ``layers``, ``seed``, ``dtype``, ...).

    Every process runs the probe (the sample is sharded and the sums all-reduced); only the
    world process zero writes.
    """

    def __init__(
        self,
        data: Any,
        *,
        every_n_steps: int = 100,
        tokenizer: Any = None,
        sinks: Sequence[str | Sink] | None = None,
        log_dir: str | os.PathLike | None = None,
        reference: Any = None,
        on_evaluate: bool = False,
        strict: bool = False,
        dashboards: Dashboards | bool = True,
        **probe_options: Any,
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        if sinks is not None:
            for sink in sinks:
                if isinstance(sink, str):
                    if sink not in SINKS:
                        raise ValueError(f"unknown sink {sink!r}; known sinks: {', '.join(SINKS)}")
                    require_package(sink)
                elif not isinstance(sink, Sink):
                    raise TypeError(f"sinks must be names or Sink objects, got {type(sink).__name__}")
        self.guard = Guard(strict)
        with self.guard.warnings_as_errors():  # strict: a truncated sample is an error too
            self.probe = Probe(data, tokenizer=tokenizer, **probe_options)
        self.every_n_steps = every_n_steps
        self.sink_specs = None if sinks is None else list(sinks)
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.probe_on_evaluate = on_evaluate
        if isinstance(dashboards, bool):
            dashboards = Dashboards() if dashboards else Dashboards.off()
        self.dashboards = dashboards
        self._reference_model = reference if isinstance(reference, nn.Module) else None
        self.reference: ProbeResult | None = None
        if reference is not None and self._reference_model is None:
            self.reference = ProbeResult.load(reference)
            self._check_reference_sample(self.reference)
        self.history: list[dict[str, Any]] = []
        self._last_probed_step: int | None = None
        self.sinks = SinkSet([], self.guard)
        self.tensorboard_dir: str | None = None
        self._periodic_seconds = 0.0
        self._periodic_probes = 0
        self._periodic_start = time.perf_counter()
        self._logging_seconds = 0.0
        self._warned_overhead = False

    # -- setup ------------------------------------------------------------------------------------

    def _check_reference_sample(self, reference: ProbeResult) -> None:
        if reference.fingerprint != self.probe.fingerprint:
            warnings.warn(
                "the Diff-eRank reference was measured on another probe sample or layer set "
                f"(fingerprint {reference.fingerprint}, this probe {self.probe.fingerprint}); "
                "its eRanks are not directly comparable",
                MNNWarning,
                stacklevel=3,
            )

    def _tensorboard_dir(self, args: Any) -> str:
        if self.log_dir is not None:
            return self.log_dir
        if os.environ.get("TENSORBOARD_LOGGING_DIR"):
            return os.path.expanduser(os.environ["TENSORBOARD_LOGGING_DIR"])
        trainer_tensorboard = _trainer_callback(self, "TensorBoardCallback")
        if getattr(trainer_tensorboard, "logging_dir", None):
            return trainer_tensorboard.logging_dir
        if getattr(args, "logging_dir", None):  # transformers 4
            return args.logging_dir
        return os.path.join(args.output_dir, "runs", "mnn_callback")

    def _make_sinks(self, args: Any) -> SinkSet:
        specs = self.sink_specs
        if specs is None:
            specs = [name for name in ("tensorboard", "wandb") if name in _report_to(args)] + ["jsonl"]
        sinks = []
        for spec in specs:
            if isinstance(spec, Sink):
                sinks.append(spec)
                continue
            if spec == "tensorboard":
                self.tensorboard_dir = self._tensorboard_dir(args)
                sink = self.guard.call("the tensorboard sink (setup)", TensorBoardSink, self.tensorboard_dir)
            elif spec == "wandb":
                sink = self.guard.call("the wandb sink (setup)", WandbSink)
            else:
                path = os.path.join(args.output_dir, JSONL_FILE)
                sink = self.guard.call("the jsonl sink (setup)", JsonlSink, path)
            if sink is not None:
                sinks.append(sink)
        return SinkSet(sinks, self.guard, self.dashboards)

    def _restore(self, state: Any) -> None:
        """Continue the history and the reference of the checkpoint the Trainer resumed from."""
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(STATE_KEY)
        entries = [dict(entry) for entry in state.log_history if "probe/sequences" in entry]
        if saved is not None and saved.get("fingerprint") != self.probe.fingerprint:
            warnings.warn(
                f"resumed at step {state.global_step} with a different probe configuration (sample, layers or "
                "max_length): the curves before and after this step are not comparable; a new Diff-eRank "
                "reference is taken now",
                MNNWarning,
                stacklevel=3,
            )
            self.history = entries
            if self._reference_model is None:
                self.reference = None
            return
        self.history = entries
        if saved is not None and self.reference is None and self._reference_model is None:
            self.reference = ProbeResult.from_dict(saved["reference"])

    # -- measuring --------------------------------------------------------------------------------

    def _measure(self, state: Any, model: nn.Module, optimizer: Any, *, periodic: bool) -> None:
        step = int(state.global_step)
        self._last_probed_step = step
        result = self.guard.call("the probe", self.probe.run, model, optimizer=optimizer)
        if result is None:
            if state.is_world_process_zero:
                self.sinks.log_metrics({"probe/errors": float(self.guard.errors)}, step, epoch=state.epoch)
            return
        if self.reference is None:
            self.reference = result
        metrics = {**result.metrics, **result.diff_erank(self.reference), "probe/errors": float(self.guard.errors)}
        if periodic:
            # the probe's time and the last probe's logging (figures included): the monitor's whole cost
            cost = result.seconds + self._logging_seconds
            metrics["probe/time_share"] = self._account(cost, warn=state.is_world_process_zero)
        entry = {"step": step, "epoch": state.epoch, **metrics}
        self.history.append(entry)
        state.log_history.append(entry)
        state.stateful_callbacks[STATE_KEY] = {
            "fingerprint": self.probe.fingerprint,
            "reference": self.reference.to_dict(),
        }
        if state.is_world_process_zero:
            logging_started = time.perf_counter()
            self.sinks.log_probe(metrics, step, self.history, epoch=state.epoch)
            self._logging_seconds = time.perf_counter() - logging_started

    def _account(self, seconds: float, *, warn: bool) -> float:
        """Add a periodic probe's time and return the probes' share of the wall time; warn once above 5%."""
        self._periodic_seconds += seconds
        self._periodic_probes += 1
        elapsed = max(time.perf_counter() - self._periodic_start, 1e-9)
        share = self._periodic_seconds / elapsed
        if warn and share > OVERHEAD_WARNING_SHARE and self._periodic_probes >= 2 and not self._warned_overhead:
            self._warned_overhead = True
            suggestion = int(self.every_n_steps * share / OVERHEAD_WARNING_SHARE * 2) + 1
            warnings.warn(
                f"mnn_callback probes and their logging took {share:.1%} of the training wall time so far "
                f"({self._periodic_seconds:.2f} s in {self._periodic_probes} probes); "
                f"consider every_n_steps={suggestion} or a smaller sample (max_samples, max_length)",
                MNNWarning,
                stacklevel=3,
            )
        return share

    def _probed_at(self, step: int) -> bool:
        """Whether this step was probed (or tried), so no step is measured twice."""
        return self._last_probed_step == step

    # -- Trainer events ---------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        resumed = state.global_step > 0
        if resumed:
            self._restore(state)
        else:
            self.history = []
        self._last_probed_step = self.history[-1]["step"] if self.history else None
        if state.is_world_process_zero:
            self.sinks = self._make_sinks(args)
            config = {**self.probe.config, "every_n_steps": self.every_n_steps}
            self.sinks.log_config(config)
            if resumed:
                self.sinks.log_event("resume", int(state.global_step))
        if self._reference_model is not None and self.reference is None:
            reference = self.guard.call("probing the reference model", self.probe.run, self._reference_model)
            self.reference = reference
            self._reference_model = None  # do not keep a second model alive
        # A resumed run keeps the schedule of an uninterrupted one: it probes now only when it
        # needs a new reference (another probe configuration, or none was saved).
        if not (resumed and self.reference is not None) and not self._probed_at(state.global_step):
            self._measure(state, model, optimizer, periodic=False)
        self._periodic_start = time.perf_counter()
        self._periodic_seconds = 0.0
        self._periodic_probes = 0
        self._logging_seconds = 0.0  # the step-0 logging (first figures, imports) is not a periodic cost

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step % self.every_n_steps == 0 and not self._probed_at(state.global_step):
            self._measure(state, model, optimizer, periodic=True)

    def on_evaluate(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.probe_on_evaluate and not self._probed_at(state.global_step):
            self._measure(state, model, optimizer, periodic=False)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(checkpoint):
            content = {
                "config": self.probe.config,
                "reference": None if self.reference is None else self.reference.to_dict(),
                "history": self.history,
            }
            self.guard.call(
                "writing mnn_metrics.json", atomic_write_json, os.path.join(checkpoint, CHECKPOINT_FILE), content
            )

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self._probed_at(state.global_step):
            self._measure(state, model, optimizer, periodic=False)
        if state.is_world_process_zero:
            self.sinks.close()
