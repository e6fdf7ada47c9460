"""Small file helpers: atomic JSON writes, JSONL appends that reach the disk whole, tolerant JSONL reads."""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from mnn_callback.core.errors import MNNWarning

try:  # POSIX: appenders of one file take turns (Windows has no flock; its appends are not shared here)
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "append_jsonl",
    "atomic_write_json",
    "atomic_write_jsonl",
    "check_appendable",
    "json_safe",
    "parse_json",
    "read_jsonl",
]

_BLOCK = 1 << 16


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None, recursively: plain, strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def parse_json(text: str | bytes) -> tuple[bool, Any]:
    """``(True, value)`` for a JSON text, ``(False, None)`` for anything else.

    Anything else includes text that is not UTF-8 and JSON nested too deeply for the parser
    (``RecursionError``): a line no writer of this package produces, skipped like a cut one.

    >>> parse_json('{"step": 3}'), parse_json('{"st')
    ((True, {'step': 3}), (False, None))
    """
    try:
        return True, json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return False, None


@contextlib.contextmanager
def _replacing(path: str | os.PathLike) -> Iterator[Any]:
    """A text file that replaces ``path`` when the block ends without error: readers see the old file or
    the new one, never a part (a temporary file in the same directory, fsynced, then renamed)."""
    path = os.fspath(path)
    handle, temporary = tempfile.mkstemp(prefix=".mnn-", suffix=".tmp", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` so that readers see the old file or the new one, never a part."""
    with _replacing(path) as file:
        json.dump(json_safe(data), file, indent=1, allow_nan=False)


def atomic_write_jsonl(path: str | os.PathLike, records: Sequence[Any]) -> None:
    """Replace ``path`` with ``records``, one strict JSON line each, atomically (as :func:`atomic_write_json`)."""
    with _replacing(path) as file:
        file.writelines(json.dumps(json_safe(record), allow_nan=False) + "\n" for record in records)


def check_appendable(path: str | os.PathLike, root: str | os.PathLike | None = None) -> None:
    """Raise ``ValueError`` unless ``path`` is absent or a regular file inside ``root``.

    ``root`` defaults to the directory of ``path``. A symbolic link is followed only when its
    target stays inside ``root``: a link out of a run's directory would have another file's lines
    repaired and appended to. A FIFO, a device or a directory is refused (opening a FIFO for
    writing would block the training process).
    """
    path = os.fspath(path)
    root = os.path.realpath(os.fspath(root) if root is not None else (os.path.dirname(path) or "."))
    target = os.path.realpath(path)
    if os.path.islink(path) and os.path.commonpath([root, target]) != root:
        raise ValueError(f"{path} is a symbolic link to {target}, outside {root}: refusing to append to it")
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path} is not a regular file (a FIFO, a device or a directory): refusing to append to it")


@contextlib.contextmanager
def _appending(path: str) -> Iterator[int]:
    """A descriptor of ``path`` opened for appending and reading, held under an exclusive lock.

    Opened without blocking (a FIFO that appeared since :func:`check_appendable` cannot stall
    the caller) and refused unless it is a regular file.
    """
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    descriptor = os.open(path, flags, 0o644)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise ValueError(f"{path} is not a regular file: refusing to append to it")
        if fcntl is not None:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield descriptor
    finally:
        os.close(descriptor)  # closing releases the lock


def _last_newline(descriptor: int, size: int) -> int:
    """The offset of the last ``\\n`` before ``size``, or -1; reads each block from the end once."""
    end = size
    while end > 0:
        start = max(0, end - _BLOCK)
        found = os.pread(descriptor, end - start, start).rfind(b"\n")
        if found >= 0:
            return start + found
        end = start
    return -1


def _repair(descriptor: int, path: str) -> str | None:
    """Make the file end with a complete line: a cut last line that is whole JSON is completed,
    anything else after the last newline is dropped. What was done, or None."""
    size = os.fstat(descriptor).st_size
    if size == 0 or os.pread(descriptor, 1, size - 1) == b"\n":
        return None
    keep = _last_newline(descriptor, size) + 1
    tail = os.pread(descriptor, size - keep, keep)
    if parse_json(tail)[0]:
        os.write(descriptor, b"\n")
        return f"completed the last line of {path}"
    os.ftruncate(descriptor, keep)
    return f"dropped a cut-off last line ({len(tail)} bytes) of {path}"


def append_jsonl(path: str | os.PathLike, *records: Any) -> None:
    """Append each record as one line of strict JSON (non-finite floats as null), fsynced.

    The lines go out in one ``write`` on an ``O_APPEND`` descriptor under an exclusive lock
    (``flock``), so appenders in several processes never interleave or cut each other's lines,
    whatever their length. Under that lock a last line without its newline can only be left by a
    writer that died (a kill, a full disk): it is repaired first (completed if it is whole JSON,
    dropped otherwise, with a warning), so no record is glued onto a partial one. Refuses what
    :func:`check_appendable` refuses.
    """
    path = os.fspath(path)
    payload = "".join(json.dumps(json_safe(record), allow_nan=False) + "\n" for record in records).encode("utf-8")
    check_appendable(path)
    with _appending(path) as descriptor:
        repaired = _repair(descriptor, path)
        view = memoryview(payload)
        while view:  # a regular file takes it in one write; a signal or a full disk may cut it short
            view = view[os.write(descriptor, view) :]
        os.fsync(descriptor)
    if repaired:
        warnings.warn(f"mnn_callback {repaired} before appending", MNNWarning, stacklevel=2)


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """The records of a JSONL file (UTF-8, a byte-order mark allowed); blank lines skipped.

    Lines that are not valid JSON (a line cut by a crash, a hand edit, nesting too deep to parse)
    are skipped with one :class:`~mnn_callback.core.errors.MNNWarning` naming them. A file that is not
    UTF-8 text raises ``ValueError``.
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
        valid, record = parse_json(line)
        if valid:
            records.append(record)
        else:
            broken.append(number)
    if broken:
        shown = ", ".join(map(str, broken[:5])) + (f" and {len(broken) - 5} more" if len(broken) > 5 else "")
        warnings.warn(f"{path}: skipped {len(broken)} line(s) that are not valid JSON (line {shown})", MNNWarning, 2)
    return records
