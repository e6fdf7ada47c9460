"""Which part of a model the probe runs, and the probe's next-token loss.

* An encoder-decoder (T5, BART, ...: ``config.is_encoder_decoder``) is probed by its encoder
  (``model.get_encoder()``) on the sample as the source sequence: its forward needs decoder
  inputs the probe does not have, and the encoder's hidden states are what the sample is read
  into. The encoder alone has no language-model loss (the training objective is the decoder's
  cross-entropy on targets the probe does not have), so there is none: the probe invents no
  target. ``modules=``/``forward=`` given by the user are honoured as they are.
* A masked language model (``...ForMaskedLM``: BERT, RoBERTa, ...) has no next-token loss: its
  logits predict each (masked) token from both sides, so ``compute_loss=True`` is refused.
* A sentence-transformers ``SentenceTransformer`` is probed through its transformer.
* PEFT wrappers (``PeftModel``, ...) are looked through to the class that says whether a model is
  a causal language model (and so has a loss).
* The loss: a Hugging Face model's own ``loss`` (the probe passes ``labels``), else the probe's
  own causal-LM cross-entropy of the output's logits (:func:`next_token_loss`).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mnn_callback.probing.emitters import inspectable

__all__ = ["ENCODER", "NO_LOGITS", "is_causal_lm", "logits_of", "next_token_loss", "probed_part"]

ENCODER = "encoder"  # result.config["probed"] of an encoder-decoder
logger = logging.getLogger("mnn_callback")
_announced: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _peft_base(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (``get_base_model()``); ``model`` otherwise."""
    getter = getattr(model, "get_base_model", None)
    if type(model).__module__.startswith("peft.") and callable(getter):
        base = getter()
        if isinstance(base, nn.Module):
            return base
    return model


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a causal language model by its class name (``...ForCausalLM``, ``...LMHeadModel``),
    looking through DDP/FSDP, compile and PEFT wrappers (a ``PeftModel`` around ``GPT2LMHeadModel`` is one)."""
    inner = inspectable(model)
    return any(type(m).__name__.endswith(("ForCausalLM", "LMHeadModel")) for m in (inner, _peft_base(inner)))


def _encoder_of(model: nn.Module) -> nn.Module | None:
    """The encoder of an encoder-decoder model (``config.is_encoder_decoder`` and a ``get_encoder()``
    returning another module); None for any other model, an encoder itself included."""
    inner = inspectable(model)
    if not getattr(getattr(inner, "config", None), "is_encoder_decoder", False):
        return None
    getter = getattr(inner, "get_encoder", None)
    try:
        encoder = getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        encoder = None
    if not isinstance(encoder, nn.Module) or encoder is inner:
        return None
    return encoder


def _refuse_masked_lm_loss(model: nn.Module, compute_loss: bool | None) -> None:
    """``ValueError`` for ``compute_loss=True`` on a masked language model (``...ForMaskedLM``, inside a
    PEFT wrapper too): its logits are no next-token predictions, and its own ``labels`` loss is a
    masked-LM loss, not the next-token NLL ``probe/loss`` is."""
    inner = inspectable(model)
    masked = [type(m).__name__ for m in (inner, _peft_base(inner)) if type(m).__name__.endswith("ForMaskedLM")]
    if compute_loss and masked:
        raise ValueError(
            f"compute_loss=True, but {masked[0]} is a masked language model, which has no next-token loss (its "
            "logits predict each token from both sides; its own labels loss is a masked-LM loss): leave "
            "compute_loss unset"
        )


def probed_part(model: nn.Module, *, custom: bool, compute_loss: bool | None) -> tuple[nn.Module, str | None]:
    """The module the probe runs for ``model`` and which part of it that is (None: the model as given).

    A ``SentenceTransformer``'s transformer (its first module's ``auto_model``); with ``custom``
    (the user named ``modules=`` or ``forward=``) the model as given; else an encoder-decoder's
    encoder (``"encoder"``, one INFO line per model), or ``model``. An encoder-decoder that has no
    ``get_encoder()`` is a ``TypeError``; ``compute_loss=True`` for an encoder or a masked language
    model a ``ValueError``.
    """
    _refuse_masked_lm_loss(model, compute_loss)
    inner = inspectable(model)
    name = type(inner).__name__
    if name == "SentenceTransformer" and isinstance(inner, nn.Sequential) and len(inner):
        auto_model = getattr(inner[0], "auto_model", None)
        if isinstance(auto_model, nn.Module):
            return auto_model, None
    if custom:
        return model, None
    encoder = _encoder_of(model)
    if encoder is None:
        if getattr(getattr(inner, "config", None), "is_encoder_decoder", False) and hasattr(inner, "decoder"):
            raise TypeError(
                f"{name} is an encoder-decoder model without get_encoder(): pass modules=[...] naming its encoder's "
                "layers and forward=lambda model, input_ids, attention_mask: ... calling its encoder"
            )
        return model, None
    if compute_loss:
        raise ValueError(
            f"compute_loss=True, but {name} is an encoder-decoder, probed by its encoder, which has no next-token "
            "loss (the training loss needs decoder targets the probe does not have): leave compute_loss unset"
        )
    if model not in _announced:
        _announced.add(model)
        logger.info(
            "%s is an encoder-decoder: the probe measures its encoder's hidden states (%s) on the sample as the "
            "source sequence; no probe loss",
            name,
            type(encoder).__name__,
        )
    return encoder, ENCODER


NO_LOGITS = (
    "a (batch, tokens, vocabulary) tensor, an output with .logits, a mapping with 'logits', or a tuple or list "
    "whose first element is such a tensor, like nanoGPT's (logits, loss)"
)


def logits_of(output: Any) -> Tensor | None:
    """The logits in a model's output (the forms of :data:`NO_LOGITS`): a 3-D tensor itself, an output's
    ``.logits``, a mapping's ``"logits"``, or the first element of a tuple or list when it is a 3-D tensor."""
    if isinstance(output, (tuple, list)) and not hasattr(output, "logits"):
        output = output[0] if output and isinstance(output[0], Tensor) else None
    if output is None:
        return None
    if isinstance(output, Tensor):
        return output if output.dim() == 3 else None
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    return logits if isinstance(logits, Tensor) else None


def next_token_loss(
    logits: Tensor, input_ids: Tensor, attention_mask: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """The summed next-token negative log-likelihood (nats) of a micro-batch and how many tokens it covers.

    With logits z (batch, T, V), ids x and mask m (right padding)::

        L = sum over b, t < T-1 with m[b, t+1] = 1 of  logsumexp(z[b, t]) - z[b, t, x[b, t+1]]

    the same tokens as Hugging Face's shifted ``labels`` loss. Each term in ``dtype`` (float32 or
    float64; the logits are upcast, never computed lower), the sum in float64.
    """
    batch, tokens = input_ids.shape
    if logits.dim() != 3 or tuple(logits.shape[:2]) != (batch, tokens):
        raise ValueError(
            f"expected logits of shape (batch, tokens, vocabulary) = ({batch}, {tokens}, V) for the probe loss, "
            f"got {tuple(logits.shape)}"
        )
    targets = input_ids[:, 1:].to(logits.device)
    keep = attention_mask[:, 1:].to(logits.device) != 0
    terms = torch.nn.functional.cross_entropy(
        logits[:, :-1].to(dtype).flatten(0, 1), targets.flatten(), reduction="none"
    ).view_as(targets)
    return terms.masked_fill(~keep, 0).to(torch.float64).sum(), keep.sum().to(torch.float64)
