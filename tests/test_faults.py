"""Faults that must never hang a distributed run, lose a logged line or crash training (README: What happens when)."""

from __future__ import annotations

import glob
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import (
    HANG_TIMEOUT,
    PROBE_DATA,
    VOCAB,
    make_trainer,
    minilm_path,
    probe_lines,
    shakespeare_tokenizer,
    tensorboard_values,
    tiny_model,
)

from mnn_callback import JsonlSink, MNNCallback, MNNWarning, Monitor, Probe
from mnn_callback.cli import main
from mnn_callback.output.files import read_jsonl
from mnn_callback.probing.results import Measurement

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")


# --- rows 1-3: a failure on one process, samples that differ -------------------------------------------


def test_two_process_run_survives_rank_local_failures_and_differing_samples(tmp_path):
    """Rows 1-3 and differing schedules (on main: a hang) in a real 2-process DDP Trainer run (torchrun, gloo);
    the timeout fails the test on a hang."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    script = os.path.join(SCRIPTS, "train_ddp_faults.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    subprocess.run([*torchrun, script, str(tmp_path / "ddp")], check=True, env=env, timeout=HANG_TIMEOUT)
    subprocess.run([sys.executable, script, str(tmp_path / "single")], check=True, env=env, timeout=HANG_TIMEOUT)

    mixed = probe_lines(tmp_path / "ddp" / "mixed" / "mnn_metrics.jsonl")
    assert [line["step"] for line in mixed] == [0, 2, 4, 6, 8]  # training went on: one line per probe
    assert [line["probe/errors"] for line in mixed] == [0, 0, 1, 2, 3]  # process 1 fails from step 4 on
    single = {line["step"]: line for line in probe_lines(tmp_path / "single" / "mixed" / "mnn_metrics.jsonl")}
    for line in mixed[:2]:  # process 0's sample on both processes: the single-process values (the model is frozen)
        assert line["probe/sequences"] == single[line["step"]]["probe/sequences"] == 9
        assert line["mnn/layer_1"] == pytest.approx(single[line["step"]]["mnn/layer_1"], rel=1e-6)

    vocab = probe_lines(tmp_path / "ddp" / "vocab" / "mnn_metrics.jsonl")
    assert [line["probe/errors"] for line in vocab] == [1, 2, 3, 4, 5] and "mnn/layer_0" not in vocab[-1]

    reports = [json.loads((tmp_path / "ddp" / f"report.{rank}.json").read_text()) for rank in range(2)]
    main_warnings = reports[0]["warnings"]
    assert reports[1]["warnings"] == []  # one warning, from process 0
    assert sum("samples differ across processes" in message for message in main_warnings) == 1
    failed = [message for message in main_warnings if "the probe failed" in message]
    assert len(failed) == 2
    assert "process 1: RuntimeError: simulated: CUDA out of memory" in failed[0]
    assert "item 1 of the data: token id 101 is out of range for GPT2LMHeadModel" in failed[1]
    assert "96 tokens" in failed[1]
    schedule = [message for message in main_warnings if "settings differ across processes" in message]
    assert len(schedule) == 1 and "(every_n_steps: process 0 2, process 1 3)" in schedule[0]
    assert "the monitor is off for this run on every process" in schedule[0]
    assert probe_lines(tmp_path / "ddp" / "schedule" / "mnn_metrics.jsonl") == []  # and training finished
    for report in reports:  # strict: an error on every process alike, none waits for the other
        assert "the probe samples differ across processes" in report["strict_error"]


# --- row 2: bad token ids ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([[1, 2, 3], [4, -1, 6]], "item 1 of the data: token ids must be >= 0, found -1"),
        ([[1, 2, 3], None], "item 1 of the data: each sequence must be a string or a list of integer token ids"),
        ({"input_ids": 5}, "input_ids must be a 2-D integer tensor"),
        ([[1, 2.5, 3]], "item 0 of the data: each sequence must be a string or a list of integer token ids, found 2.5"),
    ],
)
def test_bad_token_ids_are_refused_at_construction(data, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Probe(data)


def test_token_ids_beyond_the_vocabulary_name_the_sequence_line_and_bound(tmp_path):
    path = tmp_path / "heldout.jsonl"
    path.write_text(json.dumps({"input_ids": [1, 2, 3]}) + "\n" + json.dumps({"input_ids": [4, VOCAB]}) + "\n")
    probe = Probe(path)
    with pytest.raises(ValueError, match=rf"line 2 of {path}: token id {VOCAB} is out of range .* {VOCAB} tokens"):
        probe.run(tiny_model("gpt2"))


# --- row 4: the seed -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [None, "abc", 1.5, True])
def test_the_seed_must_be_an_int(seed):
    with pytest.raises(ValueError, match="seed must be an int"):
        Probe(PROBE_DATA, seed=seed)
    assert Probe(PROBE_DATA, seed=np.int64(3)).sequences == Probe(PROBE_DATA, seed=3).sequences


# --- row 5: a cut-off JSONL line -----------------------------------------------------------------------


def test_a_cut_line_is_repaired_before_appending_and_readers_skip_broken_lines(tmp_path):
    path = tmp_path / "mnn_metrics.jsonl"
    path.write_text('{"step": 0, "mnn/layer_0": 0.5}\n{"step": 2, "mnn/la', encoding="utf-8")  # killed mid-write
    sink = JsonlSink(path)
    with pytest.warns(MNNWarning, match="dropped a cut-off last line"):
        sink.log_measurement(Measurement(4, None, None, monitor={"errors": 0.0}))
    sink.log_measurement(Measurement(6, None, None, monitor={"errors": 0.0}))
    assert [line["step"] for line in probe_lines(path)] == [0, 4, 6]  # nothing written after the repair is lost

    path.write_text('{"step": 0}\n{"ste\n{"step": 4}\nnot json\n{"step": 8}\n', encoding="utf-8")  # hand-edited
    with pytest.warns(MNNWarning, match=r"skipped 2 line\(s\) that are not valid JSON \(line 2, 4\)"):
        assert [record["step"] for record in read_jsonl(path)] == [0, 4, 8]


def test_training_resumed_after_a_cut_line_keeps_every_later_record(tmp_path):
    callback = MNNCallback(PROBE_DATA, every_n_steps=2)
    make_trainer(tmp_path, callback, max_steps=4, save_strategy="steps", save_steps=4).train()
    history = tmp_path / "mnn_metrics.jsonl"
    with open(history, "a", encoding="utf-8") as handle:
        handle.write('{"step": 5, "mnn/layer_0": 0.')  # the disk filled up mid-line
    resumed = MNNCallback(PROBE_DATA, every_n_steps=2)
    with pytest.warns(MNNWarning, match="cut-off last line"):
        make_trainer(tmp_path, resumed, max_steps=8).train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert [line["step"] for line in probe_lines(history)] == [0, 2, 4, 6, 8]
    assert main(["plot", str(history), "--out", str(tmp_path / "plots")]) == 0


# --- row 6: TensorBoard on a full disk -------------------------------------------------------------------

FULL_DISK_SCRIPT = """
import glob, os, resource, signal, sys, warnings
sys.path.insert(0, sys.argv[2])
from helpers import PROBE_DATA, tiny_model
from mnn_callback import Monitor, Probe, TensorBoardSink

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the file-size limit fails (EFBIG), as on a full disk
directory = sys.argv[1]
monitor = Monitor(Probe(PROBE_DATA), dashboards=False)
monitor.open(lambda: [TensorBoardSink(directory)], is_main_process=True)
model = tiny_model("gpt2")
monitor.measure(model, 0)
(event_file,) = glob.glob(os.path.join(directory, "events.*"))
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(event_file) + 64, hard))  # the disk is full
monitor.measure(model, 1)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space freed
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    monitor.measure(model, 2)
    monitor.measure(model, 3)
