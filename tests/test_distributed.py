"""The probe's collectives across two real processes (gloo), their no-op form without a group, and
processes that disagree about the monitor under DDP (torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import HANG_TIMEOUT, probe_lines

from mnn_callback.probing.distributed import (
    ProcessesDisagree,
    StepAgreement,
    all_gather_object,
    all_reduce,
    broadcast_object,
    world,
)

SYNC_TIMEOUT = 10.0  # the bound under test: short, yet far above the skew of two processes at one probe


def _worker(rank: int, world_size: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        total = all_reduce(torch.tensor([1.0 + rank, 10.0 * rank], dtype=torch.float64))
        largest = all_reduce(torch.tensor([float(rank), -float(rank)]), op="max")
        gathered = all_gather_object({"rank": rank})
        broadcast = broadcast_object(f"from {rank}")
        torch.save(
            {"total": total, "largest": largest, "gathered": gathered, "broadcast": broadcast, "world": world()},
            f"{out_file}.{rank}",
        )
    finally:
        dist.destroy_process_group()


def test_two_processes_sum_take_maxima_gather_and_broadcast(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"out.{rank}", weights_only=False)
        assert got["total"].tolist() == [3.0, 10.0]
        assert got["largest"].tolist() == [1.0, 0.0]
        assert got["gathered"] == [{"rank": 0}, {"rank": 1}]
        assert got["broadcast"] == "from 0"
        assert got["world"] == (rank, 2)


def test_without_a_process_group_everything_is_local():
    value = torch.tensor([1.0, 2.0])
    assert all_reduce(value) is value
    assert all_gather_object(5) == [5]
    assert broadcast_object("x") == "x"
    assert world() == (0, 1)


def _disagreeing_worker(rank: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        agreement, errors = StepAgreement(60.0), []
        agreement.agree("step 0 (exact probe)")
        for what in (f"step {2 + rank} (exact probe)", "step 4 (exact probe)"):
            try:
                agreement.agree(what)
            except ProcessesDisagree as error:
                errors.append(str(error))
        torch.save({"errors": errors, "probes": agreement.probes}, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_processes_at_different_probes_both_learn_it_and_the_agreement_stays_off(tmp_path):
    mp.spawn(_disagreeing_worker, args=(str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True)
    errors = [torch.load(tmp_path / f"out.{rank}", weights_only=True)["errors"] for rank in range(2)]
    assert errors[0] == errors[1] and len(errors[0]) == 2 and errors[0][0] == errors[0][1]  # no further probe
    assert "process 0 at step 2 (exact probe); process 1 at step 3 (exact probe)" in errors[0][0]


def test_without_a_process_group_every_probe_is_agreed_at_once():
    agreement = StepAgreement(5.0)
    agreement.agree("step 0 (exact probe)")
    agreement.agree("step 2 (cheap probe)")
    assert agreement.disagreement is None and agreement.waited == 0.0
    with pytest.raises(ValueError, match="expected a positive sync_timeout"):
        StepAgreement(0)


@pytest.fixture(scope="module")
def disagreement_reports(tmp_path_factory):
    """One torchrun of tests/scripts/loop_disagreement.py: each case's losses, waits and warnings per process."""
    out = tmp_path_factory.mktemp("disagreement")
    script = os.path.join(os.path.dirname(__file__), "scripts", "loop_disagreement.py")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([*launcher, script, str(out), str(SYNC_TIMEOUT)], check=True, env=env, timeout=HANG_TIMEOUT)
    reports = [json.loads((out / f"report.{rank}.json").read_text()) for rank in range(2)]
    for case in ("skip", "offset", "force", "finish", "two", "two_first", "rerun"):  # measured waits, for the notes
        print(case, [(round(r[case]["waited"], 2), round(r[case]["longest_call"], 2)) for r in reports])
    return out, reports


# what each case breaks, and the steps the main process logged before the monitor turned off
DISAGREEMENTS = {
    "skip": ("process 1 did not reach the monitor's probe within 10 s while process 0 was at step 4", [0, 2]),
    "offset": ("process 0 at step 0 (exact probe); process 1 at step 1 (exact probe)", []),
    "force": ("process 1 did not reach the monitor's probe within 10 s while process 0 was at step 3", [0, 2]),
    "finish": ("process 0 did not reach the monitor's probe within 10 s while process 1 was at step 5", [0, 2, 4]),
}


@pytest.mark.parametrize("case", sorted(DISAGREEMENTS))
def test_processes_that_disagree_cost_one_bounded_wait_and_one_error(disagreement_reports, case):
    out, reports = disagreement_reports
    message, logged = DISAGREEMENTS[case]
    for rank, report in enumerate(reports):  # the monitor never changed the training, on either process
        assert report[case]["losses"] == report["none"]["losses"], rank
        assert len(report[case]["losses"]) == 8
    main, other = (report[case]["warnings"] for report in reports)
    assert len(main) == 1 and message in main[0] and "the monitor is off" in main[0]
    assert other == []  # the main process warns for all
    # at most one wait reached the bound; a process that came later learnt the reason without waiting
    timed_out = [report[case]["waited"] >= SYNC_TIMEOUT for report in reports]
    assert timed_out.count(True) == (0 if case == "offset" else 1)
    lines = probe_lines(out / case / "mnn_metrics.jsonl")
    assert [line["step"] for line in lines if "mnn/layer_0" in line] == logged


@pytest.mark.parametrize(("case", "misused", "kept"), [("two", "a", "b"), ("two_first", "b", "a")])
def test_a_monitor_used_rightly_beside_one_that_is_not_keeps_probing(disagreement_reports, case, misused, kept):
    """Whether the loop calls the misused monitor first or last, only it is off, after one wait."""
    out, reports = disagreement_reports
    for report in reports:
        assert report[case]["losses"] == report["none"]["losses"]
    main, other = (report[case]["warnings"] for report in reports)
    assert len(main) == 1 and "process 1 did not reach the monitor's probe" in main[0] and other == []
    assert [line["step"] for line in probe_lines(out / case / misused / "mnn_metrics.jsonl")] == [0, 2]
    assert [line["step"] for line in probe_lines(out / case / kept / "mnn_metrics.jsonl")] == [0, 2, 4, 6, 8]


def test_after_a_disagreement_the_next_run_of_the_same_monitor_agrees_afresh(disagreement_reports):
    out, reports = disagreement_reports
    main = reports[0]["rerun"]["warnings"]
    assert len(main) == 2 and "did not reach" in main[0] and "a new run starts at step 0" in main[1]
    lines = probe_lines(out / "rerun" / "mnn_metrics.jsonl")
    assert [line["step"] for line in lines if "mnn/layer_0" in line] == [0, 2, 0, 2, 4]


def test_a_probe_failing_in_its_first_forward_on_one_process_is_skipped_by_every_process(disagreement_reports):
    out, reports = disagreement_reports
    for report in reports:
        assert report["calibration"]["losses"] == report["none"]["losses"]
    main, other = (report["calibration"]["warnings"] for report in reports)
    assert len(main) == 2 and other == []
    assert "the probe failed on another process (process 1: RuntimeError: simulated" in main[0]
    assert "no probe succeeded in this run" in main[1]
    assert [line for line in probe_lines(out / "calibration" / "mnn_metrics.jsonl") if "mnn/layer_0" in line] == []
