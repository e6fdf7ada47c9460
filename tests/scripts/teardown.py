"""Leaving a torch.distributed group within a bound, for the scripts run under torchrun.

A plain ``barrier(); destroy_process_group()`` waits as long as the group's timeout (the Trainer's
``ddp_timeout``: 1800 s by default), longer than the tests' HANG_TIMEOUT: a rank that never arrives,
or a teardown stuck in gloo, holds a test for 20 minutes and says nothing. :func:`leave_together`
fails such a run within ``seconds`` instead, with the reason: gloo's ``monitored_barrier`` names the
rank that did not arrive, and a watchdog (``faulthandler``) prints every thread's traceback and
exits with status 1 if the teardown itself hangs (``destroy_process_group`` has no timeout).
"""

from __future__ import annotations

import datetime
import faulthandler
import sys

TEARDOWN_SECONDS = 300.0  # far above the skew of two ranks after training (the main one draws the last figures)


def leave_together(seconds: float = TEARDOWN_SECONDS) -> None:
    """Every rank leaves the group together, or the process fails within ``seconds`` saying where it waited."""
    import torch.distributed as dist

    if not dist.is_initialized():  # one process, or a launcher that left the group already
        return
    faulthandler.dump_traceback_later(seconds + 60.0, exit=True, file=sys.stderr)
    try:
        if dist.get_backend() == "gloo":  # names the rank that did not arrive; NCCL has no monitored barrier
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=seconds), wait_all_ranks=True)
        else:
            dist.barrier()
        dist.destroy_process_group()
    finally:
        faulthandler.cancel_dump_traceback_later()
