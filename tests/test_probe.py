"""The probe: fixed sample, streaming equals collected hidden states, training untouched, distributed."""

from __future__ import annotations

import json
import math
import random
import re

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import DEVICES, minilm_path, random_sequences, shakespeare_tokenizer, tiny_model

from mnn_callback import MNNWarning
from mnn_callback.core.metrics import compute_metrics
from mnn_callback.probing.probe import Probe, ProbeResult

ARCHITECTURES = ["gpt2", "llama", "neox", "bert"]


def comparable(metrics: dict[str, float]) -> dict[str, float]:
    return {key: value for key, value in metrics.items() if key != "probe/seconds"}


def assert_metrics_close(got: dict[str, float], expected: dict[str, float], rel: float) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=rel, abs=1e-7, nan_ok=True), key


# --- the fixed sample -------------------------------------------------------------------------


def test_sample_is_a_seeded_fixed_choice():
    sequences = random_sequences(50, 1, 30)
    first = Probe(sequences, max_samples=10, seed=3)
    again = Probe(sequences, max_samples=10, seed=3)
    other = Probe(sequences, max_samples=10, seed=4)
    assert first.sequences == again.sequences
    assert first.fingerprint == again.fingerprint
    assert first.sequences != other.sequences
    assert first.fingerprint != other.fingerprint
    assert len(first.sequences) == 10
    assert all(len(ids) >= 2 for ids in first.sequences)
    positions = [sequences.index(ids) for ids in first.sequences]
    assert positions == sorted(positions)  # original order kept


def test_sample_does_not_touch_global_rng():
    state = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    Probe(random_sequences(20, 2, 9), max_samples=5, seed=1)
    assert torch.equal(torch.get_rng_state(), state[0])
    assert random.getstate() == state[1]
    assert (np.random.get_state()[1] == state[2]).all()


def test_long_sequences_are_truncated_with_one_warning():
    sequences = [[1, 2, 3, 4, 5, 6]] * 3 + [[1, 2]]
    with pytest.warns(MNNWarning, match="3 of 4 probe sequences were longer than max_length=4") as record:
        probe = Probe(sequences, max_length=4)
    assert len(record) == 1
    assert [len(ids) for ids in probe.sequences] == [4, 4, 4, 2]


def test_data_formats(tmp_path):
    tokenizer = shakespeare_tokenizer()
    texts = ["To be, or not to be, that is the question.", "Whether 'tis nobler in the mind to suffer"]
    ids = [tokenizer(text)["input_ids"] for text in texts]
    expected = Probe(ids).sequences
    assert Probe(texts, tokenizer=tokenizer).sequences == expected

    width = max(map(len, ids))
    tensor = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, seq in enumerate(ids):
        tensor[row, width - len(seq) :] = torch.tensor(seq)  # left padding
        mask[row, width - len(seq) :] = 1
    assert Probe({"input_ids": tensor, "attention_mask": mask}).sequences == expected
    assert Probe(tokenizer(texts, padding=True, return_tensors="pt")).sequences == expected
    assert Probe(torch.tensor([[5, 6, 7], [8, 9, 10]])).sequences == [[5, 6, 7], [8, 9, 10]]

    text_file = tmp_path / "sample.txt"
    text_file.write_text(f"{texts[0]}\n\n\n{texts[1]}\n", encoding="utf-8")
    assert Probe(text_file, tokenizer=tokenizer).sequences == expected
    jsonl_file = tmp_path / "sample.jsonl"
    lines = [json.dumps({"text": texts[0]}), "", json.dumps(texts[1]), json.dumps({"input_ids": [4, 5, 6]})]
    jsonl_file.write_text("\n".join(lines), encoding="utf-8")
    assert Probe(str(jsonl_file), tokenizer=tokenizer).sequences == [*expected, [4, 5, 6]]


def test_a_tokenizer_given_as_a_directory_path(tmp_path):
    tokenizer = shakespeare_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    texts = ["Now is the winter of our discontent", "Made glorious summer by this sun of York"]
    expected = Probe(texts, tokenizer=tokenizer).sequences
    assert Probe(texts, tokenizer=str(tmp_path / "tokenizer")).sequences == expected
    assert Probe(texts, tokenizer=tmp_path / "tokenizer").sequences == expected


