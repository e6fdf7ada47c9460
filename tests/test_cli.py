"""The post hoc CLI on checkpoints of a real Trainer run: same numbers as the callback, resume, errors, plots."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import HANG_TIMEOUT, TINY_DEMO, assert_png, probe_lines, read_csv, tensorboard_values

from mnn_callback.cli import CSV_COLUMNS, main
from mnn_callback.output.files import read_jsonl
from mnn_callback.posthoc.models import discover

PROBE = ["--max-samples", "8", "--max-length", "32", "--batch-size", "16"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A tiny demo run: a real Trainer with MNNCallback, checkpoints 0, 6 and 12, post hoc results, plots."""
    from mnn_callback.demo import main as demo_main

    out = tmp_path_factory.mktemp("demo") / "run"
    assert demo_main(["--out", str(out), *TINY_DEMO]) == 0
    return out


@pytest.fixture
def run_copy(demo_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(demo_run, copy, ignore=shutil.ignore_patterns("posthoc", "plots", "tensorboard"))
    return copy


def evaluate(run, out, *extra):
    return main(["evaluate", str(run), "--data", str(run / "heldout.jsonl"), "--out", str(out), *PROBE, *extra])


def test_evaluate_reproduces_what_the_callback_logged(demo_run):
    rows = read_csv(demo_run / "posthoc" / "metrics.csv")
    logged = {line["step"]: line for line in probe_lines(demo_run / "mnn_metrics.jsonl")}
    assert sorted({int(row["step"]) for row in rows}) == [0, 6, 12]
    for row in rows:
        line = logged[int(row["step"])]
        layer = row["layer"]
        for key in ("mnn", "nuclear_norm", "matrix_entropy", "erank", "diff_erank"):
            assert float(row[key]) == pytest.approx(line[f"{key}/layer_{layer}"], rel=1e-5, abs=1e-7), (key, row)
        assert float(row["loss"]) == pytest.approx(line["probe/loss"], rel=1e-5)
        assert float(row["perplexity"]) == pytest.approx(line["probe/perplexity"], rel=1e-5)


def test_csv_schema_and_rows(demo_run):
    with open(demo_run / "posthoc" / "metrics.csv", encoding="utf-8") as handle:
        header = handle.readline().strip().split(",")
    assert tuple(header) == CSV_COLUMNS
    rows = read_csv(demo_run / "posthoc" / "metrics.csv")
    assert len(rows) == 3 * 3  # checkpoints x hidden states (embeddings + 2 blocks)
    assert all(int(row["params"]) > 0 and row["error"] == "" for row in rows)
    assert all(int(row["sequences"]) == 8 and int(row["nan_sequences"]) == 0 for row in rows)
    first = [row for row in rows if row["step"] == "0"]
    assert all(float(row["diff_erank"]) == 0.0 for row in first)  # the first checkpoint is the reference
    records = read_jsonl(demo_run / "posthoc" / "metrics.jsonl")
    assert len(records) == 3 and all("result" in record for record in records)


def test_resume_skips_finished_checkpoints_and_force_redoes_them(run_copy, tmp_path):
    out = tmp_path / "results"
    assert evaluate(run_copy, out) == 0
    first = read_jsonl(out / "metrics.jsonl")
    assert evaluate(run_copy, out) == 0
    assert read_jsonl(out / "metrics.jsonl") == first  # nothing re-evaluated, nothing appended
    assert evaluate(run_copy, out, "--force") == 0
    again = read_jsonl(out / "metrics.jsonl")
    assert len(again) == 2 * len(first)
    assert len(read_csv(out / "metrics.csv")) == 9  # the latest result per checkpoint
    assert evaluate(run_copy, out, "--max-samples", "4") == 0  # another probe configuration: evaluated anew
    assert len(read_jsonl(out / "metrics.jsonl")) == 3 * len(first)


def test_a_corrupted_checkpoint_gives_an_error_row_and_exit_code_1(run_copy, tmp_path, capsys):
    (run_copy / "checkpoint-6" / "model.safetensors").write_bytes(b"not a safetensors file")
    out = tmp_path / "results"
    assert evaluate(run_copy, out) == 1
    assert "checkpoint-6 failed" in capsys.readouterr().err
    rows = read_csv(out / "metrics.csv")
    errors = [row for row in rows if row["error"]]
    assert len(errors) == 1 and errors[0]["model"].endswith("checkpoint-6") and errors[0]["step"] == "6"
    assert sorted({row["step"] for row in rows if not row["error"]}) == ["0", "12"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["evaluate", "no/such/dir/", "--data", "x.txt"], "no model or checkpoint found"),
        (["evaluate", "{run}", "--data", "missing.txt"], "data file not found"),
        (["evaluate", "{empty}", "--data", "{data}"], "holds neither a model"),
        (["evaluate", "{run}", "--data", "{short}"], "at least 2 tokens"),
        (["plot", "missing.csv"], "file not found"),
    ],
)
def test_bad_input_exits_with_code_2_and_one_line(argv, message, run_copy, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "short.jsonl").write_text('{"input_ids": [5]}\n', encoding="utf-8")
    names = {"run": run_copy, "empty": tmp_path / "empty", "data": run_copy / "heldout.jsonl"}
    names["short"] = tmp_path / "short.jsonl"
    argv = [part.format(**names) for part in argv] + ["--out", str(tmp_path / "out")]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("mnn-callback: error:") and message in error and "\n" not in error


