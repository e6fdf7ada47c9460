"""Small file helpers: atomic JSON writes, JSONL appends that reach the disk, tolerant JSONL reads."""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any

__all__ = ["append_jsonl", "atomic_write_json", "json_safe", "read_jsonl"]


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None, recursively: plain, strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` so that readers see the old file or the new one, never a part.

    Writes a temporary file in the same directory, fsyncs it and renames it over ``path``.
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    handle, temporary = tempfile.mkstemp(prefix=".mnn-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(json_safe(data), file, indent=1, allow_nan=False)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def append_jsonl(path: str | os.PathLike, record: Any) -> None:
    """Append ``record`` as one line of strict JSON (non-finite floats as null), flushed and fsynced."""
    line = json.dumps(json_safe(record), allow_nan=False)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSONL file; skips blank lines and a cut-off last line (a crash mid-write).

    A broken line anywhere else raises ``ValueError`` naming it.
    """
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    last = max((number for number, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number != last:
                raise ValueError(f"{os.fspath(path)}, line {number + 1}: not valid JSON") from None
    return records
