"""MNNCallback: the Hugging Face Trainer callback that watches representations compress.

``trainer.add_callback(MNNCallback(held_out_texts, tokenizer=tokenizer))`` probes the model at
step 0, every ``every_n_steps`` steps and at the end of training, and logs MNN, Matrix
Entropy, eRank, Diff-eRank, the exact nuclear norm and the sample's loss to TensorBoard,
Weights & Biases and ``<output_dir>/mnn_metrics.jsonl``, into ``trainer_state.json``'s
``log_history``, and into every checkpoint (``checkpoint-*/mnn_metrics.json``). The work is
done by a :class:`~mnn_callback.monitoring.monitor.Monitor`; this module translates Trainer events.
"""

from __future__ import annotations

import glob
import os
import socket
import warnings
from collections.abc import Sequence
from typing import Any

from torch import nn
from transformers import TrainerCallback

from mnn_callback.core.errors import MNNWarning
from mnn_callback.core.identity import DEFAULT_NAME, named_file, validate_name
from mnn_callback.monitoring.monitor import DEFAULT_SYNC_TIMEOUT, Monitor
from mnn_callback.output.figures import Dashboards
from mnn_callback.output.files import atomic_write_json
from mnn_callback.output.sinks import JSONL_FILE, JsonlSink, Sink, TensorBoardSink, WandbSink, check_sink_specs
from mnn_callback.output.trackers import CometSink, MlflowSink

__all__ = ["CHECKPOINT_FILE", "MNNCallback", "trainer_tensorboard_dir"]

CHECKPOINT_FILE = "mnn_metrics.json"
STATE_KEY = "mnn_callback"  # our entry in TrainerState.stateful_callbacks (saved in trainer_state.json)
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml")  # report_to entries the MNN scalars follow


def _report_to(args: Any) -> list[str]:
    report_to = getattr(args, "report_to", None) or []
    if isinstance(report_to, str):
        report_to = [report_to]
    if "all" in report_to:
        from transformers.integrations import get_available_reporting_integrations

        report_to = get_available_reporting_integrations()
    return [name for name in report_to if name != "none"]


def _newest_writer_dir(root: str) -> str | None:
    """The directory of the newest TensorBoard event file this process created under ``root``.

    Event file names end in ``.{host}.{pid}.{counter}`` (the counter grows with every writer
    the process opens), so the largest counter is the writer created last.
    """
    suffix = f".{socket.gethostname()}.{os.getpid()}."
    newest: tuple[int, str] | None = None
    # one level down, where the Trainer's run directories are (not the sub-runs monitors add below them)
    for path in glob.glob(os.path.join(glob.escape(root), "*", "events.out.tfevents.*")):
        name = os.path.basename(path)
        if suffix in name and name.rsplit(".", 1)[-1].isdigit():
            candidate = (int(name.rsplit(".", 1)[-1]), os.path.dirname(path))
            newest = candidate if newest is None or candidate > newest else newest
    return None if newest is None else newest[1]


def trainer_tensorboard_dir(args: Any) -> str:
    """The directory the installed transformers' TensorBoard callback writes to for ``args``.

    transformers 4.x: ``args.logging_dir``. transformers 5: ``TENSORBOARD_LOGGING_DIR``, else
    ``output_dir/runs/<time>_<host>``, named when its callback starts training: found as the
    directory of the newest event file this process wrote under ``output_dir/runs`` (a new
    directory of that form when the Trainer does not report to TensorBoard).
    """
    if getattr(args, "logging_dir", None):  # transformers 4
        return args.logging_dir
    if os.environ.get("TENSORBOARD_LOGGING_DIR"):
        return os.path.expanduser(os.environ["TENSORBOARD_LOGGING_DIR"])
    found = _newest_writer_dir(os.path.join(args.output_dir, "runs")) if "tensorboard" in _report_to(args) else None
    if found is not None:
        return found
    from transformers.integrations.integration_utils import default_logdir

    return os.path.join(args.output_dir, default_logdir())


