"""MNNCallback in real Trainer runs: TensorBoard, W&B offline and JSONL read back, checkpoints, resume, DDP."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
import warnings
import zipfile

import pytest
from helpers import (
    HANG_TIMEOUT,
    PROBE_DATA,
    comet_archive_metrics,
    make_trainer,
    offline_comet,
    probe_lines,
    random_sequences,
    shakespeare_tokenizer,
    tensorboard_values,
    tiny_model,
    training_data,
)
from transformers import TrainingArguments
from wandb_reader import offline_runs, read_offline_run

from mnn_callback import MNNCallback, MNNWarning
from mnn_callback.output.files import read_jsonl
from mnn_callback.probing.probe import Probe

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")


def test_tensorboard_wandb_and_jsonl_hold_the_same_values(tmp_path):
    import wandb

    callback = MNNCallback(PROBE_DATA, every_n_steps=4, batch_size=4)
    trainer = make_trainer(tmp_path / "out", callback, report_to=["tensorboard", "wandb"], max_steps=10)
    trainer.train()
    wandb.finish()

    lines = probe_lines(tmp_path / "out" / "mnn_metrics.jsonl")
    assert [line["step"] for line in lines] == [0, 4, 8, 10]  # step 0, every 4, and the end
    keys = {key for key in lines[0] if "/" in key}
    for layer in range(3):
        for name in ("mnn", "nuclear_norm", "matrix_entropy", "erank", "diff_erank"):
            assert f"{name}/layer_{layer}" in keys
    for name in ("loss", "perplexity", "sequences", "tokens", "nan_sequences", "seconds", "errors"):
        assert f"probe/{name}" in keys
    assert lines[0]["diff_erank/layer_2"] == 0.0  # the step-0 probe is the reference

    scalars = tensorboard_values(callback.tensorboard_dir)  # the Trainer's own directory
    for key in keys - {key for key in keys if "_se/" in key}:  # standard errors are not TensorBoard cards
        expected = {line["step"]: line[key] for line in lines if key in line}
        got = scalars[key]
        assert got.keys() == expected.keys(), key
        for step, value in expected.items():
            assert got[step] == pytest.approx(value, rel=1e-6, abs=1e-6), (key, step)
    assert "train/loss" in scalars  # the Trainer's own scalars share the directory

    (run_dir,) = offline_runs(os.environ["WANDB_DIR"])
    run = read_offline_run(run_dir)
    rows = [row for row in run.history if "mnn/layer_0" in row]
    assert [row["train/global_step"] for row in rows] == [0, 4, 8, 10]
    for row, line in zip(rows, lines, strict=True):
        for key in keys:
            assert row[key] == pytest.approx(line[key], rel=1e-12), key
    step_metrics = {metric["name"]: metric["step_metric"] for metric in run.metrics}
    assert step_metrics["mnn/*"] == "train/global_step"
    assert step_metrics["diff_erank/*"] == "train/global_step"
    assert run.config["mnn_callback"]["fingerprint"] == callback.probe.fingerprint


def test_training_is_bit_identical_with_and_without_the_callback(tmp_path):
    def losses(callback):
        trainer = make_trainer(tmp_path / str(callback is None), callback, max_steps=10)
        trainer.train()
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    without = losses(None)
    with_callback = losses(MNNCallback(PROBE_DATA, every_n_steps=3))
    assert len(without) == 10
    assert with_callback == without


def test_checkpoints_and_trainer_state(tmp_path):
    callback = MNNCallback(PROBE_DATA, every_n_steps=4)
    trainer = make_trainer(tmp_path, callback, save_strategy="steps", save_steps=6)
    trainer.train()
    saved = json.loads((tmp_path / "checkpoint-6" / "mnn_metrics.json").read_text())
    assert [entry["step"] for entry in saved["history"]] == [0, 4]
    assert saved["config"]["fingerprint"] == callback.probe.fingerprint
    assert saved["reference"]["per_layer"]["erank"] == pytest.approx(
        [saved["history"][0][f"erank/layer_{i}"] for i in range(3)]
    )
    final = json.loads((tmp_path / "checkpoint-12" / "mnn_metrics.json").read_text())
    assert [entry["step"] for entry in final["history"]] == [0, 4, 8, 12]
    state = json.loads((tmp_path / "checkpoint-12" / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "mnn/layer_0" in entry]
    assert [entry["step"] for entry in logged] == [0, 4, 8, 12]
    assert all(isinstance(value, (int, float)) for entry in logged for value in entry.values())
    assert state["stateful_callbacks"]["mnn_callback"]["fingerprint"] == callback.probe.fingerprint
    assert not glob.glob(str(tmp_path / "checkpoint-*" / ".mnn-*"))  # no temporary files left


def test_resume_continues_history_and_reference(tmp_path):
    full = MNNCallback(PROBE_DATA, every_n_steps=4)
    make_trainer(tmp_path / "full", full, save_strategy="steps", save_steps=6).train()

    first = MNNCallback(PROBE_DATA, every_n_steps=4)
    make_trainer(tmp_path / "run", first, save_strategy="steps", save_steps=6, max_steps=6).train()
    resumed = MNNCallback(PROBE_DATA, every_n_steps=4)
    trainer = make_trainer(tmp_path / "run", resumed, save_strategy="steps", save_steps=6)
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6"))

    assert [entry["step"] for entry in resumed.history] == [0, 4, 8, 12]
    assert resumed.reference.to_dict()["per_layer"] == full.reference.to_dict()["per_layer"]
    for got, expected in zip(resumed.history, full.history, strict=True):
        for key in ("mnn/layer_2", "erank/layer_1", "diff_erank/layer_2", "probe/loss"):
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), (got["step"], key)
    records = read_jsonl(tmp_path / "run" / "mnn_metrics.jsonl")
    assert any(record.get("event") == "resume" and record["step"] == 6 for record in records)


def test_resume_with_another_probe_configuration_warns_and_takes_a_new_reference(tmp_path):
    make_trainer(
        tmp_path, MNNCallback(PROBE_DATA, every_n_steps=4), save_strategy="steps", save_steps=6, max_steps=6
    ).train()
    changed = MNNCallback(PROBE_DATA, every_n_steps=4, layers="last")
    trainer = make_trainer(tmp_path, changed, save_strategy="steps", save_steps=6)
    with pytest.warns(MNNWarning, match="different probe configuration"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    assert [entry["step"] for entry in changed.history] == [0, 4, 6, 8, 12]
    assert changed.history[2]["diff_erank/layer_2"] == 0.0  # the new reference, taken at the resume step


def test_reference_model_and_saved_result(tmp_path):
    base = tiny_model("gpt2", seed=7)
    expected = Probe(PROBE_DATA).run(base)
    from_model = MNNCallback(PROBE_DATA, every_n_steps=6, reference=base)
    make_trainer(tmp_path / "a", from_model, max_steps=6).train()
    assert from_model.reference.per_layer == expected.per_layer
    first = from_model.history[0]
    assert first["diff_erank/layer_2"] == pytest.approx(expected.per_layer["erank"][2] - first["erank/layer_2"])

    path = tmp_path / "reference.json"
    path.write_text(json.dumps(expected.to_dict()))
    from_file = MNNCallback(PROBE_DATA, every_n_steps=6, reference=str(path))
    make_trainer(tmp_path / "b", from_file, max_steps=6).train()
    assert from_file.history[-1]["diff_erank/layer_1"] == pytest.approx(
        expected.per_layer["erank"][1] - from_file.history[-1]["erank/layer_1"]
    )


def test_default_sinks_follow_report_to(tmp_path):
    callback = MNNCallback(PROBE_DATA, every_n_steps=6)
    make_trainer(tmp_path, callback, max_steps=6).train()
    assert [sink.name for sink in callback.sinks.sinks] == []  # closed at train end
    sinks = callback._make_sinks(TrainingArguments(str(tmp_path), report_to="none", use_cpu=True))
    assert [sink.name for sink in sinks] == ["jsonl"]
    assert (tmp_path / "mnn_metrics.jsonl").exists()
    assert not (tmp_path / "runs").exists()


def test_tensorboard_defaults_to_the_trainers_directory(tmp_path):
    callback = MNNCallback(PROBE_DATA, every_n_steps=6, sinks=["tensorboard"])
    make_trainer(tmp_path, callback, max_steps=6, report_to=["tensorboard"]).train()
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert callback.tensorboard_dir == run_dir
    scalars = tensorboard_values(run_dir)
    assert "mnn/layer_0" in scalars and "train/loss" in scalars


def test_evaluation_probes_when_asked(tmp_path):
    callback = MNNCallback(PROBE_DATA, every_n_steps=100, on_evaluate=True)
    trainer = make_trainer(
        tmp_path, callback, max_steps=6, eval_strategy="steps", eval_steps=3, eval_dataset=training_data(8)
    )
    trainer.train()
    assert [entry["step"] for entry in callback.history] == [0, 3, 6]


def test_errors_become_one_warning_and_a_count(tmp_path):
    callback = MNNCallback(PROBE_DATA, every_n_steps=2, layers=[7])  # out of range for this model
    with pytest.warns(MNNWarning, match="the probe failed") as record:
        make_trainer(tmp_path, callback, max_steps=6).train()
    assert sum("the probe failed" in str(w.message) for w in record) == 1
    assert callback.guard.errors == 4  # steps 0, 2, 4, 6
    lines = probe_lines(tmp_path / "mnn_metrics.jsonl")
    assert [line["probe/errors"] for line in lines] == [1, 2, 3, 4]


def test_strict_mode_raises(tmp_path):
    callback = MNNCallback(PROBE_DATA, every_n_steps=2, layers=[7], strict=True)
    with pytest.raises(ValueError, match="out of range"):
        make_trainer(tmp_path, callback, max_steps=6).train()


def test_overhead_warning_speaks_after_five_probes_and_suggests_a_cadence_that_meets_it(tmp_path):
    import re

    callback = MNNCallback(random_sequences(64, 100, 120), every_n_steps=1, batch_size=2)
    with pytest.warns(MNNWarning, match=r"at every_n_steps=1 that is \d+\.\d% of the training wall time") as record:
        make_trainer(tmp_path, callback, max_steps=7).train()
    (message,) = [str(w.message) for w in record if "wall time" in str(w.message)]
    steps_worth = float(re.search(r"cost [\d.]+ s, ([\d.]+) training steps' worth", message).group(1))
    cadence = int(re.search(r"every_n_steps=(\d+) keeps it at 5%", message).group(1))
    assert steps_worth / (steps_worth + 1) > 0.05  # the projection at the current cadence is over the threshold
    # The suggestion meets the threshold by the measured numbers (the printed cost is rounded to 0.1 step).
    assert (steps_worth - 0.05) / (steps_worth - 0.05 + cadence) <= 0.05 + 1e-9
    assert (steps_worth + 0.05) / (steps_worth + 0.05 + cadence - 1) > 0.05  # and is the smallest that does
    assert "max_overhead=0.05" in message and "method='cheap'" in message
    assert sum("probe/time_share" in entry for entry in callback.history) == 7
    quiet = MNNCallback(random_sequences(64, 100, 120), every_n_steps=1, batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MNNWarning)
        make_trainer(tmp_path / "short", quiet, max_steps=4).train()  # 3 scheduled probes: too few to judge


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"every_n_steps": 0}, ValueError, "every_n_steps"),
        ({"every_n_steps": 2.0}, ValueError, "every_n_steps"),
        ({"sinks": ["neptune"]}, ValueError, "unknown sink"),
        ({"sinks": [42]}, TypeError, "Sink objects"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        MNNCallback(PROBE_DATA, **kwargs)


def test_text_without_tokenizer_is_refused():
    with pytest.raises(ValueError, match="tokenizer="):
        MNNCallback(["some held-out text"])


def test_missing_sink_package_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail as if not installed
    with pytest.raises(ImportError, match=r"pip install 'mnn-callback\[wandb\]'"):
        MNNCallback(PROBE_DATA, sinks=["wandb"])


def test_import_mnn_callback_does_not_import_transformers():
    code = "import sys, mnn_callback; sys.exit('transformers' in sys.modules or 'wandb' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_two_process_ddp_has_one_writer_and_the_single_process_values(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    script = os.path.join(SCRIPTS, "train_ddp.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    subprocess.run([*torchrun, script, str(tmp_path / "ddp")], check=True, env=env, timeout=HANG_TIMEOUT)
    subprocess.run([sys.executable, script, str(tmp_path / "single")], check=True, env=env, timeout=HANG_TIMEOUT)
    ddp = probe_lines(tmp_path / "ddp" / "mnn_metrics.jsonl")
    single = probe_lines(tmp_path / "single" / "mnn_metrics.jsonl")
    assert [line["step"] for line in ddp] == [0, 4, 8]  # one line per probe: one writer
    for got, expected in zip(ddp, single, strict=True):
        for key, value in expected.items():
            if "/" in key and key not in ("probe/seconds", "probe/time_share"):
                assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    event_files = glob.glob(str(tmp_path / "ddp" / "tb" / "**" / "events.out.tfevents.*"), recursive=True)
    writers = {os.path.basename(path).split(".")[4] for path in event_files}
    assert len(writers) == 1  # TensorBoard events from one process only
    assert math.isfinite(ddp[0]["probe/loss"])


def test_a_model_with_fewer_positions_than_max_length_is_probed_with_one_info_line(tmp_path, caplog):
    import logging

    import transformers as tf

    config = tf.GPT2Config(
        vocab_size=96, n_layer=2, n_embd=32, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    callback = MNNCallback(random_sequences(8, 80, 200, seed=5), every_n_steps=4)  # the default max_length=512
    with caplog.at_level(logging.INFO, logger="mnn_callback"):
        make_trainer(tmp_path, callback, model=tf.GPT2LMHeadModel(config), max_steps=4).train()
    assert [entry["step"] for entry in callback.history] == [0, 4]  # metrics logged, no probe failed
    assert callback.guard.errors == 0 and callback.history[-1]["probe/max_tokens"] == 64
    cut = [record for record in caplog.records if "takes at most 64 positions" in record.getMessage()]
    assert len(cut) == 1 and cut[0].levelno == logging.INFO
    assert "cut to 64 tokens" in cut[0].getMessage()  # the limit actually applied, not max_length=512


# --- trust off the tested path: options combined, reuse, several monitors, hostile files -----------------


@pytest.mark.parametrize("background", [False, True])
def test_exact_every_with_dashboards_draws_every_profile_without_error(tmp_path, background):
    """Cheap and exact probes mixed in the layer profile (on main: TypeError into train(), or lost profiles)."""
    from helpers import event_accumulator

    from mnn_callback import Dashboards

    callback = MNNCallback(
        PROBE_DATA,
        every_n_steps=1,
        exact_every=2,
        sinks=["tensorboard", "jsonl"],
        log_dir=tmp_path / "tb",
        dashboards=Dashboards(background=background, heatmap_every=3),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path / "out", callback, max_steps=7).train()
    assert not [warning for warning in caught if "failed" in str(warning.message)]
    lines = probe_lines(tmp_path / "out" / "mnn_metrics.jsonl")
    assert [line["step"] for line in lines] == list(range(8)) and lines[-1]["probe/errors"] == 0
    assert ["matrix_entropy/layer_0" in line for line in lines] == [True, False] * 3 + [True, True]
    profiles = event_accumulator(tmp_path / "tb").Images("mnn_callback/layer_profile")
    if not background:  # drawn at every probe (in the background a waiting profile is replaced by a newer one)
        assert [image.step for image in profiles] == list(range(8))
    assert profiles[-1].step == 7


@pytest.mark.timeout(600)
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_in_place_of_the_jsonl_is_refused_and_training_goes_on(tmp_path):
    os.makedirs(tmp_path / "out")
    os.mkfifo(tmp_path / "out" / "mnn_metrics.jsonl")  # opening it for writing would block forever
    memory = __import__("mnn_callback").MemorySink()
    callback = MNNCallback(PROBE_DATA, every_n_steps=4, sinks=["jsonl", memory])
    with pytest.warns(MNNWarning, match="jsonl sink \\(setup\\) failed .*not a regular file"):
        make_trainer(tmp_path / "out", callback, max_steps=4).train()
    assert [measurement.step for measurement in memory.measurements] == [0, 4]


def test_resume_with_a_log_history_entry_without_step_warns_once(tmp_path):
    make_trainer(
        tmp_path, MNNCallback(PROBE_DATA, every_n_steps=4), save_strategy="steps", save_steps=6, max_steps=6
    ).train()
    state_path = tmp_path / "checkpoint-6" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    ours = [entry for entry in state["log_history"] if "probe/sequences" in entry]
    del ours[-1]["step"]  # hand-edited, or written by another tool
    state_path.write_text(json.dumps(state))
    resumed = MNNCallback(PROBE_DATA, every_n_steps=4)
    trainer = make_trainer(tmp_path, resumed, save_strategy="steps", save_steps=6)
    with pytest.warns(MNNWarning, match="saved MNN history is unreadable") as record:
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))  # on main: KeyError: 'step'
    assert sum(issubclass(warning.category, MNNWarning) for warning in record) == 1
    assert trainer.state.global_step == 12 and [entry["step"] for entry in resumed.history] == [6, 8, 12]
    assert resumed.history[0]["diff_erank/layer_2"] == 0.0  # a new reference, at the resume step


def test_a_callback_reused_for_a_second_run_starts_afresh(tmp_path):
    """As hyperparameter_search does (on main: the second run's Diff-eRank was measured against the first run's)."""
    callback = MNNCallback(PROBE_DATA, every_n_steps=4)
    make_trainer(tmp_path / "first", callback, seed=0).train()
    first_reference = callback.reference
    make_trainer(tmp_path / "second", callback, seed=1).train()
    assert callback.reference is not first_reference
    assert [entry["step"] for entry in callback.history] == [0, 4, 8, 12]
    assert [callback.history[0][f"diff_erank/layer_{i}"] for i in range(3)] == [0.0, 0.0, 0.0]
    alone = MNNCallback(PROBE_DATA, every_n_steps=4)
    make_trainer(tmp_path / "alone", alone, seed=1).train()
    for got, expected in zip(callback.history, alone.history, strict=True):  # the second run as if run alone
        assert got["diff_erank/layer_2"] == pytest.approx(expected["diff_erank/layer_2"], abs=1e-6)
    assert [line["step"] for line in probe_lines(tmp_path / "second" / "mnn_metrics.jsonl")] == [0, 4, 8, 12]


def test_two_callbacks_in_one_trainer_keep_their_own_files_history_and_reference_across_a_resume(tmp_path):
    def callbacks():
        return MNNCallback(PROBE_DATA, every_n_steps=4), MNNCallback(PROBE_DATA[:6], every_n_steps=3, layers="last")

    def trainer(pair, **overrides):
        run = make_trainer(tmp_path, None, save_strategy="steps", save_steps=6, **overrides)
        for callback in pair:
            run.add_callback(callback)
        return run

    first = callbacks()
    with pytest.warns(MNNWarning, match="'mnn-2'"):
        trainer(first, max_steps=6).train()
    assert [callback.name for callback in first] == ["mnn", "mnn-2"]
    resumed = callbacks()
    with pytest.warns(MNNWarning, match="'mnn-2'"):
        trainer(resumed).train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    assert [entry["step"] for entry in resumed[0].history] == [0, 4, 8, 12]
    assert [entry["step"] for entry in resumed[1].history] == [0, 3, 6, 9, 12]
    for callback, earlier in zip(resumed, first, strict=True):
        assert callback.reference.to_dict()["per_layer"] == earlier.reference.to_dict()["per_layer"]
    assert [line["step"] for line in probe_lines(tmp_path / "mnn_metrics.jsonl")] == [0, 4, 6, 8, 12]  # 6: final
    second = probe_lines(tmp_path / "mnn_metrics.mnn-2.jsonl")
    assert [line["step"] for line in second] == [0, 3, 6, 9, 12] and {line["monitor"] for line in second} == {"mnn-2"}
    checkpoint = tmp_path / "checkpoint-12"
    assert len(json.loads((checkpoint / "mnn_metrics.json").read_text())["history"]) == 4
    assert len(json.loads((checkpoint / "mnn_metrics.mnn-2.json").read_text())["history"]) == 5
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert {"mnn_callback", "mnn_callback.mnn-2"} <= set(state["stateful_callbacks"])
    assert len([entry for entry in state["log_history"] if "mnn-2/probe/sequences" in entry]) == 5


def sentence_transformer_run(output_dir, callback_texts=None):
    """Four steps of MultipleNegativesRankingLoss on the real MiniLM weights (dropout on), batches of 4
    made-up pairs, every step logged; with ``callback_texts``, ``MNNCallback`` probes every 2 steps.
    Returns the Trainer's log history and the trained SentenceTransformer."""
    from datasets import Dataset
    from helpers import minilm_path
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    try:  # sentence-transformers >= 6 moved the losses
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:
        from sentence_transformers.losses import MultipleNegativesRankingLoss

    model = SentenceTransformer(str(minilm_path()), device="cpu")
    pairs = Dataset.from_dict(
        {"anchor": [f"question {i} about the sea" for i in range(16)], "positive": [f"answer {i}" for i in range(16)]}
    )
    arguments = SentenceTransformerTrainingArguments(
        str(output_dir),
        max_steps=4,
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
    )
    callbacks = [MNNCallback(callback_texts, tokenizer=model.tokenizer, every_n_steps=2)] if callback_texts else []
    trainer = SentenceTransformerTrainer(
        model=model,
        args=arguments,
        train_dataset=pairs,
        loss=MultipleNegativesRankingLoss(model),
        callbacks=callbacks,  # the one line the callback takes
    )
    trainer.train()
    return trainer.state.log_history, model


