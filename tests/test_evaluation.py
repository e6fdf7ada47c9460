"""evaluate_models: post hoc evaluation as a library, on modules and saved model directories."""

from __future__ import annotations

import pytest
from helpers import random_sequences, tiny_model

from mnn_callback import Probe, UsageError, evaluate_models
from mnn_callback.core import schema
from mnn_callback.core.uncertainty import paired_standard_error
from mnn_callback.output.files import read_jsonl

DATA = random_sequences(6, 5, 20, seed=4)


def saved(tmp_path, name, seed):
    path = tmp_path / name
    tiny_model("gpt2", seed=seed).save_pretrained(path)
    return path


def test_rows_of_modules_equal_the_probe_and_carry_the_csv_columns():
    first, second = tiny_model("gpt2", seed=1), tiny_model("gpt2", seed=2)
    rows = evaluate_models([first, second], DATA, batch_size=4)
    assert len(rows) == 2 * 3  # models x hidden states
    assert set(rows[0]) <= set(schema.CSV_COLUMNS)
    expected = Probe(DATA, batch_size=4).run(second)
    for row in rows[3:]:
        layer = row["layer"]
        assert row["mnn"] == pytest.approx(expected.per_layer["mnn"][layer], rel=1e-12)
        assert row["erank"] == pytest.approx(expected.per_layer["erank"][layer], rel=1e-12)
        assert row["loss"] == pytest.approx(expected.loss, rel=1e-12)
        assert row["params"] == sum(p.numel() for p in second.parameters())
    reference_erank = Probe(DATA, batch_size=4).run(first).per_layer["erank"]
    assert rows[5]["diff_erank"] == pytest.approx(reference_erank[2] - expected.per_layer["erank"][2])
    assert all(row["diff_erank"] == 0.0 for row in rows[:3])  # the first model is the reference
    # the same sample through both models: the changes' standard errors are paired
    before = Probe(DATA, batch_size=4).run(first, per_sequence=True)
    after = Probe(DATA, batch_size=4).run(second, per_sequence=True)
    assert rows[5]["mnn_change"] == pytest.approx(after.per_layer["mnn"][2] - before.per_layer["mnn"][2])
    assert rows[5]["mnn_change_se"] == pytest.approx(
        paired_standard_error(after.per_sequence["mnn"][2], before.per_sequence["mnn"][2])
    )
    assert rows[5]["diff_erank_se"] == pytest.approx(after.difference_errors(before)["diff_erank"][2])


def test_directories_results_file_resume_and_untrained_reference(tmp_path):
    models = [saved(tmp_path, "a", 1), saved(tmp_path, "b", 2)]
    results = tmp_path / "metrics.jsonl"
    rows = evaluate_models(models, DATA, results_file=results, reference="untrained", layers="last")
    assert [row["layer"] for row in rows] == [2, 2]
    assert all(row["diff_erank"] != 0.0 for row in rows)
    records = read_jsonl(results)
    assert [record.get("role") for record in records].count("reference") == 1  # one architecture
    again = evaluate_models(models, DATA, results_file=results, reference="untrained", layers="last")
    assert read_jsonl(results) == records  # read back, nothing evaluated again
    assert again == rows


def test_bad_input_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no model or checkpoint found"):
        evaluate_models([str(tmp_path / "missing")], DATA)
    with pytest.raises(UsageError, match="data file not found"):
        evaluate_models([tiny_model("gpt2")], str(tmp_path / "missing.txt"))
    with pytest.raises(UsageError, match="at least 2 tokens"):
        evaluate_models([tiny_model("gpt2")], [[1]])


