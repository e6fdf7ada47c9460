"""Benchmark the Trainer callback's overhead; prints the ratio measured in one run.

A tiny GPT-2 (the demo's: 4 layers, d = 64) trains for ``--steps`` steps on the bundled text,
with and without ``MNNCallback(every_n_steps=100)`` (32 held-out sequences of 128 tokens),
in interleaved pairs so drifts of the machine hit both alike. Prints the share of the wall time
spent in probes (timed inside the run: the precise figure) and the median wall-time difference
(end to end, but as noisy as the machine). Target: <= 1%.

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

from mnn_callback import MNNCallback
from mnn_callback.demo import _Chunks, prepare_data, tiny_gpt2_config


def train_once(
    data, out_dir: str, steps: int, every: int | None, tensorboard: bool = False
) -> tuple[float, list[float], float]:
    """Wall time of ``trainer.train()``, the probes' durations and the dashboards' drawing time (seconds)."""
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
        sinks = ["jsonl", "tensorboard"] if tensorboard else ["jsonl"]
        callbacks.append(
            MNNCallback(
                data.heldout_path,
                every_n_steps=every,
                max_samples=32,
                max_length=128,
                sinks=sinks,
                log_dir=os.path.join(out_dir, "tb"),
            )
        )
    trainer = Trainer(model=model, args=args, train_dataset=_Chunks(data.train_chunks), callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    if not callbacks:
        return elapsed, [], 0.0
    return elapsed, [entry["probe/seconds"] for entry in callbacks[0].history], callbacks[0].monitor.publish_seconds


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
        without, with_callback, probe_share = [], [], []
        for pair in range(args.pairs):
            without.append(train_once(data, os.path.join(tmp, f"a{pair}"), args.steps, None)[0])
            elapsed, probe_seconds, _ = train_once(data, os.path.join(tmp, f"b{pair}"), args.steps, args.every)
            with_callback.append(elapsed)
            probe_share.append(sum(probe_seconds) / elapsed)
        # TensorBoard with the dashboard figures: what drawing them costs per probe
        elapsed, probe_seconds, figure_seconds = train_once(
            data, os.path.join(tmp, "tb"), args.steps, args.every, tensorboard=True
        )
    base, monitored = statistics.median(without), statistics.median(with_callback)
    probes = len(probe_seconds)
    results = {
        "steps": args.steps,
        "every_n_steps": args.every,
        "probes_per_run": probes,
        "without_s": without,
        "with_s": with_callback,
        "overhead": monitored / base - 1.0,
        "probe_time_share": statistics.median(probe_share),
        "probe_ms": 1e3 * statistics.median(probe_seconds),
        "figures_ms_per_probe": 1e3 * figure_seconds / len(probe_seconds),
        "with_figures_share": (sum(probe_seconds) + figure_seconds) / elapsed,
        "threads": torch.get_num_threads(),
    }
    print(
        f"{args.steps} steps, probes every {args.every} ({probes} per run incl. step 0 and the end), {args.pairs} pairs"
    )
    print(f"median wall time: without {base:.2f} s, with MNNCallback {monitored:.2f} s")
    print(f"probe time / training wall time (measured inside the runs): {results['probe_time_share']:.2%}")
    print(
        f"with TensorBoard dashboards: probe {results['probe_ms']:.0f} ms + figures "
        f"{results['figures_ms_per_probe']:.0f} ms per probe = {results['with_figures_share']:.2%} of the wall time"
    )
    print(f"wall-time difference: {results['overhead']:+.2%}  (runs without: {without}, with: {with_callback})")
    save_results(args.json, results)


if __name__ == "__main__":
    main()
