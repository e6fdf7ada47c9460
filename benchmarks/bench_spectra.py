"""Benchmark the spectral methods at 7B-like shapes; prints ratios measured in one run.

For hidden states shaped like a 7B model's (d = 4096, L = 512, 33 hidden states, 8 sequences):
the exact method (Gram on the smaller side, one batched ``eigvalsh``), the same matrices solved
one by one in a Python loop, and ``method="fast"`` (polar iteration + SLQ), each against the
forward pass that produces the hidden states. The forward of a randomly initialised
Llama-7B-shaped decoder layer (8 x 512 tokens) is timed and multiplied by 32 layers. On the
CPU the metrics are timed on a few layers and scaled to 33 (said in the output). Also prints
fast-vs-exact errors on these inputs and, on CUDA, host synchronisations per probe.

Usage: ``python benchmarks/bench_spectra.py [--device cuda] [--quick]``
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import benchmark_parser, machine, save_results, seconds, synchronize

from mnn_callback.core.metrics import compute_metrics, finish_metrics, prepare_metrics


def repeated_seconds(fn, device: torch.device, repeats: int = 1) -> float:
    """Mean time of ``repeats`` calls after one warm-up call."""
    fn()
    return sum(seconds(fn, device) for _ in range(repeats)) / repeats


def hidden_states(layers: int, batch: int, length: int, d: int, device: torch.device) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(layers):
        x = torch.randn(batch, length, d, generator=generator)
        x[..., :4] *= 30.0  # outlier dimensions, as real activations have
        out.append(x.to(device))
    return out


def forward_seconds(device: torch.device, batch: int, length: int, d: int, intermediate: int, layers: int) -> float:
    """Time of one Llama decoder layer at these shapes, times the number of layers."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(
        hidden_size=d, intermediate_size=intermediate, num_attention_heads=max(1, d // 128), attn_implementation="sdpa"
    )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layer = LlamaDecoderLayer(config, layer_idx=0).to(device, dtype).eval()
    rotary = LlamaRotaryEmbedding(config=config).to(device)  # by keyword: transformers 4 takes dim first
    x = torch.randn(batch, length, d, device=device, dtype=dtype)
    positions = torch.arange(length, device=device)[None].expand(batch, -1)
    embeddings = rotary(x, positions)

    def run():
        with torch.no_grad():
            layer(x, position_embeddings=embeddings, position_ids=positions)

    return repeated_seconds(run, device) * layers


def count_syncs(fn, device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
            synchronize(device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    device = torch.device(args.device)
    total_layers, batch, length, d, intermediate = 33, 8, 512, 4096, 11008
    timed_layers = total_layers if device.type == "cuda" else 2
    if args.quick:
        total_layers, batch, length, d, intermediate, timed_layers = 3, 2, 32, 64, 128, 1
    states = hidden_states(timed_layers, batch, length, d, device)
    scale = total_layers / timed_layers

    def exact_batched():
        return finish_metrics([prepare_metrics(h) for h in states])

    def exact_loop():
        return [compute_metrics(h[i : i + 1]) for h in states for i in range(h.shape[0])]  # a call per matrix

    def fast():
        return [compute_metrics(h, method="fast") for h in states]

    times = {
        name: repeated_seconds(fn, device) * scale
        for name, fn in [("exact", exact_batched), ("loop", exact_loop), ("fast", fast)]
    }
    forward = forward_seconds(device, batch, length, d, intermediate, total_layers - 1)
    exact_values = exact_batched()
    fast_values = fast()
    nuclear_error = max(
        ((f["nuclear_norm"] - e["nuclear_norm"]) / e["nuclear_norm"]).abs().max().item()
        for f, e in zip(fast_values, exact_values, strict=True)
    )
    entropy_error = max(
        (f["entropy_nats"] - e["entropy_nats"]).abs().max().item()
        for f, e in zip(fast_values, exact_values, strict=True)
    )
    machine_info = machine(device)
    results = {
        "machine": machine_info,
        "shape": {
            "hidden_states": total_layers,
            "batch": batch,
            "L": length,
            "d": d,
            "timed_hidden_states": timed_layers,
        },
        "forward_s": forward,
        "metrics_s": times,
        "over_forward": {name: value / forward for name, value in times.items()},
        "fast_vs_exact": {"nuclear_norm_max_relative": nuclear_error, "entropy_max_nats": entropy_error},
        "host_syncs_per_probe": {"exact": count_syncs(exact_batched, device), "fast": count_syncs(fast, device)},
    }
    print(f"machine: {machine_info}")
    note = "" if timed_layers == total_layers else f" (timed on {timed_layers} hidden states, scaled to {total_layers})"
    print(f"{total_layers} hidden states x {batch} sequences x {length} tokens, d = {d}{note}")
    print(f"forward ({total_layers - 1} Llama-7B-shaped layers): {forward:.2f} s")
    for name, label in [
        ("exact", "exact, one batched eigvalsh"),
        ("loop", "exact, matrix by matrix"),
        ("fast", "fast"),
    ]:
        print(f"  {label:28s} {times[name]:8.2f} s = {times[name] / forward:7.1%} of the forward")
    print(
        f"fast vs exact: nuclear norm max relative error {nuclear_error:.1e}, "
        f"entropy max error {entropy_error:.1e} nats"
    )
    print(f"host synchronisations per probe: {results['host_syncs_per_probe']}")
    save_results(args.json, results)


if __name__ == "__main__":
    main()