def test_hub_ids_are_accepted_but_stay_offline(run_copy, tmp_path, capsys):
    (target,) = discover(["some-org/some-model"])
    assert not target.local
    code = main(["evaluate", "some-org/some-model", "--data", str(run_copy / "heldout.jsonl"), "--out", str(tmp_path)])
    assert code == 1  # HF_HUB_OFFLINE=1 in the tests: the load fails, the failure is reported
    assert "some-org/some-model failed" in capsys.readouterr().err


def test_family_references_and_tensorboard(run_copy, tmp_path):
    bigger = tmp_path / "bigger"
    from transformers import PreTrainedTokenizerFast

    from mnn_callback.demo import DemoData, train_gpt2

    tokenizer = PreTrainedTokenizerFast.from_pretrained(run_copy / "tokenizer")
    chunks = [record["input_ids"] for record in read_jsonl(run_copy / "heldout.jsonl")][:64]
    data = DemoData(tokenizer, chunks, str(run_copy / "heldout.jsonl"))
    train_gpt2(str(bigger), data, n_layer=3, n_embd=48, n_head=2, steps=6, every=6, save_every=6, probe_samples=8)
    small, large = run_copy / "checkpoint-12", bigger / "checkpoint-6"
    out = tmp_path / "family"
    code = main(
        [
            "evaluate",
            str(small),
            str(large),
            "--data",
            str(run_copy / "heldout.jsonl"),
            "--out",
            str(out),
            *PROBE,
            "--reference-untrained",
            "--tensorboard",
            str(tmp_path / "tb"),
        ]
    )
    assert code == 0
    rows = read_csv(out / "metrics.csv")
    assert {row["model"] for row in rows} == {str(small), str(large)}
    assert len({row["params"] for row in rows}) == 2
    assert all(row["diff_erank"] != "" for row in rows)
    scalars = tensorboard_values(tmp_path / "tb")
    assert set(scalars["mnn/layer_0"]) == {12, 6}  # each model at its training step
    assert main(["plot", str(out / "metrics.csv"), "--out", str(tmp_path / "plots")]) == 0
    assert_png(tmp_path / "plots" / "family.png")

    # --reference checkpoint-0: the model the callback probed at step 0, its own reference
    with_reference = tmp_path / "ref"
    argv = ["evaluate", str(small), "--data", str(run_copy / "heldout.jsonl"), "--out", str(with_reference), *PROBE]
    assert main([*argv, "--reference", str(run_copy / "checkpoint-0")]) == 0
    logged = {line["step"]: line for line in probe_lines(run_copy / "mnn_metrics.jsonl")}[12]
    for row in read_csv(with_reference / "metrics.csv"):
        expected = logged[f"diff_erank/layer_{row['layer']}"]
        assert float(row["diff_erank"]) == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_plot_reads_every_file_the_package_writes(demo_run, tmp_path):
    assert main(["plot", str(demo_run / "posthoc" / "metrics.csv"), "--out", str(tmp_path / "csv")]) == 0
    for name in ("dynamics.png", "heatmap_mnn.png", "heatmap_matrix_entropy.png", "approximation.png"):
        assert_png(tmp_path / "csv" / name)
    assert main(["plot", str(demo_run / "posthoc" / "metrics.jsonl"), "--out", str(tmp_path / "evaluated")]) == 0
    for name in ("dynamics.png", "heatmap_mnn.png", "approximation.png"):
        assert_png(tmp_path / "evaluated" / name)
    assert main(["plot", str(demo_run / "mnn_metrics.jsonl"), "--out", str(tmp_path / "jsonl")]) == 0
    for name in ("dynamics.png", "heatmap_mnn.png", "approximation.png"):
        assert_png(tmp_path / "jsonl" / name)


