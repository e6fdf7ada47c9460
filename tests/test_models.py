"""Models for post hoc evaluation: hub revisions from a real (offline) Hugging Face cache, paths, steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import HANG_TIMEOUT, PROBE_DATA, read_csv, tiny_model

from mnn_callback import UsageError, evaluate_models
from mnn_callback.posthoc.models import discover, step_of_revision


def hub_cache(root, repo: str, revisions: dict[str, object]) -> dict[str, str]:
    """A Hugging Face cache as huggingface_hub lays it out: models--org--name/{refs/<revision>, snapshots/<commit>/}.

    Returns each revision's snapshot folder.
    """
    folder = root / "hub" / ("models--" + repo.replace("/", "--"))
    snapshots = {}
    for index, (revision, model) in enumerate(revisions.items()):
        commit = f"{index + 1:040x}"
        snapshot = folder / "snapshots" / commit
        model.save_pretrained(snapshot)
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / revision).write_text(commit)
        snapshots[revision] = str(snapshot)
    return snapshots


def test_revisions_are_evaluated_offline_from_the_cache(tmp_path):
    snapshots = hub_cache(
        tmp_path / "hf", "org/tiny", {"step4": tiny_model("gpt2", seed=4), "step8": tiny_model("gpt2", seed=8)}
    )
    data = tmp_path / "heldout.jsonl"
    data.write_text("\n".join(json.dumps({"input_ids": ids}) for ids in PROBE_DATA))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "mnn_callback", "evaluate", "--data", str(data), "--batch-size", "4"]
    for models, out in (
        (["org/tiny@step4", "org/tiny@step8"], "at"),
        (["org/tiny", "--revisions", "step4,step8"], "list"),
    ):
        result = subprocess.run(
            [*command, *models, "--out", str(tmp_path / out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=HANG_TIMEOUT,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        rows = read_csv(tmp_path / out / "metrics.csv")
        assert [(row["revision"], row["step"]) for row in rows] == [("step4", "4")] * 3 + [("step8", "8")] * 3
        expected = evaluate_models([snapshots["step4"], snapshots["step8"]], str(data), batch_size=4)
        for row, reference in zip(rows, expected, strict=True):  # the values of the two weight sets
            assert float(row["mnn"]) == pytest.approx(reference["mnn"], rel=1e-6)
            assert float(row["erank"]) == pytest.approx(reference["erank"], rel=1e-6)
    listing = subprocess.run(
        [*command, "org/tiny", "--revisions", "step*", "--out", str(tmp_path / "glob")],
        env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT,
    )  # fmt: skip
    assert (
        listing.returncode == 2 and "needs network access" in listing.stderr and "--revisions step0" in listing.stderr
    )


def test_revision_names_give_steps_and_bad_revisions_are_usage_errors():
    assert step_of_revision("step3000") == 3000 and step_of_revision("main") is None
    (target,) = discover(["EleutherAI/pythia-70m@step3000"])
    assert (target.name, target.path, target.revision, target.step, target.local) == (
        "EleutherAI/pythia-70m@step3000", "EleutherAI/pythia-70m", "step3000", 3000, False
    )  # fmt: skip
    assert [t.name for t in discover(["org/m"], revisions=["step0", "step10"])] == ["org/m@step0", "org/m@step10"]
    with pytest.raises(UsageError, match="names no revision after '@'"):
        discover(["org/m@"])
    with pytest.raises(UsageError, match="needs network access"):
        discover(["org/m"], revisions=["step*"])  # HF_HUB_OFFLINE=1 in the tests