ENCODER_KEYS = {"mnn", "mnn_vs_noise", "nuclear_norm", "matrix_entropy", "erank", "renyi2_entropy", "mnn_ratio"}
ENCODER_KEYS |= {"diff_erank", "mnn_change", "mnn_vs_noise_change", "matrix_entropy_change"}
ENCODER_KEYS |= {f"{name}_se" for name in ENCODER_KEYS - {"mnn_ratio"}}


def test_sentence_transformers_trainer_logs_real_metrics_with_no_extra_arguments(tmp_path):
    """SentenceTransformerTrainer on the real MiniLM weights: the callback probes the transformer inside
    the SentenceTransformer by itself (on main every probe failed and the run ended without a metric),
    and the run's losses, gradient norms and final weights are those of the same run without it."""
    pytest.importorskip("sentence_transformers")
    import torch

    texts = [f"The tide came in over the rocks, number {i}." for i in range(8)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history, model = sentence_transformer_run(tmp_path / "with", texts)
    assert not [warning for warning in caught if issubclass(warning.category, MNNWarning)]
    control_history, control = sentence_transformer_run(tmp_path / "without")
    steps = [(entry["step"], entry["loss"], entry["grad_norm"]) for entry in history if "loss" in entry]
    assert [step for step, _, _ in steps] == [1, 2, 3, 4] and all(math.isfinite(loss) for _, loss, _ in steps)
    assert steps == [(entry["step"], entry["loss"], entry["grad_norm"]) for entry in control_history if "loss" in entry]
    trained, untouched = model.state_dict(), control.state_dict()
    assert trained.keys() == untouched.keys() and all(torch.equal(trained[k], untouched[k]) for k in trained)

    lines = probe_lines(tmp_path / "with" / "mnn_metrics.jsonl")
    assert [line["step"] for line in lines] == [0, 2, 4] and lines[-1]["probe/errors"] == 0
    for line in lines:  # every metric of the 7 hidden states (embeddings + 6 layers), no probe loss (an encoder)
        per_layer = {key for key in line if "/layer_" in key}
        assert per_layer == {f"{name}/layer_{i}" for name in ENCODER_KEYS for i in range(7)}  # 21 x 7 keys
        assert line["mnn/last"] == line["mnn/layer_6"]
        assert "probe/loss" not in line and line["probe/sequences"] == 8
    logged = [(entry["step"], entry["mnn/layer_6"]) for entry in history if "mnn/layer_6" in entry]
    assert logged == [(line["step"], line["mnn/layer_6"]) for line in lines]  # what report_to's trackers receive
    expected = Probe(texts, tokenizer=model.tokenizer).run(model[0].auto_model)
    compared = {key: value for key, value in expected.metrics.items() if key != "probe/seconds"}
    assert {key: lines[-1][key] for key in compared} == pytest.approx(compared, rel=1e-9, abs=1e-12)  # measured: equal


def test_the_scalars_follow_report_to_into_mlflow(tmp_path, monkeypatch):
    """report_to=["mlflow"] (a local sqlite store): the MNN curves beside the Trainer's loss in the same run
    (on main they never reached MLflow, with no warning)."""
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mnn")
    callback = MNNCallback(PROBE_DATA, every_n_steps=4)
    make_trainer(tmp_path / "out", callback, report_to=["mlflow"]).train()
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("mnn").experiment_id])
    logged = probe_lines(tmp_path / "out" / "mnn_metrics.jsonl")
    for key in ("mnn/layer_2", "matrix_entropy/last", "probe/loss"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [(metric.step, metric.value) for metric in history] == [(line["step"], line[key]) for line in logged]
    assert "loss" in run.data.metrics  # the Trainer's own metrics, in the same run


def test_the_scalars_follow_report_to_into_comet_offline(tmp_path, monkeypatch):
    """report_to=["comet_ml"] with an offline experiment (no account, no network): the MNN curves in the
    experiment the Trainer's CometCallback started, read back from its offline archive."""
    pytest.importorskip("comet_ml")
    monkeypatch.setenv("COMET_START_ONLINE", "0")  # conftest sets it too: stated here, this test needs it
    monkeypatch.setenv("COMET_OFFLINE_DIRECTORY", str(tmp_path / "comet"))
    callback = MNNCallback(PROBE_DATA, every_n_steps=4)
    make_trainer(tmp_path / "out", callback, report_to=["comet_ml"]).train()
    import comet_ml

    comet_ml.get_running_experiment().end()  # writes the offline archive (also done at exit)
    (archive,) = (tmp_path / "comet").glob("*.zip")
    with zipfile.ZipFile(archive) as opened:
        messages = [json.loads(line) for line in opened.read("messages.json").decode().splitlines() if line.strip()]
    metrics = [message["payload"]["metric"] for message in messages if message["type"] == "metric_msg"]
    logged = probe_lines(tmp_path / "out" / "mnn_metrics.jsonl")
    for key in ("mnn/layer_2", "matrix_entropy/last", "probe/loss"):
        points = [(metric["step"], metric["metricValue"]) for metric in metrics if metric["metricName"] == key]
        assert points == [(line["step"], pytest.approx(line[key])) for line in logged], key
    assert any(metric["metricName"] == "train/loss" for metric in metrics)  # the Trainer's own, in the same experiment


def test_comet_mode_offline_is_named_as_why_no_experiment_and_its_fix_fills_the_archive(tmp_path, monkeypatch):
    """COMET_MODE=offline (the setting of transformers 4, which reads it) turns the Trainer's Comet logging off
    in transformers 5: no experiment, no archive. The warning names COMET_MODE and the fix (on 8861eeb it said
    to add 'comet_ml' to report_to, where it was); with the fix, or on transformers 4, the MNN scalars are in the
    offline archive beside the Trainer's loss."""
    import transformers

    comet_ml = pytest.importorskip("comet_ml")
    offline_comet(monkeypatch, tmp_path / "comet")  # COMET_START_ONLINE=0, no API key, no server within reach
    monkeypatch.setenv("COMET_MODE", "offline")
    if int(transformers.__version__.split(".")[0]) >= 5:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make_trainer(tmp_path / "refused", MNNCallback(PROBE_DATA, every_n_steps=4), report_to=["comet_ml"]).train()
        (warning,) = [
            str(w.message) for w in caught if issubclass(w.category, MNNWarning) and "comet" in str(w.message)
        ]
        assert "no running Comet experiment" in warning and "add 'comet_ml'" not in warning
        assert (
            "COMET_MODE='offline' is not a mode of the Trainer's CometCallback (get, get_or_create, create)" in warning
        )
        assert "set COMET_START_ONLINE=0 and unset COMET_MODE" in warning
        assert not list((tmp_path / "comet").glob("*.zip"))  # the Trainer's own metrics went nowhere either
        assert [line["step"] for line in probe_lines(tmp_path / "refused" / "mnn_metrics.jsonl")] == [0, 4, 8, 12]
        monkeypatch.delenv("COMET_MODE")  # the fix the warning names

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path / "out", MNNCallback(PROBE_DATA, every_n_steps=4), report_to=["comet_ml"]).train()
    assert not [w for w in caught if issubclass(w.category, MNNWarning)]
    experiment = comet_ml.get_running_experiment()
    assert isinstance(experiment, comet_ml.OfflineExperiment)
    experiment.end()  # writes the offline archive
    metrics = comet_archive_metrics(tmp_path / "comet")
    logged = probe_lines(tmp_path / "out" / "mnn_metrics.jsonl")
    for key in ("mnn/layer_2", "matrix_entropy/last", "diff_erank/layer_1", "probe/loss"):
        assert metrics[key] == [(line["step"], pytest.approx(line[key])) for line in logged], key
    assert [step for step, _ in metrics["train/loss"]] == list(range(1, 13))  # the Trainer's, in the same archive


