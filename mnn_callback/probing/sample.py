"""The fixed held-out sample: reading the data, tokenising it, the seeded choice, its fingerprint.

Every supported form of ``data`` becomes a list of token-id lists, chosen once with a private
seeded RNG (the global RNGs are not touched), so every probe, process and resume sees identical
inputs. Each chosen sequence remembers where it came from, so errors can name it.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "FixedSample",
    "check_seed",
    "check_text",
    "check_token_range",
    "fingerprint",
    "fixed_sample",
    "jsonl_lines",
    "load_tokenizer",
    "packed_sample",
    "text_paragraphs",
]


@dataclass(frozen=True)
class Candidate:
    """One item of the data before tokenisation, where it came from, and where its measured part starts."""

    item: Any  # a text or a sequence of token ids
    source: str  # e.g. "line 7 of heldout.jsonl"
    measure_from: int = 0  # the tokens before this index are context: the model reads them, the metrics do not


@dataclass
class FixedSample:
    """The chosen sequences (token ids, in their order in the data), their sources and measured parts."""

    sequences: list[list[int]]
    sources: list[str]
    truncated: int  # how many were longer than max_length and cut
    starts: list[int] | None = None  # per sequence, the first token the metrics use (None: all from 0)


def _candidate(item: Any, source: str) -> Candidate:
    """A data item: a text, token ids, or ``{"input_ids": [...], "measure_from": k}`` (k context tokens first)."""
    if isinstance(item, Mapping) and "input_ids" in item:
        start = item.get("measure_from", 0)
        if isinstance(start, bool) or not isinstance(start, numbers.Integral) or start < 0:
            raise ValueError(f"{source}: measure_from must be an integer >= 0, got {start!r}")
        return Candidate(item["input_ids"], source, int(start))
    return Candidate(item, source)


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as handle:
            return handle.read()
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {error.start}: {error.reason}); convert it to UTF-8"
        ) from None


def text_paragraphs(path: str) -> list[Candidate]:
    """Paragraphs of a text file: blocks separated by blank lines, stripped, empty ones skipped."""
    candidates, current, first_line = [], [], 0
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if line.strip():
            if not current:
                first_line = number
            current.append(line)
        elif current:
            candidates.append(Candidate("\n".join(current), f"the paragraph at line {first_line} of {path}"))
            current = []
    if current:
        candidates.append(Candidate("\n".join(current), f"the paragraph at line {first_line} of {path}"))
    return candidates


def jsonl_lines(path: str) -> list[tuple[str, Any]]:
    """The records of a JSONL file, each with where it is (``line 7 of heldout.jsonl``); blank lines
    skipped, ``ValueError`` naming the first line that is not valid JSON."""
    records = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {number} of {path}"
        try:
            records.append((where, json.loads(line)))
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
    return records


def _jsonl_records(path: str, text_column: str) -> list[Candidate]:
    """Records of a JSONL file: an object with ``input_ids`` or ``text_column``, or a bare string."""
    candidates = []
    for where, record in jsonl_lines(path):
        if isinstance(record, str):
            candidates.append(Candidate(record, where))
        elif isinstance(record, dict) and "input_ids" in record:
            candidates.append(_candidate(record, where))
        elif isinstance(record, dict) and isinstance(record.get(text_column), str):
            candidates.append(Candidate(record[text_column], where))
        else:
            raise ValueError(f"{where}: expected a string or an object with 'input_ids' or {text_column!r}")
    return candidates


def _rows_of_ids(input_ids: Any, attention_mask: Any = None) -> list[Candidate]:
    """Rows of a 2-D id tensor or nested list, keeping the tokens the mask marks valid, in order."""
    try:
        ids = torch.as_tensor(input_ids)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError("input_ids must be a 2-D array of integer token ids") from None
    if ids.ndim != 2 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be a 2-D integer tensor, got shape {tuple(ids.shape)} and {ids.dtype}")
    if attention_mask is None:
        rows = ids.tolist()
    else:
        mask = torch.as_tensor(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
        rows = [row[keep].tolist() for row, keep in zip(ids, mask.bool(), strict=True)]
    return [Candidate(row, f"row {index} of input_ids") for index, row in enumerate(rows)]


def _file_candidates(path: str, text_column: str) -> list[Candidate]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"probe data file not found: {path}")
    if path.endswith(".txt"):
        return text_paragraphs(path)
    if path.endswith(".jsonl"):
        return _jsonl_records(path, text_column)
    raise ValueError(f"probe data file must end in .txt or .jsonl, got {path}")


def _dataset_candidates(data: Any, text_column: str) -> list[Candidate]:
    if not hasattr(data, "__len__"):
        raise TypeError(
            f"{type(data).__name__} has no length (a streaming dataset?): the seeded choice needs the whole "
            "sample; pass a list, e.g. list(dataset.take(1000))"
        )
    column_names = data.column_names
    column = "input_ids" if "input_ids" in column_names else text_column
    if column not in column_names:
        raise ValueError(f"the dataset has neither 'input_ids' nor a {text_column!r} column: {column_names}")
    return [Candidate(item, f"row {index} of the dataset") for index, item in enumerate(data[column])]


def _candidates(data: Any, text_column: str) -> list[Candidate]:
    """Turn any supported ``data`` into a list of texts or token-id sequences with their sources."""
    if isinstance(data, os.PathLike):
        return _file_candidates(os.fspath(data), text_column)
    if isinstance(data, str):
        if os.path.isfile(data) or data.endswith((".txt", ".jsonl")):
            return _file_candidates(data, text_column)
        raise ValueError(
            f"probe data is a single string that is not a .txt or .jsonl file ({data[:40]!r}...): pass a list of "
            "texts, e.g. [text], or the path of an existing .txt or .jsonl file"
        )
    if isinstance(data, Tensor):
        return _rows_of_ids(data)
    if isinstance(data, Mapping):
        if "input_ids" not in data:
            raise ValueError("probe data given as a mapping must have 'input_ids' (and optionally 'attention_mask')")
        return _rows_of_ids(data["input_ids"], data.get("attention_mask"))
    if getattr(data, "column_names", None) is not None:  # a datasets.Dataset or IterableDataset
        return _dataset_candidates(data, text_column)
    if isinstance(data, Sequence) or hasattr(data, "__array__"):
        return [_candidate(item, f"item {index} of the data") for index, item in enumerate(data)]
    raise TypeError(
        "probe data must be a list of strings or of token-id lists, a 2-D tensor of input ids, a mapping with "
        f"'input_ids', a datasets.Dataset, or a path to a .txt or .jsonl file; got {type(data).__name__}"
    )


def _token_ids(item: Any, source: str) -> list[int] | None:
    """``item`` as a list of Python ints, or None when it is not a sequence of ids."""
    if isinstance(item, Tensor) or hasattr(item, "tolist"):
        item = item.tolist()
    if isinstance(item, (str, bytes, Mapping)) or not isinstance(item, Sequence):
        return None
    ids = []
    for token in item:
        if isinstance(token, bool) or not isinstance(token, numbers.Integral):
            raise ValueError(
                f"{source}: each sequence must be a string or a list of integer token ids, found {token!r}"
            )
        if token < 0:
            raise ValueError(f"{source}: token ids must be >= 0, found {int(token)}")
        ids.append(int(token))
    return ids


def load_tokenizer(tokenizer: Any) -> Any:
    """``tokenizer`` itself, or the tokenizer saved at a directory or hub id given as a string."""
    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    source = os.fspath(tokenizer)
    return AutoTokenizer.from_pretrained(source, local_files_only=os.path.isdir(source))


def check_text(text: str, source: str) -> None:
    """``ValueError`` naming ``source`` when ``text`` holds a lone surrogate (``"\\ud800"`` in JSON): no
    tokenizer takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"{source}: expected valid Unicode text, got a lone surrogate {text[error.start]!r} at character "
            f"{error.start}"
        ) from None