def test_dataset_input():
    datasets = pytest.importorskip("datasets")
    tokenizer = shakespeare_tokenizer()
    texts = ["Now is the winter of our discontent", "Made glorious summer by this sun of York"]
    by_text = Probe(datasets.Dataset.from_dict({"content": texts}), tokenizer=tokenizer, text_column="content")
    by_ids = Probe(datasets.Dataset.from_dict({"input_ids": [tokenizer(t)["input_ids"] for t in texts]}))
    assert by_text.sequences == by_ids.sequences == Probe(texts, tokenizer=tokenizer).sequences


def test_text_paragraphs_are_the_samples_of_a_txt_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("line one\nline two\n\n  \nsecond paragraph\n", encoding="utf-8")
    probe = Probe(path, tokenizer=shakespeare_tokenizer())
    assert len(probe.sequences) == 2


@pytest.mark.parametrize(
    ("data", "kwargs", "error", "message"),
    [
        ([], {}, ValueError, "empty"),
        ([[1], [2], []], {}, ValueError, "at least 2 tokens"),
        (["some text"], {}, ValueError, "tokenizer="),
        ([[1, 2, 3]], {"layers": "middle"}, ValueError, "layers"),
        ([[1, 2, 3]], {"layers": []}, ValueError, "layers"),
        ([[1, 2, 3]], {"max_samples": 0}, ValueError, "max_samples"),
        ([[1, 2, 3]], {"max_length": 1}, ValueError, "max_length"),
        ([[1, 2, 3]], {"batch_size": 2.5}, ValueError, "batch_size"),
        ([[1, 2, 3]], {"dtype": torch.float16}, ValueError, "dtype"),
        ([[1.5, 2.0]], {}, ValueError, "integer token ids"),
        ({"ids": [[1, 2]]}, {}, ValueError, "input_ids"),
        (42, {}, TypeError, "probe data must be"),
        ("no/such/file.txt", {}, FileNotFoundError, "not found"),
        ("To be, or not to be", {}, ValueError, "single string that is not a .txt or .jsonl file"),
    ],
)
def test_bad_data_gives_clear_errors(data, kwargs, error, message):
    with pytest.raises(error, match=message):
        Probe(data, **kwargs)