def test_a_tracker_without_a_sink_is_named_in_one_warning(tmp_path):
    callback = MNNCallback(PROBE_DATA)
    arguments = TrainingArguments(str(tmp_path), report_to=["clearml"], use_cpu=True)
    with pytest.warns(MNNWarning, match=r"the MNN scalars do not go to clearml \(report_to\)"):
        sinks = callback._make_sinks(arguments)
    assert [sink.name for sink in sinks] == ["jsonl"]


def seq2seq_losses(output_dir, kind, callback=None):
    """Training losses of 6 Seq2SeqTrainer steps on a tiny encoder-decoder (dropout on: the RNG matters)."""
    import torch
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    generator = torch.Generator().manual_seed(7)  # ids from 3 on: no pad, start or end token
    pairs = []
    for _ in range(32):
        source, target = (
            torch.randint(3, 96, (12,), generator=generator),
            torch.randint(3, 96, (8,), generator=generator),
        )
        pairs.append({"input_ids": source, "labels": target})
    arguments = Seq2SeqTrainingArguments(
        str(output_dir), max_steps=6, per_device_train_batch_size=4, report_to="none", use_cpu=True, seed=0,
        save_strategy="no", logging_steps=1, disable_tqdm=True, learning_rate=1e-3,
    )  # fmt: skip
    model = tiny_model(kind, seed=0)
    trainer = Seq2SeqTrainer(model=model, args=arguments, train_dataset=pairs, callbacks=[callback] if callback else [])
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry], model


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_seq2seq_trainer_monitors_the_encoder_and_trains_bit_identically(tmp_path, kind):
    """On main every probe of an encoder-decoder failed ("... which the probe does not support")."""
    sequences = [[token + 3 for token in ids] for ids in random_sequences(8, 6, 20, seed=5, vocab_size=90)]
    without, _ = seq2seq_losses(tmp_path / "without", kind)
    callback = MNNCallback(sequences, every_n_steps=3, strict=True)
    with_callback, model = seq2seq_losses(tmp_path / "with", kind, callback)
    assert len(without) == 6 and with_callback == without  # bit-identical
    lines = probe_lines(tmp_path / "with" / "mnn_metrics.jsonl")
    assert [line["step"] for line in lines] == [0, 3, 6] and lines[-1]["probe/errors"] == 0
    assert sorted(key for key in lines[0] if key.startswith("mnn/layer_")) == [f"mnn/layer_{i}" for i in range(3)]
    assert not any(key.startswith("probe/loss") or key.startswith("probe/perplexity") for key in lines[-1])
    expected = Probe(sequences).run(model.get_encoder())
    for layer in range(3):
        assert lines[-1][f"mnn/layer_{layer}"] == pytest.approx(expected.per_layer["mnn"][layer], rel=1e-9)
        assert lines[-1][f"erank/layer_{layer}"] == pytest.approx(expected.per_layer["erank"][layer], rel=1e-9)
    assert lines[-1]["diff_erank/layer_2"] != 0.0  # the encoder trained


