"""Benchmark the Trainer callback's overhead; prints the ratios measured in one run.

A tiny GPT-2 (the demo's: 4 layers, d = 64) trains for ``--steps`` steps on the bundled text,
with and without ``MNNCallback(every_n_steps=100)`` (32 held-out sequences of 128 tokens),
in interleaved pairs so drifts of the machine hit both alike. Prints the share of the wall time
spent in probes (the monitor's own accounting: the precise figure) and the median wall-time
difference (end to end, but as noisy as the machine). Target: <= 1%. Then, with TensorBoard
dashboards, the training-thread cost per probe with figures drawn on the training thread and off
it; and a run probing every step under ``max_overhead=0.01`` (its share must stay <= 1.2%).

Usage: ``python benchmarks/bench_callback.py [--steps 600] [--pairs 3]``
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import torch
from transformers import GPT2LMHeadModel, Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import benchmark_parser, save_results

from mnn_callback import Dashboards, MNNCallback
from mnn_callback.demo import _Chunks, prepare_data, tiny_gpt2_config


def train_once(data, out_dir: str, steps: int, every: int | None, **options) -> tuple[float, object | None]:
    """Wall time of ``trainer.train()`` and the callback (None without one)."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config(len(data.tokenizer), 4, 64, 4, n_positions=128))
    args = TrainingArguments(
        out_dir,
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        report_to="none",
        save_strategy="no",
        logging_steps=50,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        seed=0,
    )
    callbacks = []
    if every is not None:
        options = {"sinks": ["jsonl"], "dashboards": False, **options}
        callbacks.append(
            MNNCallback(
                data.heldout_path,
                every_n_steps=every,
                max_samples=32,
                max_length=128,
                log_dir=os.path.join(out_dir, "tb"),
                **options,
            )
        )
    trainer = Trainer(model=model, args=args, train_dataset=_Chunks(data.train_chunks), callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start, (callbacks[0] if callbacks else None)


def thread_cost(callback) -> float:
    """The monitor's training-thread seconds per scheduled probe (probe, sinks, figure hand-over)."""
    overhead = callback.monitor.overhead
    return overhead.seconds / max(overhead.probes, 1)


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0], device=False)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.every, args.pairs = 20, 10, 1
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_data(tmp, seq_len=128, max_train_chars=60_000 if args.quick else None)
        train_once(data, os.path.join(tmp, "warmup"), 20, None)
        without, with_callback, shares = [], [], []
        for pair in range(args.pairs):
            without.append(train_once(data, os.path.join(tmp, f"a{pair}"), args.steps, None)[0])
            elapsed, callback = train_once(data, os.path.join(tmp, f"b{pair}"), args.steps, args.every)
            with_callback.append(elapsed)
            shares.append(callback.monitor.overhead.share)
        figures = {}
        for background in (False, True):  # TensorBoard with figures, drawn on the training thread or off it
            dashboards = Dashboards(background=background)
            _, callback = train_once(
                data, os.path.join(tmp, f"tb{background}"), args.steps, args.every, sinks=["tensorboard"],
                dashboards=dashboards,
            )  # fmt: skip
            figures[background] = thread_cost(callback)
        budget_steps = args.steps // 2 if not args.quick else 20
        _, budgeted = train_once(data, os.path.join(tmp, "budget"), budget_steps, 1, max_overhead=0.01)
    base, monitored = statistics.median(without), statistics.median(with_callback)
    overhead = budgeted.monitor.overhead
    results = {
        "steps": args.steps,
        "every_n_steps": args.every,
        "without_s": without,
        "with_s": with_callback,
        "overhead": monitored / base - 1.0,
        "probe_time_share": statistics.median(shares),
        "thread_ms_per_probe_figures_on_thread": 1e3 * figures[False],
        "thread_ms_per_probe_figures_in_background": 1e3 * figures[True],
        "budget_every_step_share": overhead.share,
        "budget_probes": overhead.probes,
        "budget_skipped": overhead.skipped,
        "threads": torch.get_num_threads(),
    }
    print(f"{args.steps} steps, probes every {args.every}, {args.pairs} pairs")
    print(f"median wall time: without {base:.2f} s, with MNNCallback {monitored:.2f} s")
    print(f"monitor's share of the training wall time (its own accounting): {results['probe_time_share']:.2%}")
    print(
        f"with TensorBoard dashboards, training-thread time per probe: figures on the training thread "
        f"{results['thread_ms_per_probe_figures_on_thread']:.0f} ms, in the background "
        f"{results['thread_ms_per_probe_figures_in_background']:.0f} ms"
    )
    print(
        f"every_n_steps=1 with max_overhead=0.01 over {budget_steps} steps: share {overhead.share:.2%} "
        f"({overhead.probes} probes, {overhead.skipped} skipped)"
    )
    print(f"wall-time difference: {results['overhead']:+.2%}  (runs without: {without}, with: {with_callback})")
    save_results(args.json, results)


if __name__ == "__main__":
    main()
