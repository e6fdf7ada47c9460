"""A complete custom Accelerate training loop with MNN monitoring: a tiny GPT-2 on bundled text.

Runs on CPU in a couple of minutes, and unchanged on GPUs or several processes::

    python examples/accelerate_loop.py --out runs/accelerate
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 examples/accelerate_loop.py  # CPU
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_loop.py --out runs/accelerate2   # GPUs
    torchrun --standalone --nproc_per_node 2 examples/accelerate_loop.py --out runs/accelerate2   # CPU: gloo

TensorBoard logs go to ``OUT/accelerate_loop`` (``tensorboard --logdir OUT``), the history to
``OUT/mnn_metrics.jsonl``; ``--wandb`` adds W&B (offline when no key is configured).
"""

from __future__ import annotations

import argparse
import math
import os

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

from mnn_callback import MNNAccelerateHook
from mnn_callback.demo import load_text, split_text, tiny_gpt2_config, token_chunks, train_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/accelerate_loop", help="output directory")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--every", type=int, default=20, help="probe every N steps")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step, over all processes")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--probe-samples", type=int, default=32)
    parser.add_argument("--max-train-chars", type=int, default=None, help="train on only this many characters")
    parser.add_argument("--save-every", type=int, default=0, help="accelerator.save_state every N steps (0: never)")
    parser.add_argument("--resume", default=None, help="a directory written by accelerator.save_state")
    parser.add_argument("--wandb", action="store_true", help="also log to W&B (offline without a key)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


class Progress:
    """The loop's step, saved and restored by accelerator.save_state / load_state with everything else."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    trackers = ["tensorboard"] + (["wandb"] if args.wandb else [])
    if args.wandb and not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")
    accelerator = Accelerator(log_with=trackers, project_dir=args.out)
    set_seed(args.seed)

    train_text, heldout_text = split_text(load_text())
    train_text = train_text[: args.max_train_chars]
    tokenizer_dir = os.path.join(args.out, "tokenizer")
    with accelerator.main_process_first():
        if accelerator.is_main_process and not os.path.isdir(tokenizer_dir):
            train_tokenizer(train_text).save_pretrained(tokenizer_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)

    train_ids = tokenizer(train_text)["input_ids"]
    train_chunks = torch.tensor(token_chunks(train_ids, args.seq_len))
    probe_chunks = token_chunks(tokenizer(heldout_text)["input_ids"], args.seq_len)

    per_process = max(1, args.batch_size // accelerator.num_processes)
    loader = torch.utils.data.DataLoader(train_chunks, batch_size=per_process, shuffle=True, drop_last=True)
    model = GPT2LMHeadModel(tiny_gpt2_config(len(tokenizer), args.n_layer, args.n_embd, n_positions=args.seq_len))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    hook = MNNAccelerateHook(
        accelerator, probe_chunks, every_n_steps=args.every, max_samples=args.probe_samples, batch_size=8
    )
    progress = Progress()
    accelerator.register_for_checkpointing(hook, progress)  # the curves and the step survive save/load_state
    if args.resume:
        accelerator.load_state(args.resume)
    accelerator.init_trackers("accelerate_loop", config={k: v for k, v in vars(args).items() if v is not None})

    hook.step(model, progress.step, optimizer=optimizer)  # before the first optimizer step: the reference
    step, batches = progress.step, iter(loader)
    model.train()
    while step < args.steps:
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            continue
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        accelerator.log({"train/loss": loss.item()}, step=step)
        values = hook.step(model, step, optimizer=optimizer)  # every process calls it
        if values and accelerator.is_main_process:
            last_mnn = values.get(f"mnn/layer_{args.n_layer}", math.nan)
            print(f"step {step}: loss {loss.item():.3f}, MNN (last layer) {last_mnn:.4f}")
        if args.save_every and step % args.save_every == 0:
            progress.step = step
            accelerator.save_state(os.path.join(args.out, "checkpoints", f"step_{step}"))
    hook.finish(model, step, optimizer=optimizer)  # the final state, the last figures; on every process
    accelerator.end_training()
    if accelerator.is_main_process:
        print(f"TensorBoard: tensorboard --logdir {args.out}; history: {os.path.join(args.out, 'mnn_metrics.jsonl')}")


if __name__ == "__main__":
    main()