def test_python_dash_m_and_console_script():
    result = subprocess.run(
        [sys.executable, "-m", "mnn_callback", "--help"], capture_output=True, text=True, check=True
    )
    assert "evaluate" in result.stdout and "plot" in result.stdout and "demo" in result.stdout
    script = shutil.which("mnn-callback", path=os.path.dirname(sys.executable))
    assert script is not None
    result = subprocess.run([script, "evaluate", "--help"], capture_output=True, text=True, check=True)
    assert "--reference-untrained" in result.stdout


def test_evaluate_a_model_with_fewer_positions_and_plot_a_run_directory(tmp_path, demo_run, caplog):
    import logging

    import transformers as tf
    from helpers import random_sequences

    config = tf.GPT2Config(vocab_size=512, n_layer=2, n_embd=32, n_head=2, n_positions=64, bos_token_id=0)
    tf.GPT2LMHeadModel(config).save_pretrained(tmp_path / "short")
    data = tmp_path / "long.jsonl"
    data.write_text("\n".join(json.dumps({"input_ids": ids}) for ids in random_sequences(8, 80, 100, vocab_size=512)))
    argv = ["evaluate", str(tmp_path / "short"), "--data", str(data), "--out", str(tmp_path / "out")]
    with caplog.at_level(logging.INFO, logger="mnn_callback"):
        assert main(argv) == 0  # the default --max-length 512 is cut to the model's 64 positions
    assert sum("takes at most 64 positions" in record.getMessage() for record in caplog.records) == 1
    rows = read_csv(tmp_path / "out" / "metrics.csv")
    assert {float(row["max_tokens"]) for row in rows} == {64.0} and all(row["mnn"] for row in rows)
    assert main(["plot", str(demo_run), "--out", str(tmp_path / "plots")]) == 0  # a run directory: its history
    assert_png(tmp_path / "plots" / "dynamics.png")


def test_a_family_with_other_tokenizers_gets_no_diff_erank_and_one_warning(demo_run, tmp_path):
    from helpers import minilm_path

    from mnn_callback import MNNWarning, evaluate_models

    text = tmp_path / "heldout.txt"
    text.write_text("To be, or not to be, that is the question.\n\nWhether 'tis nobler in the mind to suffer.\n")
    models = [str(demo_run / "checkpoint-12"), str(minilm_path())]
    with pytest.warns(MNNWarning) as record:
        rows = evaluate_models(models, str(text), max_length=32)
    about_reference = [str(w.message) for w in record if "Diff-eRank of" in str(w.message)]
    assert len(about_reference) == 1 and "another number of hidden states" in about_reference[0]
    assert any("differ in hidden sizes" in str(w.message) for w in record)
    gpt2_rows = [row for row in rows if row["model"] == models[0]]
    minilm_rows = [row for row in rows if row["model"] == models[1]]
    assert all(row["diff_erank"] == 0.0 for row in gpt2_rows)  # its own reference
    assert minilm_rows and all(row["diff_erank"] is None for row in minilm_rows)  # left empty, not computed
    assert {row["hidden_size"] for row in rows} == {32, 384}


@pytest.mark.parametrize(
    ("argv", "absent", "extra"),
    [
        (["plot", "metrics.csv"], "matplotlib", "plot"),
        (["demo", "--steps", "1"], "tokenizers", "all"),
        (["evaluate", "run/", "--data", "x.txt"], "transformers", "transformers"),
        (["rank", "model/", "--prompts", "p.jsonl"], "matplotlib", "transformers,plot"),
        (["demo", "--wandb"], "wandb", "wandb"),
    ],
)
def test_a_command_without_its_extra_exits_2_naming_the_pip_command(argv, absent, extra, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, absent, None)  # what an environment without that package looks like to import
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert absent in error
    assert f"pip install 'mnn-callback[{extra}]'" in error


