"""MNNLightningCallback in real Lightning runs: training untouched, 1 and 2 processes (DDP strategy, gloo)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import HANG_TIMEOUT, probe_lines

pytest.importorskip("lightning")
import torch

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "lightning_run.py")


def run(out, *extra, processes=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    subprocess.run([*launcher, SCRIPT, str(out), *extra], check=True, env=env, timeout=HANG_TIMEOUT)


def test_a_lightning_run_is_watched_and_trains_bit_identically(tmp_path):
    run(tmp_path / "watched")
    run(tmp_path / "alone", "--no-monitor")
    watched, alone = (torch.load(tmp_path / name / "weights.pt", weights_only=True) for name in ("watched", "alone"))
    assert all(torch.equal(watched[key], alone[key]) for key in alone)
    lines = probe_lines(tmp_path / "watched" / "mnn_metrics.jsonl")
    assert [line["step"] for line in lines] == [0, 3, 6] and lines[-1]["probe/errors"] == 0
    assert lines[-1]["diff_erank/layer_2"] != 0.0 and "probe/loss" in lines[0]


def test_two_processes_under_the_ddp_strategy_write_once_with_the_single_process_values(tmp_path):
    run(tmp_path / "one")
    run(tmp_path / "two", processes=2)
    one, two = (probe_lines(tmp_path / name / "mnn_metrics.jsonl") for name in ("one", "two"))
    assert [line["step"] for line in two] == [0, 3, 6]  # one writer
    for key in ("mnn/layer_2", "erank/layer_1", "probe/loss", "probe/sequences"):  # step 0: the same model
        assert two[0][key] == pytest.approx(one[0][key], rel=1e-6), key
