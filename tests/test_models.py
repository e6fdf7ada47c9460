"""Models for post hoc evaluation: hub revisions from a real (offline) Hugging Face cache, paths, steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
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


# --- PEFT adapters: their base models ----------------------------------------------------------


def saved_adapter(base_dir, adapter_dir, base_name=None, seed=0) -> dict:
    """A real LoRA adapter on the model at ``base_dir`` (non-zero weights from ``seed``: it changes the model),
    saved by PEFT; ``base_name``: what its adapter_config.json then names as the base. Returns that config."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True)
    lora = peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    torch.manual_seed(seed)
    peft.get_peft_model(base, lora).save_pretrained(adapter_dir)
    if base_name is not None:
        set_base(adapter_dir, base_name)
    with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as handle:
        return json.load(handle)


def set_base(adapter_dir, base_name) -> None:
    """Rewrite the base an adapter's adapter_config.json names, as a hand edit or a copy from elsewhere leaves it."""
    config_path = os.path.join(adapter_dir, "adapter_config.json")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    config["base_model_name_or_path"] = base_name
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump(config, handle)


def merged_mnn(base_dir, *adapter_dirs) -> float:
    """The final hidden state's MNN of the adapters merged into the model at ``base_dir``, by PEFT itself:
    each merged into the model the ones before it made (an adapter on an adapter)."""
    import peft
    from transformers import AutoModelForCausalLM

    from mnn_callback import Probe

    model = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True)
    for adapter_dir in adapter_dirs:
        model = peft.PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return Probe(PROBE_DATA, batch_size=4).run(model.eval()).per_layer["mnn"][-1]


def jsonl_data(path):
    path.write_text("".join(json.dumps({"input_ids": ids}) + "\n" for ids in PROBE_DATA))
    return str(path)


