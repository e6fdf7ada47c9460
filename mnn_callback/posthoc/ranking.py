"""Ranking models by the MNN of their own responses (the MNN paper's Section 6).

For each model: an answer to every prompt (through the tokenizer's chat template when it has
one), by one of two recipes (:mod:`~mnn_callback.posthoc.responses`: greedy and measured in
context, the default; or the authors' sampled answers measured on their own), at the chosen
hidden states; the final hidden state's MNN ranks the models, lowest first, as the paper does.
Responses differ in length between models, and MNN depends on length: the mean response length
is written beside every score, and ``mnn_vs_noise`` is the length-fair one. Short responses lie
below 0.6 d, where a collapse onto a few random directions RAISES MNN, and a collapse onto
coordinate axes or outlier coordinates lowers it: a low MNN is not "more compressed" there
(``regime`` column; long sampled answers can reach the band below d or beyond it). A degenerate, repetitive answer
shows in ``repeated_4grams`` and a low ``erank`` beside its score.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

from torch import nn

from mnn_callback.core.errors import MNNWarning, UsageError
from mnn_callback.output.files import append_jsonl, atomic_write_jsonl, read_jsonl
from mnn_callback.posthoc.models import Target, discover, find_tokenizer, is_causal, load_model, model_config
from mnn_callback.posthoc.placement import Placement
from mnn_callback.posthoc.responses import (
    RECIPES,
    default_max_new_tokens,
    encode_prompt,
    repeated_ngram_share,
    respond,
    scored_item,
    seeded,
)
from mnn_callback.probing.distributed import all_gather_object, broadcast_object, world
from mnn_callback.probing.emitters import position_limit
from mnn_callback.probing.probe import Probe
from mnn_callback.probing.sample import check_text, jsonl_lines, text_paragraphs

__all__ = ["RANKING_COLUMNS", "rank_models", "read_prompts"]

RANKING_COLUMNS = (
    "rank",
    "model",
    "base",
    "sequences",
    "mean_response_tokens",
    "regime",
    "mnn",
    "mnn_se",
    "mnn_vs_noise",
    "mnn_vs_noise_se",
    "nuclear_norm",
    "matrix_entropy",
    "erank",
    "erank_se",
    "repeated_4grams",
    "error",
)
SCORE_COLUMNS = RANKING_COLUMNS[RANKING_COLUMNS.index("mnn") : RANKING_COLUMNS.index("repeated_4grams")]


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts of a ``.txt`` file (one per paragraph) or ``.jsonl`` (``{"prompt": ...}``, AlpacaEval's
    ``{"instruction": ...}``, or a string per line)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UsageError(f"prompts file not found: {path}")
    if not path.endswith((".txt", ".jsonl")):
        raise UsageError(f"prompts file must end in .txt or .jsonl, got {path}")
    try:
        if path.endswith(".txt"):
            prompts = _checked([(candidate.source, candidate.item) for candidate in text_paragraphs(path)])
        else:
            prompts = _checked([(where, _prompt_of(record, where)) for where, record in jsonl_lines(path)])
    except ValueError as error:
        raise UsageError(str(error)) from None
    prompts = [prompt for prompt in prompts if prompt.strip()]
    if not prompts:
        raise UsageError(f"{path} holds no prompt")
    return prompts


def _prompt_of(record: Any, where: str) -> str:
    if isinstance(record, str):
        return record
    for field in ("prompt", "instruction"):
        if isinstance(record, dict) and isinstance(record.get(field), str):
            return record[field]
    raise ValueError(f"{where}: expected a string or an object with 'prompt' or 'instruction'")


def _checked(prompts: list[tuple[str, Any]]) -> list[str]:
    """The prompts, each given with where it came from, checked as text: ``ValueError`` naming the first that is
    not a string or holds a lone surrogate."""
    for where, prompt in prompts:
        if not isinstance(prompt, str):
            raise ValueError(f"{where}: expected a string, got {type(prompt).__name__}")
        check_text(prompt, where)
    return [prompt for _, prompt in prompts]


def _prompt_texts(prompts: str | os.PathLike | Sequence[str]) -> list[str]:
    """The prompts to answer: read from a file (:func:`read_prompts`), or a list of strings, checked."""
    if isinstance(prompts, (str, os.PathLike)):
        return read_prompts(prompts)
    try:
        return _checked([(f"prompt {number}", prompt) for number, prompt in enumerate(prompts, start=1)])
    except ValueError as error:
        raise UsageError(str(error)) from None


def _short(prompt: str, limit: int = 40) -> str:
    text = " ".join(prompt.split())
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _ranking_row(target: Target, result: Any, responses: list[list[int]]) -> dict[str, Any]:
    final = len(result.layers) - 1
    repeated = [share for share in map(repeated_ngram_share, responses) if not math.isnan(share)]
    row: dict[str, Any] = {
        "model": target.name,
        "base": target.base_key,
        "sequences": result.sequences,
        "mean_response_tokens": sum(map(len, responses)) / max(len(responses), 1),
        "regime": result.regime or "",
    }
    for column in SCORE_COLUMNS:
        source = result.standard_errors if column.endswith("_se") else result.per_layer
        values = source.get(column.removesuffix("_se"))
        row[column] = values[final] if values else math.nan
    row["repeated_4grams"] = sum(repeated) / len(repeated) if repeated else math.nan
    row["error"] = ""
    return row


def _failed_row(target: Target, error: Exception) -> dict[str, Any]:
    """The row of a model that could not be ranked: no scores, the error in one line."""
    message = f"{type(error).__name__}: {error}".splitlines()[0][:500]
    return {**dict.fromkeys(RANKING_COLUMNS[1:]), "model": target.name, "base": target.base_key, "error": message}


class _Ranking:
    """One ranking run: models in order, their responses and scores, the results file."""

    def __init__(self, prompts: list[str], out: str | None, options: dict[str, Any]) -> None:
        self.prompts = prompts
        self.options = options
        self.responses_file = None if out is None else os.path.join(out, "responses.jsonl")
        self.writer = world()[0] == 0  # under torchrun only the main process writes
        records = self._read_responses()
        self.finished = {
            (record["path"], record.get("base"), record["config_key"]): record["summary"]
            for record in records
            if "summary" in record
        }
        self.placement: Placement = options["placement"]

    def _read_responses(self) -> list[Any]:
        """The records of ``responses.jsonl``, without response lines that no summary follows.

        A model's lines and its summary are appended in one write, summary last; lines without
        their summary were cut off (a kill, a full disk) and the model is ranked again, so they
        are dropped from the file first (rewritten atomically, with a warning): no duplicates.
        """
        if not self.responses_file or not os.path.isfile(self.responses_file):
            return []
        records = read_jsonl(self.responses_file)
        summaries = [index for index, record in enumerate(records) if isinstance(record, dict) and "summary" in record]
        complete = summaries[-1] + 1 if summaries else 0
        if complete < len(records) and self.writer:
            atomic_write_jsonl(self.responses_file, records[:complete])
            warnings.warn(
                f"{self.responses_file}: dropped {len(records) - complete} response line(s) of a model whose summary "
                "is missing (cut off); that model is ranked again",
                MNNWarning,
                stacklevel=3,
            )
        return records[:complete]

    def config_key(self) -> str:
        keys = ("recipe", "max_new_tokens", "chat_template", "layers", "dtype", "seed", "tokenizer")
        content = [self.prompts, {key: str(self.options[key]) for key in keys}]
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

    def rank_one(self, target: Target) -> dict[str, Any]:
        """The ranking row of ``target``: measured now, read back, or an error row when the model fails."""
        return self.completed(target, self.answered(target))

    def answered(self, target: Target) -> tuple[str, Any]:
        """``target``'s responses and scores, writing nothing: ``("stored", summary)`` read back,
        ``("new", (summary, lines))``, ``("error", row)``, or ``("usage", message)`` for bad input."""
        try:
            key = (target.key, target.base_key, self.config_key())  # an adapter: on the same chain of bases
            if key in self.finished and not self.options["force"]:
                return "stored", self.finished[key]
            config = model_config(target, self.options["trust"])
            if not is_causal(config):
                architecture = ", ".join(config.architectures or [type(config).__name__])
                kind = "cannot generate"
                if getattr(config, "is_encoder_decoder", False):
                    kind = "is an encoder-decoder, which ranking does not support"
                raise UsageError(f"{target.name} ({architecture}) {kind}: ranking needs a causal language model")
            model = load_model(target, placement=self.placement, trust_remote_code=self.options["trust"])
            tokenizer = find_tokenizer(target, self.options["tokenizer"], self.options["trust"])
            if tokenizer is None:
                raise UsageError(
                    f"no tokenizer found for {target.name}: pass one with --tokenizer (from Python: tokenizer=)"
                )
            try:
                return "new", self._responses(target, model, tokenizer)
            finally:
                del model
        except UsageError as error:
            return "usage", str(error)
        except Exception as error:
            return "error", _failed_row(target, error)
        finally:
            gc.collect()

    def completed(self, target: Target, answered: tuple[str, Any]) -> dict[str, Any]:
        """The row of an answered model; its lines and summary appended (one write, main process only)."""
        kind, payload = answered
        if kind == "usage":
            raise UsageError(payload)
        if kind != "new":
            return payload
        summary, lines = payload
        if self.responses_file and self.writer:  # one write: the lines arrive with their summary, or are dropped
            summary_line = {
                "model": target.name,
                "path": target.key,
                "base": target.base_key,
                "config_key": self.config_key(),
                "summary": summary,
            }
            append_jsonl(self.responses_file, *lines, summary_line)
        return summary

    def _answer(self, model: nn.Module, tokenizer: Any, number: int, prompt: str) -> tuple[list[int], list[int]]:
        """The encoded prompt and the response to it; a failure names the prompt (its number and start)."""
        try:
            encoded = encode_prompt(tokenizer, prompt, self.options["chat_template"])
            limit = position_limit(model)
            wanted = len(encoded) + self.options["max_new_tokens"]
            if limit is not None and wanted > limit:
                raise ValueError(
                    f"it has {len(encoded)} tokens, and with max_new_tokens={self.options['max_new_tokens']} that is "
                    f"{wanted}, more than the {limit} positions the model takes"
                )
            return encoded, respond(model, tokenizer, encoded, self.options["max_new_tokens"], self.options["recipe"])
        except Exception as error:
            raise RuntimeError(f"prompt {number} {_short(prompt)}: {type(error).__name__}: {error}") from error

    def _responses(self, target: Target, model: nn.Module, tokenizer: Any) -> tuple[dict[str, Any], list[dict]]:
        with seeded(model, self.options["seed"]):  # sampling seeded per model; the global RNG left as it was
            answers = [self._answer(model, tokenizer, number, prompt) for number, prompt in enumerate(self.prompts, 1)]
        responses = [answer[1] for answer in answers]
        items = [scored_item(self.options["recipe"], tokenizer, *answer) for answer in answers]
        measured = [i for i, item in enumerate(items) if len(item["input_ids"]) - item["measure_from"] >= 2]
        if not measured:
            raise UsageError(f"{target.name} gave no response of at least 2 tokens to any prompt")
        data = [items[i] for i in measured]
        probe = Probe(
            data,
            max_samples=len(data),
            max_length=max(len(item["input_ids"]) for item in data),
            batch_size=self.options["batch_size"],
            layers=self.options["layers"],
            seed=self.options["seed"],
            compute_loss=False,
        )
        result = probe.run(model, per_sequence=True, distributed=False)  # each process its own model
        summary = _ranking_row(target, result, [responses[i] for i in measured])
        lines = []
        for index, prompt in enumerate(self.prompts):
            metrics = {}
            if index in measured:
                position = measured.index(index)
                for name, layers in result.per_sequence.items():
                    for layer, values in zip(result.layers, layers, strict=True):
                        metrics[f"{name}/layer_{layer}"] = values[position]
            response = tokenizer.decode(responses[index], skip_special_tokens=True)
            lines.append(
                {
                    "model": target.name,
                    "path": target.key,
                    "prompt": prompt,
                    "response": response,
                    "tokens": len(responses[index]),
                    **metrics,
                }
            )
        return summary, lines


def rank_models(
    models: Sequence[str | os.PathLike],
    prompts: str | os.PathLike | Sequence[str],
    *,
    out: str | os.PathLike | None = None,
    tokenizer: Any = None,
    recipe: str = "greedy",
    max_new_tokens: int | None = None,
    chat_template: bool = True,
    layers: Any = "last",
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    device_map: str | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    seed: int = 0,
    trust_remote_code: bool = False,
    force: bool = False,
    progress: bool = False,
    checkpoints: bool = False,
) -> list[dict[str, Any]]:
    """Rank causal LMs by the MNN of their own responses to ``prompts``, lowest MNN first.

    ``prompts``: a ``.txt``/``.jsonl`` file (:func:`read_prompts`) or a list of strings. Each
    model answers every prompt (through the tokenizer's chat template unless
    ``chat_template=False``) by ``recipe``: ``"greedy"`` (up to ``max_new_tokens``, default 128;
    one forward over prompt + response then measures the response tokens only) or ``"authors"``
    (sampled at temperature 0.7 with ``seed``, up to 1000 new tokens by default, the response
    re-tokenised and measured on its own), at ``layers`` (the ranking uses the final hidden
    state). With ``out``, responses
    and per-response metrics are appended to ``out/responses.jsonl`` as each model finishes,
    models already ranked there with the same options are read back (``force`` redoes them), and
    ``ranking.csv`` and ``ranking.png`` are written. ``device_map``/``max_memory`` split each model
    over the devices (as in :func:`~mnn_callback.posthoc.evaluation.evaluate_models`). Under ``torchrun``
    every process calls it and ranks its own models; the main process writes.
    Returns the rows of ``ranking.csv`` (:data:`RANKING_COLUMNS`): ``rank`` by MNN ascending, ties
    by name; beside the scores the ``regime`` (of the responses' lengths against the hidden size:
    below d a low MNN is not "more compressed"), eRank with its standard error, and the mean share
    of repeated 4-grams of the responses (degenerate, repetitive answers). Models may be
    directories or hub ids (``org/name@revision``); a run directory stands for
    its final model (``checkpoints=True``: each of its checkpoints). A model that fails (a
    prompt longer than its context, a chat template that raises, a model that cannot load) gets a
    row without rank whose ``error`` names the prompt; the others are ranked.
    """
    if recipe not in RECIPES:
        raise UsageError(f"expected a recipe in {RECIPES}, got {recipe!r}")
    max_new_tokens = default_max_new_tokens(recipe) if max_new_tokens is None else max_new_tokens
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 2:
        raise UsageError(f"max_new_tokens must be an integer >= 2, got {max_new_tokens!r}")
    texts = _prompt_texts(prompts)
    if not texts:
        raise UsageError("no prompt to answer")
    targets = discover(models, checkpoints=checkpoints)
    if out is not None:
        os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mnn-offload-") as offload:
        options = {
            "tokenizer": tokenizer,
            "recipe": recipe,
            "max_new_tokens": max_new_tokens,
            "chat_template": chat_template,
            "layers": layers,
            "batch_size": batch_size,
            "dtype": dtype,
            "placement": Placement.of(device, dtype, device_map, max_memory, offload),
            "seed": seed,
            "trust": trust_remote_code,
            "force": force,
        }
        ranking = _Ranking(texts, None if out is None else os.fspath(out), options)
        rows = _rank_all(ranking, targets, progress)
    ranked = [row for row in rows if not row.get("error")]
    ordered = sorted(ranked, key=lambda row: (math.inf if math.isnan(row["mnn"]) else row["mnn"], row["model"]))
    failed = [{"rank": "", **row} for row in rows if row.get("error")]
    table = [{"rank": position + 1, **row} for position, row in enumerate(ordered)] + failed
    if out is not None and ranking.writer:
        _write_ranking(os.fspath(out), table)
    return table


def _rank_all(ranking: _Ranking, targets: list[Target], progress: bool) -> list[dict[str, Any]]:
    """Every model's row, in order: one after another, or under ``torchrun`` each process its own
    (model i on process i mod world size), gathered and written in order by the main process."""
    rank, size = world()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(targets), desc="ranking", unit="model", disable=None if ranking.writer else True)
    rows: list[dict[str, Any]] = []
    try:
        for start in range(0, len(targets), size):
            if size == 1:
                gathered = [ranking.answered(targets[start])]
            else:
                mine = ranking.answered(targets[start + rank]) if start + rank < len(targets) else None
                gathered = [item for item in all_gather_object(mine) if item is not None]
            usage = [payload for kind, payload in gathered if kind == "usage"]
            if usage:  # on every process alike
                raise UsageError(usage[0])
            rows += [ranking.completed(targets[start + offset], item) for offset, item in enumerate(gathered)]
            if bar is not None:
                bar.update(len(gathered))
    finally:
        if bar is not None:
            bar.close()
    return rows if size == 1 else broadcast_object(rows)


def _write_ranking(out: str, rows: list[dict[str, Any]]) -> None:
    """``ranking.csv`` (atomically) and, with matplotlib, ``ranking.png``."""
    path = os.path.join(out, "ranking.csv")
    with open(path + ".tmp", "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RANKING_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(path + ".tmp", path)
    try:
        from mnn_callback.output.plots import plot_ranking
    except ImportError:
        warnings.warn("ranking.png needs matplotlib: pip install 'mnn-callback[plot]'", MNNWarning, stacklevel=3)
        return
    plot_ranking(rows, os.path.join(out, "ranking.png"))
