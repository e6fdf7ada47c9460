"""The demo's run probed three ways: what a fixed and a log schedule see, and what each costs.

The demo's recipe (4-layer GPT-2, d = 64, 300 steps, 32 packed held-out sequences of 128 tokens)
trains three times, bit-identically (the callback does not change training): probed every 2
steps (the dense reference), on a fixed schedule every 50 steps, and on the log schedule every
50 steps (the demo's default). Prints, per schedule, the probes, their measured share of the
training wall time (the monitor's own accounting) and how far the curve drawn through its
probes (linear interpolation) strays from the dense one; draws ``demo_schedules.png``.

Usage: ``python benchmarks/schedules.py [--out docs/images]``
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import benchmark_parser, machine, save_results

from mnn_callback import MNNCallback
from mnn_callback.demo import prepare_data, train_gpt2

CURVES = (("matrix_entropy/last", "Matrix Entropy (final hidden state)"), ("mnn/last", "MNN (final hidden state)"))


def probe_run(data, out_dir: str, *, steps: int, every: int, schedule: str, **sizes) -> dict:
    """Train the demo's model once with the callback on ``schedule``; its probes and their share."""
    trainer = train_gpt2(out_dir, data, steps=steps, every=every, schedule=schedule, save_every=steps, **sizes)
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, MNNCallback))
    history = [entry for entry in callback.history if "mnn/last" in entry]
    return {
        "steps": [entry["step"] for entry in history],
        "curves": {key: [entry[key] for entry in history] for key, _ in CURVES},
        "share": callback.monitor.overhead.share,
        "weights": torch.cat([parameter.detach().flatten().cpu() for parameter in trainer.model.parameters()]),
    }


def largest_gap(run: dict, dense: dict, key: str) -> float:
    """The largest distance between the curve through ``run``'s probes and the dense curve."""
    interpolated = np.interp(dense["steps"], run["steps"], run["curves"][key])
    return float(np.max(np.abs(interpolated - np.asarray(dense["curves"][key]))))


def draw(runs: dict[str, dict], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    styles = {  # the fixed schedule's probes are a subset of the log schedule's: drawn on top, hollow
        "dense": {"color": "0.7", "linestyle": "-", "zorder": 1},
        "log": {"color": "tab:red", "linestyle": "-", "marker": "s", "markersize": 4, "zorder": 2},
        "fixed": {
            "color": "tab:blue",
            "linestyle": "--",
            "marker": "o",
            "markersize": 9,
            "fillstyle": "none",
            "zorder": 3,
        },
    }
    last_step = max(max(run["steps"]) for run in runs.values())
    ticks = [step for step in (0, 1, 2, 4, 8, 16, 32, 64, 100, 200, 300, 1000) if step <= last_step]
    for axis, (key, label) in zip(axes, CURVES, strict=True):
        for name, run in runs.items():
            axis.plot(run["steps"], run["curves"][key], label=name, **styles[name.split()[0]])
        axis.set_xscale("symlog", linthresh=1, linscale=0.3)
        axis.set_xticks(ticks, [str(step) for step in ticks])
        axis.set_xlabel("training step (log scale)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].legend(frameon=False)
    figure.suptitle("The demo's run probed on three schedules (identical training)")
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0], device=False)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "images"))
    args = parser.parse_args()
    if args.quick:
        steps, every, dense_every = 16, 8, 1
        sizes = {"n_layer": 2, "n_embd": 32, "n_head": 2, "probe_samples": 4, "batch_size": 4}
        data_options = {"seq_len": 32, "max_train_chars": 30_000}
    else:
        steps, every, dense_every, sizes, data_options = 300, 50, 2, {}, {"seq_len": 128}
    with tempfile.TemporaryDirectory() as work:
        data = prepare_data(os.path.join(work, "data"), **data_options)
        plans = {
            f"dense (every {dense_every})": (dense_every, "fixed"),
            f"fixed (every {every})": (every, "fixed"),
            f"log (every {every})": (every, "log"),
        }
        runs = {
            name: probe_run(data, os.path.join(work, str(i)), steps=steps, every=cadence, schedule=kind, **sizes)
            for i, (name, (cadence, kind)) in enumerate(plans.items())
        }
    dense = runs[next(iter(runs))]
    identical = all(torch.equal(run["weights"], dense["weights"]) for run in runs.values())
    print(f"machine: {machine(torch.device('cpu'))}; training identical in the three runs: {identical}")
    results = {"machine": machine(torch.device("cpu")), "identical_training": identical, "schedules": {}}
    for name, run in runs.items():
        gaps = {key: largest_gap(run, dense, key) for key, _ in CURVES}
        del run["weights"]
        results["schedules"][name] = {"steps": run["steps"], "share": run["share"], "largest_gap": gaps}
        print(
            f"{name:>16}: {len(run['steps']):3d} probes, {run['share']:.1%} of the training wall time; "
            f"largest gap to the dense curve: Matrix Entropy {gaps['matrix_entropy/last']:.3f}, "
            f"MNN {gaps['mnn/last']:.3f}"
        )
    os.makedirs(args.out, exist_ok=True)
    draw(runs, os.path.join(args.out, "demo_schedules.png"))
    save_results(args.json, results)


if __name__ == "__main__":
    main()
