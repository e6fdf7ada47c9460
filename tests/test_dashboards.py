"""Dashboards: TensorBoard custom-scalars layout, layer profiles and heatmaps, W&B summaries; bounded memory."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from helpers import HANG_TIMEOUT, PROBE_DATA, event_accumulator, make_trainer, tensorboard_values
from PIL import Image
from wandb_reader import offline_runs, wait_for_run

from mnn_callback import Dashboards, MemorySink, MNNCallback


def assert_png_bytes(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.size[0] > 200 and image.size[1] > 150
        assert np.asarray(image.convert("L"), dtype=float).std() > 5


def test_tensorboard_layout_profiles_heatmaps_and_headline_keys(tmp_path):
    from tensorboard.plugins.custom_scalar import layout_pb2

    callback = MNNCallback(
        PROBE_DATA,
        every_n_steps=2,
        sinks=["tensorboard"],
        log_dir=tmp_path / "tb",
        dashboards=Dashboards(heatmap_every=3),
    )
    make_trainer(tmp_path / "out", callback, max_steps=10).train()
    accumulator = event_accumulator(tmp_path / "tb")
    values = tensorboard_values(tmp_path / "tb")
    layer_runs = sorted(path.name for path in (tmp_path / "tb").iterdir() if path.is_dir())
    assert layer_runs == ["layer_00", "layer_01", "layer_02"]  # the layer is the run: one line per layer per card
    layer_tags = set(event_accumulator(tmp_path / "tb" / "layer_01").Tags()["scalars"])
    assert {"by layer/mnn", "by layer/mnn_vs_noise", "by layer/matrix_entropy", "by layer/erank"} <= layer_tags
    assert not any("/layer_" in tag for tag in accumulator.Tags()["scalars"])  # no card per metric per layer

    (event,) = accumulator.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout()
    layout.ParseFromString(event.tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert {"MNN by layer", "Matrix Entropy by layer", "eRank by layer", "exact nuclear norm by layer"} <= set(charts)
    assert "MNN / exact nuclear norm (approximation ratio) by layer" in charts and "Diff-eRank by layer" in charts
    assert charts["probe loss (nats per token)"] == ["^probe/loss$"]  # loss and perplexity on separate axes
    assert charts["probe perplexity"] == ["^probe/perplexity$"]
    all_tags = set(accumulator.Tags()["scalars"]) | layer_tags
    for title, patterns in charts.items():
        for pattern in patterns:
            assert [tag for tag in all_tags if re.search(pattern, tag)], (title, pattern)  # the charts' tags exist

    profiles = accumulator.Images("mnn_callback/layer_profile")
    steps = [image.step for image in profiles]  # one per probe, unless a newer probe came before it was drawn
    assert steps == sorted(set(steps)) and set(steps) <= {0, 2, 4, 6, 8, 10} and steps[-1] == 10
    heatmaps = accumulator.Images("mnn_callback/heatmap_mnn")
    assert [image.step for image in heatmaps] == [4, 10]  # every 3rd probe
    assert [image.step for image in accumulator.Images("mnn_callback/heatmap_matrix_entropy")] == [4, 10]
    for image in (*profiles[-1:], *heatmaps):
        assert_png_bytes(image.encoded_image_string)

    assert values["mnn/last"] == pytest.approx(values["mnn/layer_2"])
    assert "matrix_entropy/last" in values and "mnn_vs_noise/last" in values
    ratio = values["mnn_ratio/layer_1"][10]
    assert ratio == pytest.approx(values["mnn/layer_1"][10] / values["nuclear_norm/layer_1"][10], rel=1e-5)


def test_dashboards_can_be_switched_off(tmp_path, monkeypatch):
    from mnn_callback.output import figures

    drawn = []
    monkeypatch.setattr(figures, "render_dashboard", lambda *args, **kwargs: drawn.append(1) or [])
    memory = MemorySink()
    callback = MNNCallback(
        PROBE_DATA, every_n_steps=2, sinks=["tensorboard", memory], log_dir=tmp_path / "tb", dashboards=False
    )
    make_trainer(tmp_path / "out", callback, max_steps=4).train()
    tags = event_accumulator(tmp_path / "tb").Tags()
    assert tags["images"] == [] and "custom_scalars__config__" not in tags["tensors"]
    assert drawn == [] and memory.images == [] and memory.layouts == []  # no figure was even drawn
    assert len(memory.measurements) == 3


def test_wandb_records_images_and_summary_definitions(tmp_path, monkeypatch):
    import wandb

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    callback = MNNCallback(PROBE_DATA, every_n_steps=2, dashboards=Dashboards(heatmap_every=2))
    make_trainer(tmp_path, callback, max_steps=4, report_to=["wandb"]).train()
    wandb.finish()
    (run_dir,) = offline_runs(os.environ["WANDB_DIR"])
    run = wait_for_run(run_dir)
    summaries = {metric["name"]: metric["summary"] for metric in run.metrics}
    assert summaries["mnn/last"] == ["last", "min"]
    assert summaries["matrix_entropy/last"] == ["last", "min"]
    images = [row["mnn_callback/layer_profile"] for row in run.history if "mnn_callback/layer_profile" in row]
    assert len(images) == 3 and all(image["_type"] == "image-file" for image in images)
    for image in images:
        with open(os.path.join(run_dir, "files", image["path"]), "rb") as handle:
            assert_png_bytes(handle.read())
    assert any("mnn_callback/heatmap_mnn" in row for row in run.history)
    assert any("charts/mnn_table" in row for row in run.history)  # the line-series chart of all layers
    rows = [row for row in run.history if "mnn/last" in row]
    assert [row["train/global_step"] for row in rows] == [0, 2, 4]


MEMORY_SCRIPT = """
import gc, sys
import numpy as np
from mnn_callback.output.figures import render_dashboard
from mnn_callback.output.sinks import TensorBoardSink