def test_bad_files_give_clear_errors(tmp_path):
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\.txt or \.jsonl"):
        Probe(csv)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{not json\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        Probe(broken, tokenizer=shakespeare_tokenizer())


def test_a_lone_surrogate_names_its_file_and_line(tmp_path):
    """On main: the tokenizer's TypeError ("TextEncodeInput must be ..."), naming no file or line."""
    data = tmp_path / "heldout.jsonl"
    data.write_text('{"text": "fine text"}\n{"text": "a lone \\ud800 surrogate"}\n', encoding="utf-8")
    expected = f"line 2 of {data}: expected valid Unicode text, got a lone surrogate '\\ud800' at character 7"
    with pytest.raises(ValueError, match=re.escape(expected)):
        Probe(data, tokenizer=shakespeare_tokenizer())
    with pytest.raises(ValueError, match="item 1 of the data: expected valid Unicode text"):
        Probe(["fine text", "a lone \ud800 surrogate"], tokenizer=shakespeare_tokenizer())


# --- measuring ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_streaming_equals_collected_hidden_states(kind):
    model = tiny_model(kind)
    probe = Probe(random_sequences(11, 3, 40), batch_size=4)
    streamed = probe.run(model)
    collected = probe.run(model, streaming=False)
    assert streamed.layers == [0, 1, 2]
    assert_metrics_close(comparable(streamed.metrics), comparable(collected.metrics), rel=1e-6)
    assert ("probe/loss" in streamed.metrics) == (kind != "bert")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_padded_micro_batches_equal_sequences_one_at_a_time(kind, device):
    model = tiny_model(kind).to(device)
    sequences = random_sequences(7, 2, 30, seed=5)
    result = Probe(sequences, batch_size=3).run(model)
    per_sequence = {key: [[] for _ in range(3)] for key in ("mnn", "nuclear_norm", "matrix_entropy", "entropy_nats")}
    nll, targets = 0.0, 0
    with torch.no_grad():
        for ids in sequences:
            input_ids = torch.tensor([ids], device=device)
            labels = {"labels": input_ids} if kind == "gpt2" else {}  # an encoder takes no labels
            out = model.eval()(input_ids=input_ids, output_hidden_states=True, **labels)
            for layer, hidden in enumerate(out.hidden_states):
                values = compute_metrics(hidden[0])
                for key, lists in per_sequence.items():
                    lists[layer].append(values[key].item())
            if labels:
                nll += out.loss.item() * (len(ids) - 1)
                targets += len(ids) - 1
    for layer in range(3):
        assert result.metrics[f"mnn/layer_{layer}"] == pytest.approx(np.mean(per_sequence["mnn"][layer]), rel=1e-5)
        assert result.metrics[f"nuclear_norm/layer_{layer}"] == pytest.approx(
            np.mean(per_sequence["nuclear_norm"][layer]), rel=1e-5
        )
        assert result.metrics[f"matrix_entropy/layer_{layer}"] == pytest.approx(
            np.mean(per_sequence["matrix_entropy"][layer]), rel=1e-5
        )
        assert result.metrics[f"erank/layer_{layer}"] == pytest.approx(
            math.exp(np.mean(per_sequence["entropy_nats"][layer])), rel=1e-5
        )
    assert result.sequences == 7
    assert result.tokens == sum(map(len, sequences))
    if kind == "gpt2":
        assert result.loss == pytest.approx(nll / targets, rel=1e-5)
        assert result.perplexity == pytest.approx(math.exp(nll / targets), rel=1e-5)
    else:
        assert result.loss is None


def test_layer_selection():
    model = tiny_model("gpt2", layers=3)
    sequences = random_sequences(4, 5, 10)
    everything = Probe(sequences).run(model)
    last = Probe(sequences, layers="last").run(model)
    chosen = Probe(sequences, layers=[-1, 0, 0]).run(model)
    assert everything.layers == [0, 1, 2, 3]
    assert last.layers == [3]
    assert chosen.layers == [0, 3]
    assert last.metrics["mnn/layer_3"] == pytest.approx(everything.metrics["mnn/layer_3"], rel=1e-6)
    with pytest.raises(ValueError, match="out of range: this model has 4 hidden states"):
        Probe(sequences, layers=[4]).run(model)


def test_real_pretrained_minilm():
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    model = AutoModel.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    texts = [
        "The quick brown fox jumps over the lazy dog near the river bank.",
        "Compression of representations is measured by the matrix nuclear norm.",
        "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    ]
    probe = Probe(texts, tokenizer=tokenizer, batch_size=2)
    streamed = probe.run(model)
    collected = probe.run(model, streaming=False)
    assert streamed.layers == list(range(7))
    assert_metrics_close(comparable(streamed.metrics), comparable(collected.metrics), rel=1e-5)
    assert "probe/loss" not in streamed.metrics
    for layer in range(7):
        assert 0 < streamed.metrics[f"mnn/layer_{layer}"] < 1
        assert 1 <= streamed.metrics[f"erank/layer_{layer}"] <= 24


def test_model_without_hidden_states_is_named():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)

        def forward(self, input_ids, attention_mask=None, **kwargs):
            return {"logits": self.embed(input_ids)}

    with pytest.raises(TypeError, match=r"Plain did not return hidden states.*output_hidden_states=True"):
        Probe([[1, 2, 3]]).run(Plain())


def test_result_round_trips_through_json_and_gives_diff_erank():
    model = tiny_model("gpt2")
    probe = Probe(random_sequences(5, 4, 12), layers=[0, 2])
    reference = probe.run(model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1.5)
    current = probe.run(model)
    restored = ProbeResult.from_dict(json.loads(json.dumps(reference.to_dict())))
    assert comparable(restored.metrics) == comparable(reference.metrics)
    diff = current.diff_erank(restored)
    assert set(diff) == {"diff_erank/layer_0", "diff_erank/layer_2"}
    expected = reference.metrics["erank/layer_2"] - current.metrics["erank/layer_2"]
    assert diff["diff_erank/layer_2"] == pytest.approx(expected, rel=1e-12)
    assert current.diff_erank(current)["diff_erank/layer_0"] == 0.0


def test_nan_hidden_states_are_counted_and_the_next_probe_works():
    model = tiny_model("gpt2")
    probe = Probe(random_sequences(6, 4, 12), batch_size=4)
    healthy = probe.run(model)
    weight = model.transformer.h[0].mlp.c_fc.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0] = math.nan  # a diverged run
    with pytest.warns(MNNWarning, match="non-finite hidden states"):
        poisoned = probe.run(model)
    assert poisoned.nan_sequences == 6
    assert math.isnan(poisoned.metrics["mnn/layer_1"])
    assert math.isfinite(poisoned.metrics["mnn/layer_0"])  # embeddings are still fine
    with torch.no_grad():
        weight.copy_(saved)
    assert comparable(probe.run(model).metrics) == comparable(healthy.metrics)


