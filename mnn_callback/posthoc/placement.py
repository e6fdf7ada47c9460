"""Where a post hoc model goes: one device, or split over the devices by Accelerate, and in which dtype."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from mnn_callback.core.errors import UsageError

__all__ = ["DEVICE_MAPS", "Placement", "model_dtype", "parse_max_memory"]


def model_dtype(name: str, device: torch.device) -> torch.dtype | str:
    """The dtype to load weights in: ``auto`` keeps the checkpoint's on CUDA, float32 on the CPU."""
    if name == "auto":
        return "auto" if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


@dataclass(frozen=True)
class Placement:
    """Where a loaded model goes: one ``device``, or (``device_map``) split over the available
    devices by Accelerate's big-model inference, within ``max_memory`` per device, the rest
    offloaded to the CPU and to ``offload_folder`` on disk."""

    device: torch.device
    dtype: torch.dtype | str
    device_map: str | None = None  # "auto", "balanced", "balanced_low_0" or "sequential"
    max_memory: dict[int | str, int | str] | None = None
    offload_folder: str | None = None

    @classmethod
    def of(
        cls,
        device: str,
        dtype: str,
        device_map: str | None = None,
        max_memory: dict[int | str, int | str] | None = None,
        offload_folder: str | None = None,
    ) -> Placement:
        """From the options of ``evaluate``/``rank``: ``device`` ``"auto"`` is CUDA when available (this
        process's GPU under ``torchrun``: ``LOCAL_RANK``), ``dtype`` ``"auto"`` as :func:`model_dtype`."""
        if device_map is not None and device_map not in DEVICE_MAPS:
            raise UsageError(f"device_map must be one of {', '.join(DEVICE_MAPS)}, got {device_map!r}")
        if max_memory is not None and device_map is None:
            raise UsageError("max_memory needs device_map (e.g. device_map='auto')")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        place = torch.device(device)
        if place.type == "cuda" and place.index is None:
            place = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return cls(place, model_dtype(dtype, place), device_map, max_memory, offload_folder)


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_max_memory(text: str | None) -> dict[int | str, str] | None:
    """``"0=20GiB,cpu=60GiB"`` as Accelerate's ``max_memory`` (``{0: "20GiB", "cpu": "60GiB"}``).

    >>> parse_max_memory("0=20GiB,cpu=60GiB")
    {0: '20GiB', 'cpu': '60GiB'}
    """
    if not text:
        return None
    memory: dict[int | str, str] = {}
    for part in text.split(","):
        device, equals, amount = part.strip().partition("=")
        if not equals or not amount or not (device.isdigit() or device in ("cpu", "mps", "disk")):
            raise UsageError(f"--max-memory takes DEVICE=AMOUNT pairs such as 0=20GiB,cpu=60GiB; got {part!r}")
        memory[int(device) if device.isdigit() else device] = amount
    return memory
