"""Benchmark the metric core; prints ratios measured in one run.

1. ``compute_metrics`` against the authors' approach on the same inputs: per sequence, the
   d x d second-moment matrix Z^T Z / L and a full SVD of it (as the Diff-eRank and MNN code
   do), at L = 512 for d = 768 and d = 4096. Prints the time ratio and the largest difference.
2. ``compute_metrics`` on all 13 hidden states of a GPT-2-small-shaped model (12 layers,
   d = 768, randomly initialised from a config) against the forward pass that produced them,
   batch 8 x 512 tokens.

Usage: ``python benchmarks/bench_metrics.py [--device cuda] [--quick]``
"""

from __future__ import annotations

import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import benchmark_parser, machine, median_seconds, save_results

from mnn_callback.core.metrics import compute_metrics
from mnn_callback.core.noise import expected_noise_mnn


def timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    """Median wall time of ``fn()`` over ``repeats`` runs after one warm-up, and its last result."""
    last = [None]

    def run() -> None:
        last[0] = fn()

    return median_seconds(run, device, repeats), last[0]


def authors_approach(hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per sequence: Z, then the d x d matrix Z^T Z / L and a full SVD of it (float32)."""
    out = {key: [] for key in ("mnn", "nuclear_norm", "matrix_entropy", "erank")}
    for x in hidden.float():
        length, d = x.shape
        z = x - x.mean(dim=0)
        z = z / z.norm(dim=1, keepdim=True)
        covariance = z.T @ z / length
        singular_values = torch.linalg.svd(covariance).S  # full SVD, U and V included
        p = singular_values / singular_values.sum()
        entropy = -(p * torch.log(p.clamp(min=1e-30))).sum()
        out["mnn"].append(z.norm(dim=0).sort(descending=True).values[: min(length, d)].sum() / length)
        out["nuclear_norm"].append((singular_values * length).clamp(min=0).sqrt().sum() / length)
        out["matrix_entropy"].append(entropy / math.log(d))
        out["erank"].append(entropy.exp())
    return {key: torch.stack(values) for key, values in out.items()}


def bench_against_authors(device: torch.device, length: int, d: int, sequences: int, repeats: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(sequences, length, d, generator=generator)
    hidden[..., :8] *= 20.0  # a few outlier dimensions, as in real activations
    hidden = hidden.to(device)
    ours_time, ours = timed(lambda: compute_metrics(hidden), device, repeats)
    theirs_time, theirs = timed(lambda: authors_approach(hidden), device, max(1, repeats // 3))
    exact = compute_metrics(hidden, dtype=torch.float64)  # float64 agrees with the SVD reference to 1e-9

    def largest_error(values):
        return {key: (values[key].double() - exact[key]).abs().max().item() for key in theirs}

    return {
        "L": length,
        "d": d,
        "sequences": sequences,
        "ours_ms_per_sequence": 1e3 * ours_time / sequences,
        "authors_ms_per_sequence": 1e3 * theirs_time / sequences,
        "speedup": theirs_time / ours_time,
        "ours_error_vs_float64": largest_error(ours),
        "authors_error_vs_float64": largest_error(theirs),
    }


def bench_against_forward(device: torch.device, batch: int, length: int, repeats: int, n_layer: int = 12) -> dict:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(n_layer=n_layer, n_embd=768, n_head=12, n_positions=max(1024, length))
    model = GPT2Model(config).to(device).eval()
    input_ids = torch.randint(0, config.vocab_size, (batch, length), device=device)
    attention_mask = torch.ones_like(input_ids)

    def forward():
        with torch.no_grad():
            return model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states

    hidden_states = forward()  # warm-up, and the hidden states the tiers measure
    stacked = torch.stack(hidden_states)  # (layers, batch, L, d)

    def tier(method: str):
        return lambda: [compute_metrics(layer, attention_mask, method=method) for layer in stacked]

    # Interleaved: forward, cheap tier, exact tier, forward, ... so load that changes during the run
    # hits all three alike; each ratio is taken within one round, then the median over rounds.
    rounds = {"forward": [], "cheap": [], "exact": []}
    tier("cheap")()  # warm-up: the first call builds the noise-floor curve of this width
    tier("exact")()
    for _ in range(repeats):
        rounds["forward"].append(timed(forward, device, 1)[0])
        rounds["cheap"].append(timed(tier("cheap"), device, 1)[0])
        rounds["exact"].append(timed(tier("exact"), device, 1)[0])
    ratio = {
        name: statistics.median(t / f for t, f in zip(rounds[name], rounds["forward"], strict=True))
        for name in ("cheap", "exact")
    }
    lengths = attention_mask.sum(dim=1)
    noise_seconds = median_seconds(lambda: expected_noise_mnn(lengths, config.n_embd, longest=length), device, 200)
    return {
        "noise_lookup_us": 1e6 * noise_seconds,
        "noise_lookups_over_forward": noise_seconds * len(hidden_states) / statistics.median(rounds["forward"]),
        "layers": len(hidden_states),
        "batch": batch,
        "L": length,
        "forward_ms": 1e3 * statistics.median(rounds["forward"]),
        "cheap_ms": 1e3 * statistics.median(rounds["cheap"]),
        "metrics_ms": 1e3 * statistics.median(rounds["exact"]),
        "cheap_over_forward": ratio["cheap"],
        "metrics_over_forward": ratio["exact"],
    }


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.quick:
        authors = [bench_against_authors(device, 32, 48, 2, 1)]
        forward = bench_against_forward(device, 2, 32, 1, n_layer=2)
    else:
        repeats = 5 if device.type == "cuda" else 3
        authors = [
            bench_against_authors(device, 512, 768, 8, repeats),
            bench_against_authors(device, 512, 4096, 2 if device.type == "cpu" else 8, repeats),
        ]
        forward = bench_against_forward(device, 8, 512, repeats)
    machine_info = machine(device)
    print(f"machine: {machine_info}")
    print("compute_metrics vs the authors' d x d SVD (float32, per sequence):")
    for row in authors:
        print(
            f"  L={row['L']} d={row['d']}: ours {row['ours_ms_per_sequence']:.1f} ms, "
            f"authors {row['authors_ms_per_sequence']:.1f} ms, speedup {row['speedup']:.1f}x"
        )
        for key in row["ours_error_vs_float64"]:
            print(
                f"    {key:15s} largest error vs float64: ours {row['ours_error_vs_float64'][key]:.1e}, "
                f"authors {row['authors_error_vs_float64'][key]:.1e}"
            )
    print(
        f"metrics on all {forward['layers']} hidden states of GPT-2-small shape, batch {forward['batch']} x "
        f"{forward['L']}, interleaved with the forward: forward {forward['forward_ms']:.0f} ms; cheap tier (MNN, "
        f"Renyi-2) {forward['cheap_ms']:.0f} ms = {forward['cheap_over_forward']:.1%} of the forward; all exact "
        f"metrics {forward['metrics_ms']:.0f} ms = {forward['metrics_over_forward']:.1%}"
    )
    print(
        f"noise-floor lookup (mnn_vs_noise), cached curve: {forward['noise_lookup_us']:.0f} us per hidden state, "
        f"{forward['noise_lookups_over_forward']:.3%} of the forward for all {forward['layers']}"
    )
    save_results(args.json, {"machine": machine_info, "authors": authors, "forward": forward})


if __name__ == "__main__":
    main()