monitor.close()
print([str(w.message) for w in caught], monitor.guard.errors)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file-size limits")
def test_tensorboard_writer_that_died_on_a_full_disk_is_replaced(tmp_path):
    helpers_dir = os.path.dirname(__file__)
    command = [sys.executable, "-c", FULL_DISK_SCRIPT, str(tmp_path / "tb"), helpers_dir]
    result = subprocess.run(command, capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "File too large" in result.stderr  # the writer really failed
    output = result.stdout.strip().splitlines()[-1]
    assert output.count("had failed (disk full?); writing to a new event file") == 1 and output.endswith(" 1")
    assert len(glob.glob(str(tmp_path / "tb" / "events.*"))) == 2
    scalars = tensorboard_values(tmp_path / "tb")
    assert {2, 3} <= set(scalars["mnn/layer_2"]) and {2, 3} <= set(scalars["probe/loss"])


# --- rows 7-9: resume, reference, loss ---------------------------------------------------------------------


def test_a_malformed_saved_state_warns_once_and_takes_a_fresh_reference(tmp_path):
    make_trainer(
        tmp_path, MNNCallback(PROBE_DATA, every_n_steps=2), max_steps=4, save_strategy="steps", save_steps=4
    ).train()
    state_path = tmp_path / "checkpoint-4" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state["stateful_callbacks"]["mnn_callback"]["reference"] = {"layers": "x"}  # hand-edited, or another version
    state_path.write_text(json.dumps(state))
    resumed = MNNCallback(PROBE_DATA, every_n_steps=2)
    with pytest.warns(MNNWarning, match="the saved Diff-eRank reference is unreadable") as record:
        make_trainer(tmp_path, resumed, max_steps=8).train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert sum("unreadable" in str(w.message) for w in record) == 1
    assert [entry["step"] for entry in resumed.history] == [0, 2, 4, 6, 8]  # training and the curves went on
    assert resumed.history[3]["diff_erank/layer_2"] == 0.0  # the fresh reference: the next probe


def test_a_reference_without_finite_values_is_replaced_by_the_next_finite_probe():
    model = tiny_model("gpt2")
    monitor = Monitor(Probe(PROBE_DATA, batch_size=4), dashboards=False)
    weight = model.transformer.wte.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.fill_(math.nan)  # every sequence non-finite at the step-0 probe
    with pytest.warns(MNNWarning, match="non-finite hidden states"):
        broken = monitor.measure(model, 0)
    assert all(math.isnan(value) for value in broken.differences["diff_erank"])
    with torch.no_grad():
        weight.copy_(saved)
    with pytest.warns(MNNWarning, match="the probe at step 2 is their reference from now on"):
        fine = monitor.measure(model, 2)
    assert fine.differences["diff_erank"] == [0.0, 0.0, 0.0] and monitor.reference is fine.result


def test_a_nan_loss_gives_a_nan_perplexity():
    model = tiny_model("gpt2")
    with torch.no_grad():
        model.lm_head.weight[0, 0] = math.nan  # the logits are NaN, the hidden states are fine
    result = Probe(PROBE_DATA).run(model)
    assert math.isnan(result.loss) and math.isnan(result.perplexity)
    assert math.isnan(result.metrics["probe/perplexity"]) and math.isfinite(result.metrics["mnn/last"])


# --- row 10: compiled models ------------------------------------------------------------------------------


def test_the_probe_leaves_every_module_dict_exactly_as_it_was():
    model = tiny_model("gpt2")
    # transformers 5.24 renamed it; 4.x has only the old name
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.transformer.h[0].gradient_checkpointing = False  # one block with its own value
    compiled = torch.compile(model, backend="eager")
    before = {name: dict(module.__dict__) for name, module in model.named_modules()}
    Probe(PROBE_DATA).run(compiled)
    after = {name: dict(module.__dict__) for name, module in model.named_modules()}
    after["transformer"].pop("_output_capturing_hooks_installed", None)  # transformers 5's own, on the first request
    assert after.keys() == before.keys()
    for name, attributes in before.items():
        assert after[name].keys() == attributes.keys(), name
        assert all(after[name][key] is value for key, value in attributes.items()), name


# --- row 11: encoder-decoder models -------------------------------------------------------------------


def test_encoder_decoder_models_are_probed_by_their_encoder():
    """On main they were refused ("is an encoder-decoder model, which the probe does not support")."""
    import transformers as tf

    def config():  # one each: T5EncoderModel sets is_encoder_decoder=False on the config it is given
        return tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2)

    probe = Probe(PROBE_DATA)
    encoder_only = tf.T5EncoderModel(config())
    expected = probe.run(encoder_only).per_layer["mnn"]
    for model_class in (tf.T5ForConditionalGeneration, tf.T5Model):
        model = model_class(config())
        model.get_encoder().load_state_dict(encoder_only.get_encoder().state_dict())
        result = probe.run(model)
        assert result.config["probed"] == "encoder" and result.loss is None
        assert result.per_layer["mnn"] == pytest.approx(expected, rel=1e-12)