# --- training is untouched -----------------------------------------------------------------------


def _snapshot(model):
    return {
        "flags": {name: module.training for name, module in model.named_modules()},
        "checkpointing": {
            name: module.gradient_checkpointing
            for name, module in model.named_modules()
            if hasattr(module, "gradient_checkpointing")
        },
        "parameters": {name: p.detach().clone() for name, p in model.named_parameters()},
        "grads": {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        # transformers >= 5 installs inert output-capturing hooks the first time hidden states are
        # requested from a model; those are its own, every other hook must be as before
        "hooks": [
            [
                hook
                for hook in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
                if "capturing" not in repr(hook)
            ]
            for m in model.modules()
        ],
        "rng": (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()),
    }


def _assert_same(before, after):
    assert before["flags"] == after["flags"]
    assert before["checkpointing"] == after["checkpointing"]
    assert before["requires_grad"] == after["requires_grad"]
    assert before["hooks"] == after["hooks"]
    for name, value in before["parameters"].items():
        assert torch.equal(value, after["parameters"][name]), name
    assert before["grads"].keys() == after["grads"].keys()
    for name, value in before["grads"].items():
        assert torch.equal(value, after["grads"][name]), name
    assert torch.equal(before["rng"][0], after["rng"][0])
    assert before["rng"][1] == after["rng"][1]
    assert (before["rng"][2] == after["rng"][2]).all()


def _training_model():
    model = tiny_model("gpt2")
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train()
    model.transformer.h[1].eval()  # a frozen submodule kept in eval
    model.transformer.wpe.requires_grad_(False)
    out = model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]]))
    out.loss.backward()
    return model


def test_run_leaves_training_untouched():
    model = _training_model()
    before = _snapshot(model)
    result = Probe(random_sequences(5, 3, 10)).run(model)
    _assert_same(before, _snapshot(model))
    assert math.isfinite(result.metrics["mnn/layer_2"])


@pytest.mark.parametrize("exception", [RuntimeError, KeyboardInterrupt])
def test_run_that_raises_halfway_leaves_training_untouched(exception):
    model = _training_model()
    before = _snapshot(model)
    calls = {"n": 0}

    def explode(module, inputs):
        calls["n"] += 1
        torch.rand(3)  # consume RNG inside the probe: it must be restored
        assert not module.training and not torch.is_grad_enabled()
        if calls["n"] == 3:
            raise exception("stop halfway")

    handle = model.transformer.h[0].register_forward_pre_hook(explode)
    with pytest.raises(exception, match="stop halfway"):
        Probe(random_sequences(6, 3, 10), batch_size=2).run(model)
    handle.remove()
    _assert_same(before, _snapshot(model))  # the probe's own hooks are gone too
    assert calls["n"] == 3


def test_schedule_free_style_optimizer_is_switched_and_restored():
    class Optimizer:
        def __init__(self):
            self.log = []

        def eval(self):
            self.log.append("eval")

        def train(self):
            self.log.append("train")

    model = tiny_model("gpt2").train()
    optimizer = Optimizer()
    Probe(random_sequences(3, 3, 6)).run(model, optimizer=optimizer)
    assert optimizer.log == ["eval", "train"]
    model.eval()
    Probe(random_sequences(3, 3, 6)).run(model, optimizer=optimizer)
    assert optimizer.log == ["eval", "train"]  # not in training: left alone


# --- distributed -----------------------------------------------------------------------------------


