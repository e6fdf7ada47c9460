"""Benchmark what a long run costs the training thread: per-probe figure work, the end-of-run wait, line repair.

Three ratios, each measured in one run:

1. the monitor's figure hand-over per probe (history rows, layer-profile input) late in a run vs
   early: a Monitor probes a tiny GPT-2 ``--probes`` times with ``method="cheap"``, a MemorySink
   that shows images and background figures; the time of the training thread's figure work is
   compared between the first and the last tenth of the probes (flat: about 1);
2. ``close()`` after those probes vs the time of drawing one dashboard figure set (bounded: a
   few figures, whatever the number of probes);
3. repairing a cut last line of ``--mib`` MiB vs one of ``--mib / 8`` MiB (linear: about 8).

Usage: ``python benchmarks/bench_long_run.py [--probes 1000] [--mib 64]``
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import benchmark_parser, machine, save_results

from mnn_callback import Dashboards, MemorySink, MNNWarning, Monitor, Probe
from mnn_callback.output.figures import DashboardFeed, render_dashboard
from mnn_callback.output.files import append_jsonl


class TimedFeed(DashboardFeed):
    """The real feed, timing the training thread's share of each probe's figure work."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seconds: list[float] = []

    def after_measurement(self, *args, **kwargs) -> None:
        started = time.perf_counter()
        super().after_measurement(*args, **kwargs)
        self.seconds.append(time.perf_counter() - started)


def figure_work(probes: int) -> dict[str, float]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=96, n_layer=8, n_embd=32, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)
    )
    data = [[(7 * i + j) % 95 + 1 for j in range(16)] for i in range(4)]
    monitor = Monitor(Probe(data, batch_size=4, method="cheap"), dashboards=Dashboards(heatmap_every=0))
    monitor.open(lambda: [MemorySink()], is_main_process=True)
    monitor.feed = TimedFeed(monitor.dashboards, monitor.guard)
    for step in range(probes):
        monitor.measure(model, step)
    tenth = max(1, probes // 10)
    early, late = statistics.median(monitor.feed.seconds[:tenth]), statistics.median(monitor.feed.seconds[-tenth:])
    rows = monitor.feed.rows[-9 * 5 :]
    started = time.perf_counter()
    render_dashboard(rows, probes - 1, layer_profile=True)
    one_figure = time.perf_counter() - started
    started = time.perf_counter()
    monitor.close()
    closing = time.perf_counter() - started
    return {
        "probes": probes,
        "hand_over_early_ms": 1000 * early,
        "hand_over_late_ms": 1000 * late,
        "late_vs_early": late / early,
        "close_s": closing,
        "one_figure_s": one_figure,
        "close_vs_one_figure": closing / one_figure,
        "profiles_dropped": monitor.feed.worker.dropped,
    }


def repair_seconds(directory: str, mib: float) -> float:
    path = os.path.join(directory, f"cut-{mib}.jsonl")
    with open(path, "wb") as handle:
        handle.write(b'{"step": 0}\n{"step": 2, "padding": "' + b"x" * int(mib * (1 << 20)))
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MNNWarning)
        append_jsonl(path, {"step": 4})
    return time.perf_counter() - started


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0], device=False)
    parser.add_argument("--probes", type=int, default=1000)
    parser.add_argument("--mib", type=float, default=64.0)
    args = parser.parse_args()
    probes, mib = (40, 4.0) if args.quick else (args.probes, args.mib)
    print(f"machine: {machine(torch.device('cpu'))}")
    figures = figure_work(probes)
    print(
        f"figure hand-over per probe: {figures['hand_over_early_ms']:.2f} ms early, "
        f"{figures['hand_over_late_ms']:.2f} ms late ({figures['late_vs_early']:.2f}x) over {probes} probes"
    )
    print(
        f"close() after {probes} probes: {figures['close_s']:.2f} s = {figures['close_vs_one_figure']:.1f} x one "
        f"figure ({figures['one_figure_s']:.3f} s); {figures['profiles_dropped']} waiting profiles dropped"
    )
    with tempfile.TemporaryDirectory() as directory:
        small, large = repair_seconds(directory, mib / 8), repair_seconds(directory, mib)
    print(f"repairing a cut line: {mib / 8:g} MiB {small:.3f} s, {mib:g} MiB {large:.3f} s ({large / small:.1f}x)")
    save_results(
        args.json, {**figures, "repair_small_s": small, "repair_large_s": large, "repair_ratio": large / small}
    )


if __name__ == "__main__":
    main()
