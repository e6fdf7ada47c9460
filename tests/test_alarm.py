"""The collapse alarm in real runs: a plain loop, a Trainer and Lightning; firing once, not firing, stopping."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import PROBE_DATA, make_trainer, random_sequences, tiny_lightning_module, tiny_model
from transformers import TrainerCallback

from mnn_callback import CollapseAlert, CollapseWarning, MNNCallback, MNNMonitor
from mnn_callback.core.uncertainty import paired_standard_error
from mnn_callback.output.files import read_jsonl

COLLAPSE_STEP = 6


def collapse(model: torch.nn.Module) -> None:
    """Keep 2 of the final layer norm's 32 output dimensions: the last hidden state collapses onto 2 axes."""
    with torch.no_grad():
        model.transformer.ln_f.weight[2:] = 0.0
        model.transformer.ln_f.bias[2:] = 0.0


def train_loop(tmp_path, *, collapse_at: int | None, steps: int = 12, probes: list | None = None, **options):
    """A plain loop on a tiny GPT-2 (AdamW, lr 1e-3) with the monitor probing every 2 steps; returns the monitor.

    ``probes`` collects the alarm's newest baseline after every step."""
    model = tiny_model("gpt2", seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.tensor(random_sequences(8, 12, 12, seed=1))
    monitor = MNNMonitor(PROBE_DATA, out_dir=tmp_path, every_n_steps=2, batch_size=5, sinks=["jsonl"], **options)
    monitor.step(model, 0)
    stopped_at = None
    for step in range(1, steps + 1):
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == collapse_at:
            collapse(model)
        monitor.step(model, step)
        if probes is not None and monitor.monitor.alarm.trail:
            probes.append(monitor.monitor.alarm.trail[-1])
        if monitor.should_stop:
            stopped_at = step
            break
    monitor.finish(model, stopped_at or steps)
    return monitor, stopped_at


def alerts(path):
    return [line for line in read_jsonl(path) if line.get("event") == "alert"]


def test_a_loop_collapse_fires_once_with_the_paired_fall_and_a_healthy_loop_stays_quiet(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor, _ = train_loop(tmp_path / "collapsed", collapse_at=COLLAPSE_STEP, alert=True)
    fired = [w for w in caught if issubclass(w.category, CollapseWarning)]
    assert len(fired) == 1 and f"step {COLLAPSE_STEP}" in str(fired[0].message)
    [event] = alerts(tmp_path / "collapsed" / "mnn_metrics.jsonl")
    last = 2  # hidden state 2: after ln_f
    assert event["step"] == COLLAPSE_STEP and last in event["layers"] and event["since"] == COLLAPSE_STEP - 2
    history = {entry["step"]: entry for entry in monitor.history}
    position = event["layers"].index(last)
    fall = (
        history[COLLAPSE_STEP - 2][f"matrix_entropy/layer_{last}"]
        - history[COLLAPSE_STEP][f"matrix_entropy/layer_{last}"]
    )
    assert event["fall"][position] == pytest.approx(fall, rel=1e-6)
    assert (
        event["fall"][position] > 3 * event["se"][position]
        and event["fall"][position] > 0.25 * event["before"][position]
    )

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_loop(tmp_path / "healthy", collapse_at=None, alert=True)
    assert not [w for w in caught if issubclass(w.category, CollapseWarning)]
    assert alerts(tmp_path / "healthy" / "mnn_metrics.jsonl") == []


def test_the_paired_error_of_the_alarm_matches_an_independent_float64_computation(tmp_path):
    probes = []
    train_loop(tmp_path, collapse_at=COLLAPSE_STEP, steps=COLLAPSE_STEP, probes=probes, alert={"window": 1})
    [event] = alerts(tmp_path / "mnn_metrics.jsonl")
    results = dict(probes)
    then, now = results[COLLAPSE_STEP - 2], results[COLLAPSE_STEP]
    layer = event["layers"][0]
    a = torch.tensor(then.per_sequence["matrix_entropy"][then.layers.index(layer)], dtype=torch.float64)
    b = torch.tensor(now.per_sequence["matrix_entropy"][now.layers.index(layer)], dtype=torch.float64)
    expected = ((a - b).std(unbiased=True) / math.sqrt(len(a))).item()
    assert event["se"][0] == pytest.approx(expected, rel=1e-6)
    assert paired_standard_error(b.tolist(), a.tolist()) == pytest.approx(expected, rel=1e-6)


def test_stop_true_stops_the_loop_and_warmup_and_k_keep_it_quiet(tmp_path):
    _, stopped_at = train_loop(tmp_path / "stop", collapse_at=COLLAPSE_STEP, alert={"stop": True})
    assert stopped_at == COLLAPSE_STEP
    _, stopped_at = train_loop(tmp_path / "warm", collapse_at=COLLAPSE_STEP, alert={"stop": True, "warmup": 10})
    assert stopped_at is None  # armed at step 10: the collapse at 6 is its baseline
    _, stopped_at = train_loop(tmp_path / "k", collapse_at=COLLAPSE_STEP, alert={"stop": True, "k": 1e9})
    assert stopped_at is None


def test_the_alarm_resumes_its_window_and_episode_from_a_checkpoint(tmp_path):
    monitor, _ = train_loop(tmp_path / "a", collapse_at=COLLAPSE_STEP, steps=COLLAPSE_STEP, alert=True)
    state = monitor.state_dict()
    assert state["alarm"]["in_episode"] and len(state["alarm"]["trail"]) == 1
    again = MNNMonitor(PROBE_DATA, out_dir=tmp_path / "b", every_n_steps=2, batch_size=5, sinks=["jsonl"], alert=True)
    again.load_state_dict(torch.load(_saved(tmp_path, state), weights_only=True))
    assert again.monitor.alarm.in_episode and again.monitor.alarm.trail[0][0] == COLLAPSE_STEP


def test_a_probe_without_finite_values_is_no_baseline(tmp_path):
    import dataclasses

    from mnn_callback.monitoring.alarm import Alarm

    probes = []
    train_loop(tmp_path, collapse_at=COLLAPSE_STEP, steps=COLLAPSE_STEP, probes=probes, alert=True)
    results = dict(probes)
    healthy, collapsed = results[COLLAPSE_STEP - 2], results[COLLAPSE_STEP]
    broken = dataclasses.replace(
        healthy, per_layer={name: [math.nan] * len(values) for name, values in healthy.per_layer.items()}
    )
    alarm = Alarm(CollapseAlert(), every_n_steps=2)
    assert alarm.check(healthy, None, 2) is None and alarm.check(broken, None, 4) is None
    alert = alarm.check(collapsed, None, 6)  # compared with step 2, not with the NaN probe
    assert alert is not None and alert.since == 2


def _saved(tmp_path, state):
    path = tmp_path / "monitor.pt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    ("alert", "message"),
    [
        ({"metric": "mnn"}, "MNN never triggers"),
        ({"k": -1}, "expected k to be a finite number >= 0"),
        ({"min_drop": 1.5}, "share of the baseline below 1"),
        ({"baseline": "best"}, "expected baseline"),
        ({"window": 0}, "expected window to be an integer >= 1"),
        ("yes", "expected alert to be True"),
        ({"stpo": True}, "expected alert keys among .*stop.*, got stpo"),
    ],
)
def test_bad_alert_settings_are_refused(alert, message):
    with pytest.raises(ValueError, match=message):
        MNNMonitor(PROBE_DATA, alert=alert)


class CollapseAt(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == COLLAPSE_STEP:
            collapse(model)


def test_the_trainer_stops_when_the_alarm_fires_with_stop(tmp_path):
    callback = MNNCallback(PROBE_DATA, every_n_steps=2, batch_size=5, alert=CollapseAlert(stop=True))
    trainer = make_trainer(tmp_path, max_steps=12, learning_rate=1e-3)
    trainer.add_callback(CollapseAt())  # before the monitor: it probes the collapsed model
    trainer.add_callback(callback)
    with pytest.warns(CollapseWarning, match=f"collapse alarm at step {COLLAPSE_STEP}"):
        trainer.train()
    assert trainer.state.global_step == COLLAPSE_STEP
    [event] = alerts(tmp_path / "mnn_metrics.jsonl")
    assert event["stop"] is True and event["metric"] == "matrix_entropy"


def test_a_healthy_trainer_run_never_fires(tmp_path):
    callback = MNNCallback(PROBE_DATA, every_n_steps=2, batch_size=5, alert={"stop": True})
    trainer = make_trainer(tmp_path, callback, max_steps=12, learning_rate=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapseWarning)
        trainer.train()
    assert trainer.state.global_step == 12 and alerts(tmp_path / "mnn_metrics.jsonl") == []


def test_lightning_stops_when_the_alarm_fires_with_stop(tmp_path):
    import lightning
    from torch.utils.data import DataLoader

    from mnn_callback import MNNLightningCallback

    class Collapse(lightning.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == COLLAPSE_STEP:
                collapse(pl_module.model)

    module = tiny_lightning_module()
    loader = DataLoader(torch.tensor(random_sequences(48, 12, 12, seed=1)), batch_size=4)
    alert = {"stop": True, "warmup": 4}  # lr 1e-2: Matrix Entropy still falls fast in the first steps
    monitor = MNNLightningCallback(PROBE_DATA, module="model", every_n_steps=2, batch_size=5, alert=alert)
    trainer = lightning.Trainer(
        max_steps=12,
        callbacks=[Collapse(), monitor],
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.warns(CollapseWarning):
        trainer.fit(module, loader)
    assert trainer.global_step == COLLAPSE_STEP
    assert [event["step"] for event in alerts(tmp_path / "mnn_metrics.jsonl")] == [COLLAPSE_STEP]
