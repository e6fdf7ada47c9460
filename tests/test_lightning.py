"""MNNLightningCallback in real Lightning runs: training untouched, 1 and 2 processes (DDP strategy, gloo),
resumed from real checkpoints, reused, doubled, misconfigured."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
from helpers import HANG_TIMEOUT, PROBE_DATA, probe_lines, random_sequences, tiny_lightning_module

pytest.importorskip("lightning")
import lightning
import torch

from mnn_callback import MNNWarning
from mnn_callback.adapters.lightning import MNNLightningCallback
from mnn_callback.output.files import read_jsonl

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "lightning_run.py")


def run(out, *extra, processes=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    subprocess.run([*launcher, SCRIPT, str(out), *extra], check=True, env=env, timeout=HANG_TIMEOUT)


def test_a_lightning_run_is_watched_and_trains_bit_identically(tmp_path):
    run(tmp_path / "watched")
    run(tmp_path / "alone", "--no-monitor")
    watched, alone = (torch.load(tmp_path / name / "weights.pt", weights_only=True) for name in ("watched", "alone"))
    assert all(torch.equal(watched[key], alone[key]) for key in alone)
    lines = probe_lines(tmp_path / "watched" / "mnn_metrics.jsonl")
    assert [line["step"] for line in lines] == [0, 3, 6] and lines[-1]["probe/errors"] == 0
    assert lines[-1]["diff_erank/layer_2"] != 0.0 and "probe/loss" in lines[0]


def test_two_processes_under_the_ddp_strategy_write_once_with_the_single_process_values(tmp_path):
    run(tmp_path / "one")
    run(tmp_path / "two", processes=2)
    one, two = (probe_lines(tmp_path / name / "mnn_metrics.jsonl") for name in ("one", "two"))
    assert [line["step"] for line in two] == [0, 3, 6]  # one writer
    for key in ("mnn/layer_2", "erank/layer_1", "probe/loss", "probe/sequences"):  # step 0: the same model
        assert two[0][key] == pytest.approx(one[0][key], rel=1e-6), key


def fit(root, callbacks, max_steps=6, ckpt_path=None, checkpoints=None):
    """A real single-process fit of a tiny GPT-2; with ``checkpoints``, a checkpoint every 3 steps there."""
    lightning.seed_everything(0, verbose=False)
    loader = torch.utils.data.DataLoader(torch.tensor(random_sequences(48, 12, 12, seed=1)), batch_size=4)
    extra = []
    if checkpoints is not None:
        extra = [lightning.pytorch.callbacks.ModelCheckpoint(checkpoints, every_n_train_steps=3, save_top_k=-1)]
    trainer = lightning.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        default_root_dir=root,
        logger=False,
        enable_checkpointing=checkpoints is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, *extra],
    )
    trainer.fit(tiny_lightning_module(), loader, ckpt_path=ckpt_path)
    return trainer


def steps(path, event=None):
    records = read_jsonl(path)
    if event is not None:
        return [record["step"] for record in records if record.get("event") == event]
    return [record["step"] for record in records if "mnn/layer_0" in record]


def test_a_resumed_fit_continues_at_the_restored_step_with_the_saved_reference(tmp_path):
    first = MNNLightningCallback(PROBE_DATA, module="model", every_n_steps=2, batch_size=4, dashboards=False)
    fit(tmp_path, [first], checkpoints=tmp_path / "ckpt")
    resumed = MNNLightningCallback(PROBE_DATA, module="model", every_n_steps=2, batch_size=4, dashboards=False)
    fit(tmp_path, [resumed], max_steps=8, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=3.ckpt")
    assert [entry["step"] for entry in resumed.history] == [0, 2, 4, 6, 8]  # no second step 0
    assert resumed.history[:2] == first.history[:2]  # the checkpoint's history
    assert resumed.reference.to_dict() == first.reference.to_dict()  # the step-0 reference, kept
    assert resumed.history[2]["diff_erank/layer_2"] != 0.0
    path = tmp_path / "mnn_metrics.jsonl"
    assert steps(path) == [0, 2, 4, 6, 4, 6, 8]  # the abandoned run's 4 and 6 stay in the file
    assert steps(path, "resume") == [3] and steps(path, "regime") == [0, 4]  # each process's first probe


def test_a_callback_reused_for_another_fit_starts_a_fresh_run_in_that_fits_directory(tmp_path):
    callback = MNNLightningCallback(PROBE_DATA, module="model", every_n_steps=3, batch_size=4, dashboards=False)
    fit(tmp_path / "a", [callback])
    fit(tmp_path / "b", [callback])
    assert steps(tmp_path / "a" / "mnn_metrics.jsonl") == [0, 3, 6]
    assert steps(tmp_path / "b" / "mnn_metrics.jsonl") == [0, 3, 6]
    assert [entry["step"] for entry in callback.history] == [0, 3, 6]


def test_two_callbacks_in_one_trainer_have_their_own_files_and_checkpoint_state(tmp_path):
    def pair():
        options = {"module": "model", "batch_size": 4, "dashboards": False}
        return [
            MNNLightningCallback(PROBE_DATA, every_n_steps=2, **options),
            MNNLightningCallback(PROBE_DATA, every_n_steps=3, layers=[0, 2], **options),
        ]

    with pytest.warns(MNNWarning, match="this one is 'mnn-2'"):
        fit(tmp_path, pair(), checkpoints=tmp_path / "ckpt")
    assert steps(tmp_path / "mnn_metrics.jsonl") == [0, 2, 4, 6]
    assert steps(tmp_path / "mnn_metrics.mnn-2.jsonl") == [0, 3, 6]
    saved = torch.load(tmp_path / "ckpt" / "epoch=0-step=3.ckpt", weights_only=True)["callbacks"]
    entries = {key: [entry["step"] for entry in value["history"]] for key, value in saved.items() if "MNN" in key}
    assert entries == {"MNNLightningCallback{'name': 'mnn'}": [0, 2], "MNNLightningCallback{'name': 'mnn-2'}": [0, 3]}
    resumed = pair()
    with pytest.warns(MNNWarning, match="this one is 'mnn-2'"):
        fit(tmp_path, resumed, max_steps=8, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=3.ckpt")
    assert [[entry["step"] for entry in callback.history] for callback in resumed] == [[0, 2, 4, 6, 8], [0, 3, 6, 8]]


def test_a_module_that_is_not_there_costs_one_warning_and_training_goes_on(tmp_path):
    callback = MNNLightningCallback(PROBE_DATA, module="modle", every_n_steps=2, dashboards=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(tmp_path, [callback])
    messages = [str(w.message) for w in caught if issubclass(w.category, MNNWarning)]
    assert trainer.global_step == 6 and len(messages) == 1
    assert "module='modle'" in messages[0] and "its modules: model" in messages[0]
    strict = MNNLightningCallback(PROBE_DATA, module="modle", strict=True, dashboards=False)
    with pytest.raises(AttributeError, match="module='modle'"):
        fit(tmp_path / "strict", [strict])


def test_sinks_named_without_out_dir_write_into_the_trainers_directory(tmp_path):
    callback = MNNLightningCallback(
        PROBE_DATA, module="model", every_n_steps=3, sinks=["jsonl", "tensorboard"], dashboards=False
    )
    fit(tmp_path, [callback])
    assert steps(tmp_path / "mnn_metrics.jsonl") == [0, 3, 6]
    assert list((tmp_path / "runs").glob("events.out.tfevents.*"))


def test_a_fit_that_fails_closes_the_monitor_and_its_checkpoint_resumes_under_the_same_name(tmp_path):
    crashed = MNNLightningCallback(PROBE_DATA, module="model", every_n_steps=2, batch_size=4, dashboards=False)
    lightning.seed_everything(0, verbose=False)
    trainer = lightning.Trainer(
        max_steps=8,
        accelerator="cpu",
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[crashed, lightning.pytorch.callbacks.ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=3)],
    )
    loader = torch.utils.data.DataLoader(torch.tensor(random_sequences(48, 12, 12, seed=1)), batch_size=4)
    with pytest.raises(RuntimeError, match="simulated"):
        trainer.fit(tiny_lightning_module(fail_at_step=4), loader)
    assert not crashed.monitor.is_open and steps(tmp_path / "mnn_metrics.jsonl") == [0, 2, 4]
    resumed = MNNLightningCallback(PROBE_DATA, module="model", every_n_steps=2, batch_size=4, dashboards=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MNNWarning)  # no "mnn-2": the crashed run gave its name back
        fit(tmp_path, [resumed], max_steps=8, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=3.ckpt")
    assert resumed.name == "mnn" and [entry["step"] for entry in resumed.history] == [0, 2, 4, 6, 8]
    assert resumed.reference.to_dict() == crashed.reference.to_dict()