def _distributed_worker(rank: int, world_size: int, init_file: str, out_file: str, count: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = tiny_model("gpt2", seed=1)
        calls = {"n": 0}
        model.transformer.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
        result = Probe(random_sequences(count, 2, 25, seed=2), batch_size=2).run(model, per_sequence=True)
        with open(f"{out_file}.{rank}", "w", encoding="utf-8") as handle:
            record = {"metrics": comparable(result.metrics), "forwards": calls["n"], "each": result.per_sequence}
            json.dump(record, handle)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("count", [7, 1], ids=["uneven", "one-rank-empty"])
def test_two_processes_equal_one(tmp_path, count):
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out"), count), nprocs=2, join=True)
    probe = Probe(random_sequences(count, 2, 25, seed=2), batch_size=2)
    alone = probe.run(tiny_model("gpt2", seed=1), per_sequence=True)
    single = comparable(alone.metrics)
    runs = [json.loads((tmp_path / f"out.{rank}").read_text()) for rank in range(2)]
    assert runs[0]["forwards"] == runs[1]["forwards"]  # same number of passes on every rank
    for run in runs:
        assert_metrics_close(run["metrics"], single, rel=1e-6)  # standard errors included: sums of squares add up
        for name, layers in alone.per_sequence.items():
            assert np.allclose(run["each"][name], layers, rtol=1e-6, atol=1e-9, equal_nan=True), name


# --- honest signals: standard errors, fixed lengths, skipped first tokens ------------------------------


def per_sequence(model, sequences, skip=0):
    """Per layer and metric, the values of each sequence alone (its own forward, no padding)."""
    values: dict[str, list[list[float]]] = {}
    with torch.no_grad():
        for ids in sequences:
            hidden_states = model.eval()(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
            for layer, hidden in enumerate(hidden_states):
                for key, value in compute_metrics(hidden[0, skip:]).items():
                    values.setdefault(key, [[] for _ in hidden_states])[layer].append(value.item())
    return values


def test_standard_errors_are_the_sample_sd_over_root_n_of_per_sequence_values():
    model = tiny_model("gpt2")
    sequences = random_sequences(9, 4, 30, seed=8)
    result = Probe(sequences, batch_size=4).run(model, per_sequence=True)
    alone = per_sequence(model, sequences)
    for name in result.per_sequence:
        assert np.allclose(result.per_sequence[name], alone[name], rtol=1e-5, atol=1e-7), name
    for name in ("mnn", "mnn_vs_noise", "nuclear_norm", "matrix_entropy", "renyi2_entropy"):
        for layer in result.layers:
            values = np.array(alone[name][layer])
            expected = values.std(ddof=1) / math.sqrt(len(values))
            assert result.standard_errors[name][layer] == pytest.approx(expected, rel=1e-4), (name, layer)
            assert result.metrics[f"{name}_se/layer_{layer}"] == result.standard_errors[name][layer]


def test_a_run_keeps_each_sequences_values_by_default_and_per_sequence_false_only_drops_them():
    model = tiny_model("gpt2", seed=4)
    probe = Probe(random_sequences(6, 4, 20, seed=9), batch_size=4)
    kept, dropped = probe.run(model), probe.run(model, per_sequence=False)
    alone = per_sequence(model, probe.sequences)
    assert sorted(kept.per_sequence) == sorted(
        ["mnn", "mnn_vs_noise", "nuclear_norm", "matrix_entropy", "entropy_nats", "renyi2_entropy"]
    )
    for name, layers in kept.per_sequence.items():
        assert np.allclose(layers, alone[name], rtol=1e-5, atol=1e-7), name
    assert dropped.per_sequence is None
    assert comparable(kept.metrics) == comparable(dropped.metrics)


def test_packed_probes_have_the_same_length_everywhere():
    tokenizer = shakespeare_tokenizer()
    texts = [
        "To be, or not to be: that is the question.",
        "Whether 'tis nobler in the mind to suffer",
        "The slings",
    ] * 4
    probe = Probe(texts, tokenizer=tokenizer, pack=True, max_length=16, max_samples=5)
    assert [len(ids) for ids in probe.sequences] == [16] * len(probe.sequences)
    stream = [token for ids in probe.sequences for token in ids]
    assert stream.count(tokenizer.eos_token_id) >= len(probe.sequences) - 1  # documents joined by EOS
    result = probe.run(tiny_model("gpt2", vocab_size=len(tokenizer)))
    assert result.metrics["probe/tokens"] == 16 * result.metrics["probe/sequences"]
    assert result.metrics["probe/min_tokens"] == result.metrics["probe/max_tokens"] == 16
    assert probe.sources[0].startswith("tokens 0-15 of the packed sample (from item ")
    with pytest.raises(ValueError, match="fewer than one chunk of max_length=512"):
        Probe([[1, 2, 3]], pack=True)


def test_without_packing_the_length_distribution_is_logged():
    sequences = random_sequences(6, 3, 40, seed=2)
    metrics = Probe(sequences, skip_first_tokens=1).run(tiny_model("gpt2")).metrics
    lengths = [len(ids) - 1 for ids in sequences]
    assert metrics["probe/min_tokens"] == min(lengths) and metrics["probe/max_tokens"] == max(lengths)
    assert metrics["probe/mean_tokens"] == pytest.approx(np.mean(lengths))


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_skipping_the_first_token_equals_the_hidden_states_without_it(kind):
    model = tiny_model(kind)
    sequences = random_sequences(5, 3, 25, seed=6)
    result = Probe(sequences, batch_size=2, skip_first_tokens=1).run(model)
    alone = per_sequence(model, sequences, skip=1)
    for layer in result.layers:
        for name in ("mnn", "nuclear_norm", "matrix_entropy", "mnn_vs_noise"):
            assert result.per_layer[name][layer] == pytest.approx(np.mean(alone[name][layer]), rel=1e-5), name
    full = Probe(sequences, batch_size=2).run(model)
    if kind == "gpt2":
        assert result.loss == pytest.approx(full.loss, rel=1e-12)  # the loss is unchanged
    assert result.per_layer["mnn"] != full.per_layer["mnn"]


def test_skipping_tokens_with_left_and_right_padding_in_the_metric_core():
    hidden = torch.randn(2, 9, 6, generator=torch.Generator().manual_seed(3))
    right = torch.tensor([[1] * 7 + [0] * 2, [1] * 9])
    left = torch.tensor([[0] * 2 + [1] * 7, [1] * 9])
    for mask, first in ((right, [0, 0]), (left, [2, 0])):
        skipped = mask.clone()
        for row, start in enumerate(first):
            skipped[row, start] = 0  # the first valid token
        got = compute_metrics(hidden, skipped)
        for row, start in enumerate(first):
            end = start + int(mask[row].sum())
            expected = compute_metrics(hidden[row, start + 1 : end])
            for key in ("mnn", "nuclear_norm", "matrix_entropy", "renyi2_entropy", "mnn_vs_noise"):
                assert got[key][row].item() == pytest.approx(expected[key].item(), rel=1e-5), key


def test_the_cheap_tier_calls_no_eigensolver_and_equals_the_exact_mnn_and_renyi2(monkeypatch):
    model = tiny_model("gpt2")
    probe = Probe(random_sequences(7, 5, 30, seed=9), batch_size=3)
    exact = probe.run(model)
    calls = {"n": 0}
    for name in ("eigvalsh", "eigh", "svd", "svdvals"):
        real = getattr(torch.linalg, name)

        def counting(*args, _real=real, **kwargs):
            calls["n"] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch.linalg, name, counting)
    cheap = probe.run(model, method="cheap")
    assert calls["n"] == 0  # no eigendecomposition, no SVD
    for name in ("mnn", "mnn_vs_noise", "renyi2_entropy"):
        assert cheap.per_layer[name] == pytest.approx(exact.per_layer[name], rel=1e-6), name
    assert cheap.loss == pytest.approx(exact.loss, rel=1e-9)
    keys = {key.split("/")[0] for key in cheap.metrics}
    assert not keys & {"nuclear_norm", "matrix_entropy", "erank", "mnn_ratio", "nuclear_norm_se"}  # left out, not NaN
    assert Probe(random_sequences(3, 4, 9), method="cheap").run(model).config["method"] == "cheap"


def test_a_measured_part_beyond_the_models_positions_is_an_error_naming_the_sequence():
    """On main the sequence was cut to nothing measurable: NaN and a misleading "diverging run?" warning."""
    import transformers as tf

    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=96, n_layer=2, n_embd=32, n_head=2, n_positions=32))
    data = [list(range(1, 20)), {"input_ids": list(range(1, 60)), "measure_from": 40}]
    probe = Probe(data, max_length=64)
    with pytest.raises(ValueError, match=r"item 1 of the data: its metrics start at token 40 .* only 32 positions"):
        probe.run(model)
    fits = Probe([list(range(1, 20)), {"input_ids": list(range(1, 60)), "measure_from": 20}], max_length=64)
    result = fits.run(model)
    assert result.token_range == (12, 15.5, 19) and not result.nan_sequences  # cut to 32: tokens 20..31 measured