# --- row 12: the command line --------------------------------------------------------------------------


@pytest.fixture
def saved_model(tmp_path):
    path = tmp_path / "model"
    tiny_model("gpt2").save_pretrained(path)
    data = tmp_path / "heldout.jsonl"
    data.write_text("\n".join(json.dumps({"input_ids": ids}) for ids in PROBE_DATA) + "\n")
    return path, data


def run_cli(argv, capsys) -> str:
    assert main([str(part) for part in argv]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("mnn-callback: error:") and "\n" not in error, error
    return error


def test_cli_bad_input_is_exit_2_and_one_line(saved_model, tmp_path, capsys, monkeypatch):
    model, data = saved_model
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    evaluate = ["evaluate", model, "--data", data]
    assert "--layers must be" in run_cli([*evaluate, "--layers", "0,x"], capsys)
    assert "is a file; expected a directory" in run_cli([*evaluate, "--out", a_file], capsys)
    csv = tmp_path / "metrics.csv"
    assert main([str(part) for part in [*evaluate, "--out", tmp_path / "results"]]) == 0
    capsys.readouterr()
    plot_into_a_file = ["plot", tmp_path / "results" / "metrics.csv", "--out", a_file]
    assert "is a file; expected a directory" in run_cli(plot_into_a_file, capsys)
    csv.write_text("name,value\na,1\n")
    assert "is not a metrics.csv" in run_cli(["plot", csv], capsys)
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(bytes(range(256)) * 4)
    assert "not a UTF-8 text file" in run_cli(["plot", binary], capsys)
    assert "expected a .csv or .jsonl" in run_cli(["plot", tmp_path / "a_file"], capsys)
    flat = tmp_path / "flat.csv"
    flat.write_text("model,step,layer,mnn\nm,0,0,0.5\n")  # one point: nothing to draw
    assert "nothing to draw" in run_cli(["plot", flat, "--out", tmp_path / "plots"], capsys)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "metrics.jsonl").write_text('{"unrelated": 1}\n')
    assert "was not written by mnn-callback evaluate" in run_cli([*evaluate, "--out", corrupt], capsys)
    five = tmp_path / "five.jsonl"
    five.write_text('{"input_ids": 5}\n')
    assert "line 1 of" in run_cli(["evaluate", model, "--data", five, "--out", tmp_path / "o"], capsys)
    missing = run_cli([*evaluate, "--tokenizer", tmp_path / "no_tokenizer", "--out", tmp_path / "o"], capsys)
    assert "tokenizer directory not found" in missing
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert "not looked up on the hub" in run_cli(["evaluate", "runs/typo", "--data", data], capsys)
    assert "not looked up on the hub" in run_cli(["evaluate", "./typo", "--data", data], capsys)


