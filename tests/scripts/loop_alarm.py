"""The collapse alarm in 2-process DDP runs (gloo): a plain loop, an Accelerate loop, a Trainer.

Usage: ``torchrun --standalone --nproc_per_node 2 loop_alarm.py OUTPUT_DIR [FLAVOUR]``, FLAVOUR ``ddp``
(a plain loop with :class:`MNNMonitor`: every case below; the default) or ``trainer`` (the ``both`` case
through the Trainer and :class:`MNNCallback`, its batches drawn by the Trainer), or ``accelerate launch
--multi_gpu --num_processes 2 loop_alarm.py OUTPUT_DIR accelerate`` with ``ACCELERATE_USE_CPU=true`` and
no GPU visible (``--cpu`` launches one process; the ``both`` case through :class:`MNNAccelerateHook`).
A tiny GPT-2 under DDP (lr 1e-3, each process its own training batches) with a monitor probing every
2 steps, ``alert={"stop": True, "min_drop": 0.25}``; the loop stops when ``should_stop`` says so, at most
12 steps. After step 6 the final layer norm keeps 2 of its 32 outputs:

- ``both``: on both processes (the collapse every process sees);
- ``one``: on process 1 only (the processes' models differ from then on);
- ``mild``: on process 1 only, keeping 4 outputs: a fall the alarm would see on process 1's model
  alone, not on the two together (half the sample is probed on each process);
- ``healthy``: on neither.

Each process writes ``OUTPUT_DIR/report.<rank>.json``: per case the step it stopped at (None: it ran
to the end), its losses, the alarm's alerts (steps), ``should_stop``, the warnings it raised by kind
and the monitor's longest wait at a probe, in seconds; ``mild`` also each process's own model's
per-sequence Matrix Entropy of the last hidden state at steps 4 and 6 (the whole sample, probed
without sharding: what that process alone would have seen).
"""

import json
import os
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

# per case, per process: how many of the 32 outputs the collapse keeps
CASES = {"both": {0: 2, 1: 2}, "one": {1: 2}, "mild": {1: 4}, "healthy": {}}
MIN_DROP = 0.25  # between the mild case's falls: about 20% of both models together, 46% of process 1's alone
COLLAPSE_STEP = 6
STEPS = 12
SYNC_TIMEOUT = 10.0


def collapse(model, kept: int) -> None:
    """Keep ``kept`` of the final layer norm's 32 outputs (tests/test_alarm.py's ``collapse`` keeps 2)."""
    import torch

    with torch.no_grad():
        model.transformer.ln_f.weight[kept:] = 0.0
        model.transformer.ln_f.bias[kept:] = 0.0


def train(case: str, output_dir: str, rank: int, accelerator=None) -> dict:
    import torch
    from helpers import PROBE_DATA, random_sequences, tiny_model

    from mnn_callback import MNNAccelerateHook, MNNMonitor, Probe

    model = tiny_model("gpt2", seed=0)
    alert = {"stop": True, "min_drop": MIN_DROP}
    options = {"every_n_steps": 2, "batch_size": 5, "sync_timeout": SYNC_TIMEOUT, "alert": alert}
    if accelerator is None:
        from torch.nn.parallel import DistributedDataParallel

        monitor = MNNMonitor(PROBE_DATA, out_dir=os.path.join(output_dir, case), sinks=["jsonl"], **options)
        wrapped = DistributedDataParallel(model)
        optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)
    else:
        jsonl = os.path.join(output_dir, case, "mnn_metrics.jsonl")
        monitor = MNNAccelerateHook(accelerator, PROBE_DATA, jsonl=jsonl, dashboards=False, **options)
        wrapped, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    data = torch.tensor(random_sequences(4 * STEPS, 12, 12, seed=1 + rank))
    kept = CASES[case].get(rank)
    losses, stopped_at, alone = [], None, {}
    alone_probe = Probe(PROBE_DATA, batch_size=5) if case == "mild" else None
    monitor.step(wrapped, 0)
    for step in range(1, STEPS + 1):
        batch = data[4 * (step - 1) : 4 * step]
        loss = wrapped(input_ids=batch, labels=batch).loss
        loss.backward() if accelerator is None else accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step == COLLAPSE_STEP and kept is not None:
            collapse(model, kept)
        if alone_probe is not None and step in (COLLAPSE_STEP - 2, COLLAPSE_STEP):
            alone[step] = alone_probe.run(model, distributed=False).per_sequence["matrix_entropy"][-1]
        monitor.step(wrapped, step)
        if monitor.should_stop:
            stopped_at = step
            break
    monitor.finish(wrapped, stopped_at or STEPS)
    alarm = monitor.monitor.alarm
    return {
        "stopped_at": stopped_at,
        "losses": losses,
        "alerts": [alert.step for alert in alarm.alerts],
        "should_stop": monitor.should_stop,
        "waited": monitor.monitor.agreement.waited,
        "alone": alone,
    }


def train_with_trainer(case: str, output_dir: str) -> dict:
    """``case`` through the Trainer and :class:`MNNCallback` (the Trainer's batches: a distributed sampler)."""
    import torch.distributed as dist
    from helpers import PROBE_DATA, random_sequences, tiny_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from mnn_callback import MNNCallback

    class Collapse(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            kept = CASES[case].get(dist.get_rank())
            if state.global_step == COLLAPSE_STEP and kept is not None:
                collapse(model, kept)

    arguments = TrainingArguments(
        os.path.join(output_dir, case),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        logging_steps=1,
        ddp_timeout=600,  # a collective that waits longer fails the run (default 1800 s: past the test's timeout)
    )
    train = [{"input_ids": ids, "labels": ids} for ids in random_sequences(8 * STEPS, 12, 12, seed=1)]
    trainer = Trainer(model=tiny_model("gpt2", seed=0), args=arguments, train_dataset=train)
    callback = MNNCallback(PROBE_DATA, every_n_steps=2, batch_size=5, sync_timeout=SYNC_TIMEOUT, alert={"stop": True})
    trainer.add_callback(Collapse())  # before the monitor: it probes the collapsed model
    trainer.add_callback(callback)
    trainer.train()
    alarm = callback.monitor.alarm
    return {
        "stopped_at": trainer.state.global_step if trainer.state.global_step < STEPS else None,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "alerts": [alert.step for alert in alarm.alerts],
        "should_stop": callback.monitor.should_stop,
        "waited": callback.monitor.agreement.waited,
        "alone": {},
    }


def main(output_dir: str, flavour: str) -> None:
    import torch.distributed as dist
    from teardown import leave_together

    accelerator = None
    if flavour == "accelerate":
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)  # starts the gloo group
    elif flavour == "ddp":
        dist.init_process_group("gloo")
    elif flavour != "trainer":  # the Trainer starts the group
        raise SystemExit(f"expected ddp, accelerate or trainer, got {flavour!r}")
    report = {}
    for case in CASES if flavour == "ddp" else ("both",):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if flavour == "trainer":
                report[case] = train_with_trainer(case, output_dir)
            else:
                rank = dist.get_rank() if accelerator is None else accelerator.process_index
                report[case] = train(case, output_dir, rank, accelerator)
        report[case]["warnings"] = [[w.category.__name__, str(w.message)] for w in caught]
    with open(os.path.join(output_dir, f"report.{dist.get_rank()}.json"), "w") as handle:
        json.dump(report, handle)
    leave_together()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "ddp")