# --- encoder-decoders, PEFT and custom models: what is probed, and the loss ---------------------------


def float64_next_token_loss(logits_of_sequence, sequences) -> float:
    """Independent reference: token-weighted -log softmax(z_t)[x_{t+1}] in float64, sequence by sequence."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in sequences:
            logits = logits_of_sequence(torch.tensor([ids]))[0].to(torch.float64)
            log_p = torch.log_softmax(logits[:-1], dim=-1)
            total -= log_p[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum().item()
            count += len(ids) - 1
    return total / count


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_an_encoder_decoder_is_probed_by_its_encoder_on_the_sample_and_has_no_loss(kind, caplog):
    """On main: "T5ForConditionalGeneration is an encoder-decoder model, which the probe does not support"."""
    from reference import reference_metrics

    model = tiny_model(kind, seed=1).train()
    sequences = random_sequences(7, 5, 20, seed=2, vocab_size=90)
    sequences = [[token + 3 for token in ids] for ids in sequences]  # no pad, start or end tokens
    rng, flags = torch.get_rng_state(), [module.training for module in model.modules()]
    with caplog.at_level("INFO", logger="mnn_callback"):
        result = Probe(sequences, batch_size=3).run(model)
    assert torch.equal(torch.get_rng_state(), rng) and [m.training for m in model.modules()] == flags
    assert f"{type(model).__name__} is an encoder-decoder: the probe measures its encoder's" in caplog.text
    assert result.loss is None and "probe/loss" not in result.metrics
    assert result.config["probed"] == "encoder" and result.layers == [0, 1, 2]
    encoder = model.get_encoder().eval()
    with torch.no_grad():
        hidden = [encoder(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states for ids in sequences]
    model.train()
    for layer in range(3):
        expected = [reference_metrics(states[layer][0].numpy()) for states in hidden]
        for key in ("mnn", "matrix_entropy", "nuclear_norm"):
            assert result.per_layer[key][layer] == pytest.approx(np.mean([e[key] for e in expected]), rel=1e-5), key
    with pytest.raises(ValueError, match=r"compute_loss=True, but .* probed by its encoder, which has no next-token"):
        Probe(sequences, compute_loss=True).run(model)


def test_modules_and_forward_given_for_an_encoder_decoder_are_honoured():
    """On main the advice of the refusal (probe the encoder, by modules= and forward=) was refused the same way."""
    model = tiny_model("t5", seed=1).eval()
    sequences = [[token + 3 for token in ids] for ids in random_sequences(6, 5, 20, seed=2, vocab_size=90)]
    default = Probe(sequences).run(model)

    def encoder_forward(model, input_ids, attention_mask):
        return model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)

    blocks = Probe(sequences, modules=["encoder.block.*"], forward=encoder_forward).run(model)
    assert blocks.layers == [0, 1] and "probed" not in blocks.config  # the model as given, its names
    assert blocks.per_layer["mnn"][0] == pytest.approx(default.per_layer["mnn"][1], rel=1e-12)  # block 0's output
    calibrated = Probe(sequences, forward=encoder_forward).run(model)  # the forward's hidden states
    assert calibrated.per_layer["mnn"] == pytest.approx(default.per_layer["mnn"], rel=1e-12)


def test_a_peft_model_has_the_probe_loss_and_it_is_the_float64_cross_entropy():
    """On main a PeftModel (get_peft_model without task_type, as in most LoRA scripts) had no probe loss."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    model = peft.get_peft_model(tiny_model("gpt2", seed=2), lora).eval()
    assert type(model).__name__ == "PeftModel"
    sequences = random_sequences(7, 5, 20, seed=4)
    result = Probe(sequences, batch_size=3).run(model)
    reference = float64_next_token_loss(lambda ids: model(input_ids=ids).logits, sequences)
    assert result.loss == pytest.approx(reference, rel=1e-6)
    merged = model.merge_and_unload()
    assert result.loss == pytest.approx(Probe(sequences, batch_size=3).run(merged).loss, rel=1e-5)


