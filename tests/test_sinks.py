"""Every sink receives the same measurement in the same form: TensorBoard, W&B offline, JSONL, memory."""

from __future__ import annotations

import math
import os

import pytest
from helpers import PROBE_DATA, assert_png, event_accumulator, probe_lines, tensorboard_values, tiny_model
from wandb_reader import offline_runs, wait_for_run

from mnn_callback import JsonlSink, MemorySink, Probe, TensorBoardSink, WandbSink
from mnn_callback.core import schema
from mnn_callback.output.figures import render_dashboard
from mnn_callback.output.tables import result_rows
from mnn_callback.probing.results import Measurement


@pytest.fixture(scope="module")
def measurements():
    """Two real measurements of a tiny GPT-2 (the second after a change of weights), with Diff-eRank."""
    import torch

    model = tiny_model("gpt2")
    probe = Probe(PROBE_DATA, batch_size=4)
    reference = probe.run(model)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(3.0)
    later = probe.run(model)
    return [
        Measurement(0, 0.0, reference, reference.differences(reference), {"errors": 0.0}),
        Measurement(5, 0.5, later, later.differences(reference), {"errors": 0.0, "time_share": 0.01}),
    ]


def test_every_sink_gets_the_same_values(measurements, tmp_path):
    import wandb

    memory = MemorySink()
    sinks = [
        TensorBoardSink(tmp_path / "tb"),
        WandbSink(start_run=True, project="contract"),
        JsonlSink(tmp_path / "history.jsonl"),
        memory,
    ]
    images = render_dashboard(result_rows(measurements[1].result, {"model": "run", "step": 5}), 5, layer_profile=True)
    for sink in sinks:
        sink.log_config({"fingerprint": "f"})
        for measurement in measurements:
            sink.log_measurement(measurement)
        sink.log_images(images)
        sink.close()
    wandb.teardown()
    expected = [measurement.scalars() for measurement in measurements]
    assert "diff_erank/layer_2" in expected[1] and "mnn_se/layer_0" in expected[1]
    assert expected[1]["diff_erank/layer_2"] != 0.0 and expected[0]["diff_erank/layer_2"] == 0.0

    assert [m.scalars() for m in memory.measurements] == expected  # the same objects, in order
    assert memory.configs == [{"fingerprint": "f"}] and memory.images == images and memory.closed

    lines = probe_lines(tmp_path / "history.jsonl")
    assert [line["step"] for line in lines] == [0, 5]
    for line, values in zip(lines, expected, strict=True):
        assert {key: line[key] for key in values} == pytest.approx(values, rel=1e-12)

    accumulator = event_accumulator(tmp_path / "tb")
    tensorboard = tensorboard_values(tmp_path / "tb")
    for key in expected[1]:
        if "_se/" in key:
            assert key not in tensorboard  # standard errors: in the JSONL, CSV and W&B, not as TensorBoard cards
            continue
        got = tensorboard[key]
        want = {step: values[key] for step, values in zip((0, 5), expected, strict=True) if key in values}
        assert got == pytest.approx(want, rel=1e-6, abs=1e-7), key
    (image,) = accumulator.Images("mnn_callback/layer_profile")
    assert image.step == 5
    assert_png(image.encoded_image_string, min_size=(200, 150))

    (run_dir,) = offline_runs(os.environ["WANDB_DIR"])
    run = wait_for_run(run_dir)
    rows = [row for row in run.history if "mnn/layer_0" in row]
    assert [row["train/global_step"] for row in rows] == [0, 5]
    for row, values in zip(rows, expected, strict=True):
        assert {key: row[key] for key in values} == pytest.approx(values, rel=1e-12)
    (profile,) = [row["mnn_callback/layer_profile"] for row in run.history if "mnn_callback/layer_profile" in row]
    with open(os.path.join(run_dir, "files", profile["path"]), "rb") as handle:
        assert handle.read() == images[0].png
    assert run.config["mnn_callback"] == {"fingerprint": "f"}


def test_keys_come_from_the_schema(measurements):
    scalars = measurements[1].scalars()
    layers = measurements[1].layers
    for row in schema.logged_layer_metrics():
        for layer in layers:
            assert schema.layer_key(row.name, layer) in scalars, row.name
    assert scalars[schema.headline_key("mnn")] == scalars[schema.layer_key("mnn", layers[-1])]
    for field in ("loss", "perplexity", "sequences", "tokens", "nan_sequences", "seconds", "errors", "time_share"):
        assert schema.probe_key(field) in scalars
    assert not any(math.isnan(value) for value in scalars.values())


def test_a_failed_probe_still_reaches_every_sink_with_its_error_count(tmp_path):
    failed = Measurement(7, None, None, monitor={"errors": 3.0})
    memory, jsonl = MemorySink(), JsonlSink(tmp_path / "h.jsonl")
    for sink in (memory, jsonl):
        sink.log_measurement(failed)
    assert memory.measurements == [failed]
    (line,) = probe_lines(tmp_path / "h.jsonl")
    assert line["step"] == 7 and line["probe/errors"] == 3.0
    assert not any("/layer_" in key for key in line)


def test_a_second_monitor_writes_its_own_keys_into_the_same_wandb_run(measurements):
    """A monitor named other than "mnn" prefixes its keys, so two monitors' curves never share a chart."""
    import wandb

    run = wandb.init(project="two-monitors")
    first, second = WandbSink(run=run), WandbSink(run=run, prefix="long/")
    for sink in (first, second):
        sink.log_config({"fingerprint": "f"})
        sink.log_measurement(measurements[1])
        sink.close()
    run.finish()
    wandb.teardown()
    (run_dir,) = offline_runs(os.environ["WANDB_DIR"])
    history = wait_for_run(run_dir).history
    expected = measurements[1].scalars()
    (plain,) = [row for row in history if "mnn/layer_0" in row]
    (named,) = [row for row in history if "long/mnn/layer_0" in row]
    assert {key: plain[key] for key in expected} == pytest.approx(expected, rel=1e-12)
    assert {key: named[f"long/{key}"] for key in expected} == pytest.approx(expected, rel=1e-12)
    assert not any(key.startswith("long/") for key in plain)
    config = wait_for_run(run_dir).config
    assert config["mnn_callback"] == config["mnn_callback.long"] == {"fingerprint": "f"}