def test_text_data_and_no_tokenizer_names_the_option_to_pass(tmp_path, capsys):
    """On main: "no tokenizer was found: pass a tokenizer", naming neither --tokenizer nor tokenizer=."""
    from mnn_callback.cli import main

    checkpoint = saved(tmp_path, "checkpoint-2", 1)  # a model saved without its tokenizer
    data = tmp_path / "heldout.txt"
    data.write_text("To be, or not to be.\n\nNow is the winter of our discontent.\n")
    with pytest.raises(UsageError) as caught:
        evaluate_models([checkpoint], str(data))
    assert str(caught.value) == (
        f"the data holds text and no tokenizer was found for {checkpoint}: pass one with --tokenizer "
        "(from Python: tokenizer=)"
    )
    capsys.readouterr()
    assert main(["evaluate", str(checkpoint), "--data", str(data), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "--tokenizer" in error and "tokenizer=" in error


def gpt2_with_positions(positions: int, seed: int = 0):
    import transformers as tf

    torch = pytest.importorskip("torch")
    torch.manual_seed(seed)
    config = tf.GPT2Config(vocab_size=96, n_layer=2, n_embd=32, n_head=2, n_positions=positions)
    return tf.GPT2LMHeadModel(config)


def test_each_model_is_measured_on_the_sample_as_given_in_any_order():
    """On main the first model's position limit cut the shared sample for every later model (MNN 0.990 vs 0.579)."""
    data = random_sequences(6, 90, 110, seed=7)
    short, long = gpt2_with_positions(32, seed=1), gpt2_with_positions(128, seed=2)
    alone = {
        "short": evaluate_models([short], data, layers="last")[0],
        "long": evaluate_models([long], data, layers="last")[0],
    }
    assert alone["long"]["max_tokens"] > 32 and alone["short"]["max_tokens"] == 32
    for order in (["short", "long"], ["long", "short"]):
        models = {"short": short, "long": long}
        rows = evaluate_models([models[name] for name in order], data, layers="last")
        for name, row in zip(order, rows, strict=True):
            assert row["max_tokens"] == alone[name]["max_tokens"]
            assert row["mnn"] == pytest.approx(alone[name]["mnn"], rel=1e-12)


def test_in_memory_models_with_one_name_are_each_measured():
    """Issue 27's wrong result: two modules of one base shared a cache key; the second got the first's values."""
    base = tiny_model("gpt2", seed=3)
    base.config.name_or_path = "org/base"
    scaled = tiny_model("gpt2", seed=3)
    scaled.config.name_or_path = "org/base"
    with pytest.importorskip("torch").no_grad():
        for parameter in scaled.parameters():
            parameter.mul_(3.0)
    rows = evaluate_models([base, scaled], DATA, layers="last")
    alone = evaluate_models([scaled], DATA, layers="last")[0]
    assert [row["model"] for row in rows] == ["org/base #0", "org/base #1"]
    assert rows[1]["loss"] == pytest.approx(alone["loss"], rel=1e-12) and rows[1]["loss"] != rows[0]["loss"]
    assert rows[1]["mnn"] == pytest.approx(alone["mnn"], rel=1e-12)


def test_a_saved_t5_checkpoint_is_evaluated_by_its_encoder_without_a_loss(tmp_path):
    """On main a T5 checkpoint (loaded as T5Model) was refused: "is an encoder-decoder model, which the probe ..."."""
    import transformers as tf

    data = [[token + 3 for token in ids] for ids in random_sequences(6, 5, 20, seed=4, vocab_size=90)]
    checkpoint = tmp_path / "checkpoint-4"
    tiny_model("t5", seed=1).save_pretrained(checkpoint)
    results = tmp_path / "metrics.jsonl"
    rows = evaluate_models([checkpoint], data, reference="untrained", results_file=results)
    assert [row["layer"] for row in rows] == [0, 1, 2] and all(row["step"] == 4 for row in rows)
    assert all(row["loss"] is None for row in rows)
    encoder = tf.T5EncoderModel.from_pretrained(checkpoint, local_files_only=True).eval()  # the same weights
    expected = Probe(data).run(encoder)
    for row in rows:
        assert row["mnn"] == pytest.approx(expected.per_layer["mnn"][row["layer"]], rel=1e-12)
        assert row["erank"] == pytest.approx(expected.per_layer["erank"][row["layer"]], rel=1e-12)
    assert all(row["diff_erank"] != 0.0 for row in rows[1:])  # against the untrained T5's encoder
    stored = [record for record in read_jsonl(results) if record.get("role") != "reference"]
    assert stored[0]["result"]["config"]["probed"] == "encoder"


@pytest.mark.parametrize("task_type", ["SEQ_2_SEQ_LM", None])
def test_a_t5_lora_adapter_is_evaluated_by_its_merged_encoder(tmp_path, task_type):
    """On main a SEQ_2_SEQ_LM adapter failed: "'T5Model' object has no attribute 'prepare_inputs_for_generation'"
    (its base was loaded with AutoModel)."""
    import transformers as tf

    peft = pytest.importorskip("peft")
    data = [[token + 3 for token in ids] for ids in random_sequences(6, 5, 20, seed=4, vocab_size=90)]
    base = tmp_path / "base"
    tiny_model("t5", seed=1).save_pretrained(base)
    lora = peft.LoraConfig(r=4, target_modules=["q", "v"], task_type=task_type, init_lora_weights=False)
    model = peft.get_peft_model(tf.T5ForConditionalGeneration.from_pretrained(base), lora)
    model.save_pretrained(tmp_path / "adapter")
    rows = evaluate_models([tmp_path / "adapter"], data)
    assert [row["layer"] for row in rows] == [0, 1, 2] and all(row["loss"] is None for row in rows)
    encoder = model.merge_and_unload().get_encoder().eval()  # the adapted weights, not the base's
    expected = Probe(data).run(encoder)
    assert Probe(data).run(tf.T5EncoderModel.from_pretrained(base)).per_layer["mnn"] != expected.per_layer["mnn"]
    for row in rows:
        assert row["mnn"] == pytest.approx(expected.per_layer["mnn"][row["layer"]], rel=1e-6)
        assert row["erank"] == pytest.approx(expected.per_layer["erank"][row["layer"]], rel=1e-6)
