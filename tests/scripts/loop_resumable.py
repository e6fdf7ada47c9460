"""A plain PyTorch loop with MNNMonitor, killed after a probe past its last checkpoint, then resumed.

Usage: ``loop_resumable.py OUT_DIR kill|resume``. ``kill`` trains a tiny GPT-2 from scratch,
probing every 2 steps, saves ``OUT_DIR/checkpoint.pt`` (model, optimizer, monitor state) at step
20 and kills itself with SIGKILL right after the probe at step 22. ``resume`` continues from that
checkpoint to step 26 (on other batches, as a loop seeding its batches with the start step does)
and prints, last, a JSON line with the monitor's history.
"""

import json
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

CHECKPOINT_STEP, KILLED_AFTER, LAST_STEP = 20, 22, 26


def main(out_dir: str, phase: str) -> None:
    from helpers import VOCAB, random_sequences, tiny_model

    from mnn_callback import MNNMonitor

    model = tiny_model("gpt2")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    monitor = MNNMonitor(
        random_sequences(6, 4, 16, seed=3), out_dir=out_dir, every_n_steps=2, sinks=["jsonl"], dashboards=False
    )
    checkpoint_path = os.path.join(out_dir, "checkpoint.pt")
    start = 0
    if phase == "resume":
        checkpoint = torch.load(checkpoint_path, weights_only=True)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        monitor.load_state_dict(checkpoint["mnn"])
        start = checkpoint["step"]
    generator = torch.Generator().manual_seed(start)
    monitor.step(model, start)
    for step in range(start + 1, LAST_STEP + 1):
        batch = torch.randint(1, VOCAB, (4, 12), generator=generator)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        monitor.step(model, step)
        if phase == "kill" and step == CHECKPOINT_STEP:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
            torch.save({**state, "mnn": monitor.state_dict()}, checkpoint_path)
        if phase == "kill" and step == KILLED_AFTER:
            os.kill(os.getpid(), signal.SIGKILL)
    monitor.finish(model, LAST_STEP)
    print(json.dumps({"history": monitor.history}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
