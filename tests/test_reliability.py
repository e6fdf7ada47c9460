"""Bad input, numerical trouble and faults never hurt the training run or lose data (README: What happens when...)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import PROBE_DATA, make_trainer, minilm_path, probe_lines, random_sequences, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import TrainerCallback

from mnn_callback import MNNCallback, MNNWarning
from mnn_callback.core.metrics import compute_metrics
from mnn_callback.output.files import atomic_write_json, read_jsonl
from mnn_callback.output.sinks import JsonlSink, TensorBoardSink, WandbSink
from mnn_callback.probing.probe import Probe

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")


# --- the metric core never raises and stays in bounds ----------------------------------------------


@st.composite
def hidden_and_mask(draw):
    batch = draw(st.integers(1, 3))
    length = draw(st.integers(1, 24))
    d = draw(st.integers(1, 24))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
    scale = draw(st.sampled_from([1e-6, 1e-3, 1.0, 1e3, 1e6]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, d, generator=g) * scale
    if draw(st.booleans()):  # a few outlier dimensions
        hidden[..., : max(1, d // 8)] *= 50.0
    if draw(st.booleans()):  # low rank
        rank = draw(st.integers(1, 3))
        hidden = (torch.randn(batch, length, rank, generator=g) @ torch.randn(batch, rank, d, generator=g)) * scale
    lengths = [draw(st.integers(0, length)) for _ in range(batch)]
    mask = torch.zeros(batch, length, dtype=torch.long)
    for row, n in enumerate(lengths):
        start = draw(st.integers(0, length - n))
        mask[row, start : start + n] = 1
    return hidden.to(dtype), mask


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hidden_and_mask(), st.sampled_from([torch.float32, torch.float64]))
def test_metric_core_never_raises_and_stays_in_bounds(case, compute_dtype):
    hidden, mask = case
    out = compute_metrics(hidden, mask, dtype=compute_dtype)
    lengths = mask.sum(dim=1)
    valid_tokens = hidden.float().masked_fill(mask[..., None] == 0, 0.0)
    expected_nan = (lengths < 2) | ~torch.isfinite(valid_tokens).flatten(1).all(dim=1)
    d = hidden.shape[-1]
    for key in ("mnn", "nuclear_norm", "matrix_entropy", "erank"):
        assert torch.equal(torch.isnan(out[key]), expected_nan), key
    ok = ~expected_nan
    slack = 1e-5
    assert ((out["mnn"][ok] >= 0) & (out["mnn"][ok] <= 1 + slack)).all()
    assert ((out["nuclear_norm"][ok] >= 0) & (out["nuclear_norm"][ok] <= 1 + slack)).all()
    assert ((out["matrix_entropy"][ok] >= 0) & (out["matrix_entropy"][ok] <= 1 + slack)).all()
    upper = torch.minimum(lengths, torch.tensor(d)).to(out["erank"].dtype)[ok]
    assert ((out["erank"][ok] >= 1 - slack) & (out["erank"][ok] <= upper * (1 + slack))).all()


# --- numerical trouble -------------------------------------------------------------------------------


class PoisonAtStep(TrainerCallback):
    """Put a NaN into a weight at ``bad_step`` (add before MNNCallback: its probe sees it) ..."""

    def __init__(self, bad_step: int) -> None:
        self.bad_step = bad_step
        self.saved = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.bad_step:
            weight = model.transformer.h[0].mlp.c_fc.weight
            self.saved = weight.detach().clone()
            with torch.no_grad():
                weight[0, 0] = math.nan

    def restorer(self) -> TrainerCallback:
        """... and the callback that restores it (add after MNNCallback) before the next training step."""
        poison = self

        class Restore(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if poison.saved is not None:
                    with torch.no_grad():
                        model.transformer.h[0].mlp.c_fc.weight.copy_(poison.saved)
                    poison.saved = None

        return Restore()


def test_nan_hidden_states_during_training(tmp_path):
    callback = MNNCallback(PROBE_DATA, every_n_steps=2)
    poison = PoisonAtStep(4)
    trainer = make_trainer(tmp_path, None, max_steps=8)
    for added in (poison, callback, poison.restorer()):
        trainer.add_callback(added)
    with pytest.warns(MNNWarning, match="non-finite hidden states"):
        trainer.train()
    by_step = {entry["step"]: entry for entry in callback.history}
    assert sorted(by_step) == [0, 2, 4, 6, 8]  # training went on to the end
    assert by_step[4]["probe/nan_sequences"] == len(PROBE_DATA)
    assert math.isnan(by_step[4]["mnn/layer_2"]) and math.isfinite(by_step[4]["mnn/layer_0"])
    assert by_step[6]["probe/nan_sequences"] == 0 and math.isfinite(by_step[6]["mnn/layer_2"])
    assert [line["step"] for line in probe_lines(tmp_path / "mnn_metrics.jsonl")] == [0, 2, 4, 6, 8]
    assert all(math.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_match_float32(dtype):
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    texts = [
        "The quick brown fox jumps over the lazy dog near the river bank in the morning light.",
        "Compression of representations can be measured by the matrix nuclear norm of hidden states.",
        "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    ]
    probe = Probe(texts, tokenizer=tokenizer)
    reference = probe.run(AutoModel.from_pretrained(path, local_files_only=True)).metrics
    half = probe.run(AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype)).metrics
    for key, value in reference.items():
        if key.split("/")[0] in ("mnn", "nuclear_norm", "matrix_entropy", "erank"):
            assert half[key] == pytest.approx(value, rel=1e-2), key


# --- models and sinks that fail ------------------------------------------------------------------------


class NoHiddenStates(torch.nn.Module):
    """A trainable model whose forward cannot return hidden states."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(96, 8)
        self.head = torch.nn.Linear(8, 96)

    def forward(self, input_ids, labels=None, **kwargs):
        logits = self.head(self.embed(input_ids))
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return {"loss": loss, "logits": logits}


