"""Reading a run's history back: one timeline per run, whatever resumes and restarts left in its JSONL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
from helpers import HANG_TIMEOUT, PROBE_DATA, make_trainer, probe_lines, training_data

from mnn_callback import MNNCallback, MNNWarning
from mnn_callback.cli import main
from mnn_callback.output import plots
from mnn_callback.output.files import read_jsonl
from mnn_callback.output.tables import load_table, write_csv

LOOP_SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "loop_resumable.py")
METRICS = ("mnn", "diff_erank")  # MNN depends on the step's weights only, Diff-eRank on the run's reference too


def table_values(rows):
    """{(step, layer, metric): value} of long-table rows, after checking that no (step, layer) comes twice."""
    twice = sorted(key for key, count in Counter((row["step"], row["layer"]) for row in rows).items() if count > 1)
    assert not twice, f"two values at (step, layer) {twice}"
    return {(row["step"], row["layer"], metric): row[metric] for row in rows for metric in METRICS}


def history_values(history):
    """{(step, layer, metric): value} of a monitor's history entries."""
    values = {}
    for entry in history:
        layers = [int(key.rsplit("_", 1)[1]) for key in entry if key.startswith("mnn/layer_")]
        values.update({(entry["step"], layer, m): entry[f"{m}/layer_{layer}"] for layer in layers for m in METRICS})
    return values


def assert_every_reader_sees(run_dir, history, scratch):
    """load_table, the CSV written from it, a figure drawn from it and ``plot`` hold ``history``, once per step."""
    expected = history_values(history)
    os.makedirs(scratch, exist_ok=True)
    rows = load_table(run_dir)
    assert table_values(rows) == expected
    write_csv(str(scratch / "history.csv"), rows)
    assert table_values(load_table(scratch / "history.csv")) == expected
    figure = plots.layer_profile_figure(rows, metrics=("mnn",))
    for drawn in figure.axes[0].containers:  # one line per step: its points are the layers
        step = int(drawn.get_label().split()[1])
        line = drawn.lines[0]
        assert list(line.get_ydata()) == [expected[step, int(layer), "mnn"] for layer in line.get_xdata()], step
    assert main(["plot", str(run_dir), "--out", str(scratch / "plots")]) == 0
    assert os.path.isfile(scratch / "plots" / "dynamics.png")


def test_a_trainer_resumed_from_an_earlier_checkpoint_reads_as_the_resumed_run(tmp_path):
    run = tmp_path / "run"
    abandoned = MNNCallback(PROBE_DATA, every_n_steps=2)
    make_trainer(run, abandoned, save_strategy="steps", save_steps=4, max_steps=8).train()
    resumed = MNNCallback(PROBE_DATA, every_n_steps=2)
    trainer = make_trainer(run, resumed, save_strategy="steps", save_steps=4)
    trainer.train_dataset = training_data()[::-1]  # the resumed run trains on other batches
    trainer.train(resume_from_checkpoint=str(run / "checkpoint-4"))

    lines = probe_lines(run / "mnn_metrics.jsonl")
    assert [line["step"] for line in lines] == [0, 2, 4, 6, 8, 6, 8, 10, 12]  # nothing removed from the file
    assert lines[3]["mnn/layer_2"] != lines[5]["mnn/layer_2"]  # step 6: the abandoned value is another one
    assert [entry["step"] for entry in resumed.history] == [0, 2, 4, 6, 8, 10, 12]
    assert_every_reader_sees(run, resumed.history, tmp_path)


def test_a_plain_loop_killed_after_a_probe_past_its_checkpoint_reads_as_the_resumed_run(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, LOOP_SCRIPT, str(out), "kill"], env=env, timeout=HANG_TIMEOUT)
    assert killed.returncode == -9  # SIGKILL, right after the probe at step 22
    resumed = subprocess.run(
        [sys.executable, LOOP_SCRIPT, str(out), "resume"],
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT,
        check=True,
    )
    history = json.loads(resumed.stdout.strip().splitlines()[-1])["history"]

    records = read_jsonl(out / "mnn_metrics.jsonl")
    assert [record["step"] for record in records if record.get("event") == "resume"] == [20]
    lines = [record for record in records if "mnn/layer_2" in record]
    assert [line["step"] for line in lines] == [*range(0, 23, 2), 22, 24, 26]  # the abandoned step 22 kept
    assert lines[11]["mnn/layer_2"] != lines[12]["mnn/layer_2"]  # step 22: the abandoned value is another one
    assert [entry["step"] for entry in history] == list(range(0, 27, 2))
    assert_every_reader_sees(out, history, tmp_path)


def test_a_resume_that_probes_its_step_again_reads_with_the_new_value(tmp_path):
    """Resumed with another layer set: the resume step is probed again, for a new Diff-eRank reference."""
    first = MNNCallback(PROBE_DATA, every_n_steps=4)
    make_trainer(tmp_path, first, save_strategy="steps", save_steps=6, max_steps=6).train()  # 0, 4, final 6
    changed = MNNCallback(PROBE_DATA, every_n_steps=4, layers="last")
    trainer = make_trainer(tmp_path, changed, save_strategy="steps", save_steps=6)
    with pytest.warns(MNNWarning, match="different probe configuration"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))

    assert [line["step"] for line in probe_lines(tmp_path / "mnn_metrics.jsonl")] == [0, 4, 6, 6, 8, 12]
    assert [entry["step"] for entry in changed.history] == [0, 4, 6, 8, 12]
    assert changed.history[2]["diff_erank/layer_2"] == 0.0  # step 6 against its own new reference
    assert_every_reader_sees(tmp_path, changed.history, tmp_path / "readers")