# --- post hoc beyond one device: dispatched models, work shared across processes ----------------------------


def torchrun_cli(*argv, processes=2):
    """``torchrun -m mnn_callback ARGV`` (gloo, CPU); the timeout fails the test on a hang."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = (
        [*launcher, "-m", "mnn_callback", *argv] if processes > 1 else [sys.executable, "-m", "mnn_callback", *argv]
    )
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT)


def test_two_processes_share_the_checkpoints_and_write_what_one_would(run_copy, tmp_path):
    """3 checkpoints over 2 processes (each its own models), then one model over 2 processes (each its shard)."""
    data = str(run_copy / "heldout.jsonl")
    for name, processes in (("one", 1), ("two", 2)):
        done = torchrun_cli(
            "evaluate",
            str(run_copy),
            "--data",
            data,
            "--out",
            str(tmp_path / name),
            *PROBE,
            "--device",
            "cpu",
            processes=processes,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "two" / "metrics.csv").read_text() == (tmp_path / "one" / "metrics.csv").read_text()
    references = [record for record in read_jsonl(tmp_path / "two" / "metrics.jsonl") if record.get("role")]
    assert references == []  # the first model is the reference: nothing measured twice

    final = str(run_copy / "checkpoint-12")
    for name, processes in (("one-model", 1), ("one-model-two", 2)):
        argv = ["evaluate", final, "--data", data, "--out", str(tmp_path / name), *PROBE, "--reference-untrained"]
        done = torchrun_cli(*argv, "--device", "cpu", processes=processes)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = read_csv(tmp_path / "one-model" / "metrics.csv"), read_csv(tmp_path / "one-model-two" / "metrics.csv")
    assert len(one) == len(two) == 3
    for expected, got in zip(one, two, strict=True):
        for column in ("mnn", "erank", "diff_erank", "loss", "sequences", "tokens"):
            assert float(got[column]) == pytest.approx(float(expected[column]), rel=1e-9, abs=1e-12), column


def test_a_checkpoint_failing_on_one_process_is_an_error_row_not_a_hang(run_copy, tmp_path):
    weights = run_copy / "checkpoint-6" / "model.safetensors"  # checkpoint 1 of 3: process 1's
    weights.write_bytes(b"not safetensors")
    done = torchrun_cli(
        "evaluate", str(run_copy), "--data", str(run_copy / "heldout.jsonl"), "--out", str(tmp_path / "out"), *PROBE,
        "--device", "cpu",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    rows = read_csv(tmp_path / "out" / "metrics.csv")
    assert [(row["step"], bool(row["error"])) for row in rows if row["layer"] in ("", "0")] == [
        ("0", False),
        ("6", True),
        ("12", False),
    ]
    assert done.stderr.count("checkpoint-6 failed") == 1  # one process prints


def test_a_model_dispatched_with_offload_gives_the_undispatched_values(tmp_path):
    """Accelerate's big-model inference on CPU: max_memory so small that blocks go to disk; equal values."""
    from helpers import random_sequences, tiny_model

    from mnn_callback.posthoc.evaluation import evaluate_models
    from mnn_callback.posthoc.models import load_model
    from mnn_callback.posthoc.placement import Placement

    path = tmp_path / "model"
    tiny_model("gpt2", layers=4, hidden=64).save_pretrained(path)
    (target,) = discover([str(path)])
    placement = Placement.of("cpu", "float32", "auto", {"cpu": "300KB"}, str(tmp_path / "offload"))
    dispatched = load_model(target, placement=placement, trust_remote_code=False)
    assert "disk" in set(dispatched.hf_device_map.values()) and "cpu" in set(dispatched.hf_device_map.values())
    data = random_sequences(6, 5, 20, seed=4)
    options = {"reference": "untrained", "batch_size": 4}
    plain = evaluate_models([str(path)], data, device="cpu", **options)
    split = evaluate_models([str(path)], data, device="cpu", device_map="auto", max_memory={"cpu": "300KB"}, **options)
    for expected, got in zip(plain, split, strict=True):
        for column in ("mnn", "matrix_entropy", "erank", "diff_erank", "loss"):
            assert got[column] == expected[column], column
    out = tmp_path / "cli"
    argv = ["evaluate", str(path), "--data", str(tmp_path / "data.jsonl"), "--out", str(out), "--device-map", "auto"]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"input_ids": ids}) + "\n" for ids in data))
    assert main([*argv, "--max-memory", "cpu=300KB"]) == 0
    assert main([*argv, "--max-memory", "cpu:300KB"]) == 2  # one line naming the form


