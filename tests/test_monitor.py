"""The monitor shared by the Trainer callback and the Accelerate hook: schedule, reference, history, state."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import PROBE_DATA, random_sequences, tiny_model

from mnn_callback import MemorySink, MNNWarning, Monitor, Probe
from mnn_callback.monitoring.schedule import Overhead
from mnn_callback.output.files import read_jsonl


def monitor_with_memory(**options) -> tuple[Monitor, MemorySink]:
    monitor = Monitor(Probe(PROBE_DATA, batch_size=4), dashboards=False, **options)
    memory = MemorySink()
    monitor.open(lambda: [memory], is_main_process=True)
    return monitor, memory


def test_fixed_schedule_and_one_probe_per_step():
    monitor, _ = monitor_with_memory(every_n_steps=4)
    assert [step for step in range(13) if monitor.due(step)] == [0, 4, 8, 12]
    monitor.measure(tiny_model("gpt2"), 4)
    assert not monitor.due(4)  # already probed at this step


def test_measurements_reference_history_and_sinks():
    model = tiny_model("gpt2")
    monitor, memory = monitor_with_memory(every_n_steps=2)
    first = monitor.measure(model, 0)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight.mul_(4.0)
    second = monitor.measure(model, 2, scheduled=True)
    assert monitor.reference is first.result  # the first measurement is the default reference
    assert first.differences["diff_erank"] == [0.0, 0.0, 0.0]
    assert second.differences["diff_erank"][2] == pytest.approx(
        first.result.per_layer["erank"][2] - second.result.per_layer["erank"][2]
    )
    assert [entry["step"] for entry in monitor.history] == [0, 2]
    assert monitor.history[1] == {"step": 2, "epoch": None, **second.scalars()}
    assert memory.measurements == [first, second]
    assert "probe/time_share" in second.scalars() and "probe/time_share" not in first.scalars()
    monitor.close()
    assert memory.closed


def test_state_round_trips_through_json_and_a_new_configuration_takes_a_new_reference():
    model = tiny_model("gpt2")
    monitor, _ = monitor_with_memory()
    monitor.measure(model, 0)
    monitor.measure(model, 100, scheduled=True)
    state = json.loads(json.dumps(monitor.state_dict()))
    restored, _ = monitor_with_memory()
    assert restored.load_state_dict(state)
    assert restored.history == monitor.history and restored.last_step == 100
    assert restored.reference.to_dict() == monitor.reference.to_dict()
    other = Monitor(Probe(PROBE_DATA, layers="last"))
    with pytest.warns(MNNWarning, match="different probe configuration"):
        assert not other.load_state_dict(state)
    assert other.reference is None and other.history == monitor.history


def test_a_reference_from_another_sample_is_named():
    reference = Probe(random_sequences(4, 5, 9, seed=11)).run(tiny_model("gpt2"))
    with pytest.warns(MNNWarning, match="measured on another probe sample"):
        Monitor(Probe(PROBE_DATA), reference=reference.to_dict())


def test_a_reference_model_is_probed_once_and_dropped():
    base = tiny_model("gpt2", seed=9)
    monitor, _ = monitor_with_memory(reference=base)
    monitor.take_reference()
    expected = Probe(PROBE_DATA, batch_size=4).run(base)
    assert monitor.reference.per_layer == expected.per_layer
    measurement = monitor.measure(tiny_model("gpt2"), 0)
    assert measurement.differences["diff_erank"][1] == pytest.approx(
        expected.per_layer["erank"][1] - measurement.result.per_layer["erank"][1]
    )


def test_only_the_main_process_makes_sinks():
    made = []
    monitor = Monitor(Probe(PROBE_DATA), dashboards=False)
    monitor.open(lambda: made.append(1) or [MemorySink()], is_main_process=False)
    monitor.measure(tiny_model("gpt2"), 0)
    assert made == [] and monitor.sinks.sinks == []
    assert len(monitor.history) == 1  # every process keeps the history (for checkpoints)


def test_bad_arguments():
    with pytest.raises(ValueError, match="every_n_steps"):
        Monitor(Probe(PROBE_DATA), every_n_steps=0)
    with pytest.raises(TypeError, match="dashboards"):
        Monitor(Probe(PROBE_DATA), dashboards="yes")


# --- the schedule, the budget, the cheap tier ----------------------------------------------------------


def probed_steps(monitor: Monitor, model, steps: int) -> list[int]:
    """Drive ``monitor`` as the adapters do: the reference at 0, scheduled steps, the final step."""
    monitor.measure(model, 0)
    monitor.start_clock()
    for step in range(1, steps + 1):
        if monitor.due(step):
            monitor.measure(model, step, scheduled=True, final=step == steps)
    if monitor.last_step != steps:
        monitor.measure(model, steps, final=True)
    return [entry["step"] for entry in monitor.history]


def test_a_log_schedule_probes_densely_early():
    monitor, _ = monitor_with_memory(every_n_steps=8, schedule="log")
    assert probed_steps(monitor, tiny_model("gpt2"), 40) == [0, 1, 2, 4, 8, 16, 24, 32, 40]
    fixed, _ = monitor_with_memory(every_n_steps=8)
    assert probed_steps(fixed, tiny_model("gpt2"), 20) == [0, 8, 16, 20]  # and the end of training
    with pytest.raises(ValueError, match="schedule must be one of"):
        Monitor(Probe(PROBE_DATA), schedule="cosine")


def test_the_overhead_projection_does_not_hold_dense_early_probes_against_a_sparse_cadence():
    now = [0.0]
    overhead = Overhead(clock=lambda: now[0])
    overhead.start(step=0)
    for step in (1, 2, 4, 8, 16):  # a log schedule's early probes: 1 s each, training steps of 1 s
        now[0] += (step - (overhead.last_step or 0)) * 1.0 + 1.0
        overhead.add(1.0, probe=True, step=step)
    assert overhead.share == pytest.approx(5 / 21)  # what the dense probes took so far
    assert overhead.step_seconds == pytest.approx(1.0)
    assert overhead.projected_share(100) == pytest.approx(1 / 101)  # what the run will take at every 100
    assert overhead.suggestion(0.05) == 19  # 1 / (1 + 19) = 5%


def test_exact_every_makes_every_kth_probe_exact_and_the_others_cheap():
    monitor, _ = monitor_with_memory(every_n_steps=1, exact_every=3)
    probed_steps(monitor, tiny_model("gpt2"), 7)
    exact = [entry["step"] for entry in monitor.history if "matrix_entropy/layer_0" in entry]
    assert exact == [0, 3, 6, 7]  # the first, every third, and the final probe
    cheap = [entry for entry in monitor.history if entry["step"] not in exact]
    assert all("mnn/layer_0" in entry and "renyi2_entropy/layer_0" in entry for entry in cheap)
    assert not any("erank/layer_0" in entry or "diff_erank/layer_0" in entry for entry in cheap)
    assert monitor.history[3]["diff_erank/layer_0"] == 0.0  # exact probes have Diff-eRank (the model is unchanged)


def slow_sample():
    """A sample whose probe costs many training steps of the tiny model."""
    return random_sequences(48, 100, 120, seed=4)


def test_the_budget_admits_a_probe_only_when_the_share_would_stay_under_the_cap():
    """The budget's arithmetic on a clock the test moves: 1 s probes, a 10% cap."""
    now = [0.0]
    overhead = Overhead(0.1, clock=lambda: now[0])
    overhead.start()
    admitted = []
    for step in range(1, 101):  # 100 training steps of 0.2 s each
        now[0] += 0.2
        if overhead.would_exceed(first_cost=1.0):
            overhead.skipped += 1
            continue
        now[0] += 1.0  # the probe
        overhead.add(1.0, probe=True)
        admitted.append(step)
        assert overhead.share <= 0.1 + 1e-12, (step, overhead.share)
    assert len(admitted) == 2 and overhead.skipped == 98  # about 2 s of probes in 22 s
    assert admitted[0] == 45  # the first: once 9 s of training make room for a 1 s probe


