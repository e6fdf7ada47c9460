"""The few collectives the probe needs, under an initialised ``torch.distributed`` process group.

Every function here must be called by every process of the group at the same point; each is a
no-op (or returns its input) without a process group.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "all_gather_object",
    "all_reduce",
    "broadcast_object",
    "differing_across_processes",
    "process_group_from_environment",
    "world",
]

# The last all-reduce's work handle and buffer, referenced until the next all-reduce, module-wide
# (they must outlive the probe that made them): otherwise gloo's worker thread may drop the last
# reference and need the GIL to free the buffer while the main thread, holding the GIL, tears
# the process group down, a deadlock at exit (seen with torch 2.13).
_LAST_ALL_REDUCE: list[Any] = []


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    import torch.distributed as dist

    if _initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce(tensor: Tensor, *, op: str = "sum") -> Tensor:
    """Elementwise ``op`` (``"sum"`` or ``"max"``) of ``tensor`` over the processes, on ``tensor``'s device.

    ``tensor`` itself without a process group. Communicates through a CUDA tensor under NCCL, a
    CPU tensor otherwise.
    """
    import torch.distributed as dist

    if not _initialized():
        return tensor
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    buffer = tensor.to(device, copy=True)
    operation = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    work = dist.all_reduce(buffer, op=operation, async_op=True)
    work.wait()
    _LAST_ALL_REDUCE[:] = [work, buffer]
    return buffer.to(tensor.device, copy=True)


def all_gather_object(value: Any) -> list[Any]:
    """``value`` of every process, in rank order (``[value]`` alone)."""
    import torch.distributed as dist

    if not _initialized():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: Any, source: int = 0) -> Any:
    """Process ``source``'s ``value`` on every process (``value`` alone)."""
    import torch.distributed as dist

    if not _initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=source)
    return box[0]


def differing_across_processes(settings: dict[str, Any]) -> str | None:
    """Which of ``settings`` differ between the processes, with each process's value; None when none does.

    Every process gets the same answer (the settings are gathered everywhere).

    >>> differing_across_processes({"every_n_steps": 100}) is None  # one process
    True
    """
    gathered = all_gather_object(settings)
    keys = sorted({key for values in gathered for key in values}, key=str)
    differing = [key for key in keys if len({repr(values.get(key)) for values in gathered}) > 1]
    if not differing:
        return None
    return "; ".join(
        f"{key}: " + ", ".join(f"process {rank} {values.get(key)!r}" for rank, values in enumerate(gathered))
        for key in differing
    )


@contextlib.contextmanager
def process_group_from_environment(device: str = "auto") -> Iterator[None]:
    """A process group for the block when launched as several processes (``torchrun``, ``accelerate
    launch``: ``WORLD_SIZE`` > 1) and none is initialised yet; nothing otherwise.

    NCCL when the work runs on CUDA (each process on its ``LOCAL_RANK`` GPU), gloo otherwise. On a
    normal exit every process leaves together (a barrier) and the group is destroyed.
    """
    import torch.distributed as dist

    if _initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    yield
    dist.barrier()  # only on a normal exit: after an error, the launcher ends the other processes
    dist.destroy_process_group()
