"""A plain PyTorch training loop with MNN monitoring: a nanoGPT-style model, no Trainer, no Accelerate.

The model is the shape most pretraining code has (blocks in a ``ModuleList``, ``forward(idx,
targets)``, no ``output_hidden_states``): ``modules=["blocks.*", "ln_f"]`` tells the probe which
outputs are the hidden states. Characters of the bundled text are the tokens, so nothing but torch
is needed. Runs on CPU in a minute, and under ``torch.distributed`` unchanged::

    python examples/plain_loop.py --out runs/plain
    torchrun --standalone --nproc_per_node 2 examples/plain_loop.py --out runs/plain2   # DDP, gloo on CPU

The history goes to ``OUT/mnn_metrics.jsonl`` (and TensorBoard to ``OUT/runs`` when installed);
``OUT/checkpoint.pt`` holds the model, the optimizer and the monitor's state (``--resume`` continues).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional

from mnn_callback import MNNMonitor
from mnn_callback.demo import load_text, split_text


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=x.device), diagonal=1)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT's shape: token and position embeddings, blocks, a final norm, a tied head."""

    def __init__(self, vocab_size: int, block_size: int, layers: int = 4, width: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.block_size = block_size
        self.wte, self.wpe = nn.Embedding(vocab_size, width), nn.Embedding(block_size, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        loss = None if targets is None else functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/plain_loop")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=50, help="probe every N steps")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step and process")
    parser.add_argument("--probe-samples", type=int, default=16)
    parser.add_argument("--no-monitor", action="store_true", help="train without the monitor (for comparison)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[float]:
    args = parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    train_text, heldout_text = split_text(load_text())
    alphabet = sorted(set(train_text + heldout_text))
    encode = {char: index for index, char in enumerate(alphabet)}
    train = torch.tensor([encode[char] for char in train_text[:200_000]])
    heldout = [encode[char] for char in heldout_text]
    probe_data = [heldout[start : start + args.block_size] for start in range(0, 64 * args.block_size, args.block_size)]

    torch.manual_seed(args.seed)
    model = GPT(len(alphabet), args.block_size)
    trained = nn.parallel.DistributedDataParallel(model) if distributed else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    monitor = None
    if not args.no_monitor:
        monitor = MNNMonitor(
            probe_data,
            out_dir=args.out,
            modules=["blocks.*", "ln_f"],  # the hidden states: each block's output, then the final norm
            every_n_steps=args.every,
            max_samples=args.probe_samples,
            max_length=args.block_size,
            batch_size=8,
            dashboards=False,
        )
    start = 0
    checkpoint_path = os.path.join(args.out, "checkpoint.pt")
    if args.resume:
        checkpoint = torch.load(checkpoint_path, weights_only=True)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start = checkpoint["step"]
        if monitor is not None:
            monitor.load_state_dict(checkpoint["mnn"])
    generator = torch.Generator().manual_seed(args.seed + 1000 * rank + start)
    losses = []
    if monitor is not None:
        monitor.step(trained, start)  # the Diff-eRank reference (or, resumed, nothing: already probed)
    for step in range(start + 1, args.steps + 1):
        offsets = torch.randint(0, len(train) - args.block_size - 1, (args.batch_size,), generator=generator)
        batch = torch.stack([train[offset : offset + args.block_size + 1] for offset in offsets.tolist()])
        _, loss = trained(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if monitor is not None:
            monitor.step(trained, step)  # on every process, at every step
    if monitor is not None:
        monitor.finish(trained, args.steps)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": args.steps}
        torch.save({**state, "mnn": monitor.state_dict() if monitor else {}}, checkpoint_path)
        with open(os.path.join(args.out, "losses.txt"), "w", encoding="utf-8") as handle:
            handle.write("\n".join(repr(value) for value in losses) + "\n")
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return losses


if __name__ == "__main__":
    main()