def rss_mb():
    with open("/proc/self/status", encoding="utf-8") as handle:
        return int(next(line for line in handle if line.startswith("VmRSS")).split()[1]) / 1024

sink = TensorBoardSink(sys.argv[1])
rng = np.random.default_rng(0)
rows = []
for step in range(110):
    rows.extend({"model": "run", "step": step, "layer": i, "mnn": rng.random(), "matrix_entropy": rng.random()}
                for i in range(6))
    sink.log_images(render_dashboard(rows[-60:], step, layer_profile=True, heatmaps=step % 10 == 0))
    if step == 49:  # warmed up: matplotlib's font and text-layout caches fill over the first ~50 figures
        gc.collect()
        before = rss_mb()
gc.collect()
sink.close()
print(rss_mb() - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_many_probes_with_figures_do_not_grow_memory(tmp_path):
    """A fresh process draws 110 dashboards; after the first 50, resident memory stays flat (measured +0.1 MB)."""
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "tb")],
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    growth_mb = float(result.stdout.strip().splitlines()[-1])
    assert growth_mb < 2, f"resident memory grew by {growth_mb:.1f} MB over 60 probes"
    assert len(event_accumulator(tmp_path / "tb").Images("mnn_callback/layer_profile")) == 110


def test_figures_are_drawn_off_the_training_thread_and_the_worker_is_joined(tmp_path, monkeypatch):
    import threading

    from matplotlib.figure import Figure

    drawing_threads = []
    real_savefig = Figure.savefig

    def recording_savefig(self, *args, **kwargs):
        drawing_threads.append(threading.current_thread().name)
        return real_savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)
    callback = MNNCallback(
        PROBE_DATA, every_n_steps=3, sinks=["tensorboard"], log_dir=tmp_path / "tb", dashboards=Dashboards()
    )
    make_trainer(tmp_path / "out", callback, max_steps=9).train()  # probes at 0, 3, 6, 9: four
    accumulator = event_accumulator(tmp_path / "tb")
    assert [image.step for image in accumulator.Images("mnn_callback/layer_profile")] == [0, 3, 6, 9]
    assert [image.step for image in accumulator.Images("mnn_callback/heatmap_mnn")] == [9]  # at the last probe
    assert [image.step for image in accumulator.Images("mnn_callback/heatmap_matrix_entropy")] == [9]
    assert drawing_threads and set(drawing_threads) == {"mnn_callback figures"}
    assert threading.current_thread().name not in drawing_threads
    assert not any(thread.name == "mnn_callback figures" for thread in threading.enumerate())  # joined


