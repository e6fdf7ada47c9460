"""Building blocks of the demo: bundled text, a tokenizer trained locally, tiny GPT-2 models.

Nothing here downloads anything: the text ships with the package, the tokenizer is a
byte-level BPE trained on the training split in well under a second, models are built from a
config and trained from scratch.
"""

from __future__ import annotations

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
