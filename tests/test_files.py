"""JSONL appends and reads: several writers, cut lines, links, FIFOs and hostile lines (README: What happens when)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import HANG_TIMEOUT

from mnn_callback import MNNWarning
from mnn_callback.cli import main
from mnn_callback.output.files import append_jsonl, check_appendable, read_jsonl
from mnn_callback.output.sinks import JsonlSink

WRITER = """
import sys
from mnn_callback.output.files import append_jsonl
path, writer, count, width = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
for number in range(count):
    append_jsonl(path, {"writer": writer, "number": number, "padding": "x" * (width + 997 * (number % 7))})
"""


def test_appends_from_several_processes_never_lose_or_cut_a_record(tmp_path):
    """Two processes appending lines of 31-37 KB to one file (on main, 21 of 600 were lost and 2 cut)."""
    path = tmp_path / "shared.jsonl"
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), name, "300", str(31_000)]) for name in ("a", "b")
    ]
    for writer in writers:
        assert writer.wait(timeout=HANG_TIMEOUT) == 0
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 601
    records = [json.loads(line) for line in lines[:-1]]  # every line whole JSON
    for name in ("a", "b"):
        assert [record["number"] for record in records if record["writer"] == name] == list(range(300))


def test_a_cut_last_line_is_repaired_by_reading_each_byte_once(tmp_path, monkeypatch):
    """The repair reads backwards block by block, each block once (on main it re-read the tail: quadratic)."""
    path = tmp_path / "history.jsonl"
    path.write_bytes(b'{"step": 0}\n' + b'{"step": 2, "padding": "' + b"x" * (8 << 20))  # an 8 MiB cut line
    size = path.stat().st_size
    real_pread, read = os.pread, []

    def counting_pread(descriptor, length, offset):
        data = real_pread(descriptor, length, offset)
        read.append(len(data))
        return data

    monkeypatch.setattr(os, "pread", counting_pread)
    with pytest.warns(MNNWarning, match="dropped a cut-off last line"):
        append_jsonl(path, {"step": 4})
    assert sum(read) <= 2 * size + 2
    assert [record["step"] for record in read_jsonl(path)] == [0, 4]


def test_a_symlink_out_of_the_run_directory_is_refused_and_its_target_untouched(tmp_path):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run.mkdir()
    elsewhere.mkdir()
    target = elsewhere / "notes.txt"
    target.write_text("someone's file\nwithout a final newline")
    (run / "mnn_metrics.jsonl").symlink_to(target)
    with pytest.raises(ValueError, match=r"symbolic link .* outside"):
        JsonlSink(run / "mnn_metrics.jsonl")
    with pytest.raises(ValueError, match=r"symbolic link .* outside"):
        append_jsonl(run / "mnn_metrics.jsonl", {"step": 0})
    assert target.read_text() == "someone's file\nwithout a final newline"

    (run / "logs").mkdir()
    (run / "inside.jsonl").symlink_to(run / "logs" / "history.jsonl")  # a link within the run is followed
    JsonlSink(run / "inside.jsonl").log_event("config", 0)
    assert read_jsonl(run / "logs" / "history.jsonl")[0]["event"] == "config"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_is_refused_without_blocking(tmp_path):
    path = tmp_path / "mnn_metrics.jsonl"
    os.mkfifo(path)
    script = (
        "import sys\nfrom mnn_callback.output.files import append_jsonl\n"
        "try:\n    append_jsonl(sys.argv[1], {'step': 0})\nexcept ValueError as error:\n    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120)
    assert "not a regular file" in done.stdout
    with pytest.raises(ValueError, match="not a regular file"):
        check_appendable(tmp_path)  # a directory


def test_deeply_nested_lines_are_skipped_and_repaired_like_cut_ones(tmp_path):
    path = tmp_path / "mnn_metrics.jsonl"
    nested = "[" * 100_000 + "]" * 100_000  # valid JSON that no parser recursion limit takes
    path.write_text('{"step": 0, "mnn/layer_0": 0.5}\n' + nested + '\n{"step": 2, "mnn/layer_0": 0.6}\n')
    with pytest.warns(MNNWarning, match=r"skipped 1 line\(s\) that are not valid JSON \(line 2\)"):
        assert [record["step"] for record in read_jsonl(path)] == [0, 2]
    with pytest.warns(MNNWarning, match="not valid JSON"):
        assert main(["plot", str(path), "--out", str(tmp_path / "plots")]) == 0  # on main: RecursionError
    path.write_text('{"step": 0}\n' + nested)  # as a last line without its newline
    with pytest.warns(MNNWarning, match="dropped a cut-off last line"):
        append_jsonl(path, {"step": 4})
    append_jsonl(path, {"step": 6})  # and every later append works
    assert [record["step"] for record in read_jsonl(path)] == [0, 4, 6]
