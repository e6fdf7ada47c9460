"""The few collectives the probe needs, under an initialised ``torch.distributed`` process group.

Every function here must be called by every process of the group at the same point; each is a
no-op (or returns its input) without a process group.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ProcessesDisagree",
    "StepAgreement",
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


_AGREEMENTS = itertools.count()  # each StepAgreement's place in this process: which of two waits gives way
_CALLS = itertools.count()  # every agree() call of this process, in order: the order a loop calls its monitors in
_RUNS: dict[str, int] = {}  # per monitor name, the agreements made so far in this process: each run's key space


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


class ProcessesDisagree(RuntimeError):
    """The processes were not at the same probe: the monitor that met this is off on every process."""


class StepAgreement:
    """Makes sure every process is at the same probe before any collective of it, with a bounded wait.

    Before each probe every process publishes what it is about to do (e.g. ``"step 4 (exact
    probe)"``) in the process group's key-value store (outside the collectives, so it never mixes
    with the training's all-reduces) and waits at most ``timeout`` seconds for the others'. The
    probe's outcome is decided once, atomically, by the first process that can: ``go`` when every
    process published the same, else the reason (what each did, or who did not come in time).
    Every process reads the same outcome, a late one without waiting; on anything but ``go``
    :meth:`agree` raises :class:`ProcessesDisagree`, now and at every later call: the monitor is
    off, training goes on.

    One agreement serves one run of the monitor named ``name`` (the n-th run of that name in each
    process meets the n-th of the others). A process that is late because it waits in another
    monitor's agreement that the loop calls earlier (as the processes' last calls showed; else
    the one made first) is waited for: a process that skipped a monitor waits at the next one,
    and the other, once its wait at the skipped one ran out, comes there. So of two processes
    waiting for each other, only the wait at the monitor called first runs out.

    Without a process group (or a store) every call agrees at once.
    """

    GO = "go"

    def __init__(self, timeout: float, name: str = "mnn") -> None:
        if not timeout > 0:
            raise ValueError(f"expected a positive sync_timeout (seconds), got {timeout!r}")
        self.timeout = float(timeout)
        run = _RUNS[name] = _RUNS.get(name, -1) + 1
        self.namespace = f"mnn_callback/agreement/{name}/{run}"
        self.order = next(_AGREEMENTS)
        self.previous_call = -1  # this agreement's last agree() among the process's calls (-1: none yet)
        self.probes = 0  # probes agreed (or tried) so far: the same on every process while they agree
        self.waited = 0.0  # the longest wait so far, in seconds
        self.disagreement: str | None = None

    def _store(self) -> Any:
        if not _initialized():
            return None
        from torch.distributed import distributed_c10d

        try:
            return distributed_c10d._get_default_store()
        except (AttributeError, RuntimeError, ValueError):  # a backend without a store: no agreement possible
            return None

    def agree(self, what: str) -> None:
        """Return once every process published ``what`` for this probe; raise :class:`ProcessesDisagree` else."""
        import torch.distributed as dist

        if self.disagreement is not None:
            raise ProcessesDisagree(self.disagreement)
        store = self._store()
        if store is None:
            return
        rank, size = dist.get_rank(), dist.get_world_size()
        probe, self.probes = self.probes, self.probes + 1
        outcome = f"{self.namespace}/{probe}/outcome"
        keys = [f"{self.namespace}/{probe}/{other}" for other in range(size)]
        if not store.check([outcome]):  # decided already only when it is off: then nobody waits for this one
            store.set(keys[rank], what)
        waiting = f"mnn_callback/waiting/{rank}"
        place = (self.previous_call, self.order, rank)
        store.set(waiting, f"{self.previous_call},{self.order}")
        self.previous_call = next(_CALLS)
        try:
            self._wait(store, outcome, keys, place, what)
        finally:
            store.set(waiting, "")
        decided = store.get(outcome).decode()
        if decided != self.GO:
            self.disagreement = (
                f"{decided}. Every process must call the monitor at the same steps with the same step numbers; the "
                "monitor is off for the rest of this run on every process; training goes on"
            )
            raise ProcessesDisagree(self.disagreement)
        if probe:  # every process read the previous probe's keys before it published this one's
            store.delete_key(f"{self.namespace}/{probe - 1}/{rank}")
            if rank == 0:
                store.delete_key(f"{self.namespace}/{probe - 1}/outcome")

    def _wait(self, store: Any, outcome: str, keys: list[str], place: tuple[int, int, int], what: str) -> None:
        """Until the probe's outcome is decided: by this process once every key is there, or once the
        others did not come within the timeout (waiting longer, up to 3 timeouts in all, for a process
        bound by a wait at an agreement called earlier)."""
        started = waiting_since = time.monotonic()
        pause = 0.001
        while not store.check([outcome]):
            now = time.monotonic()
            if store.check(keys):
                doing = [store.get(key).decode() for key in keys]
                reason = "the processes were at different probes: " + "; ".join(
                    f"process {other} at {done}" for other, done in enumerate(doing)
                )
                store.compare_set(outcome, "", self.GO if len(set(doing)) == 1 else reason)
            elif now - waiting_since > self.timeout:
                missing = [other for other in range(len(keys)) if not store.check([keys[other]])]
                if now - started < 3 * self.timeout and _waiting_earlier(store, missing, place):
                    waiting_since = now  # they are bound by their own wait: they come here after it
                    continue
                store.compare_set(
                    outcome,
                    "",
                    f"{_processes(missing)} did not reach the monitor's probe within {self.timeout:g} s while "
                    f"process {place[2]} was at {what}: a step() call skipped, a step number that differs, "
                    "force=True or finish() on some processes only",
                )
            else:
                time.sleep(pause)
                pause = min(2 * pause, 0.05)
        self.waited = max(self.waited, time.monotonic() - waiting_since)


def _waiting_earlier(store: Any, ranks: list[int], place: tuple[int, int, int]) -> bool:
    """Whether one of ``ranks`` waits in an agreement that comes before the one at ``place`` (its last call,
    then the order agreements were made in, then the rank): a strict order, so no two waits wait for each other."""
    for other in ranks:
        key = f"mnn_callback/waiting/{other}"
        theirs = store.get(key).decode() if store.check([key]) else ""
        if theirs and (*map(int, theirs.split(",")), other) < place:
            return True
    return False


def _processes(ranks: list[int]) -> str:
    return ("process " if len(ranks) == 1 else "processes ") + ", ".join(str(rank) for rank in ranks)


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
