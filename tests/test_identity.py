"""Monitor names: unique per output directory while open, stable in start order, files named after them."""

from __future__ import annotations

import gc

import pytest

from mnn_callback import MNNWarning
from mnn_callback.core.identity import claim_name, named_file, release_name, validate_name


class Owner:
    """Anything a name can be held by (weakly)."""


def test_names_are_unique_per_directory_while_held(tmp_path):
    first, second, third = Owner(), Owner(), Owner()
    assert claim_name(tmp_path, first) == "mnn"
    assert claim_name(tmp_path, first) == "mnn"  # the holder itself gets its name again
    with pytest.warns(MNNWarning, match="this one is 'mnn-2'"):
        assert claim_name(tmp_path, second) == "mnn-2"
    assert claim_name(tmp_path / "other", third) == "mnn"  # another directory: no clash
    release_name(tmp_path, "mnn")
    assert claim_name(tmp_path, third) == "mnn"
    holder = Owner()
    assert claim_name(tmp_path, holder, "long") == "long"
    with pytest.warns(MNNWarning, match="this one is 'long-2'"):
        assert claim_name(tmp_path, first, "long") == "long-2"
    assert claim_name(None, first) == claim_name(None, second) == "mnn"  # no files to tell apart


def test_a_holder_dropped_without_closing_frees_its_name(tmp_path):
    claim_name(tmp_path, Owner())  # garbage at once
    gc.collect()
    assert claim_name(tmp_path, Owner()) == "mnn"


@pytest.mark.parametrize("name", ["", "a/b", "../x", " x", "x" * 65, 3])
def test_bad_names_are_refused(name):
    with pytest.raises(ValueError, match="name must be"):
        validate_name(name)


def test_file_names():
    assert named_file("mnn_metrics.jsonl", "mnn") == "mnn_metrics.jsonl"
    assert named_file("mnn_metrics.json", "mnn-2") == "mnn_metrics.mnn-2.json"
