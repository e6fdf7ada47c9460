"""Train a tiny GPT-2 with MNNCallback; run under torchrun with 2 processes or plainly with 1.

Usage: ``[torchrun --standalone --nproc_per_node 2] train_ddp.py OUTPUT_DIR``. The learning rate
is 0, so the model stays at its initialisation and every probe must give the same values on
any number of processes.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main(output_dir: str) -> None:
    from helpers import random_sequences, tiny_model
    from teardown import leave_together
    from transformers import Trainer, TrainingArguments

    from mnn_callback import MNNCallback

    model = tiny_model("gpt2", seed=1)
    train = [{"input_ids": ids, "labels": ids} for ids in random_sequences(64, 12, 12, seed=1)]
    args = TrainingArguments(
        output_dir,
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=0.0,
        report_to=["tensorboard"],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        ddp_timeout=600,  # a collective that waits longer fails the run (default 1800 s: past the test's timeout)
    )
    trainer = Trainer(model=model, args=args, train_dataset=train)
    callback = MNNCallback(
        random_sequences(9, 3, 20, seed=3), every_n_steps=4, batch_size=2, log_dir=os.path.join(output_dir, "tb")
    )
    trainer.add_callback(callback)
    trainer.train()
    # as torch asks, the group is destroyed (older accelerate leaves it to the exit), every rank leaving
    # together: a rank exiting straight after the Trainer's last collective was seen to abort in gloo's
    # teardown (torch 2.13, transformers 4.47, accelerate 0.34; rarely). Within a bound: an unbounded
    # barrier once held a fresh-clone CI run until the test's timeout (one rank gone, one in the teardown)
    leave_together()


if __name__ == "__main__":
    main(sys.argv[1])
