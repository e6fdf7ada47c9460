"""Read back what a W&B offline run logged, from its ``.wandb`` file.

wandb >= 0.31 has no public reader for offline runs. The file is a LevelDB-log stream: a 7-byte
header ``<4sHB`` = (b":W&B", 0xBEE1, 0), then 32 KiB blocks of records, each with a 7-byte header
``<IHB`` = (crc32 of the type byte and payload, payload length, type: FULL=1, FIRST=2, MIDDLE=3,
LAST=4); the payloads put together are ``wandb_internal_pb2.Record`` protobufs.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_payloads(path: str):
    with open(path, "rb") as handle:
        data = handle.read()
    magic, version, zero = struct.unpack("<4sHB", data[:HEADER])
    assert (magic, version, zero) == (b":W&B", 0xBEE1, 0), f"not a W&B log: {path}"
    offset, pending = HEADER, b""
    while offset + HEADER <= len(data):
        left_in_block = BLOCK - offset % BLOCK
        if left_in_block < HEADER:  # block trailer: zero padding
            offset += left_in_block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[offset : offset + HEADER])
        if length == 0 and kind == 0:  # zero padding at the end of a block
            offset += left_in_block
            continue
        if offset + HEADER + length > len(data):  # still being written
            return
        payload = data[offset + HEADER : offset + HEADER + length]
        assert zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF == checksum, "corrupt record"
        offset += HEADER + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            yield pending + payload
            pending = b""


def _key(item: Any) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


@dataclass
class OfflineRun:
    finished: bool = False  # the run's exit record was written: nothing more will come
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)  # define_metric records
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


def read_offline_run(run_dir: str) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(os.path.join(run_dir, "*.wandb"))
    run = OfflineRun()
    for payload in iter_payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                if len(item.nested_key) > 1:  # media (images, tables) come as {key: {"_type": ..., "path": ...}}
                    row.setdefault("/".join(item.nested_key[:-1]), {})[item.nested_key[-1]] = json.loads(
                        item.value_json
                    )
                else:
                    row[_key(item)] = json.loads(item.value_json)
            run.history.append(row)
        elif kind == "metric":
            metric = record.metric
            run.metrics.append(
                {
                    "name": metric.name or metric.glob_name,
                    "step_metric": metric.step_metric,
                    "summary": sorted(
                        name
                        for name in ("min", "max", "mean", "last", "best", "copy", "none")
                        if getattr(metric.summary, name, False)
                    ),
                }
            )
        elif kind == "config":
            for item in record.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = json.loads(item.value_json)
        elif kind == "files":
            run.files.extend(file.path for file in record.files.files)
        elif kind == "exit":
            run.finished = True
    return run


def wait_for_run(run_dir: str, timeout: float = 120.0) -> OfflineRun:
    """The offline run once W&B has written all of it: its exit record and every media file it names.

    W&B writes from a service process after ``wandb.finish()`` returns; reading earlier can miss
    the last records. Polls the file (a bounded wait: fails the test rather than hang).
    """
    deadline = time.monotonic() + timeout
    while True:
        run = read_offline_run(run_dir)
        media = [
            os.path.join(run_dir, "files", value["path"])
            for row in run.history
            for value in row.values()
            if isinstance(value, dict) and "path" in value
        ]
        if run.finished and all(os.path.isfile(path) for path in media):
            return run
        if time.monotonic() > deadline:
            raise AssertionError(f"W&B did not finish writing {run_dir} within {timeout} s")
        time.sleep(0.2)


def offline_runs(wandb_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*")))