def test_a_budget_in_a_trainer_run_skips_probes_and_still_probes_at_both_ends(tmp_path):
    from helpers import make_trainer

    from mnn_callback import MNNCallback

    callback = MNNCallback(slow_sample(), every_n_steps=1, max_overhead=0.05, batch_size=8, dashboards=False)
    make_trainer(tmp_path, callback, max_steps=30).train()
    overhead = callback.monitor.overhead
    steps = [entry["step"] for entry in callback.history]
    assert steps[0] == 0 and steps[-1] == 30  # the reference and the final probe always run
    assert overhead.skipped > 0 and len(steps) < 31
    # one probe costs many steps of this model: the share stays near the cap at most (the monitor's accounting)
    assert overhead.share <= 0.05 or overhead.probes <= 1
    assert callback.history[-1]["probe/skipped"] == overhead.skipped
    records = [line for line in read_jsonl(tmp_path / "mnn_metrics.jsonl") if line.get("event") == "overhead"]
    assert not records or records[-1]["skipped"] == overhead.skipped


def test_without_a_budget_nothing_is_skipped():
    monitor, _ = monitor_with_memory(every_n_steps=1)
    assert probed_steps(monitor, tiny_model("gpt2"), 5) == [0, 1, 2, 3, 4, 5]
    assert monitor.overhead.skipped == 0
    with pytest.raises(ValueError, match="max_overhead must be a share between 0 and 1"):
        Monitor(Probe(PROBE_DATA), max_overhead=5)