def _encoder(tokenizer: Any) -> Callable[[Candidate], list[int]]:
    def encode(candidate: Candidate) -> list[int]:
        ids = _token_ids(candidate.item, candidate.source)
        if ids is not None:
            return ids
        if not isinstance(candidate.item, str):
            raise ValueError(
                f"{candidate.source}: each sequence must be a string or a list of integer token ids, "
                f"got {type(candidate.item).__name__}"
            )
        if tokenizer is None:
            raise ValueError("the probe data holds text: pass tokenizer= to turn it into token ids")
        check_text(candidate.item, candidate.source)
        return list(tokenizer(candidate.item, add_special_tokens=True, truncation=False, verbose=False)["input_ids"])

    return encode


def check_seed(seed: Any) -> int:
    """``seed`` if it is an int: the sample must be the same on every probe, process and resume."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(
            f"seed must be an int (the sample must be the same on every probe, process and resume), got {seed!r}"
        )
    return int(seed)


def fixed_sample(
    data: Any,
    *,
    tokenizer: Any,
    text_column: str,
    max_samples: int,
    max_length: int,
    seed: int,
    min_tokens: int = 2,
) -> FixedSample:
    """A seeded choice of ``max_samples`` sequences of at least ``min_tokens`` tokens, truncated to ``max_length``.

    Candidates are visited in a seeded random order and encoded one by one until enough are
    found, so a large data set is not tokenised whole. The chosen sequences keep their order in
    ``data``.
    """
    candidates = _candidates(data, text_column)
    if len(candidates) == 0:
        raise ValueError("the probe data is empty")
    encode = _encoder(tokenizer)
    chosen: list[tuple[int, list[int]]] = []
    for index in _seeded_order(len(candidates), seed):
        ids = encode(candidates[index])
        if min(len(ids), max_length) - candidates[index].measure_from >= min_tokens:
            chosen.append((index, ids))
            if len(chosen) == max_samples:
                break
    if not chosen:
        raise ValueError(
            f"none of the {len(candidates)} probe sequences has at least {min_tokens} tokens after tokenisation; "
            "the metrics need at least 2 tokens per sequence (after skip_first_tokens)"
        )
    chosen.sort()
    starts = [candidates[index].measure_from for index, _ in chosen]
    return FixedSample(
        sequences=[ids[:max_length] for _, ids in chosen],
        sources=[candidates[index].source for index, _ in chosen],
        truncated=sum(len(ids) > max_length for _, ids in chosen),
        starts=starts if any(starts) else None,
    )


def _seeded_order(count: int, seed: int) -> list[int]:
    order = list(range(count))
    random.Random(check_seed(seed)).shuffle(order)
    return order


def packed_sample(
    data: Any, *, tokenizer: Any, text_column: str, max_samples: int, max_length: int, seed: int
) -> FixedSample:
    """``max_samples`` chunks of exactly ``max_length`` tokens from the documents concatenated.

    Documents are visited in a seeded random order and joined until ``max_samples`` full chunks
    exist (the last partial chunk is dropped), so every sequence of every probe has the same
    number of tokens. Text documents end with the tokenizer's EOS token when it has one; token-id
    documents are joined as they are.
    """
    candidates = _candidates(data, text_column)
    if len(candidates) == 0:
        raise ValueError("the probe data is empty")
    encode = _encoder(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    separator = [eos] if isinstance(eos, int) else []
    stream: list[int] = []
    starts: list[tuple[int, str]] = []  # where each document begins in the stream
    if any(candidate.measure_from for candidate in candidates):
        raise ValueError("measure_from is not supported with pack=True: packing cuts across documents")
    for index in _seeded_order(len(candidates), seed):
        starts.append((len(stream), candidates[index].source))
        stream += encode(candidates[index]) + (separator if isinstance(candidates[index].item, str) else [])
        if len(stream) >= max_samples * max_length:
            break
    chunks = [stream[start : start + max_length] for start in range(0, len(stream) - max_length + 1, max_length)]
    if not chunks:
        raise ValueError(
            f"the probe data holds {len(stream)} tokens, fewer than one chunk of max_length={max_length}: "
            "pass more data or a smaller max_length"
        )
    chunks = chunks[:max_samples]
    sources = [
        f"tokens {k * max_length}-{(k + 1) * max_length - 1} of the packed sample (from "
        f"{max(source for source in starts if source[0] <= k * max_length)[1]})"
        for k in range(len(chunks))
    ]
    return FixedSample(sequences=chunks, sources=sources, truncated=0)


def fingerprint(sequences: Sequence[Sequence[int]], **settings: Any) -> str:
    """A short hash of the sequences and the settings that fix what is measured on them."""
    content = json.dumps({"sequences": sequences, **settings}, separators=(",", ":"), sort_keys=True, default=str)
    return hashlib.sha256(content.encode()).hexdigest()[:16]


def check_token_range(
    sequences: Sequence[Sequence[int]], sources: Sequence[str], vocabulary: int | None, model_name: str
) -> None:
    """``ValueError`` naming the first sequence with a token id the model cannot embed (``>= vocabulary``)."""
    if vocabulary is None:
        return
    bad = [(source, max(ids)) for ids, source in zip(sequences, sources, strict=True) if max(ids) >= vocabulary]
    if bad:
        source, token = bad[0]
        others = f" (and {len(bad) - 1} more sequences)" if len(bad) > 1 else ""
        raise ValueError(
            f"{source}: token id {token} is out of range for {model_name}, whose vocabulary has {vocabulary} tokens "
            f"(ids 0 to {vocabulary - 1}){others}; was the sample tokenised with another tokenizer?"
        )
