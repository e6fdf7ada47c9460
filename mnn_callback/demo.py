"""Building blocks of the demo: bundled text, a tokenizer trained locally, tiny GPT-2 models.

Nothing here downloads anything: the text ships with the package, the tokenizer is a
byte-level BPE trained on the training split in well under a second, models are built from a
config and trained from scratch.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent / "data"
SHAKESPEARE = DATA_DIR / "tinyshakespeare.txt"
END_OF_TEXT = "<|endoftext|>"


def load_text(path: str | Path | None = None) -> str:
    """The bundled tiny-shakespeare text, or the UTF-8 text of ``path``."""
    return Path(path or SHAKESPEARE).read_text(encoding="utf-8")


def split_text(text: str, holdout_fraction: float = 0.1) -> tuple[str, str]:
    """Split by position: the first part trains, the last ``holdout_fraction`` is held out.

    The cut is moved forward to the next paragraph boundary (a blank line), so no paragraph
    is shared; no text of the held-out part occurs in the training part by construction.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    cut = int(len(text) * (1.0 - holdout_fraction))
    boundary = text.find("\n\n", cut)
    cut = boundary + 2 if boundary != -1 else cut
    return text[:cut], text[cut:]


def train_tokenizer(text: str, vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer trained on ``text``, as a ``PreTrainedTokenizerFast``.

    ``<|endoftext|>`` is its BOS, EOS and padding token (GPT-2's convention). Save it with
    ``save_pretrained`` next to the checkpoints so post hoc evaluation can load it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.split("\n\n"), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT
    )


def token_chunks(token_ids: list[int], length: int) -> list[list[int]]:
    """Consecutive non-overlapping chunks of ``length`` tokens (the last partial chunk is dropped)."""
    return [token_ids[start : start + length] for start in range(0, len(token_ids) - length + 1, length)]


def tiny_gpt2_config(vocab_size: int, n_layer: int = 4, n_embd: int = 64, n_head: int = 4, n_positions: int = 256):
    """A small GPT-2 configuration (dropout off: a small model on little data trains faster without it)."""
    from transformers import GPT2Config

    if n_embd % n_head:
        raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
    return GPT2Config(
        vocab_size=vocab_size,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_positions=n_positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


# ---------------------------------------------------------------------------------------------
# The demo run
# ---------------------------------------------------------------------------------------------


@dataclass
class DemoData:
    """Tokenizer and token chunks of the bundled text, with the held-out probe sample on disk."""

    tokenizer: Any
    train_chunks: list[list[int]]
    heldout_path: str  # JSONL of {"input_ids": [...]}: the probe sample for the callback and `evaluate`


def prepare_data(
    out_dir: str, seq_len: int = 128, max_train_chars: int | None = None, vocab_size: int = 512
) -> DemoData:
    """Split the bundled text by position, train the tokenizer on the training part, cut both into chunks.

    Saves the tokenizer to ``out_dir/tokenizer`` and the held-out chunks to ``out_dir/heldout.jsonl``.
    """
    os.makedirs(out_dir, exist_ok=True)
    train_text, heldout_text = split_text(load_text())
    train_text = train_text[:max_train_chars]
    tokenizer = train_tokenizer(train_text, vocab_size=vocab_size)
    tokenizer.save_pretrained(os.path.join(out_dir, "tokenizer"))
    heldout_path = os.path.join(out_dir, "heldout.jsonl")
    with open(heldout_path, "w", encoding="utf-8") as handle:
        for chunk in token_chunks(tokenizer(heldout_text)["input_ids"], seq_len):
            handle.write(json.dumps({"input_ids": chunk}) + "\n")
    return DemoData(tokenizer, token_chunks(tokenizer(train_text)["input_ids"], seq_len), heldout_path)


class _Chunks:
    """A map-style dataset of equal-length token chunks for causal-LM training."""

    def __init__(self, chunks: list[list[int]]) -> None:
        self.chunks = chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        ids = torch.tensor(self.chunks[index], dtype=torch.long)
        return {"input_ids": ids, "labels": ids}


def _training_arguments(out_dir: str, *, tensorboard_dir: str | None, wandb: bool, every: int, **options: Any) -> Any:
    """The demo's TrainingArguments (transformers 4 takes the TensorBoard directory as ``logging_dir``)."""
    import transformers
    from transformers import TrainingArguments

    logging_dir = {}
    if tensorboard_dir is not None and int(transformers.__version__.split(".")[0]) < 5:
        logging_dir["logging_dir"] = tensorboard_dir
    steps = options.pop("steps")
    return TrainingArguments(
        out_dir,
        max_steps=steps,
        per_device_train_batch_size=options["batch_size"],
        learning_rate=options["learning_rate"],
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        weight_decay=0.01,
        logging_steps=max(1, min(10, every // 2)),
        save_strategy="steps",
        save_steps=options["save_every"],
        report_to=["tensorboard"] + (["wandb"] if wandb else []),
        use_cpu=options["use_cpu"],
        bf16=options["bf16"],
        seed=options["seed"],
        disable_tqdm=False,
        run_name=os.path.basename(os.path.normpath(out_dir)),
        **logging_dir,
    )


def train_gpt2(
    out_dir: str,
    data: DemoData,
    *,
    n_layer: int = 4,
    n_embd: int = 64,
    n_head: int = 4,
    steps: int = 300,
    every: int = 50,
    schedule: str = "log",
    save_every: int = 100,
    batch_size: int = 16,
    learning_rate: float = 3e-3,
    device: str = "auto",
    bf16: bool = False,
    wandb: bool = False,
    probe_samples: int = 32,
    seed: int = 0,
    tensorboard_dir: str | None = None,
) -> Any:
    """Train a GPT-2 from scratch with the HF Trainer and :class:`MNNCallback`; returns the Trainer.

    ``tensorboard_dir``: where the Trainer's and the callback's TensorBoard scalars go (one run);
    default: the Trainer's own ``output_dir/runs/<time>_<host>``.
    """
    import torch
    import transformers
    from transformers import GPT2LMHeadModel, Trainer

    from mnn_callback.adapters.callback import MNNCallback

    seq_len = len(data.train_chunks[0])
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(tiny_gpt2_config(len(data.tokenizer), n_layer, n_embd, n_head, n_positions=seq_len))
    use_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    args = _training_arguments(
        out_dir,
        steps=steps,
        every=every,
        save_every=save_every,
        batch_size=batch_size,
        learning_rate=learning_rate,
        use_cpu=use_cpu,
        bf16=bf16,
        wandb=wandb,
        seed=seed,
        tensorboard_dir=tensorboard_dir,
    )
    environment = {}
    if tensorboard_dir is not None and int(transformers.__version__.split(".")[0]) >= 5:
        environment["TENSORBOARD_LOGGING_DIR"] = tensorboard_dir  # transformers 5 reads it from the environment
    callback = MNNCallback(
        data.heldout_path,
        every_n_steps=every,
        schedule=schedule,  # 0, 1, 2, 4, ..., 32, then every `every`: the early collapse at a sparse cadence's cost
        max_samples=probe_samples,
        max_length=seq_len,
        batch_size=16,
        pack=True,  # every probe sequence has exactly seq_len tokens: values comparable over the run
        log_dir=tensorboard_dir,
    )
    with _environment(environment):
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=_Chunks(data.train_chunks),
            processing_class=data.tokenizer,
            callbacks=[callback],
        )
        # The untrained model as checkpoint-0, so post hoc evaluation starts where the callback did.
        trainer.save_model(os.path.join(out_dir, "checkpoint-0"))
        trainer.train()
    return trainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mnn-callback demo",
        description="Train a tiny GPT-2 from scratch on bundled Shakespeare and watch its representations compress.",
    )
    parser.add_argument("--out", default="mnn_demo", help="output directory (default: mnn_demo)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default: 300)")
    parser.add_argument("--every", type=int, default=50, help="probe every N steps (default: 50)")
    parser.add_argument(
        "--schedule",
        choices=["fixed", "log"],
        default="log",
        help="log: also at steps 1, 2, 4, ... below --every (default: log)",
    )
    parser.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (default: 100)")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--probe-samples", type=int, default=32, help="held-out sequences per probe")
    parser.add_argument("--max-train-chars", type=int, default=None, help="train on only this much text")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--bf16", action="store_true", help="train in bfloat16 mixed precision")
    parser.add_argument("--wandb", action="store_true", help="also log to W&B (offline when no key is configured)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--docs-images", default=None, help="also copy the README figures into this directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """``mnn-callback demo``: train, evaluate the checkpoints post hoc, plot, and say where everything is."""
    args = parse_args(argv)
    if args.wandb and importlib.util.find_spec("wandb") is None:
        print(
            "mnn-callback: error: --wandb needs wandb, which is not installed: pip install 'mnn-callback[wandb]'",
            file=sys.stderr,
        )
        return 2
    if args.wandb and not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
        print("W&B: no API key configured, logging offline (wandb sync later to upload); set WANDB_MODE to choose")
        with _environment({"WANDB_MODE": "offline"}):
            return _run(args)
    return _run(args)


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """Set environment variables for the duration of the block (the Trainer reads them at construction)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _figures(out: str, posthoc: str, docs_images: str | None) -> list[str]:
    """The demo's PNGs: from the run's history and from the post hoc results."""
    from mnn_callback.output import plots
    from mnn_callback.output.tables import load_table

    plot_dir = os.path.join(out, "plots")
    history = load_table(out)
    figures = plots.plot_all(history, plot_dir)
    profile = plots.layer_profile_figure(history)
    figures.append(plots.save_figure(profile, os.path.join(plot_dir, "layer_profile.png")))
    if os.path.isfile(os.path.join(posthoc, "metrics.csv")):
        approximation = plots.plot_approximation(
            load_table(os.path.join(posthoc, "metrics.csv")), os.path.join(plot_dir, "checkpoints_approximation.png")
        )
        figures += [approximation] if approximation else []
    if docs_images:
        os.makedirs(docs_images, exist_ok=True)
        for figure in figures:
            shutil.copy(figure, os.path.join(docs_images, "demo_" + os.path.basename(figure)))
    return figures


def _run(args: argparse.Namespace) -> int:
    from mnn_callback.adapters.callback import MNNCallback
    from mnn_callback.output.files import read_jsonl
    from mnn_callback.output.tables import write_csv
    from mnn_callback.posthoc.evaluation import evaluate_models, latest_rows

    started = time.perf_counter()
    data = prepare_data(args.out, seq_len=args.seq_len, max_train_chars=args.max_train_chars)
    trainer = train_gpt2(
        args.out,
        data,
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_head=args.n_head,
        steps=args.steps,
        every=args.every,
        schedule=args.schedule,
        save_every=args.save_every,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        device=args.device,
        bf16=args.bf16,
        wandb=args.wandb,
        probe_samples=args.probe_samples,
        seed=args.seed,
        tensorboard_dir=os.path.join(args.out, "tensorboard"),
    )
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, MNNCallback))
    posthoc = os.path.join(args.out, "posthoc")
    os.makedirs(posthoc, exist_ok=True)
    results_file = os.path.join(posthoc, "metrics.jsonl")
    rows = evaluate_models(
        [args.out],
        data.heldout_path,
        results_file=results_file,
        device=args.device,
        max_samples=args.probe_samples,
        max_length=args.seq_len,
        batch_size=16,
        pack=True,
    )
    write_csv(os.path.join(posthoc, "metrics.csv"), latest_rows(read_jsonl(results_file)))
    figures = _figures(args.out, posthoc, args.docs_images)
    tensorboard_dir = callback.tensorboard_dir
    lines = [
        "",
        f"Done in {time.perf_counter() - started:.0f} s. Everything is in {args.out}/:",
        f"  TensorBoard logs   {tensorboard_dir}   (tensorboard --logdir {tensorboard_dir})",
        f"  probe history      {os.path.join(args.out, 'mnn_metrics.jsonl')}",
        f"  checkpoints        {os.path.join(args.out, 'checkpoint-*')}  (each with mnn_metrics.json)",
        f"  post hoc metrics   {os.path.join(posthoc, 'metrics.csv')}",
        f"  plots              {', '.join(figures)}",
    ]
    if callback.wandb_dir:
        lines.append(
            f"  W&B run            {callback.wandb_dir}   (wandb sync {callback.wandb_dir} to upload an offline run)"
        )
    print("\n".join(lines))
    return 1 if any(row.get("error") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
