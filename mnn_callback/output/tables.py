"""The long table: one row per model x step x layer, from results, histories and files.

Its columns are :data:`~mnn_callback.core.schema.CSV_COLUMNS`. Plots and the CSV writer take these
rows; every file the package writes can be read back into them (:func:`load_table`).
"""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from mnn_callback.core import schema
from mnn_callback.core.errors import UsageError
from mnn_callback.core.identity import DEFAULT_NAME
from mnn_callback.output.files import json_safe, read_jsonl
from mnn_callback.probing.results import ProbeResult

__all__ = ["current_timeline", "evaluation_rows", "history_rows", "load_table", "result_rows", "write_csv"]

RUN_HISTORY = "mnn_metrics.jsonl"  # the callback's and the hook's history, in the run's output directory


def result_rows(
    result: ProbeResult, identity: Mapping[str, Any], differences: Mapping[str, list[float]] | None = None
) -> list[dict[str, Any]]:
    """One row per layer of ``result``, holding the CSV columns: ``identity`` (model, step, ...), metrics,
    standard errors, probe fields (None where this result has no value)."""
    probe = result.probe_values()
    rows = []
    for position, layer in enumerate(result.layers):
        values: dict[str, Any] = {**identity, "layer": layer, **probe}
        values.update({name: column[position] for name, column in {**result.per_layer, **(differences or {})}.items()})
        values.update({f"{name}_se": column[position] for name, column in result.standard_errors.items()})
        rows.append({column: values.get(column) for column in schema.CSV_COLUMNS if column != "error"})
    return rows


def _is_probe_line(record: Mapping[str, Any]) -> bool:
    return "step" in record and "event" not in record


def _later(step: Any, than: Any) -> bool:
    """Whether ``step`` comes after ``than``; False unless both are numbers (a hand-edited line is kept)."""
    numbers = all(isinstance(value, (int, float)) for value in (step, than))
    return numbers and step > than


