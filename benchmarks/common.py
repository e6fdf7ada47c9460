"""Helpers shared by the benchmark scripts: device synchronisation, timing, the machine's description."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (CUDA is asynchronous: time only after this)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall time of one call of ``fn``, device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median time of ``repeats`` calls after one warm-up call."""
    fn()
    return statistics.median(seconds(fn, device) for _ in range(repeats))


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": name, "threads": torch.get_num_threads(), "torch": torch.__version__}


def benchmark_parser(description: str, *, device: bool = True) -> argparse.ArgumentParser:
    """Options every benchmark takes: ``--quick`` (tiny sizes), ``--json`` and (unless device=False) ``--device``."""
    parser = argparse.ArgumentParser(description=description)
    if device:
        parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs")
    parser.add_argument("--json", help="also write the results to this file")
    return parser


def save_results(path: str | None, results: dict[str, Any]) -> None:
    """Write the results as JSON to ``path`` (the ``--json`` option), if one was given."""
    if path:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