def test_model_without_hidden_states_warns_and_training_goes_on(tmp_path):
    callback = MNNCallback(PROBE_DATA, every_n_steps=3)
    with pytest.warns(MNNWarning, match=r"NoHiddenStates did not return hidden states"):
        trainer = make_trainer(tmp_path, callback, model=NoHiddenStates(), max_steps=6)
        trainer.train()
    assert trainer.state.global_step == 6
    assert callback.guard.errors == 3


@pytest.fixture
def full_disk(tmp_path):
    """A directory on a real file system that is full: a 64 KiB tmpfs, filled (mounting needs root)."""
    mount = tmp_path / "full"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        descriptor = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(descriptor, b"\0" * 4096):
                pass
        except OSError:  # ENOSPC: full
            pass
        finally:
            os.close(descriptor)
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_failing_sinks_cost_a_warning_and_the_others_keep_working(tmp_path, full_disk):
    (tmp_path / "a_file").write_text("not a directory")
    full_disk = JsonlSink(full_disk / "mnn_metrics.jsonl")  # every write fails with ENOSPC
    good = JsonlSink(tmp_path / "good.jsonl")
    callback = MNNCallback(
        PROBE_DATA, every_n_steps=2, sinks=["tensorboard", full_disk, good], log_dir=tmp_path / "a_file" / "tb"
    )
    with pytest.warns(MNNWarning) as record:
        make_trainer(tmp_path / "out", callback, max_steps=4).train()
    messages = [str(w.message) for w in record]
    assert any("tensorboard sink (setup) failed" in m for m in messages)
    assert sum("jsonl sink (log_measurement) failed" in m and "No space left" in m for m in messages) == 1
    assert [line["step"] for line in probe_lines(tmp_path / "good.jsonl")] == [0, 2, 4]
    assert probe_lines(tmp_path / "good.jsonl")[-1]["probe/errors"] >= 3


def test_wandb_without_a_key_names_the_fix(monkeypatch, tmp_path):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert wandb.run is None
    with pytest.raises(RuntimeError, match=r"wandb login.*WANDB_API_KEY.*WANDB_MODE=offline"):
        WandbSink(start_run=True, project="p")
    callback = MNNCallback(PROBE_DATA, every_n_steps=4, sinks=["wandb", "jsonl"])
    with pytest.warns(MNNWarning, match=r"wandb sink \(setup\) failed.*no active W&B run"):
        make_trainer(tmp_path, callback, max_steps=4).train()
    assert [line["step"] for line in probe_lines(tmp_path / "mnn_metrics.jsonl")] == [0, 4]


def test_strict_mode_turns_warnings_into_errors(tmp_path, full_disk):
    callback = MNNCallback(PROBE_DATA, every_n_steps=2, sinks=[JsonlSink(full_disk / "mnn_metrics.jsonl")], strict=True)
    with pytest.raises(OSError, match="No space left"):
        make_trainer(tmp_path, callback, max_steps=4).train()
    with pytest.raises(MNNWarning, match="truncated"):
        MNNCallback([*PROBE_DATA, list(range(1, 40))], max_length=32, strict=True)
    strict = MNNCallback(PROBE_DATA, every_n_steps=2, strict=True)
    trainer = make_trainer(tmp_path / "nan", None, max_steps=6)
    trainer.add_callback(PoisonAtStep(2))
    trainer.add_callback(strict)
    with pytest.raises(MNNWarning, match="non-finite hidden states"):
        trainer.train()


def test_tensorboard_sink_on_an_unwritable_path_raises_at_setup(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        TensorBoardSink(tmp_path / "file" / "tb")


# --- interruptions -------------------------------------------------------------------------------------


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path):
    path = tmp_path / "mnn_metrics.json"
    atomic_write_json(path, {"history": [1, 2]})

    class Explodes(dict):
        def items(self):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_json(path, {"history": Explodes()})
    assert json.loads(path.read_text()) == {"history": [1, 2]}
    assert os.listdir(tmp_path) == ["mnn_metrics.json"]


