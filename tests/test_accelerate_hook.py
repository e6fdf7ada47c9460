"""MNNAccelerateHook in real Accelerate loops: trackers read back, 2 processes, save/load_state."""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import (
    HANG_TIMEOUT,
    event_accumulator,
    free_port,
    probe_lines,
    random_sequences,
    tensorboard_values,
    tiny_model,
)

from mnn_callback import MNNAccelerateHook, MNNWarning
from mnn_callback.output.files import read_jsonl

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "accelerate_loop.py")
TINY = ["--n-layer", "2", "--n-embd", "32", "--seq-len", "48", "--max-train-chars", "60000", "--probe-samples", "12"]


def run_example(out, *extra, processes=1):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [*launcher, EXAMPLE, "--out", str(out), *TINY, *extra]
    subprocess.run(command, check=True, env=env, timeout=HANG_TIMEOUT)


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


def test_example_loop_logs_to_tensorboard_and_jsonl(tmp_path):
    run_example(tmp_path, "--steps", "20", "--every", "10")
    lines = probe_lines(tmp_path / "mnn_metrics.jsonl")
    assert [line["step"] for line in lines] == [0, 10, 20]
    scalars = tensorboard_values(tmp_path / "accelerate_loop")
    for key in ("mnn/layer_2", "matrix_entropy/layer_1", "erank/layer_0", "diff_erank/layer_2", "probe/loss"):
        assert scalars[key] == pytest.approx({line["step"]: line[key] for line in lines}, rel=1e-6), key
    assert "train/loss" in scalars
    assert lines[-1]["mnn/layer_2"] < lines[0]["mnn/layer_2"]  # a real run compresses
    dashboards = event_accumulator(tmp_path / "accelerate_loop")  # drawn into the tracker's own writer
    assert [image.step for image in dashboards.Images("mnn_callback/layer_profile")] == [0, 10, 20]
    assert "custom_scalars__config__" in dashboards.Tags()["tensors"]


def test_two_processes_give_the_single_process_values_with_one_writer(tmp_path):
    frozen = ["--steps", "4", "--every", "2", "--lr", "0"]  # the model does not move
    run_example(tmp_path / "two", *frozen, processes=2)
    run_example(tmp_path / "one", *frozen)
    two, one = probe_lines(tmp_path / "two" / "mnn_metrics.jsonl"), probe_lines(tmp_path / "one" / "mnn_metrics.jsonl")
    assert [line["step"] for line in two] == [0, 2, 4]  # exactly one line per probe: one writer
    for got, expected in zip(two, one, strict=True):
        for key, value in expected.items():
            if key.startswith(("mnn/", "nuclear_norm/", "matrix_entropy/", "erank/", "probe/loss")):
                assert got[key] == pytest.approx(value, rel=1e-6), key
    event_files = glob.glob(str(tmp_path / "two" / "**" / "events.out.tfevents.*"), recursive=True)
    assert len({os.path.basename(name).split(".")[4] for name in event_files}) == 1  # one writing process


def test_save_state_and_load_state_continue_the_curves(tmp_path):
    run_example(tmp_path, "--steps", "8", "--every", "4", "--save-every", "4")
    run_example(tmp_path, "--steps", "8", "--every", "4", "--resume", str(tmp_path / "checkpoints" / "step_4"))
    records = read_jsonl(tmp_path / "mnn_metrics.jsonl")
    events = [r.get("event", r.get("step")) for r in records]
    # no second probe at 4; each process's first probe names the regime
    assert events == ["config", "regime", 0, 4, 8, "overhead", "config", "resume", "regime", 8, "overhead"]
    saved = torch.load(tmp_path / "checkpoints" / "step_4" / "custom_checkpoint_0.pkl", weights_only=True)
    assert [entry["step"] for entry in saved["history"]] == [0, 4]
    first_reference = records[2]["erank/layer_2"]
    resumed = [record for record in records if "event" not in record][-1]
    assert resumed["diff_erank/layer_2"] == pytest.approx(first_reference - resumed["erank/layer_2"], rel=1e-9)


