"""The responses a ranking scores: how a model answers a prompt, which tokens are measured, how repetitive they are.

Two recipes:

- ``"greedy"`` (the default): a greedy answer (up to 128 new tokens), measured inside one forward
  over prompt + response, on the response tokens only. Deterministic, and cheaper.
- ``"authors"``: the MNN authors' code (``MLGroupJLU/MatrixNuclearNorm``): an answer sampled at
  temperature 0.7 (no top-k or top-p cut, none of the model's ``generation_config`` penalties;
  seeded) up to 1000 new tokens, decoded to text, then re-tokenised on its own (the tokenizer's
  default special tokens, no prompt) and measured whole.

The greedy recipe turns sampling off and keeps the rest of the model's ``generation_config`` (a
repetition penalty, an n-gram ban, beams set there still apply): the answer as the model is set up to give it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from mnn_callback.probing.emitters import model_device

__all__ = [
    "RECIPES",
    "authors_sampling",
    "default_max_new_tokens",
    "encode_prompt",
    "repeated_ngram_share",
    "respond",
    "scored_item",
    "seeded",
]

RECIPES = ("greedy", "authors")
AUTHORS_TEMPERATURE = 0.7


def default_max_new_tokens(recipe: str) -> int:
    """128 for the greedy recipe, the authors' 1000 for theirs."""
    if recipe not in RECIPES:
        raise ValueError(f"expected a recipe in {RECIPES}, got {recipe!r}")
    return 1000 if recipe == "authors" else 128


@contextlib.contextmanager
def seeded(model: nn.Module, seed: int) -> Iterator[None]:
    """The global RNG of the CPU and of the GPUs ``model`` lives on, seeded, then restored as it was.

    Other GPUs are neither initialised nor touched (``torch.manual_seed`` would seed every one).
    """
    gpus = sorted(
        {p.device.index for p in model.parameters() if p.device.type == "cuda" and p.device.index is not None}
    )
    with torch.random.fork_rng(devices=gpus):
        torch.random.default_generator.manual_seed(seed)
        for gpu in gpus:
            with torch.cuda.device(gpu):
                torch.cuda.manual_seed(seed)
        yield


def encode_prompt(tokenizer: Any, prompt: str, chat_template: bool) -> list[int]:
    """The prompt's token ids: through the tokenizer's chat template (a user turn) when it has one."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    return list(tokenizer(prompt)["input_ids"])


# what a model's generation_config may set that shapes the next-token distribution, and the value that
# turns it off; the authors' vLLM call (SamplingParams(temperature=0.7, max_tokens=1000)) applied none of them
_NEUTRAL = {
    "top_h": None,
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "sequence_bias": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "min_length": 0,
    "min_new_tokens": 0,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
    "guidance_scale": None,
    "renormalize_logits": False,
    "watermarking_config": None,
    "stop_strings": None,
    "num_beams": 1,
    "num_return_sequences": 1,
}


def authors_sampling(model: nn.Module) -> dict[str, Any]:
    """The authors' sampling as ``generate`` keyword arguments: temperature 0.7, no top-k or top-p cut, and
    the neutral value of every other setting the model's ``generation_config`` holds (a repetition penalty,
    an n-gram ban, beams, ...), which ``generate`` would otherwise apply. Its token ids (eos, pad, bos) stay."""
    sampling: dict[str, Any] = {"do_sample": True, "temperature": AUTHORS_TEMPERATURE, "top_k": 0, "top_p": 1.0}
    config = getattr(model, "generation_config", None)
    for name, neutral in _NEUTRAL.items():
        if getattr(config, name, None) not in (None, neutral):
            sampling[name] = neutral
    return sampling


@torch.no_grad()
def respond(
    model: nn.Module, tokenizer: Any, prompt_ids: list[int], max_new_tokens: int, recipe: str = "greedy"
) -> list[int]:
    """The response's token ids, up to and without the first end-of-sequence token.

    Sampling (the authors' recipe) draws from the global RNG: the caller seeds it (:func:`seeded`).
    """
    device = model_device(model)  # the first device of a model dispatched over several
    input_ids = torch.tensor([prompt_ids], device=device)
    eos = tokenizer.eos_token_id
    sampling = authors_sampling(model) if recipe == "authors" else {"do_sample": False}
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        **sampling,
    )
    response = output[0, len(prompt_ids) :].tolist()
    return response[: response.index(eos)] if eos in response else response


def scored_item(recipe: str, tokenizer: Any, prompt_ids: list[int], response_ids: list[int]) -> dict[str, Any]:
    """The probe item of one answer: prompt + response measured from the response (greedy), or the
    response's text re-tokenised on its own (authors)."""
    if recipe == "authors":
        text = tokenizer.decode(response_ids, skip_special_tokens=True)
        return {"input_ids": list(tokenizer(text)["input_ids"]), "measure_from": 0}
    return {"input_ids": prompt_ids + response_ids, "measure_from": len(prompt_ids)}


def repeated_ngram_share(tokens: list[int], n: int = 4) -> float:
    """Share of a sequence's n-grams that repeat an earlier one: 1 - distinct / all (0: none; NaN: no n-gram).

    Example:
        >>> repeated_ngram_share([1, 2, 3, 4, 5, 6]), round(repeated_ngram_share([7, 8] * 6, n=2), 4)  # 1 - 2/11
        (0.0, 0.8182)
    """
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else float("nan")
