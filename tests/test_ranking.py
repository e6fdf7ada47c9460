"""Ranking models by the MNN of their own responses (the MNN paper's Section 6), on causal LMs trained here."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import read_csv, shakespeare_tokenizer

from mnn_callback import MNNWarning
from mnn_callback.cli import main
from mnn_callback.core.metrics import compute_metrics
from mnn_callback.output.files import read_jsonl

PROMPTS = "To be, or not to be:\n\nNow is the winter of our discontent\n\nShall I compare thee to a summer's day?\n"


def trained_model(path, steps: int) -> str:
    """A tiny GPT-2 trained ``steps`` steps on the bundled text, saved with its tokenizer."""
    from transformers import GPT2LMHeadModel

    from mnn_callback.demo import load_text, split_text, tiny_gpt2_config, token_chunks

    tokenizer = shakespeare_tokenizer()
    chunks = torch.tensor(token_chunks(tokenizer(split_text(load_text())[0][:60_000])["input_ids"], 32))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config(len(tokenizer), n_layer=2, n_embd=32, n_head=2, n_positions=256))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        batch = chunks[8 * step : 8 * step + 8]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranking")
    trained, barely = trained_model(root / "trained", 60), trained_model(root / "barely", 2)
    twin = shutil.copytree(trained, root / "twin")  # identical weights: identical scores
    return trained, barely, str(twin)


def test_ranking_measures_the_responses_and_resumes(models, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    argv = ["rank", *models, "--prompts", str(prompts), "--out", str(tmp_path / "out"), "--max-new-tokens", "12"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "rank" in printed and "MNN/noise" in printed
    rows = read_csv(tmp_path / "out" / "ranking.csv")
    assert len(rows) == 3 and [row["rank"] for row in rows] == ["1", "2", "3"]
    by_model = {row["model"]: row for row in rows}
    assert by_model[models[0]]["mnn"] == by_model[models[2]]["mnn"]  # identical models, identical scores
    assert by_model[models[0]]["mnn"] != by_model[models[1]]["mnn"]
    assert [float(row["mnn"]) for row in rows] == sorted(float(row["mnn"]) for row in rows)  # lowest first
    assert all(float(row["mean_response_tokens"]) > 1 for row in rows)
    assert (tmp_path / "out" / "ranking.png").stat().st_size > 10_000

    responses = read_jsonl(tmp_path / "out" / "responses.jsonl")
    line = next(record for record in responses if record.get("model") == models[1] and "prompt" in record)
    from transformers import AutoModelForCausalLM

    tokenizer = shakespeare_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(models[1], local_files_only=True).eval()
    prompt_ids = tokenizer(line["prompt"])["input_ids"]
    with torch.no_grad():
        output = model.generate(torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False, pad_token_id=0)
        response_ids = output[0, len(prompt_ids) :].tolist()
        hidden = model(output, output_hidden_states=True).hidden_states[-1][0]
    assert line["tokens"] == len(response_ids) and line["response"] == tokenizer.decode(response_ids)
    expected = compute_metrics(hidden[len(prompt_ids) :])  # the response tokens only
    final = len(model.transformer.h)
    assert line[f"mnn/layer_{final}"] == pytest.approx(expected["mnn"].item(), rel=1e-5)
    assert line[f"matrix_entropy/layer_{final}"] == pytest.approx(expected["matrix_entropy"].item(), rel=1e-5)

    assert main(argv) == 0  # the same --out: finished models are read back, nothing is appended
    assert read_jsonl(tmp_path / "out" / "responses.jsonl") == responses


def test_bad_input_is_exit_2_and_one_line(models, tmp_path, capsys):
    from helpers import tiny_model

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    encoder = tmp_path / "encoder"
    tiny_model("bert").save_pretrained(encoder)
    t5 = tmp_path / "t5"
    tiny_model("t5").save_pretrained(t5)
    shakespeare_tokenizer().save_pretrained(encoder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    cases = [
        (["rank", models[0], "--prompts", str(empty)], "holds no prompt"),
        (["rank", str(encoder), "--prompts", str(prompts)], "cannot generate"),
        (["rank", str(t5), "--prompts", str(prompts)], "is an encoder-decoder, which ranking does not support"),
        (["rank", "org/tiny@", "--prompts", str(prompts)], "names no revision after '@'"),
    ]
    capsys.readouterr()  # what saving the models printed
    for argv, message in cases:
        assert main([*argv, "--out", str(tmp_path / "out")]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("mnn-callback: error:") and message in error and "\n" not in error


def test_a_lone_surrogate_in_the_prompts_is_exit_2_naming_its_file_and_line(models, tmp_path, capsys):
    """On main each model failed on it (exit 1, "TypeError: TextEncodeInput must be ..." rows), not the input."""
    from mnn_callback import UsageError
    from mnn_callback.posthoc.ranking import rank_models

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\n\n{"instruction": "hi \\ud800"}\n', encoding="utf-8")
    capsys.readouterr()
    argv = ["rank", *models[:2], "--prompts", str(prompts), "--out", str(tmp_path / "out"), "--max-new-tokens", "4"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"mnn-callback: error: line 3 of {prompts}: expected valid Unicode text, got a lone surrogate '\\ud800' at "
        "character 3"
    )
    with pytest.raises(UsageError, match=r"^prompt 2: expected valid Unicode text, got a lone surrogate '\\ud800'"):
        rank_models([models[0]], ["fine", "hi \ud800"], max_new_tokens=4)


def test_a_response_file_cut_mid_summary_resumes_without_duplicates(models, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    argv = ["rank", models[1], "--prompts", str(prompts), "--out", str(tmp_path / "out"), "--max-new-tokens", "6"]
    assert main(argv) == 0
    responses = tmp_path / "out" / "responses.jsonl"
    whole = read_jsonl(responses)
    content = responses.read_bytes()
    responses.write_bytes(content[: content.rindex(b'"summary"') + 20])  # killed while writing the summary
    with pytest.warns(MNNWarning, match=r"dropped 3 response line\(s\) of a model whose summary is missing"):
        assert main(argv) == 0
    again = read_jsonl(responses)
    assert [record.get("prompt") for record in again] == [record.get("prompt") for record in whole]  # 3 + summary
    assert again[-1]["summary"]["mnn"] == whole[-1]["summary"]["mnn"]


def test_a_prompt_beyond_the_context_or_a_failing_chat_template_is_an_error_row(models, tmp_path, capsys):
    """On main: a raw IndexError or TemplateError traceback, exit 1, nothing ranked."""
    from transformers import AutoTokenizer

    templated = shutil.copytree(models[0], tmp_path / "templated")
    tokenizer = AutoTokenizer.from_pretrained(templated)
    tokenizer.chat_template = "{{ raise_exception('this template takes no user turn') }}"
    tokenizer.save_pretrained(templated)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Now is the winter of our discontent\n\n" + "To be, or not to be: " * 60 + "\n")
    out = tmp_path / "out"
    capsys.readouterr()
    argv = ["rank", models[1], str(templated), "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "8"]
    assert main(argv) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mnn-callback:")]
    assert len(errors) == 2, errors
    assert errors[0].startswith(f"mnn-callback: {models[1]} failed: RuntimeError: prompt 2 'To be, or not to be:")
    assert "more than the 256 positions the model takes" in errors[0]
    assert "prompt 1 'Now is the winter of our discontent': TemplateError: this template takes no" in errors[1]
    rows = read_csv(out / "ranking.csv")
    assert [(row["rank"], row["model"], row["mnn"]) for row in rows] == [("", models[1], ""), ("", str(templated), "")]


def test_two_processes_rank_their_own_models_and_write_one_ranking(models, tmp_path):
    import os
    import subprocess
    import sys

    from helpers import HANG_TIMEOUT

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    outputs = {}
    for processes in (1, 2):
        out = tmp_path / f"out{processes}"
        argv = ["-m", "mnn_callback", "rank", models[0], models[1], "--prompts", str(prompts), "--out", str(out)]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        command = [*(launcher if processes == 2 else [sys.executable]), *argv, "--max-new-tokens", "8"]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("MNN/noise") == 1  # one table, printed by the main process
        outputs[processes] = out
    assert (outputs[2] / "ranking.csv").read_text() == (outputs[1] / "ranking.csv").read_text()
    assert read_jsonl(outputs[2] / "responses.jsonl") == read_jsonl(outputs[1] / "responses.jsonl")
    assert (outputs[2] / "ranking.png").stat().st_size > 10_000


def test_rank_models_in_python_writes_what_the_command_writes(models, tmp_path):
    from mnn_callback.posthoc.ranking import rank_models

    rows = rank_models([models[0]], PROMPTS.split("\n\n"), out=tmp_path, max_new_tokens=6)
    assert [row["model"] for row in read_csv(tmp_path / "ranking.csv")] == [row["model"] for row in rows]
    assert (tmp_path / "ranking.png").stat().st_size > 10_000 and (tmp_path / "responses.jsonl").is_file()


def test_a_run_directory_is_ranked_by_its_final_model_unless_checkpoints_are_asked_for(models, tmp_path):
    from mnn_callback.posthoc.ranking import rank_models

    run = shutil.copytree(models[0], tmp_path / "run")  # the final model at the run's root
    shutil.copytree(models[1], run / "checkpoint-2")
    shutil.copytree(models[0], run / "checkpoint-60")
    prompts = PROMPTS.split("\n\n")[:2]
    (final,) = rank_models([str(run)], prompts, max_new_tokens=4)
    assert final["model"] == str(run)
    rows = rank_models([str(run)], prompts, max_new_tokens=4, checkpoints=True)
    assert sorted(row["model"] for row in rows) == [str(run / "checkpoint-2"), str(run / "checkpoint-60")]
    other = shutil.copytree(models[0], tmp_path / "other" / "run")
    pair = rank_models([str(run), str(other)], prompts, max_new_tokens=4, out=tmp_path / "out")
    assert len({row["model"] for row in pair}) == 2
    from mnn_callback.output.plots import model_labels

    assert sorted(model_labels([row["model"] for row in pair]).values()) == ["other/run", f"{tmp_path.name}/run"]


def test_the_authors_recipe_samples_seeded_and_scores_each_response_on_its_own(models, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    state = torch.get_rng_state()
    argv = ["rank", models[1], "--prompts", str(prompts), "--out", str(tmp_path / "out"), "--recipe", "authors"]
    assert main([*argv, "--max-new-tokens", "16", "--seed", "3"]) == 0
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left as it was
    printed = capsys.readouterr().out
    assert "regime: 0.6d <= n < d" in printed and "not determined" in printed  # 20-26 tokens re-tokenised, d = 32

    tokenizer = shakespeare_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(models[1], local_files_only=True).eval()
    final, lines = len(model.transformer.h), read_jsonl(tmp_path / "out" / "responses.jsonl")
    repeated, erank = [], []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(3)
        for prompt, line in zip(PROMPTS.strip().split("\n\n"), lines, strict=False):
            prompt_ids = tokenizer(prompt)["input_ids"]
            output = model.generate(
                torch.tensor([prompt_ids]), max_new_tokens=16, do_sample=True, temperature=0.7, top_k=0, top_p=1.0
            )
            response_ids = output[0, len(prompt_ids) :].tolist()
            if tokenizer.eos_token_id in response_ids:
                response_ids = response_ids[: response_ids.index(tokenizer.eos_token_id)]
            text = tokenizer.decode(response_ids, skip_special_tokens=True)
            alone = torch.tensor([tokenizer(text)["input_ids"]])  # re-tokenised, without the prompt
            expected = compute_metrics(model(alone, output_hidden_states=True).hidden_states[-1][0])
            assert line["prompt"] == prompt and line["response"] == text
            assert line[f"mnn/layer_{final}"] == pytest.approx(expected["mnn"].item(), rel=1e-5)
            grams = [tuple(response_ids[i : i + 4]) for i in range(len(response_ids) - 3)]
            repeated.append(1 - len(set(grams)) / len(grams))
            erank.append(expected["entropy_nats"].item())
    row = read_csv(tmp_path / "out" / "ranking.csv")[0]
    assert float(row["repeated_4grams"]) == pytest.approx(sum(repeated) / len(repeated))
    assert float(row["erank"]) == pytest.approx(torch.tensor(erank).mean().exp().item(), rel=1e-5)
    assert float(row["erank_se"]) > 0 and row["regime"] == "0.6d <= n < d"

    assert main([*argv, "--max-new-tokens", "16", "--seed", "4", "--out", str(tmp_path / "other")]) == 0
    other = read_jsonl(tmp_path / "other" / "responses.jsonl")
    assert [line["response"] for line in other[:3]] != [line["response"] for line in lines[:3]]  # another seed


def penalised_copy(source: str, path) -> str:
    """A copy of the model at ``source`` whose saved generation_config penalises repeats (2.0; no repeated 2-gram)."""
    from transformers import GenerationConfig

    shutil.copytree(source, path)
    config = GenerationConfig.from_pretrained(path)
    config.repetition_penalty, config.no_repeat_ngram_size = 2.0, 2
    config.save_pretrained(path)
    return str(path)


def generated(model, tokenizer, seed: int, **settings) -> list[str]:
    """Each prompt's answer by ``model.generate(**settings)``, the CPU RNG seeded once before the first."""
    texts = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for prompt in PROMPTS.strip().split("\n\n"):
            prompt_ids = tokenizer(prompt)["input_ids"]
            output = model.generate(torch.tensor([prompt_ids]), max_new_tokens=16, pad_token_id=0, **settings)
            response_ids = output[0, len(prompt_ids) :].tolist()
            if tokenizer.eos_token_id in response_ids:
                response_ids = response_ids[: response_ids.index(tokenizer.eos_token_id)]
            texts.append(tokenizer.decode(response_ids, skip_special_tokens=True))
    return texts


