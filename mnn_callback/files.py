"""Small file helpers: atomic JSON writes, JSONL appends that reach the disk, tolerant JSONL reads."""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from typing import Any

from mnn_callback.errors import MNNWarning

__all__ = ["append_jsonl", "atomic_write_json", "json_safe", "read_jsonl", "repair_last_line"]


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


def repair_last_line(path: str | os.PathLike) -> str | None:
    """Make ``path`` end with a complete line before anything is appended to it.

    A crash or a full disk can leave a last line without its newline. If that line is a
    complete JSON value it is completed (a newline appended); otherwise it is dropped (the file
    truncated after the last newline). Returns what was done, or None when nothing was needed.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError:
        return None
    if size == 0:
        return None
    with open(path, "rb+") as handle:
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return None
        start = max(0, size - 65536)
        while True:  # find the last newline, reading backwards in blocks
            handle.seek(start)
            block = handle.read(size - start)
            cut = block.rfind(b"\n")
            if cut >= 0 or start == 0:
                break
            start = max(0, start - 65536)
        keep = start + cut + 1 if cut >= 0 else 0
        handle.seek(keep)
        tail = handle.read()
        try:
            json.loads(tail.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            handle.truncate(keep)
            return f"dropped a cut-off last line ({len(tail)} bytes) of {path}"
        handle.seek(size)
        handle.write(b"\n")
        return f"completed the last line of {path}"


def append_jsonl(path: str | os.PathLike, record: Any) -> None:
    """Append ``record`` as one line of strict JSON (non-finite floats as null), flushed and fsynced.

    First repairs a cut-off last line (:func:`repair_last_line`, with a warning), so no record
    is glued onto a partial one.
    """
    line = json.dumps(json_safe(record), allow_nan=False)
    repaired = repair_last_line(path)
    if repaired:
        warnings.warn(f"mnn_callback {repaired} before appending", MNNWarning, stacklevel=2)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """The records of a JSONL file (UTF-8, a byte-order mark allowed); blank lines skipped.

    Lines that are not valid JSON (a line cut by a crash, a hand edit) are skipped with one
    :class:`~mnn_callback.errors.MNNWarning` naming them. A file that is not UTF-8 text raises
    ``ValueError``.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8-sig") as handle:
            lines = handle.read().split("\n")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a UTF-8 text file") from None
    records, broken = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            broken.append(number)
    if broken:
        shown = ", ".join(map(str, broken[:5])) + (f" and {len(broken) - 5} more" if len(broken) > 5 else "")
        warnings.warn(f"{path}: skipped {len(broken)} line(s) that are not valid JSON (line {shown})", MNNWarning, 2)
    return records