class TinyCustomLM(torch.nn.Module):
    """nanoGPT-shaped: blocks in a ModuleList, forward(idx) -> logits, no Hugging Face anything."""

    def __init__(self, vocab: int = 96, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.embed = torch.nn.Embedding(vocab, width)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(2))
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, idx):
        x = self.embed(idx)
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return self.head(x)


def test_a_custom_model_has_the_probe_loss_from_the_logits_its_forward_returns():
    """On main a model probed through modules=/forward= never had a loss, whatever it returned."""
    from types import SimpleNamespace

    model = TinyCustomLM().eval()
    sequences = random_sequences(9, 4, 24, seed=6)  # uneven lengths: padded micro-batches
    expected = float64_next_token_loss(model, sequences)
    assert Probe(sequences, modules="blocks.*").run(model).loss is None  # no loss unless asked
    plain = Probe(sequences, modules="blocks.*", batch_size=4, compute_loss=True).run(model)  # model(input_ids)
    assert plain.loss == pytest.approx(expected, rel=1e-6)
    assert plain.perplexity == pytest.approx(math.exp(expected), rel=1e-6)
    wrapped = Probe(
        sequences, modules="blocks.*", compute_loss=True, dtype=torch.float64,
        forward=lambda model, ids, mask: SimpleNamespace(logits=model(ids)),
    ).run(model)  # fmt: skip
    assert wrapped.loss == pytest.approx(expected, rel=1e-12)  # float64 terms of the same float32 logits
    gpt2 = tiny_model("gpt2", seed=3).eval()
    # one sequence per forward: the same float32 logits as the reference's (padding moves their last bits)
    own = Probe(sequences, modules="transformer.h.*", compute_loss=True, dtype=torch.float64, batch_size=1).run(gpt2)
    assert own.loss == pytest.approx(float64_next_token_loss(lambda ids: gpt2(ids).logits, sequences), rel=1e-12)
    assert own.loss == pytest.approx(Probe(sequences).run(gpt2).loss, rel=1e-6)  # Hugging Face's own loss
    no_logits = Probe(
        sequences, modules="blocks.*", compute_loss=True, forward=lambda model, ids, mask: (model(ids).sum(-1),)
    )  # a tuple whose first element is 2-D: no logits
    with pytest.raises(TypeError, match=r"the probe loss needs the logits: TinyCustomLM's output has no loss") as error:
        no_logits.run(model)
    assert "nanoGPT's (logits, loss)" in str(error.value) and "model(ids)[0]" in str(error.value)