def test_a_lora_run_its_checkpoints_and_an_adapter_directory_are_evaluated(tmp_path):
    """PEFT post hoc (on main: "holds neither a model (config.json) nor checkpoint-* directories")."""
    peft = pytest.importorskip("peft")
    from helpers import make_trainer, random_sequences, tiny_model
    from transformers import AutoModelForCausalLM

    from mnn_callback import MNNCallback, Probe

    base_dir = tmp_path / "base"
    tiny_model("gpt2", seed=2).save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    run = tmp_path / "run"
    callback = MNNCallback(random_sequences(6, 5, 20, seed=4), every_n_steps=2)  # PEFT models train as they are
    trainer = make_trainer(
        run, callback, model=lora, max_steps=4, save_strategy="steps", save_steps=2, learning_rate=0.05
    )
    trainer.train()
    assert [line["step"] for line in probe_lines(run / "mnn_metrics.jsonl")] == [0, 2, 4]
    trainer.save_model(str(run))  # the final adapter at the run's root
    assert (
        not (run / "checkpoint-4" / "config.json").exists() and (run / "checkpoint-4" / "adapter_config.json").exists()
    )

    data = tmp_path / "data.jsonl"
    ids = random_sequences(6, 5, 20, seed=4)
    data.write_text("".join(json.dumps({"input_ids": sequence}) + "\n" for sequence in ids))
    options = ["--data", str(data), "--layers", "last", "--device", "cpu"]
    assert main(["evaluate", str(run), "--out", str(tmp_path / "series"), *options]) == 0
    rows = read_csv(tmp_path / "series" / "metrics.csv")
    assert [int(row["step"]) for row in rows] == [2, 4]
    merged = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True), str(run / "checkpoint-4")
    ).merge_and_unload()
    expected = Probe(ids).run(merged.eval())
    assert float(rows[1]["mnn"]) == pytest.approx(expected.per_layer["mnn"][-1], rel=1e-5)
    assert float(rows[1]["loss"]) == pytest.approx(expected.loss, rel=1e-5)
    untouched = Probe(ids).run(AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True).eval())
    assert float(rows[1]["loss"]) != pytest.approx(untouched.loss, rel=1e-6)  # the adapter was merged in

    adapter_only = tmp_path / "adapter"
    shutil.copytree(run / "checkpoint-4", adapter_only)
    assert main(["evaluate", str(adapter_only), "--out", str(tmp_path / "one"), *options]) == 0
    assert read_csv(tmp_path / "one" / "metrics.csv")[0]["mnn"] == rows[1]["mnn"]
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", str(tmp_path / "empty"), "--out", str(tmp_path / "none"), *options]) == 2


def test_the_command_prints_the_package_info_lines_on_stderr_once_per_run(tmp_path, capsys):
    """On main the mnn_callback logger had no handler: the command printed none of its INFO lines."""
    import logging

    from helpers import random_sequences, tiny_model

    tiny_model("gpt2").save_pretrained(tmp_path / "model")  # 128 positions
    data = tmp_path / "long.jsonl"
    data.write_text("\n".join(json.dumps({"input_ids": ids}) for ids in random_sequences(4, 150, 160)))
    package, root = logging.getLogger("mnn_callback"), logging.getLogger()
    before = (list(package.handlers), package.level, list(root.handlers), root.level)
    capsys.readouterr()
    argv = ["evaluate", str(tmp_path / "model"), "--data", str(data), "--layers", "last", "--device", "cpu"]
    for out in ("first", "second"):  # main twice in one process: each run's lines once
        assert main([*argv, "--out", str(tmp_path / out)]) == 0
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("INFO: ")]
        assert len(lines) == 1 and lines[0].startswith("INFO: GPT2LMHeadModel takes at most 128 positions"), lines
    assert (list(package.handlers), package.level, list(root.handlers), root.level) == before
