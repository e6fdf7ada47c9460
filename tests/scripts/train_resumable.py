"""Train a tiny GPT-2 with MNNCallback, checkpointing every 2 steps; resume from the last complete checkpoint.

Usage: ``train_resumable.py OUTPUT_DIR MAX_STEPS|finish``. ``finish`` resumes and trains 10 steps
past the last complete checkpoint. Prints, last, a JSON line with the checkpoint it resumed from
and the steps of the callback's history.
"""

import glob
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def last_complete_checkpoint(output_dir):
    """The newest checkpoint whose trainer_state.json (the Trainer writes it last) is intact."""
    best = None
    for path in glob.glob(os.path.join(output_dir, "checkpoint-*")):
        try:
            with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as handle:
                step = json.load(handle)["global_step"]
        except (OSError, ValueError, KeyError):
            continue
        if best is None or step > best[0]:
            best = (step, path)
    return best


def main(output_dir: str, limit: str) -> None:
    from helpers import random_sequences, tiny_model
    from transformers import Trainer, TrainingArguments

    from mnn_callback import MNNCallback

    resume = last_complete_checkpoint(output_dir)
    max_steps = (resume[0] if resume else 0) + 10 if limit == "finish" else int(limit)
    args = TrainingArguments(
        output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=4,
        save_strategy="steps",
        save_steps=2,
        save_total_limit=4,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        lr_scheduler_type="constant",
        seed=0,
    )
    train = [{"input_ids": ids, "labels": ids} for ids in random_sequences(4000, 12, 12, seed=1)]
    callback = MNNCallback(random_sequences(6, 4, 16, seed=3), every_n_steps=2)
    trainer = Trainer(model=tiny_model("gpt2"), args=args, train_dataset=train, callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume[1] if resume else None)
    steps = [entry["step"] for entry in callback.history]
    print(json.dumps({"resumed_from": resume[1] if resume else None, "steps": steps, "max_steps": max_steps}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
