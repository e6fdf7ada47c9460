"""Faults in a 2-process DDP Trainer run (torchrun, gloo): the run must finish, never hang.

Usage: ``torchrun --standalone --nproc_per_node 2 train_ddp_faults.py OUTPUT_DIR`` (also runs with 1
process). Two trainings in the same processes:

- ``OUTPUT_DIR/mixed``: each process is given other probe data (process 0 its own, process 1 other
  sequences), and from step 4 on the probe's forward fails on process 1 only (as an out-of-memory
  error on the rank with the longest sequences would);
- ``OUTPUT_DIR/vocab``: the probe sample holds a token id beyond the model's vocabulary, in a
  sequence that process 1's shard holds;
- ``OUTPUT_DIR/schedule``: process 1 is given another ``every_n_steps`` (a user error): one error
  on process 0, the monitor off on every process, no hang;
- ``OUTPUT_DIR/strict``: other data per process again, with ``strict=True``: every process raises.

Each process writes ``report.<rank>.json``: the warnings it raised and the strict run's error.
"""

import json
import os
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def train(
    output_dir: str, probe_data: list[list[int]], fail_from_step: int | None, strict: bool = False, every: int = 2
) -> None:
    import torch.distributed as dist
    from helpers import VOCAB, random_sequences, tiny_model
    from transformers import Trainer, TrainingArguments

    from mnn_callback import MNNCallback

    model = tiny_model("gpt2", seed=1)
    args = TrainingArguments(
        output_dir,
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=0.0,  # the model stays as it is: every probe must give the single-process values
        report_to="none",
        save_strategy="no",
        use_cpu=True,
    )
    train_data = [{"input_ids": ids, "labels": ids} for ids in random_sequences(64, 12, 12, seed=1)]
    trainer = Trainer(model=model, args=args, train_dataset=train_data)
    callback = MNNCallback(probe_data, every_n_steps=every, batch_size=2, strict=strict)
    trainer.add_callback(callback)
    if fail_from_step is not None and dist.is_initialized() and dist.get_rank() == 1:

        def out_of_memory(module, inputs):
            if not module.training and trainer.state.global_step >= fail_from_step:
                raise RuntimeError("simulated: CUDA out of memory on this process only")

        model.transformer.h[0].register_forward_pre_hook(out_of_memory)
    trainer.train()
    assert trainer.state.global_step == 8 and model.config.vocab_size == VOCAB


def main(output_dir: str) -> None:
    import torch.distributed as dist
    from helpers import VOCAB, random_sequences

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rank = int(os.environ.get("RANK", "0"))
        own_data = random_sequences(9, 3, 20, seed=3 + rank)  # process 1 was given other data
        train(os.path.join(output_dir, "mixed"), own_data, fail_from_step=4)
        bad = random_sequences(9, 3, 20, seed=3)
        bad[1][0] = VOCAB + 5  # sequences are dealt out by length in micro-batches of 2: process 1 holds this one
        train(os.path.join(output_dir, "vocab"), bad, fail_from_step=None)
        same = random_sequences(9, 3, 20, seed=3)
        train(os.path.join(output_dir, "schedule"), same, fail_from_step=None, every=2 + rank)
    try:
        train(os.path.join(output_dir, "strict"), own_data, fail_from_step=None, strict=True)
        strict_error = None
    except ValueError as error:
        strict_error = str(error)
    rank = dist.get_rank() if dist.is_initialized() else 0
    messages = [str(warning.message) for warning in caught if warning.category.__name__ == "MNNWarning"]
    with open(os.path.join(output_dir, f"report.{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump({"warnings": messages, "strict_error": strict_error}, handle)
    if dist.is_initialized():  # as torch asks: older accelerate leaves the group to the exit
        dist.barrier()  # every rank leaves together (see train_ddp.py)
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
