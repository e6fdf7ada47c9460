"""Processes that disagree about the monitor in a 2-process DDP plain loop (torchrun, gloo).

Usage: ``torchrun --standalone --nproc_per_node 2 loop_disagreement.py OUTPUT_DIR [SYNC_TIMEOUT]``.
Trainings of 8 steps in the same processes, each a fresh tiny GPT-2 with the same seed under
DDP, with an :class:`MNNMonitor` probing every 2 steps (but in ``none``):

- ``none``: no monitor: the losses every other case must reproduce;
- ``skip``: process 1 does not call ``step`` at step 4;
- ``offset``: process 1 passes ``step + 1`` (a counter that starts at 1);
- ``force``: process 0 calls ``step(force=True)`` at step 3, alone;
- ``finish``: process 1 calls ``finish`` at step 5 (an early stop) and the monitor no more;
- ``two``: two monitors of the same model (``a/`` and ``b/``, the loop calls b first); process 1 skips
  a's step 4; ``two_first``: the same, process 1 skipping b's step 4 (it then waits at a's probe);
- ``rerun``: ``skip``, then the same monitor for a second run (steps 0-4 again after ``finish``);
- ``calibration``: every probe's first forward fails on process 1 (before any of the probe's sums).

Each process writes ``OUTPUT_DIR/report.<rank>.json``: per case the losses, the MNNWarnings it
raised, the monitor's longest wait at a probe and its longest call, in seconds.
"""

import json
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

CASES = ("none", "skip", "offset", "force", "finish", "two", "two_first", "rerun", "calibration")


def train(case: str, output_dir: str, sync_timeout: float) -> dict:
    import torch
    import torch.distributed as dist
    from helpers import PROBE_DATA, random_sequences, tiny_model
    from torch.nn.parallel import DistributedDataParallel

    from mnn_callback import MNNMonitor

    rank = dist.get_rank()
    model = tiny_model("gpt2", seed=0)
    options = {"every_n_steps": 2, "batch_size": 2, "sync_timeout": sync_timeout}
    monitor = second = None
    if case in ("two", "two_first"):
        monitor = MNNMonitor(PROBE_DATA, out_dir=os.path.join(output_dir, case, "a"), **options)
        second = MNNMonitor(PROBE_DATA, out_dir=os.path.join(output_dir, case, "b"), **options)
    elif case != "none":
        monitor = MNNMonitor(PROBE_DATA, out_dir=os.path.join(output_dir, case), **options)
    if case == "calibration" and rank == 1:

        def fail_in_the_probe(module, inputs):
            if not module.training:
                raise RuntimeError("simulated: out of memory in the probe on this process only")

        model.transformer.h[0].register_forward_pre_hook(fail_in_the_probe)
    ddp = DistributedDataParallel(model)  # after the monitor: DDP's broadcast lines the processes up
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    data = torch.tensor(random_sequences(32, 12, 12, seed=1 + rank))
    losses, longest_call = [], 0.0

    def call(method, *args, **kwargs):
        nonlocal longest_call
        started = time.perf_counter()
        method(*args, **kwargs)
        longest_call = max(longest_call, time.perf_counter() - started)

    finished = False
    if monitor is not None:
        call(monitor.step, ddp, 1 if case == "offset" and rank == 1 else 0)
    if second is not None:
        call(second.step, ddp, 0)
    for step in range(1, 9):
        batch = data[4 * (step - 1) : 4 * step]
        loss = ddp(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if second is not None and not (case == "two_first" and rank == 1 and step == 4):
            call(second.step, ddp, step)
        if monitor is None or finished:
            continue
        if case in ("skip", "two", "rerun") and rank == 1 and step == 4:
            continue
        if case == "finish" and rank == 1 and step == 5:
            call(monitor.finish, ddp, step)
            finished = True
            continue
        reported = step + 1 if case == "offset" and rank == 1 else step
        call(monitor.step, ddp, reported, force=case == "force" and rank == 0 and step == 3)
    if monitor is not None and not finished:
        call(monitor.finish, ddp, 9 if case == "offset" and rank == 1 else 8)
    if second is not None:
        call(second.finish, ddp, 8)
    waited = 0.0 if monitor is None else monitor.monitor.agreement.waited
    if case == "rerun":  # a new run of the same monitor: the processes agree afresh
        for step in range(5):
            call(monitor.step, ddp, step)
        call(monitor.finish, ddp, 4)
    return {"losses": losses, "waited": waited, "longest_call": longest_call}


def main(output_dir: str, sync_timeout: float) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    report = {}
    for case in CASES:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report[case] = train(case, output_dir, sync_timeout)
        report[case]["warnings"] = [str(w.message) for w in caught if w.category.__name__ == "MNNWarning"]
    with open(os.path.join(output_dir, f"report.{dist.get_rank()}.json"), "w") as handle:
        json.dump(report, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 10.0)
