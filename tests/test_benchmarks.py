"""The benchmark scripts still run (at tiny sizes); their real figures are in docs/benchmarks.md."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import HANG_TIMEOUT

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


@pytest.mark.parametrize(
    "script",
    [
        "bench_metrics.py",
        "bench_probe.py",
        "bench_spectra.py",
        "bench_callback.py",
        "bench_long_run.py",
        "schedules.py",
        "regime.py",
        "alarm.py",
    ],
)
def test_benchmark_runs_at_a_tiny_size(script, tmp_path):
    options = ["--out", str(tmp_path)] if script == "schedules.py" else []  # not over the README's figure
    result = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, script), "--quick", "--json", str(tmp_path / "out.json"), *options],
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out.json").stat().st_size > 0
    assert "machine" in result.stdout or "overhead" in result.stdout or "wall time" in result.stdout
    if script == "schedules.py":
        assert "training identical in the three runs: True" in result.stdout
        assert (tmp_path / "demo_schedules.png").stat().st_size > 10_000
    if script == "alarm.py":  # the recorded probes replay offline to the same tables
        replay = [sys.executable, os.path.join(BENCHMARKS, script), "--replay", str(tmp_path / "out.json")]
        replayed = subprocess.run(replay, capture_output=True, text=True, timeout=HANG_TIMEOUT)
        assert replayed.returncode == 0, replayed.stderr[-3000:]
        tables = [[row for row in out.splitlines() if row.startswith("|")] for out in (result.stdout, replayed.stdout)]
        assert "False alarms" in result.stdout and tables[0] == tables[1] and len(tables[0]) > 50


def test_findings_report_runs_at_a_tiny_size(tmp_path):
    script = os.path.join(BENCHMARKS, "findings.py")
    result = subprocess.run(
        [sys.executable, script, "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "docs" / "findings.md").read_text(encoding="utf-8")
    for section in ("## 1.", "## 2.", "## 3.", "## 4.", "**Verdict"):
        assert section in report
    assert (tmp_path / "docs" / "images" / "findings_family.png").stat().st_size > 10_000


def test_the_gpu_benchmark_refuses_a_cpu_in_one_line_and_runs_tiny_shapes_with_smoke(tmp_path):
    import torch

    script = os.path.join(BENCHMARKS, "gpu.py")
    if not torch.cuda.is_available():
        refused = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=HANG_TIMEOUT)
        assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0 and "needs CUDA" in refused.stderr
    command = [
        sys.executable,
        script,
        "--smoke",
        "--out",
        str(tmp_path / "table.md"),
        "--json",
        str(tmp_path / "r.json"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "table.md").read_text()
    assert table.count("\n| ") == 11 and "Trainer callback at every_n_steps=100" in table  # header + 10 figures
