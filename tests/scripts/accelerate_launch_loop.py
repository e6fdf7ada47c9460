"""A custom Accelerate loop around a tiny GPT-2 (DDP, dropout on), with or without the MNN hook.

Usage: ``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --main_process_port PORT
accelerate_launch_loop.py OUTPUT_DIR {hook,off}`` (or plainly, one process). On a machine without
GPUs ``--cpu --num_processes 2`` starts one process, and ``--multi_gpu`` without
``ACCELERATE_USE_CPU`` two processes that each see an accelerator of one process: the script
refuses to run unless the accelerator's process count is torchrun's ``WORLD_SIZE``.

Six optimizer steps of AdamW (lr 1e-2) on shuffled batches of 2 sequences per process; with
``hook``, an ``MNNAccelerateHook`` probes at steps 0, 3 and 6 (``hook.finish`` at 6: already
probed) and writes ``OUTPUT_DIR/mnn_metrics.jsonl`` from the main process. Every process writes
its losses (``loss.item()``, exact in JSON) and how it was launched to ``OUTPUT_DIR/rank{i}.json``;
the main process saves the final weights to ``OUTPUT_DIR/final.pt``.
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

STEPS, EVERY = 6, 3
PROBE_SEED, MODEL_SEED = 3, 1


def probe_data() -> list[list[int]]:
    """Nine sequences at ``batch_size=2``: on 2 processes one makes a dummy forward pass."""
    from helpers import random_sequences

    return random_sequences(9, 3, 20, seed=PROBE_SEED)


def launch_facts(accelerator) -> dict:
    """How this process was started, for the test to check; refuses a launch that is not one run."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != world:
        raise SystemExit(f"expected an accelerator of {world} processes (WORLD_SIZE), got {accelerator.num_processes}")
    return {
        "process_index": accelerator.process_index,
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "is_main_process": accelerator.is_main_process,
    }


def train(accelerator, hook) -> list[float]:
    """The loop: the same on every process and with or without the hook; returns this process's losses."""
    import torch
    from helpers import random_sequences, tiny_model

    model = tiny_model("gpt2", seed=MODEL_SEED)  # GPT-2's dropout (0.1) is on: the losses read the RNG
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = torch.utils.data.DataLoader(torch.tensor(random_sequences(32, 12, 12, seed=1)), batch_size=2, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    losses: list[float] = []
    if hook is not None:
        hook.step(model, 0)  # the Diff-eRank reference
    model.train()
    for step, batch in enumerate(loader, start=1):
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if hook is not None:
            hook.step(model, step)  # on every process
        if step == STEPS:
            break
    if hook is not None:
        hook.finish(model, STEPS)
    if accelerator.is_main_process:
        torch.save(accelerator.unwrap_model(model).state_dict(), os.path.join(accelerator.project_dir, "final.pt"))
    return losses


def main(output_dir: str, mode: str) -> None:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from teardown import leave_together

    from mnn_callback import MNNAccelerateHook

    if mode not in ("hook", "off"):
        raise SystemExit(f"expected mode 'hook' or 'off', got {mode!r}")
    accelerator = Accelerator(project_dir=output_dir)
    facts = launch_facts(accelerator)
    set_seed(0)
    hook = None
    if mode == "hook":
        hook = MNNAccelerateHook(accelerator, probe_data(), every_n_steps=EVERY, batch_size=2, strict=True)
    losses = train(accelerator, hook)
    with open(os.path.join(output_dir, f"rank{accelerator.process_index}.json"), "w", encoding="utf-8") as handle:
        json.dump({**facts, "losses": losses}, handle)
    accelerator.end_training()
    leave_together()  # every rank leaves the gloo group together, within a bound


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
