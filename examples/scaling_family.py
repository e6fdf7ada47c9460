"""The paper's model-size experiment in miniature: a family of tiny GPT-2s, same data, same steps.

Trains each size with the HF Trainer and MNNCallback, evaluates the final checkpoints with
:func:`mnn_callback.evaluate_models` on the same held-out sample, and plots each metric against
parameter count (``OUT/plots/family.png``). Defaults take about 10 minutes on 2 CPU cores::

    python examples/scaling_family.py --out runs/family
"""

from __future__ import annotations

import argparse
import os
import sys

from mnn_callback import evaluate_models
from mnn_callback.demo import prepare_data, train_gpt2
from mnn_callback.output import plots
from mnn_callback.output.tables import write_csv

# (n_layer, n_embd, n_head): about 0.05M to 3M parameters with the 512-token vocabulary
DEFAULT_SIZES = ["2x32x2", "4x64x4", "4x128x4", "6x192x6"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/family")
    parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, help="LAYERSxWIDTHxHEADS per model")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--probe-samples", type=int, default=32)
    parser.add_argument("--max-train-chars", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    data = prepare_data(args.out, seq_len=args.seq_len, max_train_chars=args.max_train_chars)
    runs = []
    for size in args.sizes:
        n_layer, n_embd, n_head = (int(part) for part in size.split("x"))
        run_dir = os.path.join(args.out, f"gpt2-{size}")
        train_gpt2(
            run_dir,
            data,
            n_layer=n_layer,
            n_embd=n_embd,
            n_head=n_head,
            steps=args.steps,
            every=max(1, args.steps // 10),
            save_every=args.steps,
            batch_size=args.batch_size,
            probe_samples=args.probe_samples,
            seed=args.seed,
        )
        runs.append(os.path.join(run_dir, f"checkpoint-{args.steps}"))
    rows = evaluate_models(
        runs, data.heldout_path, reference="untrained", max_samples=args.probe_samples, max_length=args.seq_len
    )
    results = os.path.join(args.out, "family")
    os.makedirs(results, exist_ok=True)
    write_csv(os.path.join(results, "metrics.csv"), rows)
    figure = plots.plot_family(rows, os.path.join(args.out, "plots", "family.png"))
    print(f"family results: {os.path.join(results, 'metrics.csv')}; plot: {figure}")
    return 1 if any(row.get("error") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