def test_a_relative_base_is_found_from_the_adapter_and_named(tmp_path, monkeypatch, capsys, caplog):
    """On main "a" was looked up from the current directory: from a directory holding another a/,
    evaluate exited 0 on the wrong base, naming no base."""
    from helpers import shakespeare_tokenizer

    from mnn_callback.cli import main

    tokenizer = shakespeare_tokenizer()
    train, other = tmp_path / "train", tmp_path / "other"
    tiny_model("gpt2", seed=2, vocab_size=len(tokenizer)).save_pretrained(train / "a")
    tiny_model("gpt2", seed=5, vocab_size=len(tokenizer)).save_pretrained(other / "a")  # another model, same name
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    monkeypatch.chdir(train)  # training ran here, on the base model "a"
    adapter = train / "run" / "checkpoint-4"
    assert saved_adapter("a", adapter)["base_model_name_or_path"] == "a"  # PEFT saves the name it was given
    right, wrong = merged_mnn(train / "a", adapter), merged_mnn(other / "a", adapter)
    assert right != pytest.approx(wrong, rel=1e-4)
    data = jsonl_data(tmp_path / "data.jsonl")
    options = ["--data", data, "--layers", "last", "--device", "cpu", "--batch-size", "4"]

    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO", logger="mnn_callback"):
        assert main(["evaluate", "train/run/checkpoint-4", "--out", "found", *options]) == 0
    assert f"PEFT adapter train/run/checkpoint-4: base model {train / 'a'}" in caplog.messages
    (row,) = read_csv(tmp_path / "found" / "metrics.csv")
    assert (row["model"], row["base"], row["step"]) == ("train/run/checkpoint-4", str(train / "a"), "4")
    assert float(row["mnn"]) == pytest.approx(right, rel=1e-5)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("To be, or not to be:\n\nNow is the winter of our discontent\n")
    ranking = ["--prompts", str(prompts), "--tokenizer", str(tmp_path / "tokenizer"), "--max-new-tokens", "4"]
    assert main(["rank", str(adapter), *ranking, "--no-chat-template", "--device", "cpu", "--out", "ranked"]) == 0
    assert read_csv(tmp_path / "ranked" / "ranking.csv")[0]["base"] == str(train / "a")

    monkeypatch.chdir(other)  # "a" here is another model: which one is meant cannot be told
    capsys.readouterr()
    assert main(["evaluate", str(adapter), "--out", str(tmp_path / "two"), *options]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and str(adapter) in error and str(train / "a") in error and str(other / "a") in error

    # the base named anew: evaluated anew into the same results, not read back as the other base's
    set_base(adapter, str(other / "a"))
    assert main(["evaluate", str(adapter), "--out", str(tmp_path / "found"), *options]) == 0
    (row,) = read_csv(tmp_path / "found" / "metrics.csv")
    assert row["base"] == str(other / "a") and float(row["mnn"]) == pytest.approx(wrong, rel=1e-5)


@pytest.mark.parametrize("itself", ["absolute", "."])
def test_an_adapter_whose_base_is_itself_is_exit_2_and_one_line(tmp_path, monkeypatch, capsys, itself):
    """On main: RecursionError in evaluate, rank and --reference-untrained."""
    from mnn_callback.cli import main

    tiny_model("gpt2", seed=2).save_pretrained(tmp_path / "base")
    adapter = tmp_path / "adapter"
    saved_adapter(tmp_path / "base", adapter, base_name=str(adapter) if itself == "absolute" else itself)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say hello.\n")
    data = jsonl_data(tmp_path / "data.jsonl")
    monkeypatch.chdir(tmp_path)
    commands = [
        ["evaluate", str(adapter), "--data", data],
        ["evaluate", str(adapter), "--data", data, "--reference-untrained"],
        ["rank", str(adapter), "--prompts", str(prompts)],
    ]
    capsys.readouterr()
    for command in commands:
        assert main([*command, "--device", "cpu", "--out", str(tmp_path / "out")]) == 2, command
        error = capsys.readouterr().err.strip()
        assert "\n" not in error and f"PEFT adapter {adapter}" in error and "is the adapter itself" in error, error


@pytest.mark.parametrize("base", ["/nonexistent/base-model", "./missing", "models/missing", "not a hub id"])
def test_a_missing_local_base_is_exit_2_naming_the_adapter_and_its_base(tmp_path, monkeypatch, capsys, base):
    """On main: "Repo id must be in the form ..." or "no tokenizer was found", the base never named."""
    from mnn_callback.cli import main

    tiny_model("gpt2", seed=2).save_pretrained(tmp_path / "base")
    adapter = tmp_path / "adapter"
    saved_adapter(tmp_path / "base", adapter, base_name=base)
    (tmp_path / "models").mkdir()  # "models/missing": its first part is a directory here, so a local path
    monkeypatch.chdir(tmp_path)
    data = jsonl_data(tmp_path / "data.jsonl")
    capsys.readouterr()
    assert main(["evaluate", str(adapter), "--data", data, "--device", "cpu", "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and f"PEFT adapter {adapter}: its base model {base!r} cannot be loaded" in error
    assert "no such directory" in error and "not looked up on the hub" in error


def test_a_hub_base_is_loaded_from_the_cache_offline_and_an_uncached_one_is_exit_2(tmp_path):
    """On main an uncached base gave "couldn't connect ..." naming no base; a cached one: no base named."""
    snapshots = hub_cache(tmp_path / "hf", "org/tiny", {"main": tiny_model("gpt2", seed=2)})
    data = jsonl_data(tmp_path / "data.jsonl")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "mnn_callback", "evaluate", "--data", data, "--layers", "last"]
    for base in ("org/tiny", "org/not-cached"):
        adapter = tmp_path / base.replace("/", "-")
        saved_adapter(snapshots["main"], adapter, base_name=base)
        result = subprocess.run(
            [*command, str(adapter), "--batch-size", "4", "--device", "cpu", "--out", str(tmp_path / "out" / base)],
            env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT,
        )  # fmt: skip
        if base == "org/tiny":
            assert result.returncode == 0, result.stderr[-2000:]
            (row,) = read_csv(tmp_path / "out" / base / "metrics.csv")
            assert row["base"] == "org/tiny"
            assert float(row["mnn"]) == pytest.approx(merged_mnn(snapshots["main"], adapter), rel=1e-5)
        else:
            assert result.returncode == 2, result.stderr[-2000:]
            assert result.stderr.strip().splitlines()[-1] == (
                f"mnn-callback: error: PEFT adapter {adapter}: its base model 'org/not-cached' cannot be loaded: "
                "HF_HUB_OFFLINE is set and it is not in the local cache"
            )


def test_an_adapter_on_an_adapter_is_stored_under_its_whole_chain_of_bases(tmp_path, monkeypatch, capsys):
    """On main stored results were keyed by the adapter's immediate base only: after lora1's base changed,
    evaluate and rank of lora2 into the same --out read back the old values, --reference lora1 the old reference."""
    from helpers import shakespeare_tokenizer

    from mnn_callback.cli import main

    tokenizer = shakespeare_tokenizer()
    project, data = tmp_path / "proj", jsonl_data(tmp_path / "data.jsonl")
    for name, seed in (("base", 2), ("base_b", 5)):
        tiny_model("gpt2", seed=seed, vocab_size=len(tokenizer)).save_pretrained(project / name)
        tokenizer.save_pretrained(project / name)
    lora1, lora2 = project / "runs" / "lora1", project / "runs" / "lora2"
    saved_adapter(project / "base", lora1, base_name="base")  # proj/base, found above the adapter
    saved_adapter(project / "base", lora2, base_name="lora1", seed=1)  # trained on lora1: its sibling
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("To be, or not to be:\n\nNow is the winter of our discontent\n")
    probe = ["--data", data, "--layers", "last", "--device", "cpu", "--batch-size", "4"]
    evaluate, reference = ["evaluate", str(lora2), *probe], ["evaluate", str(project / "base_b"), *probe]
    reference += ["--reference", str(lora1)]
    rank = ["rank", str(lora2), "--prompts", str(prompts), "--max-new-tokens", "4", "--no-chat-template"]
    monkeypatch.chdir(tmp_path)
    ranked_mnn, diff_erank = {}, {}
    for base_name in ("base", "base_b"):  # the second time into the same --out as the first, and a fresh one
        set_base(lora1, base_name)
        chain = f"{lora1} <- {project / base_name}"
        capsys.readouterr()
        assert main([*evaluate, "--out", "evaluated"]) == 0
        assert f"INFO: PEFT adapter {lora2}: base model {chain}" in capsys.readouterr().err
        (row,) = read_csv(tmp_path / "evaluated" / "metrics.csv")
        assert row["base"] == chain
        assert float(row["mnn"]) == pytest.approx(merged_mnn(project / base_name, lora1, lora2), rel=1e-5)

        assert main([*rank, "--out", "ranked"]) == 0 and main([*rank, "--out", f"ranked-{base_name}"]) == 0
        (row,), (alone,) = (read_csv(tmp_path / out / "ranking.csv") for out in ("ranked", f"ranked-{base_name}"))
        assert row["base"] == chain and row["mnn"] == alone["mnn"]
        ranked_mnn[base_name] = alone["mnn"]

        assert main([*reference, "--out", "refd"]) == 0 and main([*reference, "--out", f"refd-{base_name}"]) == 0
        (row,), (alone,) = (read_csv(tmp_path / out / "metrics.csv") for out in ("refd", f"refd-{base_name}"))
        assert row["diff_erank"] == alone["diff_erank"] != ""
        diff_erank[base_name] = alone["diff_erank"]
    assert ranked_mnn["base"] != ranked_mnn["base_b"]  # the change is one a stale read would hide
    assert diff_erank["base"] != diff_erank["base_b"]


def test_a_base_named_like_a_directory_without_a_model_is_local_and_never_looked_up(tmp_path):
    """On main a bare name ("rundir": a run directory holding only checkpoint-*) beside the adapter was taken
    for a hub id: online a request to the hub; offline exit 1 after trying to load it."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    requests = []

    class Hub(BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            self.send_error(404)

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    project = tmp_path / "project"
    tiny_model("gpt2", seed=2).save_pretrained(project / "rundir" / "checkpoint-4")
    (project / "empty").mkdir()
    data = jsonl_data(tmp_path / "data.jsonl")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    online = {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    env = {**os.environ, **online, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HOME": str(tmp_path)}
    checkpoint = project / "rundir" / "checkpoint-4"
    cases = {
        "rundir": f"{project / 'rundir'} is a run directory (checkpoint-4), not a model: point base_model_name_or_path "
        f"at the checkpoint meant, e.g. {checkpoint}",
        "empty": f"{project / 'empty'} holds neither a model (config.json) nor a PEFT adapter",
    }
    try:
        for base, why in cases.items():
            adapter = project / f"on-{base}"
            saved_adapter(checkpoint, adapter, base_name=base)
            result = subprocess.run(
                [sys.executable, "-m", "mnn_callback", "evaluate", str(adapter), "--data", data, "--device", "cpu"],
                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT,
            )  # fmt: skip
            assert result.returncode == 2, result.stderr[-2000:]
            assert result.stderr.strip().splitlines()[-1] == (
                f"mnn-callback: error: PEFT adapter {adapter}: its base model {base!r} cannot be loaded: {why} "
                "(a local path: not looked up on the hub)"
            )
    finally:
        server.shutdown()
    assert requests == []


def test_a_base_is_found_from_inside_its_directory_and_from_where_a_linked_adapter_points(tmp_path, monkeypatch):
    """On main an adapter saved inside its base model's directory with base "." was "two different models" (one
    of them the adapter itself), and a link to an adapter found no base beside the adapter it points at."""
    from mnn_callback.cli import main

    tiny_model("gpt2", seed=2).save_pretrained(tmp_path / "base")
    inside = tmp_path / "base" / "adapters" / "inside"
    saved_adapter(tmp_path / "base", inside, base_name=".")  # trained with the base's directory as cwd
    real = tmp_path / "real" / "run"
    tiny_model("gpt2", seed=5).save_pretrained(real / "mybase")
    saved_adapter(real / "mybase", real / "linked", base_name="mybase")
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "linked").symlink_to(real / "linked", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    options = ["--data", jsonl_data(tmp_path / "data.jsonl"), "--layers", "last", "--device", "cpu"]
    for adapter, base in ((inside, tmp_path / "base"), (tmp_path / "links" / "linked", real / "mybase")):
        out = tmp_path / "out" / adapter.name
        assert main(["evaluate", str(adapter), *options, "--batch-size", "4", "--out", str(out)]) == 0
        (row,) = read_csv(out / "metrics.csv")
        assert os.path.realpath(row["base"]) == os.path.realpath(base)
        assert float(row["mnn"]) == pytest.approx(merged_mnn(base, adapter), rel=1e-5)