def current_timeline(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The records of a run's history without the probe lines that later runs in the same file superseded.

    The JSONL is append-only: a run restarted in the same file leaves the lines of the run it
    abandoned there. Each run of a monitor (the ``monitor`` field) starts with a ``config`` event;
    one that resumes from a checkpoint then logs ``resume`` at the step ``r`` it continues from.
    When the lines name their run (``run``; the ``resume`` event the run it ``continues``), the
    timeline is the latest run's lines, then those of the run it continues up to ``r``, and so on
    back (:func:`_lineage`). Lines without run ids are read by their place in the file:

    - a ``resume`` supersedes the monitor's earlier probe lines at steps after ``r`` (the
      abandoned run went on past the checkpoint);
    - a probe of the resumed run at ``r`` itself (taken again for a new Diff-eRank reference)
      supersedes the earlier line at ``r``;
    - a run whose first probe comes without a ``resume`` started from scratch: it supersedes all
      of the monitor's earlier probe lines (its history starts afresh, as the monitor's does).

    Event lines and other monitors' lines are kept, except an ``alert`` that names its run whose
    probe line (same monitor, run and step) is not on the timeline: the abandoned run's alarm. The
    order is the file's.

    >>> abandoned = [{"event": "config"}, {"step": 0, "value": 1}, {"step": 2, "value": 1}, {"step": 4, "value": 1}]
    >>> resumed = [{"event": "config"}, {"event": "resume", "step": 2}, {"step": 4, "value": 2}]
    >>> [(line["step"], line["value"]) for line in current_timeline(abandoned + resumed) if "value" in line]
    [(0, 1), (2, 1), (4, 2)]
    >>> a = [{"event": "config", "run": "a"}] + [{"step": step, "run": "a"} for step in (0, 2, 4, 6)]
    >>> b = [{"event": "config", "run": "b"}, {"step": 0, "run": "b"}, {"step": 2, "run": "b"}]  # from scratch
    >>> c = [{"event": "resume", "step": 4, "run": "c", "continues": "a"}, {"step": 6, "run": "c"}]  # a's checkpoint
    >>> [(line["step"], line["run"]) for line in current_timeline(a + b + c) if "event" not in line]
    [(0, 'a'), (2, 'a'), (4, 'a'), (6, 'c')]
    >>> alerts = [{"event": "alert", "step": 6, "run": run} for run in ("a", "c")]
    >>> [line["run"] for line in current_timeline(a + b + c + alerts) if line.get("event") == "alert"]
    ['c']
    """
    records = list(records)
    by_monitor: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        by_monitor[record.get("monitor", DEFAULT_NAME)].append(index)
    timeline: set[int] = set()
    for indices in by_monitor.values():
        named = any(isinstance(records[i].get("run"), str) for i in indices if _is_probe_line(records[i]))
        timeline.update(_lineage(records, indices) if named else _by_position(records, indices))
    probed = {_fired_by(records[index]) for index in timeline}
    return [
        record
        for index, record in enumerate(records)
        if index in timeline or not (_is_probe_line(record) or _superseded_alert(record, probed))
    ]


def _fired_by(record: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    return record.get("monitor", DEFAULT_NAME), record.get("run"), record.get("step")


def _superseded_alert(record: Mapping[str, Any], probed: set[tuple[Any, Any, Any]]) -> bool:
    """An ``alert`` of a named run whose probe is not on the timeline (lines without run ids are all kept)."""
    return record.get("event") == "alert" and isinstance(record.get("run"), str) and _fired_by(record) not in probed


def _by_position(records: list[Mapping[str, Any]], indices: list[int]) -> list[int]:
    """One monitor's probe lines on its latest run's timeline, read by their place in the file (no run ids)."""
    kept: list[int] = []
    opened: Mapping[str, Any] | None = None  # the latest run's config or resume, until it probes
    for index in indices:
        record = records[index]
        if record.get("event") in ("config", "resume"):
            opened = record
        if record.get("event") == "resume":
            kept = [i for i in kept if not _later(records[i]["step"], record.get("step"))]
        elif _is_probe_line(record):
            if opened is not None and opened["event"] == "config":
                kept = []
            elif opened is not None and opened.get("step") == record["step"]:
                kept = [i for i in kept if records[i]["step"] != record["step"]]
            opened = None
            kept.append(index)
    return kept


def _lineage(records: list[Mapping[str, Any]], indices: list[int]) -> list[int]:
    """One monitor's probe lines on the timeline of its latest run (the run of its last probe line or
    ``resume``), following each ``resume``'s ``continues`` back: a run's lines up to the step its
    successor resumed at (the smallest such step on the way), none at a step a later run holds. A
    ``resume`` that names no run (its checkpoint is from a version without run ids) continues the
    lines before it, read by their place."""
    lines: dict[str, list[int]] = defaultdict(list)
    continues: dict[str, tuple[Any, Any, int]] = {}  # run -> (the run it continues, its resume step, where)
    latest = None
    for index in indices:
        record = records[index]
        if _is_probe_line(record) and isinstance(record.get("run"), str):
            lines[record["run"]].append(index)
            latest = record["run"]
        elif record.get("event") == "resume" and isinstance(record.get("run"), str):
            continues[record["run"]] = (record.get("continues"), record.get("step"), index)
            latest = record["run"]
    kept: list[int] = []
    steps: set[Any] = set()

    def keep(candidates: list[int], bound: Any) -> None:
        for index in reversed(candidates):
            step = records[index]["step"]
            if (bound is None or not _later(step, bound)) and step not in steps:
                kept.append(index)
                steps.add(step)

    run, bound, visited = latest, None, set()
    while isinstance(run, str) and run not in visited:
        visited.add(run)
        keep(lines[run], bound)
        parent, resumed_at, where = continues.get(run, (None, None, None))
        bound = resumed_at if bound is None or _later(bound, resumed_at) else bound
        if parent is None and where is not None:  # an older checkpoint: the lines before, by their place
            keep(_by_position(records, [i for i in indices if i < where]), bound)
        run = parent
    return sorted(kept)


def history_rows(records: Iterable[Mapping[str, Any]], model: str = "run") -> list[dict[str, Any]]:
    """Rows of a run's history: the callback's ``log_history`` entries or ``mnn_metrics.jsonl`` lines.

    Only the :func:`current_timeline`: lines a resume or a restart superseded give no rows. Lines
    of a monitor other than the default one (their ``monitor`` field) are the model
    ``"<model>:<monitor>"``, so two monitors' lines in one file never merge into one curve.
    """
    rows = []
    for record in current_timeline(records):
        if not _is_probe_line(record):
            continue
        monitor = record.get("monitor", DEFAULT_NAME)
        name = model if monitor == DEFAULT_NAME else f"{model}:{monitor}"
        rows.extend(schema.long_rows(record, {"model": name, "step": record["step"], "params": None}))
    return rows


def evaluation_rows(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows of one ``metrics.jsonl`` record written by post hoc evaluation: per layer, or one error row."""
    identity = {column: record.get(column) for column in schema.IDENTITY_COLUMNS if column != "layer"}
    if record.get("error"):
        return [{**identity, "error": record["error"]}]
    result = ProbeResult.from_dict(record["result"])
    differences = {
        name: [math.nan if value is None else value for value in values]
        for name, values in (record.get("differences") or {}).items()
    }
    return [{**row, "error": ""} for row in result_rows(result, identity, differences)]


