"""The collapse alarm in real runs: a plain loop, a Trainer and Lightning; firing once, not firing, stopping."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import PROBE_DATA, make_trainer, random_sequences, tiny_lightning_module, tiny_model
from transformers import TrainerCallback

from mnn_callback import CollapseAlert, CollapseWarning, MNNCallback, MNNMonitor
from mnn_callback.core.errors import MNNWarning
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
    alarm = Alarm(CollapseAlert(warmup=2), every_n_steps=2)  # armed at 2 with no episode on
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
        ({"metric": ["erank"]}, "expected metric to be 'matrix_entropy' or 'erank'"),
    ],
)
def test_bad_alert_settings_are_refused(alert, message):
    with pytest.raises(ValueError, match=message):
        MNNMonitor(PROBE_DATA, alert=alert)


def test_an_unpaired_reference_is_said_once_at_the_start_and_in_the_alert(tmp_path):
    from mnn_callback.probing.probe import Probe

    reference = Probe(PROBE_DATA, batch_size=5).run(tiny_model("gpt2", seed=0), per_sequence=False)
    alert = {"baseline": "reference", "warmup": 0}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # each warning once per place, as Python shows them by default
        train_loop(tmp_path, collapse_at=COLLAPSE_STEP, reference=reference, alert=alert)
    unpaired = [w for w in caught if "reference kept no per-sequence values" in str(w.message)]
    assert len(unpaired) == 1  # at the start; not again at every probe, nor after the alert
    assert not [w for w in caught if "both results measured the same sample" in str(w.message)]
    [event] = alerts(tmp_path / "mnn_metrics.jsonl")
    assert event["paired"] is False and "unpaired" in event["message"] and event["since"] == "reference"
    with pytest.raises(MNNWarning, match="kept no per-sequence values"):  # strict: at the start, in every adapter
        MNNMonitor(PROBE_DATA, out_dir=tmp_path / "strict", reference=reference, alert=alert, strict=True)


def test_a_named_monitor_s_alert_names_it_and_a_strict_run_still_only_warns(tmp_path):
    with pytest.warns(CollapseWarning, match=r"^mnn_callback\[wide\]: collapse alarm at step 6"):
        monitor, _ = train_loop(tmp_path, collapse_at=COLLAPSE_STEP, name="wide", strict=True, alert=True)
    [event] = alerts(tmp_path / "mnn_metrics.wide.jsonl")
    assert event["monitor"] == "wide" and event["paired"] is True
    assert monitor.monitor.alarm.alerts[0].title == "step 6: Matrix Entropy collapse (mnn_callback[wide])"


@pytest.mark.parametrize(("metric", "paired_on"), [("matrix_entropy", "matrix_entropy"), ("erank", "entropy_nats")])
def test_the_saved_window_keeps_only_what_the_alarm_pairs_on(tmp_path, metric, paired_on):
    monitor, _ = train_loop(tmp_path, collapse_at=None, steps=4, alert={"metric": metric, "warmup": 0})
    [[step, saved]] = monitor.state_dict()["alarm"]["trail"]
    assert step == 4 and list(saved["per_sequence"]) == [paired_on]
    assert len(monitor.monitor.history[-1]) > 0 and len(saved["per_layer"]) > 1  # the means stay: the message uses them


def test_a_resumed_run_s_alert_replaces_the_abandoned_run_s_on_the_timeline(tmp_path):
    from mnn_callback.output.tables import current_timeline

    def run(start_model, start_state, first, last, saved):
        model = tiny_model("gpt2", seed=0)
        model.load_state_dict(start_model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        data = torch.tensor(random_sequences(8, 12, 12, seed=1))
        monitor = MNNMonitor(PROBE_DATA, out_dir=tmp_path, every_n_steps=2, batch_size=5, sinks=["jsonl"], alert=True)
        if start_state is None:
            monitor.step(model, 0)
        else:
            monitor.load_state_dict(start_state)
        for step in range(first, last + 1):
            model(input_ids=data, labels=data).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step == COLLAPSE_STEP:
                collapse(model)
            monitor.step(model, step)
            if step == 4:
                saved.update(model={k: v.clone() for k, v in model.state_dict().items()}, state=monitor.state_dict())
        monitor.finish(model, last)

    checkpoint: dict = {}
    with pytest.warns(CollapseWarning):
        run(tiny_model("gpt2", seed=0).state_dict(), None, 1, 8, checkpoint)  # fires at 6, then "crashes" at 8
    with pytest.warns(CollapseWarning):
        run(checkpoint["model"], checkpoint["state"], 5, 8, {})  # resumed from step 4: fires at 6 again
    lines = read_jsonl(tmp_path / "mnn_metrics.jsonl")
    fired = [line for line in lines if line.get("event") == "alert"]
    assert [line["step"] for line in fired] == [COLLAPSE_STEP, COLLAPSE_STEP] and fired[0]["run"] != fired[1]["run"]
    [kept] = [line for line in current_timeline(lines) if line.get("event") == "alert"]
    assert kept["run"] == fired[1]["run"]


def test_by_default_the_first_falls_are_one_episode_and_a_set_warmup_checks_at_once(tmp_path):
    """warmup=None: the run starts in an episode (a from-scratch run's early compression), which ends at a
    probe without a fall; a number arms with no episode on."""
    from mnn_callback.monitoring.alarm import Alarm

    probes = []
    train_loop(tmp_path, collapse_at=COLLAPSE_STEP, steps=COLLAPSE_STEP, probes=probes, alert={"warmup": 0})
    results = dict(probes)
    healthy, collapsed = results[COLLAPSE_STEP - 2], results[COLLAPSE_STEP]
    default = Alarm(CollapseAlert(), every_n_steps=2)
    sequence = [(2, healthy), (4, collapsed), (6, collapsed), (8, healthy), (10, collapsed)]
    fired = [step for step, result in sequence if default.check(result, None, step) is not None]
    assert fired == [10]  # 2 -> 4 is the initial episode; 4 -> 6 no fall ends it; 8 -> 10 is announced
    armed = Alarm(CollapseAlert(warmup=2), every_n_steps=2)
    assert [step for step, result in sequence if armed.check(result, None, step) is not None] == [4, 10]


def test_a_run_the_alarm_stopped_stops_again_when_resumed_unless_stop_is_off(tmp_path):
    with pytest.warns(CollapseWarning):
        monitor, stopped_at = train_loop(tmp_path / "a", collapse_at=COLLAPSE_STEP, alert={"stop": True})
    assert stopped_at == COLLAPSE_STEP
    path = _saved(tmp_path, monitor.state_dict())
    options = {"out_dir": tmp_path / "b", "every_n_steps": 2, "batch_size": 5, "sinks": ["jsonl"]}
    again = MNNMonitor(PROBE_DATA, alert={"stop": True}, **options)
    with pytest.warns(MNNWarning, match=f"stopped this run at step {COLLAPSE_STEP}"):
        again.load_state_dict(torch.load(path, weights_only=True))
    assert again.should_stop
    going_on = MNNMonitor(PROBE_DATA, alert={"stop": False}, **options)
    going_on.load_state_dict(torch.load(path, weights_only=True))
    assert not going_on.should_stop


def test_an_alarm_on_cheap_probes_only_is_refused_and_exact_every_gives_it_exact_ones():
    with pytest.raises(ValueError, match="expected a probe with spectra for the collapse alarm"):
        MNNMonitor(PROBE_DATA, method="cheap", alert=True)
    assert MNNMonitor(PROBE_DATA, method="cheap", exact_every=2, alert=True).monitor.alarm is not None


def test_a_filter_that_makes_the_alert_an_error_costs_no_monitor_error_and_strict_leaves_it_a_warning(tmp_path, caplog):
    assert not issubclass(CollapseWarning, MNNWarning)  # a finding, not a problem the monitor survived
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapseWarning)
        monitor, _ = train_loop(tmp_path / "error", collapse_at=COLLAPSE_STEP, alert=True)
    assert monitor.monitor.guard.errors == 0 and len(alerts(tmp_path / "error" / "mnn_metrics.jsonl")) == 1
    assert "a warnings filter made CollapseWarning an error" in caplog.text
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CollapseWarning)  # the user's own filter holds under strict too
        warnings.simplefilter("error", MNNWarning)
        warnings.filterwarnings("ignore", message="mnn_callback: a probe and its logging cost")
        train_loop(tmp_path / "strict", collapse_at=COLLAPSE_STEP, alert=True, strict=True)
    assert len(alerts(tmp_path / "strict" / "mnn_metrics.jsonl")) == 1


def test_an_alert_against_a_reference_of_another_sample_says_why_it_is_unpaired(tmp_path):
    from mnn_callback.probing.probe import Probe

    other = Probe(random_sequences(10, 4, 24, seed=9), batch_size=5).run(tiny_model("gpt2", seed=0))
    with pytest.warns(MNNWarning, match="another probe sample"):
        train_loop(tmp_path, collapse_at=COLLAPSE_STEP, reference=other, alert={"baseline": "reference", "warmup": 0})
    [event] = alerts(tmp_path / "mnn_metrics.jsonl")
    assert event["paired"] is False and "unpaired: the baseline was measured on another sample" in event["message"]


@pytest.mark.parametrize(
    ("alert", "expected"),
    [({"window": __import__("numpy").int64(4)}, 4), ({"k": __import__("numpy").float32(2.5)}, 2.5)],
)
def test_numpy_numbers_are_accepted_as_plain_ones(alert, expected):
    rule = CollapseAlert.of(alert)
    value = rule.window if "window" in alert else rule.k
    assert value == expected and type(value) in (int, float)


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


# --- two processes (torchrun, gloo), Accelerate, W&B offline ---------------------------------------------

SYNC_TIMEOUT = 10.0  # tests/scripts/loop_alarm.py's: a process waiting this long at a probe means the other left
TORCHRUN = ["torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def launch_alarm_script(out, launcher: list[str], *arguments: str) -> list[dict]:
    """tests/scripts/loop_alarm.py under ``launcher`` (2 CPU processes, gloo); each process's report."""
    import json
    import os
    import subprocess
    import sys

    from helpers import HANG_TIMEOUT

    script = os.path.join(os.path.dirname(__file__), "scripts", "loop_alarm.py")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", *launcher, script, str(out), *arguments]
    subprocess.run(command, check=True, env=env, timeout=HANG_TIMEOUT)
    return [json.loads((out / f"report.{rank}.json").read_text()) for rank in range(2)]


@pytest.fixture(scope="module")
def two_process_alarm(tmp_path_factory):
    """One torchrun of the plain DDP loop's cases: their output directory and each process's report."""
    out = tmp_path_factory.mktemp("alarm_ddp")
    return out, launch_alarm_script(out, TORCHRUN)


def mnn_warnings(report: dict) -> list[list[str]]:
    return [warning for warning in report["warnings"] if warning[0] in ("MNNWarning", "CollapseWarning")]


def assert_both_stopped_at_the_collapse(out, reports: list[dict], case: str) -> dict:
    """Both processes stopped at the collapse step, neither waited on the other, only the main one
    announced (one warning, one ``alert`` line) and wrote (one line per probe); returns the alert."""
    for rank, report in enumerate(reports):
        got = report[case]
        assert (got["stopped_at"], got["should_stop"], got["alerts"]) == (COLLAPSE_STEP, True, [COLLAPSE_STEP]), rank
        assert len(got["losses"]) == COLLAPSE_STEP and got["waited"] < SYNC_TIMEOUT, rank
        assert not [text for _, text in mnn_warnings(got) if "the monitor is off" in text], rank
    main, other = (mnn_warnings(report[case]) for report in reports)
    [fired] = [text for kind, text in main if kind == "CollapseWarning"]
    assert f"collapse alarm at step {COLLAPSE_STEP}" in fired
    assert other == []  # process 1 decided alike and said nothing
    [event] = alerts(out / case / "mnn_metrics.jsonl")
    assert event["step"] == COLLAPSE_STEP and event["stop"] is True and 2 in event["layers"]
    lines = [line for line in probe_lines_of(out / case) if "matrix_entropy/layer_2" in line]
    assert [line["step"] for line in lines] == [0, 2, 4, 6]  # one writer: one line per probe
    before, now = (line["matrix_entropy/layer_2"] for line in lines[2:])
    position = event["layers"].index(2)
    assert event["before"][position] == pytest.approx(before, rel=1e-9)
    assert event["now"][position] == pytest.approx(now, rel=1e-9)
    assert event["fall"][position] == pytest.approx(before - now, rel=1e-9)
    return event


def probe_lines_of(directory):
    from helpers import probe_lines

    return probe_lines(directory / "mnn_metrics.jsonl")


def test_two_processes_stop_together_at_the_collapse_and_the_main_one_alone_announces(two_process_alarm):
    out, reports = two_process_alarm
    both = assert_both_stopped_at_the_collapse(out, reports, "both")
    one = assert_both_stopped_at_the_collapse(out, reports, "one")  # the collapse on process 1's model only
    last = both["layers"].index(2), one["layers"].index(2)
    assert one["fall"][last[1]] < both["fall"][last[0]]  # half the sample was probed on the collapsed model
    assert one["before"][last[1]] == pytest.approx(both["before"][last[0]], rel=1e-9)  # the same run until step 6


def test_a_fall_on_one_process_s_model_alone_stops_neither_process(two_process_alarm):
    """Process 1's own model fell past the alarm's thresholds; the probe of both models together did not:
    both processes run to the end (a decision per process would have stopped process 1 alone)."""
    out, reports = two_process_alarm
    rule = CollapseAlert(min_drop=0.25)  # the script's
    for rank, report in enumerate(reports):
        then, now = (torch.tensor(report["mild"]["alone"][str(step)], dtype=torch.float64) for step in (4, 6))
        fall = (then - now).mean().item()
        error = ((then - now).std(unbiased=True) / math.sqrt(len(then))).item()
        fires_alone = fall > rule.k * error and fall > rule.min_drop * then.mean().item()
        assert fires_alone is (rank == 1), (rank, fall, error, then.mean().item())
    for case in ("mild", "healthy"):
        for rank, report in enumerate(reports):
            got = report[case]
            assert (got["stopped_at"], got["should_stop"], got["alerts"]) == (None, False, []), (case, rank)
            assert len(got["losses"]) == 12 and got["waited"] < SYNC_TIMEOUT, (case, rank)
        assert not [w for report in reports for w in mnn_warnings(report[case]) if w[0] == "CollapseWarning"]
        assert alerts(out / case / "mnn_metrics.jsonl") == []
        steps = [line["step"] for line in probe_lines_of(out / case) if "matrix_entropy/layer_2" in line]
        assert steps == list(range(0, 13, 2)), case
    together = {line["step"]: line["matrix_entropy/layer_2"] for line in probe_lines_of(out / "mild")}
    assert 0 < together[4] - together[6] < rule.min_drop * together[4]  # fell, by less than the rule's share


def test_a_two_process_trainer_stops_both_processes_at_the_collapse(tmp_path):
    reports = launch_alarm_script(tmp_path, TORCHRUN, "trainer")
    assert_both_stopped_at_the_collapse(tmp_path, reports, "both")  # should_training_stop on both, alike


def test_an_accelerate_launch_of_two_processes_stops_both_at_the_collapse(tmp_path, two_process_alarm):
    from helpers import free_port

    launcher = ["accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launcher += ["--main_process_port", str(free_port())]
    launcher += ["--mixed_precision", "no", "--dynamo_backend", "no"]  # on CPU: ACCELERATE_USE_CPU, no GPU visible
    reports = launch_alarm_script(tmp_path, launcher, "accelerate")
    event = assert_both_stopped_at_the_collapse(tmp_path, reports, "both")
    plain = alerts(two_process_alarm[0] / "both" / "mnn_metrics.jsonl")[0]  # the same DDP training by hand
    for key in ("layers", "before", "now", "fall", "se"):
        assert event[key] == pytest.approx(plain[key], rel=1e-6), key


@pytest.fixture
def fresh_accelerate_state():
    """No Accelerator state from an earlier test in this process, nor left for a later one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_the_accelerate_hook_stops_at_the_collapse_with_the_plain_loop_s_alert_in_jsonl_and_tensorboard(
    tmp_path, fresh_accelerate_state
):
    """One process: the training of ``train_loop`` through an Accelerator and its TensorBoard tracker."""
    import json

    from accelerate import Accelerator
    from helpers import event_accumulator

    from mnn_callback import MNNAccelerateHook

    with pytest.warns(CollapseWarning):
        plain, _ = train_loop(tmp_path / "plain", collapse_at=COLLAPSE_STEP, alert={"stop": True})
    accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=tmp_path / "accelerate")
    accelerator.init_trackers("alarm")
    model = tiny_model("gpt2", seed=0)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    data = torch.tensor(random_sequences(8, 12, 12, seed=1))
    hook = MNNAccelerateHook(accelerator, PROBE_DATA, every_n_steps=2, batch_size=5, alert={"stop": True})
    hook.step(model, 0)
    stopped_at = None
    with pytest.warns(CollapseWarning, match=f"collapse alarm at step {COLLAPSE_STEP}"):
        for step in range(1, 13):
            accelerator.backward(model(input_ids=data, labels=data).loss)
            optimizer.step()
            optimizer.zero_grad()
            if step == COLLAPSE_STEP:
                collapse(model)
            hook.step(model, step)
            if hook.should_stop:
                stopped_at = step
                break
    assert hook.should_stop and stopped_at == COLLAPSE_STEP
    hook.finish(model, stopped_at)
    accelerator.end_training()
    [event] = alerts(tmp_path / "accelerate" / "mnn_metrics.jsonl")  # the project_dir's history
    [expected] = alerts(tmp_path / "plain" / "mnn_metrics.jsonl")
    assert event["step"] == COLLAPSE_STEP and event["stop"] is True and event["message"] == expected["message"]
    for key in ("layers", "before", "now", "fall", "se"):
        assert event[key] == pytest.approx(expected[key], rel=1e-6), key
    assert [alert.step for alert in plain.monitor.alarm.alerts] == [COLLAPSE_STEP]
    texts = event_accumulator(tmp_path / "accelerate" / "alarm").Tensors("mnn_callback/events/text_summary")
    fired = [(entry.step, entry.tensor_proto.string_val[0].decode()) for entry in texts]
    fired = [(step, json.loads(text.removeprefix("alert: "))) for step, text in fired if text.startswith("alert: ")]
    assert [step for step, _ in fired] == [COLLAPSE_STEP]  # "alert: {fields as JSON}", the JSONL line's fields
    assert {key: fired[0][1][key] for key in ("message", "layers", "fall", "se")} == {
        key: event[key] for key in ("message", "layers", "fall", "se")
    }


def wandb_alerts(run_dir) -> list[dict]:
    """The ``alert`` records of an offline W&B run's ``.wandb`` file (``run.alert``: kept for ``wandb sync``)."""
    import glob
    import os

    from wandb.proto import wandb_internal_pb2
    from wandb_reader import iter_payloads

    (path,) = glob.glob(os.path.join(run_dir, "*.wandb"))
    found = []
    for payload in iter_payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "alert":
            alert = record.alert
            found.append({"title": alert.title, "text": alert.text, "level": alert.level, "wait": alert.wait_duration})
    return found


def test_the_alert_reaches_an_offline_wandb_run(tmp_path):
    import os

    import wandb
    from wandb_reader import offline_runs, wait_for_run

    callback = MNNCallback(PROBE_DATA, every_n_steps=2, batch_size=5, alert=CollapseAlert(stop=True))
    trainer = make_trainer(tmp_path, max_steps=12, learning_rate=1e-3, report_to=["wandb"])
    trainer.add_callback(CollapseAt())
    trainer.add_callback(callback)
    with pytest.warns(CollapseWarning):
        trainer.train()
    wandb.finish()
    assert trainer.state.global_step == COLLAPSE_STEP
    (run_dir,) = offline_runs(os.environ["WANDB_DIR"])
    run = wait_for_run(run_dir)  # every record written, the exit one too
    [event] = alerts(tmp_path / "mnn_metrics.jsonl")
    [alert] = wandb_alerts(run_dir)
    assert alert["title"] == f"step {COLLAPSE_STEP}: Matrix Entropy collapse (mnn_callback)"
    assert alert["text"] == event["message"] and alert["level"] == "WARN"
    assert alert["wait"] == 60_000  # W&B's default: the same title at most once a minute (each step's differs)
    rows = [row for row in run.history if "matrix_entropy/layer_2" in row]
    assert [row["train/global_step"] for row in rows] == [0, 2, 4, 6]  # the alert's step is the last probe's