class MNNCallback(TrainerCallback):
    """Probe the model being trained and log how its representations compress.

    Args:
        data: the held-out sample (see :class:`~mnn_callback.probing.probe.Probe`): texts (with
            ``tokenizer``), token-id lists, a tensor of ids, a dataset, or a ``.txt``/``.jsonl`` path.
        every_n_steps: probe every this many optimizer steps (and at step 0 and at the end).
        schedule: ``"fixed"`` (default), or ``"log"``: also at steps 1, 2, 4, 8, ... below
            ``every_n_steps``, where training moves fastest.
        max_overhead: skip scheduled probes that would take the monitor's share of the training
            wall time above this (e.g. ``0.01``); the step-0 and final probes always run.
        exact_every: every K-th probe (and the first and the last) with the full spectra, the
            others with ``method="cheap"`` (MNN, Rényi-2, loss).
        tokenizer: turns text data into ids (or the directory of one).
        sinks: where to log: names from ``"tensorboard"``, ``"wandb"``, ``"mlflow"``, ``"comet_ml"``,
            ``"jsonl"`` or :class:`~mnn_callback.output.sinks.Sink` objects. Default: those of
            ``TrainingArguments.report_to`` (tensorboard, wandb, mlflow, comet_ml; any other is named
            in one warning) plus JSONL, always.
        log_dir: TensorBoard directory; default: the one the Trainer's own TensorBoard callback
            writes to (:func:`trainer_tensorboard_dir`).
        reference: the Diff-eRank reference: a model (e.g. the base model of a fine-tune,
            probed once at the start of training), a :class:`ProbeResult`, or a JSON file
            holding one. Default: the step-0 probe of the model being trained.
        on_evaluate: also probe at every evaluation.
        name: this monitor's name, written into every JSONL record. Default ``"mnn"``; a second
            monitor of the same output directory gets ``"mnn-2"``, and so on, in the order they
            start. Any other than ``"mnn"`` has its own files (``mnn_metrics.<name>.jsonl``,
            ``checkpoint-*/mnn_metrics.<name>.json``), checkpoint entry, TensorBoard run
            (``<log_dir>/<name>``) and keys in W&B and ``log_history`` (``<name>/mnn/layer_0``, ...).
        strict: raise errors instead of turning them into warnings.
        dashboards: the TensorBoard/W&B pictures besides the scalars (a
            :class:`~mnn_callback.output.figures.Dashboards`, or True/False for all or none).
        sync_timeout: with several processes, the seconds one waits at a probe for the others
            (default 300); a process that does not come (or comes to another step) turns the
            monitor off on every process, with one error, and training goes on.
        alert: the collapse alarm: True, a :class:`~mnn_callback.monitoring.alarm.CollapseAlert` or a
            dict of its fields. When a hidden state's Matrix Entropy (or eRank) falls by more than
            ``k`` paired standard errors and ``min_drop``: one warning, an ``alert`` event, ``wandb.alert``;
            with ``stop=True`` the Trainer stops (``control.should_training_stop``).
        **probe_options: passed to :class:`~mnn_callback.probing.probe.Probe` (``max_samples``,
            ``max_length``, ``batch_size``, ``layers``, ``seed``, ``dtype``, ...).

    Every process runs the probe (the sample is sharded and the sums all-reduced); only the
    world process zero writes. A callback used for a second training run (a second Trainer, or
    ``hyperparameter_search``) starts afresh: new history, new Diff-eRank reference (unless
    ``reference`` was given).
    """

    def __init__(
        self,
        data: Any,
        *,
        every_n_steps: int = 100,
        schedule: str = "fixed",
        max_overhead: float | None = None,
        exact_every: int | None = None,
        tokenizer: Any = None,
        sinks: Sequence[str | Sink] | None = None,
        log_dir: str | os.PathLike | None = None,
        reference: Any = None,
        on_evaluate: bool = False,
        name: str | None = None,
        strict: bool = False,
        dashboards: Dashboards | bool = True,
        sync_timeout: float = DEFAULT_SYNC_TIMEOUT,
        alert: Any = None,
        **probe_options: Any,
    ) -> None:
        self.requested_name = validate_name(name)
        check_sink_specs(sinks)
        self.monitor = Monitor.of_data(
            data,
            tokenizer=tokenizer,
            strict=strict,
            probe_options=probe_options,
            every_n_steps=every_n_steps,
            schedule=schedule,
            max_overhead=max_overhead,
            exact_every=exact_every,
            reference=reference,
            dashboards=dashboards,
            sync_timeout=sync_timeout,
            alert=alert,
        )
        self.monitor.adapter_settings = {"on_evaluate": bool(on_evaluate)}
        self.sink_specs = None if sinks is None else list(sinks)
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.probe_on_evaluate = on_evaluate
        self.tensorboard_dir: str | None = None  # where the TensorBoard sink writes, once training started
        self.wandb_dir: str | None = None  # the W&B run's local directory, once training started

    # what the monitor holds, under the names users and tests know
    probe = property(lambda self: self.monitor.probe)
    history = property(lambda self: self.monitor.history)
    reference = property(lambda self: self.monitor.reference)
    guard = property(lambda self: self.monitor.guard)
    sinks = property(lambda self: self.monitor.sinks)
    every_n_steps = property(lambda self: self.monitor.every_n_steps)
    name = property(lambda self: self.monitor.name)

    @property
    def _state_key(self) -> str:
        return STATE_KEY if self.name == DEFAULT_NAME else f"{STATE_KEY}.{self.name}"

    @property
    def _key_prefix(self) -> str:
        """Before this monitor's keys in ``log_history`` and the trackers: none for ``"mnn"``, else ``"<name>/"``."""
        return "" if self.name == DEFAULT_NAME else f"{self.name}/"

    def _log_entry(self, entry: dict[str, Any]) -> dict[str, Any]:
        """A history entry as ``log_history`` holds it: this monitor's keys (prefixed), numbers only."""
        prefix = self._key_prefix
        return {key if key in ("step", "epoch") else prefix + key: value for key, value in entry.items()}

    def _own_entries(self, log_history: list[Any]) -> list[dict[str, Any]]:
        """This monitor's probes among ``log_history``'s entries, without the prefix."""
        prefix = self._key_prefix
        own = []
        for entry in log_history:
            if isinstance(entry, dict) and f"{prefix}probe/sequences" in entry:
                keys = [key for key in entry if key in ("step", "epoch") or key.startswith(prefix)]
                own.append({key if key in ("step", "epoch") else key[len(prefix) :]: entry[key] for key in keys})
        return own

    def _make_sinks(self, args: Any) -> list[Sink]:
        specs = self.sink_specs
        if specs is None:
            reported = _report_to(args)
            specs = [name for name in TRACKERS if name in reported] + ["jsonl"]
            others = [name for name in reported if name not in TRACKERS]
            if others:
                warnings.warn(
                    f"the MNN scalars do not go to {', '.join(others)} (report_to): no sink of this package "
                    f"writes there; they are in {JSONL_FILE} and the other trackers, and a Sink subclass in "
                    "sinks=[...] can forward them",
                    MNNWarning,
                    stacklevel=2,
                )
        sinks = []
        for spec in specs:
            if isinstance(spec, Sink):
                sinks.append(spec)
                continue
            named = self.name != DEFAULT_NAME
            if spec == "tensorboard":
                directory = self.log_dir or trainer_tensorboard_dir(args)
                self.tensorboard_dir = os.path.join(directory, self.name) if named else directory
                sink = self.guard.call("the tensorboard sink (setup)", TensorBoardSink, self.tensorboard_dir)
            elif spec in ("mlflow", "comet_ml"):  # the run the Trainer's integration started
                kind = MlflowSink if spec == "mlflow" else CometSink
                sink = self.guard.call(f"the {spec} sink (setup)", kind, prefix=self._key_prefix)
            elif spec == "wandb":
                sink = self.guard.call("the wandb sink (setup)", WandbSink, prefix=self._key_prefix)
                self.wandb_dir = getattr(sink, "directory", None)
            else:
                path = os.path.join(args.output_dir, named_file(JSONL_FILE, self.name))
                run = self.monitor.run_id
                sink = self.guard.call("the jsonl sink (setup)", JsonlSink, path, monitor=self.name, run=run)
            if sink is not None:
                sinks.append(sink)
        return sinks

    def _restore(self, state: Any) -> None:
        """Continue the history and the reference of the checkpoint the Trainer resumed from."""
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(self._state_key) or {}
        history = self._own_entries(state.log_history)
        self.monitor.load_state_dict(
            {
                "fingerprint": saved.get("fingerprint", self.probe.fingerprint),
                "reference": saved.get("reference"),
                "history": history,
                "last_step": history[-1].get("step") if history else None,  # checked there
                "run": saved.get("run"),
                "alarm": saved.get("alarm"),
            }
        )

    def _measure(self, state: Any, model: nn.Module, optimizer: Any, **kind: bool) -> None:
        measurement = self.monitor.measure(
            model, int(state.global_step), epoch=state.epoch, optimizer=optimizer, **kind
        )
        if measurement.result is None:
            return
        state.log_history.append(self._log_entry(self.history[-1]))
        self._keep_state(state)

    def _keep_state(self, state: Any) -> None:
        """What a checkpoint saved from now on carries (in ``trainer_state.json``): this run's id from its start."""
        state.stateful_callbacks[self._state_key] = {
            "fingerprint": self.probe.fingerprint,
            "reference": None if self.reference is None else self.reference.to_dict(),
            "run": self.monitor.run_id,
            "alarm": None if self.monitor.alarm is None else self.monitor.alarm.state_dict(),
        }

    # -- Trainer events ---------------------------------------------------------------------------

    # Every event runs inside the guard: what fails in the monitor costs a warning, never the training.

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.guard.call("starting the monitor", self._begin, args, state, model, optimizer)
        if self.monitor.should_stop:  # the first probe's alert, or a resumed run the alarm stopped
            control.should_training_stop = True  # (the Trainer still takes the step it is at)

    def _begin(self, args: Any, state: Any, model: nn.Module, optimizer: Any) -> None:
        resumed = state.global_step > 0
        self.monitor.open(
            lambda: self._make_sinks(args),
            is_main_process=state.is_world_process_zero,
            directory=args.output_dir,
            name=self.requested_name,
        )
        if resumed:
            self._restore(state)
        if resumed:
            self.monitor.log_resume(int(state.global_step))
        self.monitor.take_reference(int(state.global_step))
        # A resumed run keeps the schedule of an uninterrupted one: it probes now only when it
        # needs a new reference (another probe configuration, or none was saved).
        if not (resumed and self.reference is not None) and self.monitor.last_step != state.global_step:
            self._measure(state, model, optimizer)
        self._keep_state(state)
        self.monitor.start_clock(state.global_step)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.guard.call("the monitor (step end)", self._step_end, state, model, optimizer)
        if self.monitor.should_stop:  # the collapse alarm fired with stop=True
            control.should_training_stop = True

    def _step_end(self, state: Any, model: nn.Module, optimizer: Any) -> None:
        if self.monitor.due(state.global_step):
            last = bool(state.max_steps) and state.global_step >= state.max_steps
            self._measure(state, model, optimizer, scheduled=True, final=last)
        else:
            self.monitor.poll()  # figures finished in the background reach the sinks

    def on_evaluate(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.probe_on_evaluate and self.monitor.last_step != state.global_step:
            self.guard.call("the monitor (evaluate)", self._measure, state, model, optimizer)
        if self.monitor.should_stop:
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(checkpoint):
            content = {
                "config": self.monitor.config,
                "reference": None if self.reference is None else self.reference.to_dict(),
                "history": self.history,
            }
            path = os.path.join(checkpoint, named_file(CHECKPOINT_FILE, self.name))
            self.guard.call(f"writing {os.path.basename(path)}", atomic_write_json, path, content)

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.guard.call("the monitor (train end)", self._end, state, model, optimizer)

    def _end(self, state: Any, model: nn.Module, optimizer: Any) -> None:
        try:
            if self.monitor.last_step != state.global_step:
                self._measure(state, model, optimizer, final=True)
        finally:
            self.monitor.close()