def _csv_rows(path: str) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (UnicodeDecodeError, csv.Error) as error:
        raise UsageError(f"{path} is not a CSV text file ({type(error).__name__})") from None
    columns = set(rows[0]) if rows else set()
    metrics = columns & {row.name for row in schema.LAYER_METRICS}
    if rows and not ({"model", "layer"} <= columns and metrics):
        raise UsageError(f"{path} is not a metrics.csv: it needs the columns model, layer and a metric such as mnn")
    numeric = schema.numeric_columns()
    return [
        {key: (schema.number(value) if key in numeric else value) for key, value in row.items()}
        for row in rows
        if not row.get("error")
    ]


def _jsonl_rows(path: str) -> list[dict[str, Any]]:
    try:
        records = [record for record in read_jsonl(path) if isinstance(record, dict)]
    except ValueError as error:
        raise UsageError(str(error)) from None
    if any("result" in record or "error" in record for record in records):  # post hoc evaluation
        try:
            return [row for record in records if record.get("role") != "reference" for row in evaluation_rows(record)]
        except (KeyError, TypeError, ValueError) as error:
            raise UsageError(f"{path} holds a malformed evaluation record ({type(error).__name__}: {error})") from None
    model = os.path.basename(os.path.dirname(os.path.abspath(path))) or "run"
    return history_rows(records, model=model)


def load_table(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of ``metrics.csv``, of the ``metrics.jsonl`` that evaluation writes, or of a run's history.

    A run directory stands for its ``mnn_metrics.jsonl``. ``UsageError`` for anything else.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, RUN_HISTORY)):
            raise UsageError(f"{path} is a directory without a {RUN_HISTORY}: pass a metrics.csv or a .jsonl file")
        path = os.path.join(path, RUN_HISTORY)
    if not os.path.isfile(path):
        raise UsageError(f"file not found: {path}")
    if path.endswith(".csv"):
        return _csv_rows(path)
    if path.endswith(".jsonl"):
        return _jsonl_rows(path)
    raise UsageError(f"{path}: expected a .csv or .jsonl file written by mnn_callback")


def write_csv(path: str, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write the rows to ``path`` (atomically) with the schema's columns; returns the row count."""
    temporary = path + ".tmp"
    count = 0
    with open(temporary, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=schema.CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if value is None else value for key, value in json_safe(dict(row)).items()})
            count += 1
    os.replace(temporary, path)
    return count