def test_layer_profiles_tick_whole_layers():
    from mnn_callback.output.plots import layer_profile_figure

    rows = [{"model": "run", "step": 0, "layer": layer, "mnn": 0.5, "matrix_entropy": 0.6} for layer in range(3)]
    for axis in layer_profile_figure(rows).axes:
        assert all(float(tick).is_integer() for tick in axis.get_xticks())


def test_the_figure_backlog_is_bounded():
    """Probes faster than figures: at most 4 layer profiles wait, the oldest are dropped, so close() waits for a
    bounded amount of drawing (on main every waiting profile was kept: 1000 fast probes made close() block 239 s)."""
    from mnn_callback.output.figures import FigureWorker

    worker = FigureWorker(background=True)
    rows = [{"model": "run", "step": 0, "layer": layer, "mnn": 0.5 + 0.01 * layer} for layer in range(4)]
    for step in range(60):
        worker.request(profile=(step, [{**row, "step": step} for row in rows]))
    worker.close()
    images = worker.collect()
    steps = [image.step for image in images]
    assert len(steps) <= 12 and steps[-4:] == [56, 57, 58, 59]  # the newest are always drawn
    assert worker.dropped == 60 - len(images)


def test_the_training_threads_figure_work_does_not_grow_with_the_run(tmp_path, monkeypatch):
    """Each probe's history entry becomes rows once; a layer profile is drawn from the last few probes only
    (on main the whole history was converted at every probe: 11 s per probe after 5000 probes)."""
    from helpers import tiny_model

    from mnn_callback import Monitor, Probe
    from mnn_callback.output import figures

    converted = []
    real_history_rows = figures.history_rows
    monkeypatch.setattr(
        figures, "history_rows", lambda records: converted.extend(records) or real_history_rows(records)
    )
    requested = []
    monitor = Monitor(Probe(PROBE_DATA[:4], batch_size=4), dashboards=Dashboards(background=False, heatmap_every=0))
    memory = MemorySink()
    monitor.open(lambda: [memory], is_main_process=True)
    monkeypatch.setattr(monitor.feed.worker, "request", lambda **what: requested.append(what))
    model = tiny_model("gpt2")
    for step in range(40):
        monitor.measure(model, step, scheduled=True)
    assert len(converted) == 40  # one history entry each
    assert len(monitor.feed.rows) == 40 * 3
    steps_drawn = [sorted({row["step"] for row in what["profile"][1]}) for what in requested]
    assert steps_drawn[-1] == [35, 36, 37, 38, 39] and max(map(len, steps_drawn)) == 5


NO_MATPLOTLIB = """
import sys, warnings
sys.modules["matplotlib"] = None  # as in the bare package: importing it fails
sys.path.insert(0, sys.argv[2])
from helpers import PROBE_DATA, make_trainer
from mnn_callback import Dashboards, MNNCallback
callback = MNNCallback(PROBE_DATA, every_n_steps=2, sinks=["tensorboard", "jsonl"], log_dir=sys.argv[1] + "/tb",
                       dashboards=Dashboards(background=False))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    make_trainer(sys.argv[1], callback, max_steps=4).train()
for warning in caught:
    if warning.category.__name__ == "MNNWarning":
        print("WARNING", warning.message)
"""


def test_without_matplotlib_the_scalars_go_on_and_one_warning_says_why(tmp_path):
    """On main, background=False without matplotlib raised ImportError into train()."""
    from helpers import probe_lines

    tests = os.path.dirname(__file__)
    done = subprocess.run(
        [sys.executable, "-c", NO_MATPLOTLIB, str(tmp_path), tests],
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [line for line in done.stdout.splitlines() if line.startswith("WARNING")]
    assert len(printed) == 1 and "dashboard figures need matplotlib" in printed[0], printed
    assert [line["step"] for line in probe_lines(tmp_path / "mnn_metrics.jsonl")] == [0, 2, 4]
    assert probe_lines(tmp_path / "mnn_metrics.jsonl")[-1]["probe/errors"] == 0
    assert "mnn/last" in tensorboard_values(tmp_path / "tb")
