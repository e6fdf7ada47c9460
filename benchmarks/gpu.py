"""Every GPU figure the README still lacks, in one run on one CUDA device; prints a markdown table.

Measures (each a ratio within this run, interleaved where two things are compared):

1. all metrics on all 13 hidden states of a GPT-2-small shape (8 x 512 tokens) vs its forward:
   exact, cheap and fast (``bench_metrics.bench_against_forward``);
2. the same at 7B-like shapes (d = 4096, 33 hidden states, 8 x 512 tokens, bf16 Llama layers):
   exact with one batched eigensolve, exact matrix by matrix, fast; host synchronisations;
3. the probe vs a plain forward over the same sample, and its peak memory above the forward, on
   GPT-2-small in bf16;
4. the Trainer callback's share of the wall time at ``every_n_steps=100`` on a GPT-2-small config
   in bf16 (the monitor's own accounting).

Usage: ``python benchmarks/gpu.py [--out table.md]`` on a machine with CUDA (under 8 minutes on one
H100-class GPU); on a CPU it refuses with one line. ``--smoke`` runs every part at tiny shapes,
on the CPU too, so that the script cannot rot (the tests run it).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_metrics import bench_against_forward
from bench_probe import peak_bytes
from bench_spectra import count_syncs, forward_seconds, hidden_states, repeated_seconds
from common import benchmark_parser, machine, save_results, seconds

from mnn_callback import MNNCallback, Probe
from mnn_callback.core.metrics import compute_metrics, finish_metrics, prepare_metrics


def gpt2_small_tiers(device: torch.device, smoke: bool) -> dict[str, float]:
    """Metrics over the forward at the GPT-2-small shape: the exact and cheap tiers, then fast."""
    batch, length, layers, repeats = (2, 32, 2, 1) if smoke else (8, 512, 12, 5)
    tiers = bench_against_forward(device, batch, length, repeats, n_layer=layers)
    states = hidden_states(layers + 1, batch, length, 64 if smoke else 768, device)
    fast = repeated_seconds(lambda: [compute_metrics(h, method="fast") for h in states], device, repeats)
    return {
        "exact": tiers["metrics_over_forward"],
        "cheap": tiers["cheap_over_forward"],
        "fast": fast / (tiers["forward_ms"] / 1e3),
    }


def seven_b_shapes(device: torch.device, smoke: bool) -> dict[str, float]:
    """At d = 4096, 33 hidden states, 8 x 512 tokens: the metrics over 32 bf16 Llama-7B-shaped layers."""
    layers, batch, length, d, intermediate = (3, 2, 32, 64, 128) if smoke else (33, 8, 512, 4096, 11008)
    states = hidden_states(layers, batch, length, d, device)
    batched = lambda: finish_metrics([prepare_metrics(h) for h in states])  # noqa: E731
    loop = lambda: [compute_metrics(h[i : i + 1]) for h in states for i in range(h.shape[0])]  # noqa: E731
    fast = lambda: [compute_metrics(h, method="fast") for h in states]  # noqa: E731
    cheap = lambda: [compute_metrics(h, method="cheap") for h in states]  # noqa: E731
    forward = forward_seconds(device, batch, length, d, intermediate, layers - 1)
    times = {
        name: repeated_seconds(fn, device)
        for name, fn in [("exact", batched), ("loop", loop), ("fast", fast), ("cheap", cheap)]
    }
    return {
        **{f"{name}_over_forward": value / forward for name, value in times.items()},
        "batched_vs_loop": times["loop"] / times["exact"],
        "syncs_exact": count_syncs(batched, device),
        "syncs_fast": count_syncs(fast, device),
    }


def probe_vs_forward(device: torch.device, smoke: bool) -> dict[str, float]:
    """The probe over a plain forward on the same sample, and its peak memory above it, GPT-2-small in bf16."""
    from transformers import GPT2Config, GPT2LMHeadModel

    n_layer, d, heads, length, batch, samples = (2, 64, 2, 32, 4, 8) if smoke else (12, 768, 12, 512, 8, 32)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    config = GPT2Config(n_layer=n_layer, n_embd=d, n_head=heads, n_positions=1024)
    model = GPT2LMHeadModel(config).to(device, dtype).eval()
    data = torch.randint(0, config.vocab_size, (samples, length), generator=torch.Generator().manual_seed(0))
    probe = Probe(data, max_samples=samples, max_length=length, batch_size=batch)
    probe.run(model)  # calibration
    ids = data.to(device)

    def plain_forward():
        with torch.no_grad():
            for start in range(0, samples, batch):
                chunk = ids[start : start + batch]
                model(input_ids=chunk, labels=chunk, use_cache=False)

    pairs = [
        (seconds(plain_forward, device), seconds(lambda: probe.run(model), device)) for _ in range(1 if smoke else 5)
    ]
    forward_peak = peak_bytes(plain_forward, device)
    probe_peak = peak_bytes(lambda: probe.run(model), device)
    layer_bytes = batch * length * d * 4
    return {
        "probe_over_forward": statistics.median(probe / forward for forward, probe in pairs),
        "peak_above_forward_layers": (probe_peak - forward_peak) / layer_bytes,
    }


def callback_share(device: torch.device, smoke: bool) -> dict[str, float]:
    """The callback's share of a GPT-2-small bf16 training run at every_n_steps=100 (its own accounting)."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    n_layer, d, heads, length, steps, every = (2, 64, 2, 32, 6, 2) if smoke else (12, 768, 12, 512, 600, 100)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=n_layer, n_embd=d, n_head=heads, n_positions=1024)
    generator = torch.Generator().manual_seed(1)
    train = [
        {"input_ids": ids, "labels": ids}
        for ids in torch.randint(0, config.vocab_size, (64, length), generator=generator).tolist()
    ]
    heldout = torch.randint(0, config.vocab_size, (32, length), generator=generator)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            out,
            max_steps=steps,
            per_device_train_batch_size=8,
            bf16=device.type == "cuda",
            use_cpu=device.type != "cuda",
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
        )
        callback = MNNCallback(heldout, every_n_steps=every, max_length=length, sinks=["jsonl"], dashboards=False)
        started = time.perf_counter()
        Trainer(model=GPT2LMHeadModel(config), args=args, train_dataset=train, callbacks=[callback]).train()
        wall = time.perf_counter() - started
    overhead = callback.monitor.overhead
    return {"share": overhead.share, "probes": overhead.probes, "wall_s": wall}