def test_state_dict_round_trip(accelerator, tmp_path):
    data = random_sequences(6, 4, 20)
    model = tiny_model("gpt2")
    hook = MNNAccelerateHook(accelerator, data, every_n_steps=5)
    assert hook.step(model, 0)["diff_erank/layer_2"] == 0.0
    assert hook.step(model, 3) is None
    with torch.no_grad():
        model.lm_head.weight.mul_(1.1)
        model.transformer.h[0].mlp.c_fc.weight.mul_(2.0)
    scheduled = hook.step(model, 5)
    assert 0 < scheduled["probe/time_share"] < 1  # the wall time between calls, as the Trainer callback reports
    torch.save(hook.state_dict(), tmp_path / "state.pt")  # as accelerator.save_state does
    state = torch.load(tmp_path / "state.pt", weights_only=True)  # plain values: safe to load
    restored = MNNAccelerateHook(accelerator, data, every_n_steps=5)
    restored.load_state_dict(state)
    assert restored.history == hook.history
    assert restored.reference.to_dict() == hook.reference.to_dict()
    assert restored.step(model, 5) is None  # already probed at this step
    values = restored.step(model, 10)
    assert values["diff_erank/layer_1"] == pytest.approx(hook.reference.per_layer["erank"][1] - values["erank/layer_1"])

    other = MNNAccelerateHook(accelerator, data, every_n_steps=5, layers="last")
    with pytest.warns(MNNWarning, match="different probe configuration"):
        other.load_state_dict(state)
    assert other.reference is None


def test_errors_become_warnings_unless_strict(accelerator):
    model = tiny_model("gpt2")
    lenient = MNNAccelerateHook(accelerator, random_sequences(4, 4, 10), layers=[9])
    with pytest.warns(MNNWarning, match="the probe failed"):
        assert lenient.step(model, 0) == {"probe/errors": 1.0}
    strict = MNNAccelerateHook(accelerator, random_sequences(4, 4, 10), layers=[9], strict=True)
    with pytest.raises(ValueError, match="out of range"):
        strict.step(model, 0)
    with pytest.raises(ValueError, match="every_n_steps"):
        MNNAccelerateHook(accelerator, random_sequences(4, 4, 10), every_n_steps=0)


def test_finish_probes_the_final_step_and_closes_the_sinks(accelerator):
    from mnn_callback import MemorySink

    model = tiny_model("gpt2")
    hook = MNNAccelerateHook(accelerator, random_sequences(4, 4, 10), every_n_steps=10, jsonl=False)
    memory = MemorySink()
    hook.monitor.add_sinks(lambda: [memory])
    hook.step(model, 0)
    for step in range(1, 8):
        assert hook.step(model, step) is None  # not due
    final = hook.finish(model, 7)
    assert final is not None and [m.step for m in memory.measurements] == [0, 7] and memory.closed
    with pytest.warns(MNNWarning, match=r"step after finish\(\): a new run starts at step 8"):
        assert hook.step(model, 8, force=True)["probe/sequences"] == 4  # force: whatever the schedule


ENGINES_SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "hook_engines.py")
DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def run_engine(engine, out, processes):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    subprocess.run([*launcher, ENGINES_SCRIPT, engine, str(out)], check=True, env=env, timeout=HANG_TIMEOUT)
    return probe_lines(out / "mnn_metrics.jsonl")


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory):
    return run_engine("plain", tmp_path_factory.mktemp("plain"), processes=1)