def test_sigkill_during_training_loses_nothing_before_the_last_checkpoint(tmp_path):
    """Kill training at several moments while checkpoints and the JSONL are written; resume; check files."""
    script = os.path.join(SCRIPTS, "train_resumable.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    for delay in (0.0, 0.37, 0.81):
        process = subprocess.Popen([sys.executable, script, str(out), "400"], env=env, stderr=subprocess.DEVNULL)
        started = set(out.glob("checkpoint-*"))
        deadline = time.monotonic() + 120
        while set(out.glob("checkpoint-*")) <= started and time.monotonic() < deadline:
            time.sleep(0.02)  # until this run writes its first checkpoint: from then on it writes all the time
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        for checkpoint in out.glob("checkpoint-*"):
            saved = checkpoint / "mnn_metrics.json"
            if saved.exists():
                json.loads(saved.read_text())  # never a partial file (a killed write can leave a .mnn-*.tmp beside)
        read_jsonl(out / "mnn_metrics.jsonl")  # readable: at most a cut-off last line
    completed = subprocess.run([sys.executable, script, str(out), "finish"], env=env, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-2000:]
    resumed = json.loads(completed.stdout.strip().splitlines()[-1])
    assert resumed["resumed_from"] is not None
    final_step = resumed["max_steps"]
    assert resumed["steps"] == list(range(0, final_step + 1, 2))  # complete, each step once
    final = json.loads((out / f"checkpoint-{final_step}" / "mnn_metrics.json").read_text())
    assert [entry["step"] for entry in final["history"]] == resumed["steps"]


# --- distributed edge cases and compiled models ---------------------------------------------------------


def test_compiled_model_probes_without_recompiling_the_training_graph():
    from torch._dynamo.utils import counters

    model = tiny_model("gpt2")
    compiled = torch.compile(model, backend="eager")
    batch = torch.tensor(random_sequences(4, 12, 12, seed=2))

    def train_step():
        compiled(input_ids=batch, labels=batch).loss.backward()

    train_step()
    train_step()
    probe = Probe(PROBE_DATA)
    probe.run(compiled)  # the first probe: transformers installs its inert output-capturing hooks once
    train_step()
    graphs = counters["stats"]["unique_graphs"]
    expected = probe.run(model).metrics
    for _ in range(3):
        result = probe.run(compiled)
        train_step()
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation from later probes
    assert result.metrics["mnn/layer_2"] == pytest.approx(expected["mnn/layer_2"], rel=1e-6)


def _compiled_training(wrap: str, out_dir) -> tuple[list[float], int]:
    """Losses of 4 AdamW steps of a freshly compiled (inductor) tiny GPT-2, monitored every 2 steps
    from step 0 when ``out_dir`` is given, and the number of graphs Dynamo compiled."""
    from torch._dynamo.utils import counters

    from mnn_callback import MNNMonitor

    torch._dynamo.reset()  # no cache entry nor automatic-dynamic mark from an earlier run
    counters.clear()
    model = tiny_model("gpt2")
    if wrap == "inplace":
        model.compile()  # no _orig_mod: calling the module goes through Dynamo
        trained = model
    else:
        trained = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    monitor = None if out_dir is None else MNNMonitor(PROBE_DATA, out_dir=out_dir, every_n_steps=2, sinks=["jsonl"])
    if monitor is not None:
        monitor.step(trained, 0)  # before the first compile, as MNNCallback's on_train_begin probe
    losses = []
    for step in range(1, 5):
        batch = torch.tensor(random_sequences(4, 12, 12, seed=10 + step))
        loss = trained(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if monitor is not None:
            monitor.step(trained, step)
    if monitor is not None:
        monitor.finish(trained, 4)
    return losses, counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("wrap", ["inplace", "wrapper"])
def test_compiled_training_is_bit_identical_with_and_without_monitoring(tmp_path, wrap):
    # Inductor's CPU embedding backward adds with atomics across threads: a compiled run differs
    # from itself by a float32 ulp of the loss (4.8e-7) now and then. Deterministic algorithms
    # make the control reproducible, so any difference left is the probe's.
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        control, control_graphs = _compiled_training(wrap, None)
        monitored, monitored_graphs = _compiled_training(wrap, tmp_path)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch._dynamo.reset()
    assert [loss.hex() for loss in monitored] == [loss.hex() for loss in control]
    assert monitored_graphs == control_graphs  # the probe compiled nothing (no eval-mode, no dynamic graph)
    assert len(probe_lines(tmp_path / "mnn_metrics.jsonl")) == 3  # steps 0, 2 and 4 were probed
