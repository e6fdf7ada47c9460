"""The monitor shared by the Trainer callback and the Accelerate hook: schedule, reference, history, state."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import PROBE_DATA, random_sequences, tiny_model

from mnn_callback import MemorySink, MNNWarning, Monitor, Probe


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