@pytest.mark.parametrize(
    ("lengths", "regime", "announced"),
    [
        ((4, 16), "n < 0.6d", True),
        ((20, 30), "0.6d <= n < d", True),
        ((4, 24), "mixed", True),
        ((40, 60), "n >= d", False),
    ],
)
def test_the_first_probe_names_the_regime_and_says_what_mnn_means_there(caplog, lengths, regime, announced):
    import logging

    monitor = Monitor(Probe(random_sequences(6, *lengths, seed=4), batch_size=3), dashboards=False)
    memory = MemorySink()
    monitor.open(lambda: [memory], is_main_process=True)
    model = tiny_model("gpt2")  # hidden size 32
    with caplog.at_level(logging.INFO, logger="mnn_callback"):
        monitor.measure(model, 0)
        monitor.measure(model, 1)
    events = [fields for event, _, fields in memory.events if event == "regime"]
    assert len(events) == 1 and events[0]["regime"] == regime and events[0]["hidden_size"] == 32
    assert events[0]["tokens"][0] >= lengths[0] and events[0]["tokens"][2] <= lengths[1]
    lines = [record.getMessage() for record in caplog.records if "MNN regime" in record.getMessage()]
    assert len(lines) == int(announced)
    if announced:
        assert "coordinate axes" in lines[0] and "Matrix Entropy" in lines[0] and "d = 32" in lines[0]
    monitor.close()


def test_a_reference_layer_without_finite_values_takes_the_next_finite_probes_values():
    model = tiny_model("gpt2")
    monitor, _ = monitor_with_memory(every_n_steps=2)
    weight = model.transformer.h[1].mlp.c_fc.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.fill_(float("nan"))  # the last hidden state non-finite, the embeddings and block 0 finite
    start = monitor.measure(model, 0)
    assert monitor.reference.finite_layers() == [0, 1]
    with torch.no_grad():
        weight.copy_(saved)
        model.transformer.wte.weight.mul_(3.0)  # every layer moves, so the old references show
    with pytest.warns(MNNWarning, match="no finite values at hidden states 2 .* step 2 is their reference"):
        second = monitor.measure(model, 2)
    reference = monitor.reference
    assert reference.layers == [0, 1, 2] and reference.finite_layers() == [0, 1, 2]
    for name in ("erank", "mnn", "matrix_entropy"):  # layers 0, 1: step 0's values; layer 2: step 2's
        assert reference.per_layer[name][:2] == start.result.per_layer[name][:2]
        assert reference.per_layer[name][2] == second.result.per_layer[name][2]
    assert reference.per_sequence["entropy_nats"][2] == second.result.per_sequence["entropy_nats"][2]
    assert second.differences["diff_erank"][2] == 0.0 and second.differences["diff_erank"][0] != 0.0
    assert second.difference_errors["diff_erank"][2] == 0.0  # paired, against its own values
    third = monitor.measure(model, 4)  # no further warning: every layer has a finite reference
    assert third.differences["diff_erank"] == pytest.approx(second.differences["diff_erank"], abs=1e-9)