# --- row 13: data in the wild ------------------------------------------------------------------------------


def test_data_in_the_wild(tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Caf\u00e9 cr\u00e8me\n\nna\u00efve".encode("latin-1"))
    with pytest.raises(ValueError, match=f"{latin} is not UTF-8 text"):
        Probe(latin, tokenizer=shakespeare_tokenizer())
    with_bom = tmp_path / "bom.jsonl"
    with_bom.write_bytes(b"\xef\xbb\xbf" + b'{"input_ids": [1, 2, 3]}\n{"input_ids": [4, 5]}\n')
    assert Probe(with_bom).sequences == [[1, 2, 3], [4, 5]]
    assert Probe([np.array([1, 2, 3]), [np.int32(4), np.int64(5)]]).sequences == [[1, 2, 3], [4, 5]]


def test_datasets_in_numpy_format_and_streaming_datasets():
    datasets = pytest.importorskip("datasets")
    ids = [[1, 2, 3], [4, 5, 6, 7]]
    as_numpy = datasets.Dataset.from_dict({"input_ids": ids}).with_format("numpy")
    assert Probe(as_numpy).sequences == ids
    texts = datasets.Dataset.from_dict({"text": ["To be or not", "that is the question"]}).with_format("numpy")
    assert len(Probe(texts, tokenizer=shakespeare_tokenizer()).sequences) == 2
    streaming = datasets.Dataset.from_dict({"input_ids": ids}).to_iterable_dataset()
    with pytest.raises(TypeError, match=r"no length .* pass a list, e\.g\. list\(dataset\.take\(1000\)\)"):
        Probe(streaming)


def test_a_real_tokenizer_directory_as_a_string(tmp_path):
    path = minilm_path()
    assert Probe(["a short sentence to probe"], tokenizer=path).sequences[0][0] == 101  # [CLS]