@pytest.mark.parametrize(
    "engine",
    [
        "fsdp1",
        "fsdp1-orig-params",
        "fsdp2",
        pytest.param("zero3", marks=pytest.mark.skipif(not DEEPSPEED, reason="deepspeed is not installed")),
    ],
)
def test_sharded_engines_on_two_processes_give_the_unsharded_values_at_step_0(engine, unsharded, tmp_path):
    """FSDP1 (flat and original parameters), FSDP2 and ZeRO-3 in a plain loop; one process makes a dummy pass."""
    sharded = run_engine(engine, tmp_path, processes=2)
    assert [line["step"] for line in sharded] == [0, 2]  # one writer; hook.finish probed the final step
    compared = [key for key in unsharded[0] if key.startswith(("mnn/", "matrix_entropy/", "erank/", "probe/loss"))]
    assert len(compared) >= 10
    for key in compared:
        assert sharded[0][key] == pytest.approx(unsharded[0][key], rel=1e-6, abs=1e-7), key
    assert sharded[0]["probe/sequences"] == 9
    assert all(math.isfinite(sharded[1][key]) for key in compared)


def test_two_hooks_with_one_project_dir_keep_their_own_files(tmp_path):
    """On main both wrote one JSONL that nothing told apart, and load_table merged them."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from mnn_callback.output.tables import load_table

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True, project_dir=str(tmp_path))
    model = tiny_model("gpt2")
    first = MNNAccelerateHook(accelerator, random_sequences(6, 4, 20), every_n_steps=2)
    with pytest.warns(MNNWarning, match="this one is 'mnn-2'"):
        second = MNNAccelerateHook(accelerator, random_sequences(6, 4, 20, seed=5), every_n_steps=3, layers="last")
    named = MNNAccelerateHook(accelerator, random_sequences(6, 4, 20, seed=6), every_n_steps=6, name="long")
    for step in range(7):
        for hook in (first, second, named):
            hook.step(model, step)
    for hook in (first, second, named):
        hook.finish(model, 6)
    AcceleratorState._reset_state(reset_partial_state=True)
    files = {"mnn": "mnn_metrics.jsonl", "mnn-2": "mnn_metrics.mnn-2.jsonl", "long": "mnn_metrics.long.jsonl"}
    steps = {"mnn": [0, 2, 4, 6], "mnn-2": [0, 3, 6], "long": [0, 6]}
    for name, file in files.items():
        lines = probe_lines(tmp_path / file)
        assert [line["step"] for line in lines] == steps[name]
        assert {line["monitor"] for line in lines} == {name}
        assert sorted({row["step"] for row in load_table(tmp_path / file)}) == steps[name]
    assert read_jsonl(tmp_path / files["long"])[0]["config"]["monitor"] == "long"


# --- `accelerate launch`, 2 CPU processes (gloo), hook on and off --------------------------------------

LAUNCH_SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "accelerate_launch_loop.py")


def accelerate_launch(out, mode):
    """``accelerate launch`` of the loop on 2 CPU processes: ``--cpu --num_processes 2`` would start one
    (accelerate's simple launcher), so ``--multi_gpu`` (torchrun) with ACCELERATE_USE_CPU=true (gloo); an
    empty HF_HOME keeps a developer's accelerate config out of it. The timeout fails a hang."""
    out.mkdir()
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HOME": str(out / "hf_home")}
    flags = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port())]
    flags += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", *flags, LAUNCH_SCRIPT]
    subprocess.run([*command, str(out), mode], check=True, env=env, timeout=HANG_TIMEOUT)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The same loop launched twice, with the hook and without it (the control)."""
    root = tmp_path_factory.mktemp("launch")
    return root, {mode: accelerate_launch(root / mode, mode) for mode in ("hook", "off")}


def launch_probe_data():
    spec = importlib.util.spec_from_file_location("accelerate_launch_loop", LAUNCH_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.probe_data(), module.MODEL_SEED


def test_accelerate_launch_writes_once_the_values_of_a_single_process_probe(launched):
    """Both processes finish in one gloo group; only the main one writes; every metric of steps 0 and 6 is
    that of Probe.run in this process on the initial and the final weights (measured: equal to the last bit)."""
    from mnn_callback import Probe

    root, ranks = launched
    assert [(r["process_index"], r["num_processes"], r["is_main_process"]) for r in ranks["hook"]] == [
        (0, 2, True),
        (1, 2, False),
    ]
    assert {(r["distributed_type"], r["backend"]) for r in ranks["hook"]} == {("DistributedType.MULTI_CPU", "gloo")}
    records = read_jsonl(root / "hook" / "mnn_metrics.jsonl")
    assert [r.get("event", r.get("step")) for r in records] == ["config", "regime", 0, 3, 6, "overhead"]  # one writer
    assert not glob.glob(str(root / "off" / "mnn_metrics*.jsonl"))
    data, seed = launch_probe_data()
    initial = tiny_model("gpt2", seed=seed)
    final = tiny_model("gpt2", seed=seed)
    final.load_state_dict(torch.load(root / "hook" / "final.pt", weights_only=True))
    lines = probe_lines(root / "hook" / "mnn_metrics.jsonl")
    for line, model in ((lines[0], initial), (lines[-1], final)):
        expected = Probe(data, batch_size=2).run(model)
        compared = {key: value for key, value in expected.metrics.items() if key != "probe/seconds"}
        assert len(compared) == 50 and line["probe/sequences"] == 9  # 3 hidden states; 9 sequences: a dummy pass
        assert {key: line[key] for key in compared} == pytest.approx(compared, rel=1e-9, abs=1e-12)
    reference = Probe(data, batch_size=2).run(initial)
    assert lines[-1]["diff_erank/layer_2"] == pytest.approx(
        reference.per_layer["erank"][2] - lines[-1]["erank/layer_2"], rel=1e-9
    )
    assert lines[-1]["mnn/layer_2"] != lines[0]["mnn/layer_2"]  # the model trained


def test_accelerate_launch_losses_with_the_hook_equal_those_without_it_bit_for_bit(launched):
    """Per process, the six losses of the run with the hook are those of the run without it (dropout on,
    so a probe that drew from the RNG or left the model in eval mode would change them), and so are the
    final weights."""
    root, ranks = launched
    for with_hook, without in zip(ranks["hook"], ranks["off"], strict=True):
        assert len(with_hook["losses"]) == 6 and all(math.isfinite(loss) for loss in with_hook["losses"])
        assert with_hook["losses"] == without["losses"]  # floats read back exactly from JSON
    assert ranks["hook"][0]["losses"] != ranks["hook"][1]["losses"]  # each process trained on its own shard
    trained = torch.load(root / "hook" / "final.pt", weights_only=True)
    control = torch.load(root / "off" / "final.pt", weights_only=True)
    assert trained.keys() == control.keys()
    assert all(torch.equal(trained[name], control[name]) for name in trained)


def test_a_launch_whose_accelerator_sees_one_process_of_two_has_one_writer_and_says_why(tmp_path):
    """`accelerate launch --multi_gpu` on a machine without GPUs and without ACCELERATE_USE_CPU: torch.distributed
    has 2 processes, each accelerator 1 (both "main"): process 0 alone writes, and a warning names the fix."""
    env = {key: value for key, value in os.environ.items() if key != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf_home"), CUDA_VISIBLE_DEVICES="")
    flags = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port())]
    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", *flags, "--mixed_precision", "no"]
    command += [EXAMPLE, "--out", str(tmp_path / "out"), *TINY, "--steps", "4", "--every", "2"]
    done = subprocess.run(command, env=env, timeout=HANG_TIMEOUT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    import accelerate
    from packaging.version import Version

    warned = done.stderr.count("the accelerator runs 1 process(es) but torch.distributed has 2")
    # accelerate 1.x starts such a split launch (seen on 1.16); 0.34 runs one group of 2 on the CPU
    assert warned == 1 if Version(accelerate.__version__) >= Version("1.0") else warned <= 1
    lines = read_jsonl(tmp_path / "out" / "mnn_metrics.jsonl")
    assert [line["event"] for line in lines if "event" in line].count("config") == 1
    assert [line["step"] for line in lines if "event" not in line] == [0, 2, 4]
