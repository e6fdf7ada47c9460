"""Every sink receives the same measurement in the same form: TensorBoard, W&B offline, JSONL, memory."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
from helpers import (
    HANG_TIMEOUT,
    PROBE_DATA,
    assert_png,
    comet_archive_metrics,
    event_accumulator,
    offline_comet,
    probe_lines,
    tensorboard_values,
    tiny_model,
)
from wandb_reader import offline_runs, wait_for_run

from mnn_callback import CometSink, JsonlSink, MemorySink, Probe, TensorBoardSink, WandbSink
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


def test_the_comet_sink_takes_no_ended_experiment_and_says_so(measurements, tmp_path, monkeypatch):
    """An ended experiment drops what it is given without a word: the sink never takes it for the running one,
    and a log after it ended is an error naming it (on 8861eeb both were silent losses)."""
    comet_ml = pytest.importorskip("comet_ml")
    offline_comet(monkeypatch, tmp_path / "comet")
    experiment = comet_ml.start(online=False, mode="create")
    sink = CometSink()
    assert sink.experiment is experiment
    sink.log_measurement(measurements[0])
    experiment.end()  # writes the offline archive
    key = experiment.get_key()
    with pytest.raises(RuntimeError, match=f"the Comet experiment {key} has ended: it takes no more data"):
        sink.log_measurement(measurements[1])
    with pytest.raises(RuntimeError, match=rf"no running Comet experiment: the last one \({key}\) has ended; "):
        CometSink()
    metrics = comet_archive_metrics(tmp_path / "comet")
    expected = measurements[0].scalars()
    assert {name: points for name, points in metrics.items() if name in expected} == {
        name: [(0, pytest.approx(value))] for name, value in expected.items()
    }


def test_the_comet_sink_says_why_no_experiment_is_running(tmp_path):
    """In a fresh process (no experiment yet) the error names the cause: what starts one, or the missing
    configuration (online without an API key); Comet's own configuration files kept out (HOME, cwd)."""
    pytest.importorskip("comet_ml")
    import mnn_callback

    code = "\n".join(
        [
            "import os",
            "from mnn_callback import CometSink",
            "def why():",
            "    try:",
            "        CometSink()",
            "    except RuntimeError as error:",
            "        print(error)",
            "os.environ['COMET_START_ONLINE'] = '0'",
            "why()",
            "del os.environ['COMET_START_ONLINE']",
            "why()",
        ]
    )
    env = {name: value for name, value in os.environ.items() if not name.startswith("COMET_")}
    env.update(
        HOME=str(tmp_path),
        COMET_URL_OVERRIDE="http://127.0.0.1:9/clientlib/",
        COMET_ERROR_TRACKING_ENABLE="false",
        PYTHONPATH=os.path.dirname(os.path.dirname(mnn_callback.__file__)),
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    offline, unconfigured = result.stdout.splitlines()
    found = "no running Comet experiment (comet_ml.get_running_experiment() is None); "
    assert offline.startswith(found + "the Trainer's CometCallback starts one when training starts"), offline
    assert "a monitor whose callback runs before it finds none" in offline and "comet_ml.start(...)" in offline
    assert unconfigured.startswith(found + "Comet is not configured: no API key (COMET_API_KEY)"), unconfigured
    assert "COMET_START_ONLINE is not 0 for an offline one" in unconfigured
    assert "add 'comet_ml'" not in offline + unconfigured
