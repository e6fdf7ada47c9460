"""Figures build on matplotlib's object API: the user's backend, rcParams and pyplot figures are left alone."""

from __future__ import annotations

import subprocess
import sys

from helpers import HANG_TIMEOUT

SCRIPT = """
import sys, matplotlib
matplotlib.use("pdf")
matplotlib.rcParams["font.size"] = 7.5
before = dict(matplotlib.rcParams)
from mnn_callback.output import plots
from mnn_callback.output.figures import render_dashboard
rows = [
    {"model": m, "step": s, "params": p, "layer": l, "mnn": 0.5 + 0.01 * s - 0.02 * l, "nuclear_norm": 0.3,
     "matrix_entropy": 0.6 - 0.01 * s, "erank": 10.0, "loss": 3.0}
    for m, p in (("a/checkpoint-1", 10), ("b", 20)) for s in (0, 1, 2) for l in (0, 1, 2)
]
paths = plots.plot_all(rows, sys.argv[1])
images = render_dashboard(rows[:9], 2, layer_profile=True, heatmaps=True)
assert len(paths) >= 4 and len(images) == 3, (paths, images)
assert matplotlib.get_backend() == "pdf", matplotlib.get_backend()
assert dict(matplotlib.rcParams) == before
assert "matplotlib.pyplot" not in sys.modules
print("untouched")
"""


def test_figures_leave_global_matplotlib_state_alone(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=HANG_TIMEOUT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "untouched"


def test_a_history_with_changes_gets_the_changes_drawn_with_their_paired_errors(tmp_path):
    from PIL import Image

    from mnn_callback.output import plots

    rows = [
        {"model": "run", "step": s, "layer": 2, "mnn": 0.5 + 0.01 * s, "matrix_entropy": 0.6 - 0.01 * s}
        for s in (0, 10, 20)
    ]
    plain = plots.plot_dynamics(rows, str(tmp_path / "plain.png"))
    for row in rows:
        row.update(mnn_change=0.01 * row["step"], mnn_change_se=0.001, matrix_entropy_change=-0.01 * row["step"])
    with_changes = plots.plot_dynamics(rows, str(tmp_path / "changes.png"))
    plain_size, changes_size = Image.open(plain).size, Image.open(with_changes).size
    assert changes_size[0] == plain_size[0] and changes_size[1] > 1.5 * plain_size[1]  # a second row of panels
