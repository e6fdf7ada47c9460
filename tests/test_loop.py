"""MNNMonitor in plain PyTorch loops: a nanoGPT-style model (no Trainer, no Accelerate), 1 and 2 processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import HANG_TIMEOUT, probe_lines, random_sequences, tiny_model

from mnn_callback import MNNMonitor, MNNWarning, Probe
from mnn_callback.output.files import read_jsonl

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "plain_loop.py")
SHORT = ["--steps", "12", "--every", "6", "--block-size", "32", "--batch-size", "8", "--probe-samples", "8"]


def run_example(out, *extra, processes=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    subprocess.run([*launcher, EXAMPLE, "--out", str(out), *SHORT, *extra], check=True, env=env, timeout=HANG_TIMEOUT)
    return (out / "losses.txt").read_text().split()


def test_the_plain_loop_trains_bit_identically_and_logs_every_block(tmp_path):
    watched = run_example(tmp_path / "watched")
    assert run_example(tmp_path / "alone", "--no-monitor") == watched  # the loss curve, to the last bit
    lines = probe_lines(tmp_path / "watched" / "mnn_metrics.jsonl")
    assert [line["step"] for line in lines] == [0, 6, 12]
    assert sorted(key for key in lines[0] if key.startswith("mnn/layer_")) == [f"mnn/layer_{i}" for i in range(5)]
    assert lines[-1]["probe/errors"] == 0 and lines[-1]["diff_erank/layer_4"] != 0.0


def test_two_processes_probe_the_shards_and_one_writes(tmp_path):
    run_example(tmp_path / "one")
    run_example(tmp_path / "two", processes=2)
    one, two = (probe_lines(tmp_path / name / "mnn_metrics.jsonl") for name in ("one", "two"))
    assert [line["step"] for line in two] == [0, 6, 12]  # one writer: no line twice
    for key in ("mnn/layer_4", "erank/layer_2", "probe/tokens"):  # step 0: the same model on both
        assert two[0][key] == pytest.approx(one[0][key], rel=1e-6), key


def test_a_saved_state_continues_the_curves(tmp_path):
    run_example(tmp_path)
    run_example(tmp_path, "--resume", "--steps", "18")
    records = read_jsonl(tmp_path / "mnn_metrics.jsonl")
    assert [record["step"] for record in records if "mnn/layer_0" in record] == [0, 6, 12, 18]
    assert any(record.get("event") == "resume" and record["step"] == 12 for record in records)


class NotHuggingFace(torch.nn.Module):
    """A model called as model(idx): no input_ids keyword, no hidden_states."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(96, 16)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(2))

    def forward(self, idx):
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return x


def test_a_model_that_is_not_hugging_face_shaped_is_named_with_the_option_to_use():
    data = random_sequences(4, 5, 12)
    with pytest.raises(TypeError, match=r"NotHuggingFace cannot be probed .* pass modules=\[\.\.\.\]"):
        Probe(data).run(NotHuggingFace())
    result = Probe(data, modules=["embed", "blocks.*"]).run(NotHuggingFace())
    assert result.layers == [0, 1, 2] and result.hidden_size == 16
    hidden = NotHuggingFace()
    called = Probe(data, modules="blocks.*", forward=lambda model, ids, mask: model(ids)).run(hidden)
    assert called.layers == [0, 1]
    with pytest.raises(ValueError, match=r"no module of NotHuggingFace matches 'block\.\*'"):
        Probe(data, modules="block.*").run(hidden)


def test_the_monitor_with_a_hugging_face_model_and_its_default_sinks(tmp_path):
    model = tiny_model("gpt2")
    monitor = MNNMonitor(random_sequences(6, 5, 20), out_dir=tmp_path, every_n_steps=2)
    for step in range(5):
        monitor.step(model, step)
    monitor.finish(model, 4)
    assert [line["step"] for line in probe_lines(tmp_path / "mnn_metrics.jsonl")] == [0, 2, 4]
    assert os.listdir(tmp_path / "runs")  # TensorBoard, since it is installed
    with pytest.warns(MNNWarning, match="after finish"):
        monitor.step(model, 6)
    with pytest.raises(ValueError, match="the jsonl sink needs out_dir"):
        MNNMonitor(random_sequences(6, 5, 20), sinks=["jsonl"])