def table(results: dict) -> str:
    """The markdown table for docs/benchmarks.md."""
    small, big, probe, trainer = results["gpt2_small"], results["7b"], results["probe"], results["callback"]
    rows = [
        ("all exact metrics, 13 hidden states of GPT-2-small, 8 x 512, vs the forward", f"{small['exact']:.1%}"),
        ('the same, `method="cheap"`', f"{small['cheap']:.1%}"),
        ('the same, `method="fast"`', f"{small['fast']:.1%}"),
        (
            "exact, 33 hidden states at d = 4096, 8 x 512, vs 32 bf16 Llama-7B layers",
            f"{big['exact_over_forward']:.1%}",
        ),
        ("the same, cheap / fast", f"{big['cheap_over_forward']:.1%} / {big['fast_over_forward']:.1%}"),
        ("one call per matrix / one batched eigensolve, time (7B shapes)", f"{big['batched_vs_loop']:.1f}x"),
        ("host synchronisations per probe, exact / fast", f"{big['syncs_exact']} / {big['syncs_fast']}"),
        ("probe vs plain forward, GPT-2-small bf16, 32 x 512", f"{probe['probe_over_forward']:.2f}x"),
        ("probe's peak memory above the forward", f"{probe['peak_above_forward_layers']:+.2f} layers' activations"),
        (
            "Trainer callback at every_n_steps=100, GPT-2-small bf16, 600 steps",
            f"{trainer['share']:.2%} of the wall time",
        ),
    ]
    smoke = " (--smoke: tiny shapes, the figures mean nothing)" if results["smoke"] else ""
    lines = [
        f"Measured with `python benchmarks/gpu.py` on {results['machine']['device']} "
        f"(torch {results['machine']['torch']}){smoke}:",
        "",
        "| what | figure |",
        "|---|---|",
    ]
    return "\n".join(lines + [f"| {what} | {figure} |" for what, figure in rows]) + "\n"


def main() -> int:
    parser = benchmark_parser(__doc__.splitlines()[0], device=False)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, on the CPU too: checks that the script runs")
    parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args()
    smoke = args.smoke or args.quick
    if not smoke and not torch.cuda.is_available():
        print(
            "benchmarks/gpu.py measures GPU figures and needs CUDA; --smoke runs tiny shapes on the CPU",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    results = {"machine": machine(device), "smoke": smoke}
    for name, part in [
        ("gpt2_small", gpt2_small_tiers),
        ("7b", seven_b_shapes),
        ("probe", probe_vs_forward),
        ("callback", callback_share),
    ]:
        started = time.perf_counter()
        results[name] = part(device, smoke)
        print(f"{name}: {results[name]} ({time.perf_counter() - started:.0f} s)", flush=True)
    markdown = table(results)
    print(markdown)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(markdown)
    save_results(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
