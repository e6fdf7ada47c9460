"""Which monitor wrote what: each monitor's name, unique per output directory, and the file names it implies.

Several monitors may share a run (two callbacks in one Trainer, two hooks with one
``project_dir``): each claims a name for its directory while it is open, and its history file,
checkpoint entry and tracker keys carry that name, so no record is attributed to another one.
The first monitor of a directory is ``"mnn"`` and keeps the plain file names.
"""

from __future__ import annotations

import os
import re
import threading
import warnings
import weakref
from typing import Any

from mnn_callback.core.errors import MNNWarning

__all__ = ["DEFAULT_NAME", "claim_name", "named_file", "release_name", "validate_name"]

DEFAULT_NAME = "mnn"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# directory (real path) -> name -> the open monitor holding it (weakly: a monitor dropped unclosed frees it)
_claimed: dict[str, dict[str, weakref.ref]] = {}
_lock = threading.Lock()


def validate_name(name: str | None) -> str | None:
    """``name`` if it can name files and tracker keys (letters, digits, ``_.-``, 64 at most), else ``ValueError``.

    >>> validate_name("probe-long"), validate_name(None)
    ('probe-long', None)
    """
    if name is not None and (not isinstance(name, str) or not _NAME.match(name)):
        raise ValueError(
            f"name must be 1-64 letters, digits, '_', '.' or '-' (starting with a letter or digit), got {name!r}"
        )
    return name


def claim_name(directory: str | os.PathLike | None, owner: Any, requested: str | None = None) -> str:
    """A name that no other open monitor writing to ``directory`` holds: ``requested`` (default
    ``"mnn"``), else ``requested-2``, ``-3``, ... with a warning. Held by ``owner`` until
    :func:`release_name` or until ``owner`` is garbage. Without a directory there are no files to
    tell apart: ``requested`` or ``"mnn"``.

    Monitors claim in the order they start, which is the same on every process and at every resume.
    """
    base = validate_name(requested) or DEFAULT_NAME
    if directory is None:
        return base
    with _lock:
        held = _claimed.setdefault(os.path.realpath(os.fspath(directory)), {})
        for stale in [name for name, holder in held.items() if holder() is None]:
            del held[stale]
        name, number = base, 1
        while name in held and held[name]() is not owner:
            number += 1
            name = f"{base}-{number}"
        held[name] = weakref.ref(owner)
    if name != base:
        warnings.warn(
            f"another open monitor writes to {directory} as {base!r}: this one is {name!r}, with files of its own "
            f"(e.g. {named_file('mnn_metrics.jsonl', name)}); name= chooses the name",
            MNNWarning,
            stacklevel=3,
        )
    return name


def release_name(directory: str | os.PathLike | None, name: str) -> None:
    """Give ``name`` back (the monitor closed)."""
    if directory is None:
        return
    with _lock:
        _claimed.get(os.path.realpath(os.fspath(directory)), {}).pop(name, None)


def named_file(file_name: str, name: str) -> str:
    """The file of monitor ``name``: ``file_name`` itself for the default monitor, else with the name before the suffix.

    >>> named_file("mnn_metrics.jsonl", "mnn"), named_file("mnn_metrics.jsonl", "long")
    ('mnn_metrics.jsonl', 'mnn_metrics.long.jsonl')
    """
    if name == DEFAULT_NAME:
        return file_name
    stem, suffix = os.path.splitext(file_name)
    return f"{stem}.{name}{suffix}"