def test_a_lora_run_logs_the_probe_loss_and_it_is_the_float64_cross_entropy(tmp_path):
    """On main a PeftModel (get_peft_model without task_type) had no probe/loss nor probe/perplexity in training."""
    peft = pytest.importorskip("peft")
    import torch

    sequences = random_sequences(6, 5, 20, seed=4)

    def run(directory, callback):
        config = peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)
        model = peft.get_peft_model(tiny_model("gpt2", seed=2), config)
        trainer = make_trainer(directory, callback, model=model, max_steps=4, learning_rate=0.05)
        trainer.train()
        return model, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    lora, monitored = run(tmp_path, MNNCallback(sequences, every_n_steps=2))
    assert monitored == run(tmp_path / "control", None)[1]  # training unchanged, bit for bit
    lines = probe_lines(tmp_path / "mnn_metrics.jsonl")
    assert [line["step"] for line in lines] == [0, 2, 4]
    assert (
        all(math.isfinite(line["probe/loss"]) for line in lines) and lines[-1]["probe/loss"] != lines[0]["probe/loss"]
    )
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in sequences:  # independent reference: float64 cross-entropy of the trained model's logits
            logits = lora.eval()(input_ids=torch.tensor([ids])).logits[0].to(torch.float64)
            total -= torch.log_softmax(logits[:-1], -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum().item()
            count += len(ids) - 1
    assert lines[-1]["probe/loss"] == pytest.approx(total / count, rel=1e-6)
    assert lines[-1]["probe/perplexity"] == pytest.approx(math.exp(total / count), rel=1e-6)


def test_trl_sft_trainer_is_monitored_and_trains_bit_identically(tmp_path):
    """TRL's SFTTrainer on text: one add_callback line; the probe loss and metrics logged, the training
    losses equal to those of the same run without the callback."""
    pytest.importorskip("trl", minversion="0.19")  # SFTConfig(max_length=...); older ones install with old transformers
    import torch
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel
    from trl import SFTConfig, SFTTrainer

    from mnn_callback.demo import load_text, split_text

    tokenizer = shakespeare_tokenizer()
    train_text, held_out = split_text(load_text())
    train = Dataset.from_dict({"text": [part for part in train_text.split("\n\n") if part.strip()][:64]})
    texts = [part for part in held_out.split("\n\n") if 0 < len(part) < 160][:8]  # within max_length

    def run(directory, callback):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_embd=32, n_head=2, n_positions=64))
        config = SFTConfig(
            str(directory),
            max_steps=6,
            per_device_train_batch_size=4,
            max_length=64,
            logging_steps=1,
            report_to="none",
            bf16=False,  # SFTConfig defaults to bf16, which the Accelerator state keeps for later Trainers (4.x)
            save_strategy="no",
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = SFTTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer)
        if callback is not None:
            trainer.add_callback(callback)
        trainer.train()
        return model, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    callback = MNNCallback(texts, tokenizer=tokenizer, every_n_steps=3, max_length=64)
    model, monitored = run(tmp_path / "monitored", callback)
    _, control = run(tmp_path / "control", None)
    assert monitored == control and len(control) == 6
    lines = probe_lines(tmp_path / "monitored" / "mnn_metrics.jsonl")
    assert [line["step"] for line in lines] == [0, 3, 6] and lines[-1]["probe/errors"] == 0
    expected = Probe(texts, tokenizer=tokenizer, max_length=64).run(model)
    assert lines[-1]["mnn/layer_2"] == pytest.approx(expected.per_layer["mnn"][2], rel=1e-6)
    assert lines[-1]["probe/loss"] == pytest.approx(expected.loss, rel=1e-6)