def test_a_run_restarted_from_scratch_in_the_same_directory_reads_as_the_new_run(tmp_path):
    """A new run, as the monitor's history starts afresh: the earlier run's lines stay in the file, unread."""
    make_trainer(tmp_path, MNNCallback(PROBE_DATA, every_n_steps=4), seed=0).train()
    again = MNNCallback(PROBE_DATA, every_n_steps=4)
    make_trainer(tmp_path, again, seed=1).train()

    assert [line["step"] for line in probe_lines(tmp_path / "mnn_metrics.jsonl")] == [0, 4, 8, 12] * 2
    assert_every_reader_sees(tmp_path, again.history, tmp_path / "readers")


def test_a_resume_from_a_checkpoint_of_a_run_that_a_later_run_abandoned_reads_as_that_runs_timeline(tmp_path):
    """Run A to step 6, run B from scratch in the same directory to step 4, then resume from the latest
    checkpoint (A's): the timeline is A's up to 6, then the resumed run's, never B's."""
    first = MNNCallback(PROBE_DATA, every_n_steps=2)
    make_trainer(tmp_path, first, save_strategy="steps", save_steps=2, max_steps=6).train()
    scratch = MNNCallback(PROBE_DATA, every_n_steps=2)
    make_trainer(tmp_path, scratch, save_strategy="steps", save_steps=2, max_steps=4, seed=1).train()
    resumed = MNNCallback(PROBE_DATA, every_n_steps=2)
    make_trainer(tmp_path, resumed, save_strategy="steps", save_steps=2, max_steps=8).train(resume_from_checkpoint=True)

    assert [line["step"] for line in probe_lines(tmp_path / "mnn_metrics.jsonl")] == [0, 2, 4, 6, 0, 2, 4, 8]
    assert resumed.history[:4] == first.history  # checkpoint-6 was A's
    assert resumed.history[1]["mnn/layer_2"] != scratch.history[1]["mnn/layer_2"]
    assert_every_reader_sees(tmp_path, resumed.history, tmp_path / "readers")


def test_a_checkpoint_saved_before_the_resumed_runs_first_probe_names_that_run(tmp_path):
    """A probes 0, 4, 6 (its last); B resumes from checkpoint-4 and saves checkpoint-6 before it probes
    (at 8); C resumes from B's checkpoint-6: A's line at 6 (another model's) is not on C's timeline."""
    make_trainer(
        tmp_path, MNNCallback(PROBE_DATA, every_n_steps=4), save_strategy="steps", save_steps=2, max_steps=6
    ).train()
    middle = MNNCallback(PROBE_DATA, every_n_steps=4)
    trainer = make_trainer(tmp_path, middle, save_strategy="steps", save_steps=2, max_steps=10, learning_rate=1e-2)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    last = MNNCallback(PROBE_DATA, every_n_steps=4)
    trainer = make_trainer(tmp_path, last, save_strategy="steps", save_steps=2, max_steps=10, learning_rate=1e-2)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))

    assert [entry["step"] for entry in last.history] == [0, 4, 8, 10]
    assert_every_reader_sees(tmp_path, last.history, tmp_path / "readers")


def test_lines_of_an_older_version_without_run_ids_are_continued_by_their_place(tmp_path):
    """An older version's run A (no run ids), resumed by B from A's step-6 state, a new run F from scratch,
    then C resumed from B's state at step 9 (probed to 8): C's timeline is A's to 6, B's 8, its own."""
    import torch
    from helpers import tiny_model

    from mnn_callback import MNNMonitor

    def train(monitor, model, steps, keep_at=None):
        kept = None
        for step in steps:
            with torch.no_grad():
                model.transformer.wte.weight.mul_(1.02)  # every step moves the representations
            monitor.step(model, step)
            if step == keep_at:
                kept = monitor.state_dict()
        return kept

    model, options = tiny_model("gpt2"), {"out_dir": tmp_path, "every_n_steps": 2, "dashboards": False}
    old = MNNMonitor(PROBE_DATA, **options)
    saved = train(old, model, range(9), keep_at=6)
    old.finish(model, 8)
    del saved["run"]  # as an older version saved it
    path = tmp_path / "mnn_metrics.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "run"}) + "\n" for r in read_jsonl(path)))
    middle = MNNMonitor(PROBE_DATA, **options)
    middle.load_state_dict(saved)
    saved = train(middle, model, range(7, 10), keep_at=9)
    middle.finish(model, 9)  # its probe at 9 comes after the state C resumes from
    scratch = MNNMonitor(PROBE_DATA, **options)
    train(scratch, tiny_model("gpt2", seed=1), range(5))
    scratch.finish(model, 4)
    last = MNNMonitor(PROBE_DATA, **options)
    last.load_state_dict(saved)
    train(last, model, range(10, 13))
    last.finish(model, 12)

    assert [entry["step"] for entry in last.history] == [0, 2, 4, 6, 8, 10, 12]
    assert_every_reader_sees(tmp_path, last.history, tmp_path / "readers")
