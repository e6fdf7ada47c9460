"""The probe: a fixed held-out sample through the current model, per-layer metrics in one pass.

:class:`Probe` fixes its sample once, at construction (:mod:`mnn_callback.probing.sample`);
:meth:`Probe.run` sends it through a model in micro-batches and turns each chosen hidden state
into data-set metrics as soon as that layer's activations exist (forward hooks), so the extra
memory stays near one layer's activations for one micro-batch. Training is left untouched
(:mod:`mnn_callback.probing.training_state`). Under ``torch.distributed`` the sample is sharded and the
sums are all-reduced, so every process gets the single-process result.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mnn_callback.core.errors import MNNWarning
from mnn_callback.core.metrics import METHODS
from mnn_callback.probing.distributed import all_gather_object, all_reduce, broadcast_object, world
from mnn_callback.probing.emitters import (
    Emitters,
    accepted_kwargs,
    calibrate,
    inspectable,
    model_device,
    named_emitters,
    position_limit,
    vocabulary_size,
)
from mnn_callback.probing.measuring import RunState, raise_if_failed_anywhere
from mnn_callback.probing.parts import is_causal_lm, probed_part
from mnn_callback.probing.results import ProbeResult
from mnn_callback.probing.sample import check_token_range, fingerprint, fixed_sample, load_tokenizer, packed_sample
from mnn_callback.probing.training_state import preserved_training_state

__all__ = ["Probe", "ProbeResult", "preserved_training_state"]

LayerSpec = str | int | Sequence[int]
logger = logging.getLogger("mnn_callback")


def _validate_layers(layers: LayerSpec) -> str | tuple[int, ...]:
    if isinstance(layers, str):
        if layers not in ("all", "last"):
            raise ValueError(f"layers must be 'all', 'last' or a list of hidden-state indices, got {layers!r}")
        return layers
    if isinstance(layers, int) and not isinstance(layers, bool):
        return (layers,)
    if isinstance(layers, Sequence) and layers and all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        return tuple(layers)
    raise ValueError(f"layers must be 'all', 'last' or a non-empty list of hidden-state indices, got {layers!r}")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _not_hugging_face(model: nn.Module, error: TypeError) -> str:
    """What to do when a model is not called like a Hugging Face model (or returns no hidden states)."""
    name = type(inspectable(model)).__name__
    if "hidden states" in str(error):
        return str(error)
    return (
        f"{name} cannot be probed as a Hugging Face model ({error}): pass modules=[...] naming the modules whose "
        "outputs are the hidden states (e.g. modules=['transformer.h.*']) and, if it is not called as "
        "model(input_ids), forward=lambda model, input_ids, attention_mask: ..."
    )


class Probe:
    """A fixed held-out sample and the per-layer compression metrics of a model on it.

    Args:
        data: the held-out sample: a list of strings (with ``tokenizer``); a list of token-id
            lists; a 2-D LongTensor of input ids, or a mapping with ``input_ids`` and
            optionally ``attention_mask``; a ``datasets.Dataset`` with ``input_ids`` or a text
            column; or a path to a ``.txt`` file (one sample per paragraph: blocks of lines
            separated by blank lines) or a ``.jsonl`` file (per line an object with
            ``input_ids`` or ``text_column``, or a string).
        tokenizer: turns text into ids (``tokenizer(text)["input_ids"]``), or the directory (or
            hub id) of one; needed for text.
        max_samples: how many sequences to keep (a seeded choice, fixed at construction).
        max_length: tokens per sequence; longer ones are truncated (one warning with the count).
        batch_size: sequences per forward pass.
        layers: ``"all"``, ``"last"``, or indices into the model's hidden states (0 = the
            embedding output; the last one is after the final norm, like HF's
            ``hidden_states[-1]``); negative indices count from the end.
        seed: seed of the choice of sequences (an int).
        text_column: the text field of a dataset or JSONL record.
        dtype: compute dtype of the metrics, ``torch.float32`` or ``torch.float64``.
        compute_loss: compute the sample's next-token loss; None (default) does so for causal
            language models (class names ending in ``ForCausalLM`` or ``LMHeadModel``, inside a
            PEFT wrapper too). An encoder-decoder is probed by its encoder: no loss. With
            ``modules``/``forward`` the loss comes from the output's logits (see ``forward``).
        method: ``"exact"`` spectra (eigendecomposition), ``"fast"`` (matmul only, for GPUs; see
            :func:`~mnn_callback.core.metrics.compute_metrics`), or ``"cheap"`` (MNN, Rényi-2 and the
            loss: no spectrum; the spectral metrics are left out of the result).
        defer_spectra: exact method only: keep the Gram matrices of every layer and micro-batch
            and solve them in ONE batched eigensolve at the end of the probe (one host
            synchronisation; flushed early above 1 GiB of Grams). Default: on CUDA. Off, each
            layer is solved as soon as it exists, which bounds the memory to about one layer.
        pack: concatenate the documents (the tokenizer's EOS between them, when it has one) and
            cut ``max_samples`` chunks of exactly ``max_length`` tokens, so every sequence of
            every probe has the same n (MNN depends on n: see ``mnn_vs_noise``).
        modules: for a model that does not return Hugging Face ``hidden_states`` (nanoGPT-style
            code, torchtitan, ...): the modules whose outputs are the hidden states, as names or
            patterns whose ``*`` stands for one part of a dotted name, in order (e.g.
            ``["transformer.h.*", "transformer.ln_f"]``); each must run once per forward.
        forward: how to call such a model, ``forward(model, input_ids, attention_mask)``; default
            ``model(input_ids)`` with ``modules``, else Hugging Face keyword arguments. For the
            loss (``compute_loss=True``) it returns the logits, a (batch, tokens, vocabulary)
            tensor or an output with ``.logits``: the probe's causal-LM cross-entropy of them.
            Without ``modules``, its output must hold ``hidden_states`` where the model cannot be
            called the Hugging Face way (e.g. an encoder-decoder's encoder).
        skip_first_tokens: the metrics use each sequence's valid tokens from the (k+1)-th on (a
            BOS or attention-sink token with huge activations can fake compression); the model
            still sees them and the loss still covers them, but a sequence with fewer than k + 2
            tokens (from its ``measure_from``) is left out of the sample: the loss is over the rest.

    An item of the data may be ``{"input_ids": [...], "measure_from": k}``: the model reads all of
    it, the metrics use its tokens from index k on (e.g. a response after its prompt). Sequences
    with fewer than 2 measured tokens are dropped; if none remain, ``ValueError``.
    """

    def __init__(
        self,
        data: Any,
        *,
        tokenizer: Any = None,
        max_samples: int = 64,
        max_length: int = 512,
        batch_size: int = 8,
        layers: LayerSpec = "all",
        seed: int = 0,
        text_column: str = "text",
        dtype: torch.dtype = torch.float32,
        compute_loss: bool | None = None,
        modules: str | Sequence[str] | None = None,
        forward: Callable[[nn.Module, Tensor, Tensor], Any] | None = None,
        method: str = "exact",
        defer_spectra: bool | None = None,
        pack: bool = False,
        skip_first_tokens: int = 0,
    ) -> None:
        self.max_samples = _positive_int("max_samples", max_samples)
        self.max_length = _positive_int("max_length", max_length)
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 (the metrics need 2 tokens), got {max_length}")
        self.batch_size = _positive_int("batch_size", batch_size)
        self.layers = _validate_layers(layers)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.dtype = dtype
        self.method = method
        self.defer_spectra = defer_spectra
        self.seed = seed
        self.compute_loss = compute_loss
        self.modules = [modules] if isinstance(modules, str) else None if modules is None else list(modules)
        if self.modules is not None and (not self.modules or not all(isinstance(m, str) and m for m in self.modules)):
            raise ValueError(f"modules must be module names or patterns such as 'transformer.h.*', got {modules!r}")
        if forward is not None and not callable(forward):
            raise TypeError(f"forward must be callable as forward(model, input_ids, attention_mask), got {forward!r}")
        self.forward = forward
        self.pack = bool(pack)
        if isinstance(skip_first_tokens, bool) or not isinstance(skip_first_tokens, int) or skip_first_tokens < 0:
            raise ValueError(f"skip_first_tokens must be an integer >= 0, got {skip_first_tokens!r}")
        if skip_first_tokens + 2 > self.max_length:
            raise ValueError(f"skip_first_tokens={skip_first_tokens} leaves fewer than 2 of max_length={max_length}")
        self.skip_first_tokens = skip_first_tokens
        options = {"text_column": text_column, "max_samples": self.max_samples, "max_length": self.max_length}
        tokenizer = load_tokenizer(tokenizer)
        limit = getattr(tokenizer, "model_max_length", None)
        self._tokenizer_limit = limit if isinstance(limit, int) and 2 <= limit < 1_000_000 else None
        if self.pack:
            chosen = packed_sample(data, tokenizer=tokenizer, seed=seed, **options)
        else:
            chosen = fixed_sample(data, tokenizer=tokenizer, seed=seed, min_tokens=skip_first_tokens + 2, **options)
        self.sequences, self.sources = chosen.sequences, chosen.sources
        # per sequence, the first token the metrics use: its measure_from, then skip_first_tokens more
        self.starts = [start + skip_first_tokens for start in (chosen.starts or [0] * len(chosen.sequences))]
        if chosen.truncated:
            warnings.warn(
                f"{chosen.truncated} of {len(self.sequences)} probe sequences were longer than "
                f"max_length={max_length} tokens and were truncated",
                MNNWarning,
                stacklevel=2,
            )
        self.fingerprint = self._fingerprint()
        self._emitters: weakref.WeakKeyDictionary[nn.Module, tuple[Emitters, int | None]] = weakref.WeakKeyDictionary()
        self._agreed = False

    def _fingerprint(self) -> str:
        settings = {"layers": self.layers, "dtype": str(self.dtype), "method": self.method}
        if self.modules is not None:
            settings["modules"] = self.modules
        return fingerprint(self.sequences, starts=self.starts, **settings)

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids in self.sequences)

    @property
    def config(self) -> dict[str, Any]:
        """What fixes the measurement (JSON-serialisable); equal fingerprints mean comparable curves."""
        return {
            "max_samples": self.max_samples,
            "max_length": self.max_length,
            "batch_size": self.batch_size,
            "layers": self.layers if isinstance(self.layers, str) else list(self.layers),
            "seed": self.seed,
            "dtype": str(self.dtype).removeprefix("torch."),
            "method": self.method,
            "pack": self.pack,
            "skip_first_tokens": self.skip_first_tokens,
            **({"modules": self.modules} if self.modules is not None else {}),
            "sequences": len(self.sequences),
            "tokens": self.num_tokens,
            "fingerprint": self.fingerprint,
        }

    def resolve_layers(self, num_hidden_states: int) -> list[int]:
        """The chosen hidden-state indices for a model with ``num_hidden_states`` of them, sorted, unique."""
        if self.layers == "all":
            return list(range(num_hidden_states))
        if self.layers == "last":
            return [num_hidden_states - 1]
        resolved = set()
        for index in self.layers:
            if not -num_hidden_states <= index < num_hidden_states:
                raise ValueError(
                    f"layer index {index} is out of range: this model has {num_hidden_states} hidden states "
                    f"(0 = embeddings .. {num_hidden_states - 1} = final), negative indices from -{num_hidden_states}"
                )
            resolved.add(index % num_hidden_states)
        return sorted(resolved)

    def _micro_batches(self, rank: int, world_size: int) -> list[list[int] | None]:
        """Sequence indices of this rank's micro-batches; None marks a dummy pass on an uneven split.

        Sequences are sorted by length (less padding) and dealt out round-robin by micro-batch,
        so every rank runs the same number of forward passes.
        """
        order = sorted(range(len(self.sequences)), key=lambda i: (-len(self.sequences[i]), i))
        batches = [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        steps = math.ceil(len(batches) / world_size)
        mine: list[list[int] | None] = list(batches[rank::world_size])
        return mine + [None] * (steps - len(mine))

    def _tensors(self, indices: list[int], device: torch.device, limit: int | None = None) -> tuple[Tensor, Tensor]:
        """Right-padded input ids and attention mask (right padding keeps position ids and labels simple),
        each sequence cut to ``limit`` tokens (a model's position limit)."""
        width = max(len(self.sequences[i][:limit]) for i in indices)
        input_ids = torch.zeros(len(indices), width, dtype=torch.long)
        attention_mask = torch.zeros(len(indices), width, dtype=torch.long)
        for row, index in enumerate(indices):
            ids = self.sequences[index][:limit]
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        return input_ids.to(device), attention_mask.to(device)

    def _wants_loss(self, model: nn.Module) -> bool:
        if self.compute_loss is not None:
            return self.compute_loss
        return is_causal_lm(model)

    @property
    def custom(self) -> bool:
        """Whether the model is called the user's way (``modules=`` or ``forward=``), not Hugging Face's."""
        return self.modules is not None or self.forward is not None

    def agree_across_processes(self) -> list[str] | None:
        """Make every process use the same sample (every process calls this, once; later calls do nothing).

        Compares the fingerprints of all processes; when they differ (other data, or a seed that
        differs per process), every process adopts process 0's sample, and the distinct
        fingerprints are returned (None when they agree).
        """
        if self._agreed:
            return None
        self._agreed = True
        fingerprints = all_gather_object(self.fingerprint)
        if len(set(fingerprints)) == 1:
            return None
        self.sequences, self.sources, self.starts = broadcast_object((self.sequences, self.sources, self.starts))
        self.fingerprint = self._fingerprint()
        return list(dict.fromkeys(fingerprints))

    def _check_model(self, model: nn.Module) -> int | None:
        """Fit the sample to ``model``, or refuse it, on every process alike (before any collective).

        Returns the length sequences are cut to for this model (None: no cut): its position
        limit (``max_position_embeddings`` / ``n_positions``, or the tokenizer's
        ``model_max_length`` when smaller), when a sequence is longer, with one INFO line. The
        sample itself is left as it is (another model may take more positions), and so is the
        fingerprint. A sequence whose measured part (from its ``measure_from``) the cut would
        leave with fewer than 2 tokens is a ``ValueError`` naming it.
        """
        name = type(inspectable(model)).__name__
        limits = [limit for limit in (position_limit(model), self._tokenizer_limit) if limit is not None]
        longest = max(len(ids) for ids in self.sequences)
        limit = min(limits) if limits and longest > min(limits) else None
        if limit is not None:
            if limit < self.skip_first_tokens + 2:
                raise ValueError(f"the model takes only {limit} positions: too few for the metrics")
            for index, start in enumerate(self.starts):
                if limit - start < 2:
                    raise ValueError(
                        f"{self.sources[index]}: its metrics start at token {start} (measure_from, skip_first_tokens), "
                        f"but {name} takes only {limit} positions, which leaves fewer than 2 tokens to measure; "
                        "shorten what comes before the measured part"
                    )
            logger.info(
                "%s takes at most %d positions: the probe sequences are cut to %d tokens for it (the longest has %d; "
                "max_length=%d only bounds the sample)",
                name,
                limit,
                limit,
                longest,
                self.max_length,
            )
        check_token_range([ids[:limit] for ids in self.sequences], self.sources, vocabulary_size(model), name)
        return limit

    def _explained(self, failure: Exception | None) -> Exception | None:
        """An index error of the model's embeddings, with what the sample asked of it (the likely cause)."""
        if failure is None or not (isinstance(failure, IndexError) or "index out of range" in str(failure)):
            return failure
        longest = max(len(ids) for ids in self.sequences)
        largest = max(max(ids) for ids in self.sequences)
        explained = type(failure)(
            f"{failure} (the probe's sequences hold up to {longest} tokens and token ids up to {largest}: does the "
            "model embed that many positions and ids? Set max_length, or tokenize with the model's tokenizer)"
        )
        explained.__cause__ = failure
        return explained

    def _emitters_of(
        self, model: nn.Module, device: torch.device, kwargs: dict[str, Any]
    ) -> tuple[Emitters, int | None]:
        """Which module emits each hidden state (one short calibration forward per model, then cached),
        and the length the sample is cut to for it (:meth:`_check_model`)."""
        known = self._emitters.get(model)
        if known is None:
            limit = self._check_model(model)
            ids, mask = self._tensors([0], device, limit)
            ids, mask = ids[:, :16], mask[:, :16]
            if self.modules is not None:
                emitters = named_emitters(model, self.modules, lambda: self.call(model, ids, mask, kwargs))
            else:
                emitters = self._calibrated(model, ids, mask, kwargs)
            known = self._emitters[model] = (emitters, limit)
        return known

    def _calibrated(self, model: nn.Module, ids: Tensor, mask: Tensor, kwargs: dict[str, Any]) -> Emitters:
        """:func:`calibrate` with a Hugging Face call; when that fails and ``forward`` was given (an
        encoder-decoder called through its encoder, ...), with ``forward``, whose output must then
        hold ``hidden_states``."""
        hf_kwargs = {"input_ids": ids, "attention_mask": mask, **kwargs, "output_hidden_states": True}
        try:
            return calibrate(model, lambda: model(**hf_kwargs))
        except (TypeError, ValueError) as error:
            if self.forward is None:
                if isinstance(error, ValueError):
                    raise
                raise TypeError(_not_hugging_face(model, error)) from error
        return calibrate(model, lambda: self.call(model, ids, mask, kwargs), forward_given=True)

    def call(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor, kwargs: dict[str, Any]) -> Any:
        """One forward of ``model`` as this probe calls it: ``forward``, ``model(input_ids)`` with
        ``modules``, else Hugging Face's keyword arguments (``kwargs``: ``use_cache``, ``labels``, ...)."""
        if self.forward is not None:
            return self.forward(model, input_ids, attention_mask)
        if self.modules is not None:
            return model(input_ids)
        return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def run(
        self,
        model: nn.Module,
        *,
        optimizer: Any = None,
        distributed: bool | None = None,
        streaming: bool = True,
        per_sequence: bool = True,
        method: str | None = None,
    ) -> ProbeResult:
        """Send the sample through ``model`` and return its per-layer metrics.

        Args:
            model: the model as training uses it (possibly DDP/FSDP-wrapped: the forward goes
                through the object given; a ``torch.compile`` wrapper is looked through so the
                probe's shapes do not recompile the training graph).
            optimizer: the training optimizer, if it has ``eval()``/``train()`` (schedule-free).
            distributed: shard the sample across ``torch.distributed`` processes and all-reduce;
                default: when a process group with more than one process is initialised. Every
                process must then call ``run``.
            streaming: compute each layer's metrics from a forward hook as soon as it exists
                (bounded memory); False collects ``output_hidden_states`` per micro-batch.
            per_sequence: also return each sequence's values (``ProbeResult.per_sequence``), which
                paired comparisons of two results of one sample need
                (:meth:`ProbeResult.difference_errors`) and bootstraps use: one float64 per
                averaged metric (6 exact, 3 cheap), hidden state and sequence, e.g. 6 x 7 x 64 =
                2,688 values (21 kB; 54 kB of ``to_dict()`` JSON) for MiniLM on 64 sequences,
                held on the model's device and all-reduced with the sums. False only saves that.
            method: this run's spectra, instead of the probe's ``method`` (``"cheap"``: MNN,
                Rényi-2 and the loss only).
        """
        method = self.method if method is None else method
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        started = time.perf_counter()
        eager = getattr(model, "_orig_mod", model)  # the eager module of a compile wrapper
        forward_model, part = probed_part(eager, custom=self.custom, compute_loss=self.compute_loss)
        if not isinstance(forward_model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        rank, world_size = (0, 1) if distributed is False else world()
        if world_size > 1 and self.agree_across_processes() and rank == 0:
            warnings.warn(
                "the probe samples differ across processes; every process now uses process 0's sample",
                MNNWarning,
                stacklevel=2,
            )
        device = model_device(forward_model)
        with preserved_training_state(forward_model, optimizer), torch.no_grad():
            kwargs = accepted_kwargs(inspectable(forward_model), {"use_cache": False, "return_dict": True})
            try:  # the calibration forward may fail on one process only: the others must learn it too
                emitters, limit = self._emitters_of(forward_model, device, kwargs)
                state = RunState(
                    self, forward_model, emitters, device, streaming, kwargs, per_sequence, method, limit, part=part
                )
                totals, failure = state.run(self._micro_batches(rank, world_size), keep_in_step=world_size > 1)
            except Exception as error:
                if world_size == 1:
                    raise
                totals, failure = None, error
            failure = self._explained(failure)
            if world_size > 1:
                raise_if_failed_anywhere(failure)
                totals = all_reduce(totals)
            elif failure is not None:
                raise failure
            flat = totals.tolist()  # the probe's one host synchronisation
        return state.result(flat, time.perf_counter() - started)