class TupleLM(TinyCustomLM):
    """nanoGPT's convention: forward(idx) -> (logits, loss); with ``last_only`` (its inference path, no
    targets) the logits of the last position only, ``logits[:, [-1], :]``."""

    def __init__(self, last_only: bool = False) -> None:
        super().__init__()
        self.last_only = last_only

    def forward(self, idx):
        logits = super().forward(idx)
        return (logits[:, [-1], :] if self.last_only else logits), None


def test_a_tuple_output_s_first_element_is_the_logits_of_the_probe_loss():
    """On main nanoGPT's (logits, loss) with compute_loss=True: "output has no loss and no logits"."""
    model = TupleLM().eval()
    sequences = random_sequences(9, 4, 24, seed=6)
    expected = float64_next_token_loss(lambda ids: model(ids)[0], sequences)
    result = Probe(sequences, modules="blocks.*", batch_size=1, compute_loss=True, dtype=torch.float64).run(model)
    assert result.loss == pytest.approx(expected, rel=1e-12)
    listed = Probe(sequences, modules="blocks.*", compute_loss=True, forward=lambda m, ids, mask: list(m(ids)))
    assert listed.run(model).loss == pytest.approx(expected, rel=1e-6)  # a list too, padded micro-batches
    last_only = Probe(sequences, modules="blocks.*", batch_size=1, compute_loss=True)
    with pytest.raises(
        ValueError, match=r"expected logits of shape \(batch, tokens, vocabulary\) = \(1, \d+, V\).*, 1, 96\)"
    ):
        last_only.run(TupleLM(last_only=True).eval())


def test_compute_loss_on_a_masked_language_model_is_refused():
    """On main BertForMaskedLM with compute_loss=True logged its masked-LM loss (labels = input_ids) as probe/loss."""
    import transformers as tf

    config = tf.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    model = tf.BertForMaskedLM(config).eval()
    sequences = random_sequences(4, 5, 12, seed=1, vocab_size=64)
    with pytest.raises(ValueError, match=r"compute_loss=True, but BertForMaskedLM is a masked language model"):
        Probe(sequences, compute_loss=True).run(model)
    with pytest.raises(ValueError, match=r"BertForMaskedLM is a masked language model"):
        Probe(sequences, compute_loss=True, modules="bert.encoder.layer.*").run(model)
    default = Probe(sequences).run(model)  # not a causal LM: no loss unless asked
    assert default.loss is None and len(default.layers) == 3


def test_a_forward_without_modules_returning_no_hidden_states_says_to_return_them():
    """On main the error told the user to pass forward=, which they had done."""
    model = tiny_model("t5", seed=1).eval()
    sequences = [[token + 3 for token in ids] for ids in random_sequences(3, 5, 12, seed=2, vocab_size=90)]
    probe = Probe(
        sequences, forward=lambda model, ids, mask: model.get_encoder()(input_ids=ids, attention_mask=mask)
    )  # the encoder's output without output_hidden_states=True
    with pytest.raises(TypeError, match=r"forward= for T5ForConditionalGeneration holds no hidden_states") as error:
        probe.run(model)
    message = str(error.value)
    assert "forward= must return an output with hidden_states" in message
    assert "output_hidden_states=True" in message and "pass forward=" not in message