def test_the_authors_recipe_neutralises_the_models_generation_config_and_greedy_keeps_it(models, tmp_path):
    from transformers import AutoModelForCausalLM

    from mnn_callback.posthoc.responses import authors_sampling

    path = penalised_copy(models[0], tmp_path / "penalised")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    answers = {}
    for recipe in ("authors", "greedy"):
        out = tmp_path / recipe
        argv = ["rank", path, "--prompts", str(prompts), "--out", str(out), "--recipe", recipe, "--seed", "3"]
        assert main([*argv, "--max-new-tokens", "16"]) == 0
        answers[recipe] = [line["response"] for line in read_jsonl(out / "responses.jsonl") if "prompt" in line]

    tokenizer = shakespeare_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    assert (model.generation_config.repetition_penalty, model.generation_config.no_repeat_ngram_size) == (2.0, 2)
    settings = authors_sampling(model)
    assert settings["repetition_penalty"] == 1.0 and settings["no_repeat_ngram_size"] == 0
    assert not {"eos_token_id", "pad_token_id", "bos_token_id"} & set(settings)  # the token ids stay the model's
    sampled = {"do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 1.0}
    neutral = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
    penalised_samples = generated(model, tokenizer, 3, **sampled)  # generate applies the saved config
    assert answers["authors"] == generated(model, tokenizer, 3, **sampled, **neutral) != penalised_samples
    unpenalised_greedy = generated(model, tokenizer, 3, do_sample=False, **neutral)
    assert answers["greedy"] == generated(model, tokenizer, 3, do_sample=False) != unpenalised_greedy
