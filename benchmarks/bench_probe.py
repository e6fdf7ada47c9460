"""Benchmark the probe; prints ratios measured in one run.

- Peak extra memory of the streaming probe (metrics from forward hooks, layer by layer)
  against holding all hidden states of a micro-batch (``output_hidden_states=True``), both
  above the plain forward pass the probe makes anyway, in units of one layer's activations
  for one micro-batch. CPU: peak live bytes from the allocation events of
  ``torch.profiler(profile_memory=True)``; CUDA: ``torch.cuda.max_memory_allocated``.
- Probe time against the plain forward over the same sample (same micro-batches, loss included).

Model: GPT-2-small shape (12 layers, d = 768) from a config, random weights; sample 16 x 512.
Usage: ``python benchmarks/bench_probe.py [--device cuda] [--quick]``
"""

from __future__ import annotations

import os
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import benchmark_parser, machine, median_seconds, save_results, seconds

from mnn_callback.probing.probe import Probe


def peak_bytes(fn, device: torch.device) -> int:
    """Peak of live allocated bytes on ``device`` while ``fn()`` runs, above what was live before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    device = torch.device(args.device)

    from transformers import GPT2Config, GPT2LMHeadModel

    if args.quick:
        n_layer, d, heads, length, batch, samples, repeats = 2, 64, 2, 64, 4, 8, 1
    else:
        n_layer, d, heads, length, batch, samples, repeats = 12, 768, 12, 512, 8, 16, 5
    torch.manual_seed(0)
    config = GPT2Config(n_layer=n_layer, n_embd=d, n_head=heads, n_positions=max(1024, length))
    model = GPT2LMHeadModel(config).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    data = torch.randint(0, config.vocab_size, (samples, length), generator=generator)
    probe = Probe(data, max_samples=samples, max_length=length, batch_size=batch)
    probe.run(model)  # calibration (which module emits which hidden state) happens once, here

    input_ids = data.to(device)
    mask = torch.ones_like(input_ids)

    def plain_forward():
        with torch.no_grad():
            for start in range(0, samples, batch):
                ids = input_ids[start : start + batch]
                model(input_ids=ids, attention_mask=mask[start : start + batch], labels=ids, use_cache=False)

    layer_bytes = batch * length * d * torch.finfo(torch.float32).bits // 8
    forward_peak = peak_bytes(plain_forward, device)
    streaming_peak = peak_bytes(lambda: probe.run(model), device)
    collected_peak = peak_bytes(lambda: probe.run(model, streaming=False), device)
    # Interleaved, so that drifts of the machine's speed hit both alike; median of the ratios.
    pairs = [(median_seconds(plain_forward, device, 1), median_seconds(lambda: probe.run(model), device, 1))]
    pairs += [(seconds(plain_forward, device), seconds(lambda: probe.run(model), device)) for _ in range(repeats - 1)]
    forward_time = statistics.median(pair[0] for pair in pairs)
    probe_time = statistics.median(pair[1] for pair in pairs)
    ratio = statistics.median(pair[1] / pair[0] for pair in pairs)

    # The same without the language-model head: no vocabulary-sized logits dominate the peak.
    base = model.transformer

    def base_forward():
        with torch.no_grad():
            for start in range(0, samples, batch):
                base(
                    input_ids=input_ids[start : start + batch],
                    attention_mask=mask[start : start + batch],
                    use_cache=False,
                )

    probe.run(base)
    base_peak = peak_bytes(base_forward, device)
    base_streaming_peak = peak_bytes(lambda: probe.run(base), device)
    base_collected_peak = peak_bytes(lambda: probe.run(base, streaming=False), device)

    machine_info = machine(device)
    results = {
        "machine": machine_info,
        "shape": {"layers": n_layer + 1, "d": d, "batch": batch, "L": length, "samples": samples},
        "one_layer_activation_MB": layer_bytes / 1e6,
        "plain_forward_peak_MB": forward_peak / 1e6,
        "streaming_extra_layers": (streaming_peak - forward_peak) / layer_bytes,
        "all_hidden_states_extra_layers": (collected_peak - forward_peak) / layer_bytes,
        "forward_s": forward_time,
        "probe_s": probe_time,
        "probe_over_forward": ratio,
        "base_model_forward_peak_MB": base_peak / 1e6,
        "base_model_streaming_extra_layers": (base_streaming_peak - base_peak) / layer_bytes,
        "base_model_all_hidden_states_extra_layers": (base_collected_peak - base_peak) / layer_bytes,
    }
    print(f"machine: {machine_info}")
    print(
        f"GPT-2 shape, {n_layer + 1} hidden states, d={d}, micro-batch {batch} x {length}, {samples} sequences; "
        f"one layer's activations for one micro-batch = {layer_bytes / 1e6:.1f} MB"
    )
    print(
        f"peak memory above the plain forward ({forward_peak / 1e6:.0f} MB): streaming probe "
        f"{results['streaming_extra_layers']:+.2f} layers, "
        f"all hidden states {results['all_hidden_states_extra_layers']:+.2f} layers"
    )
    print(
        f"without the LM head (forward peak {base_peak / 1e6:.0f} MB): streaming probe "
        f"{results['base_model_streaming_extra_layers']:+.2f} layers, "
        f"all hidden states {results['base_model_all_hidden_states_extra_layers']:+.2f} layers"
    )
    print(
        f"time: plain forward {forward_time:.2f} s, probe {probe_time:.2f} s, probe / forward = "
        f"{results['probe_over_forward']:.2f}x"
    )
    save_results(args.json, results)


if __name__ == "__main__":
    main()
