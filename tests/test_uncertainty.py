"""Standard errors of eRank, Diff-eRank and changes on the fixed sample, against scipy's bootstrap."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
from helpers import random_sequences, tiny_model
from scipy import stats

from mnn_callback import MemorySink, MNNWarning, Monitor, Probe
from mnn_callback.core.uncertainty import paired_standard_error
from mnn_callback.probing.results import Measurement

LAYER = 2  # the final hidden state of the 2-layer model


def _two_probes():
    """The same sample through a model and through the same model after a change of one weight."""
    probe = Probe(random_sequences(48, 8, 40, seed=5), batch_size=8)
    model = tiny_model("gpt2", seed=1)
    before = probe.run(model, per_sequence=True)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight.mul_(3.0)
    after = probe.run(model, per_sequence=True)
    return before, after


@pytest.fixture(scope="module")
def probes():
    return _two_probes()


def _bootstrap_se(statistic, *samples, paired=False):
    return stats.bootstrap(
        tuple(np.asarray(sample) for sample in samples),
        statistic,
        paired=paired,
        n_resamples=4000,
        method="percentile",
        random_state=np.random.default_rng(0),
    ).standard_error


def test_the_erank_standard_error_matches_a_bootstrap_of_the_sequences(probes):
    _, after = probes
    entropies = after.per_sequence["entropy_nats"][LAYER]
    bootstrap = _bootstrap_se(lambda h: np.exp(np.mean(h)), entropies)
    assert after.per_layer["erank"][LAYER] == pytest.approx(math.exp(np.mean(entropies)))
    assert after.standard_errors["erank"][LAYER] == pytest.approx(bootstrap, rel=0.1)


@pytest.mark.parametrize("name", ["mnn", "mnn_vs_noise", "matrix_entropy"])
def test_the_paired_standard_error_of_a_change_matches_a_paired_bootstrap(probes, name):
    before, after = probes
    now, then = after.per_sequence[name][LAYER], before.per_sequence[name][LAYER]
    errors = after.difference_errors(before)[f"{name}_change"]
    bootstrap = _bootstrap_se(lambda a, b: np.mean(a) - np.mean(b), now, then, paired=True)
    assert errors[LAYER] == pytest.approx(bootstrap, rel=0.1)
    independent = math.hypot(after.standard_errors[name][LAYER], before.standard_errors[name][LAYER])
    assert errors[LAYER] < independent  # the same sequences: their order is shared


def test_the_diff_erank_standard_error_matches_a_paired_bootstrap(probes):
    before, after = probes
    now, then = after.per_sequence["entropy_nats"][LAYER], before.per_sequence["entropy_nats"][LAYER]
    value = after.differences(before)["diff_erank"][LAYER]
    assert value == pytest.approx(math.exp(np.mean(then)) - math.exp(np.mean(now)))
    bootstrap = _bootstrap_se(lambda a, b: np.exp(np.mean(b)) - np.exp(np.mean(a)), now, then, paired=True)
    assert after.difference_errors(before)["diff_erank"][LAYER] == pytest.approx(bootstrap, rel=0.1)


def test_without_per_sequence_values_the_error_is_that_of_two_independent_means_and_a_warning_says_so(probes):
    before, after = probes
    independent = math.hypot(after.standard_errors["mnn"][LAYER], before.standard_errors["mnn"][LAYER])
    unpaired = dataclasses.replace(before, per_sequence=None)
    for now, then, missing in (
        (after, unpaired, "the reference"),
        (dataclasses.replace(after, per_sequence=None), before, "this result"),
    ):
        with pytest.warns(MNNWarning, match=f"same sample.*{missing} kept no per-sequence values") as caught:
            error = now.difference_errors(then)["mnn_change"][LAYER]
        assert len(caught) == 1  # one warning per comparison, not one per metric and layer
        assert error == pytest.approx(independent)
    other_sample = dataclasses.replace(unpaired, fingerprint="another sample")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # another sample: independent means are the right comparison, no warning
        assert after.difference_errors(other_sample)["mnn_change"][LAYER] == pytest.approx(independent)


def test_two_runs_with_the_defaults_on_one_sample_are_compared_paired():
    probe = Probe(random_sequences(24, 8, 40, seed=6), batch_size=8)
    model = tiny_model("gpt2", seed=3)
    before = probe.run(model)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(1.5)
    after = probe.run(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        errors = after.difference_errors(before)
    change = np.asarray(after.per_sequence["mnn"][LAYER]) - np.asarray(before.per_sequence["mnn"][LAYER])
    assert errors["mnn_change"][LAYER] == pytest.approx(change.std(ddof=1) / math.sqrt(len(change)), rel=1e-9)
    independent = math.hypot(after.standard_errors["mnn"][LAYER], before.standard_errors["mnn"][LAYER])
    assert errors["mnn_change"][LAYER] < independent


def test_the_monitor_logs_changes_with_paired_errors_under_schema_keys():
    model = tiny_model("gpt2", seed=2)
    monitor = Monitor(Probe(random_sequences(16, 8, 24, seed=3), batch_size=4), dashboards=False)
    memory = MemorySink()
    monitor.open(lambda: [memory], is_main_process=True)
    monitor.measure(model, 0)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight.mul_(2.0)
    second: Measurement = monitor.measure(model, 5)
    scalars = second.scalars()
    for key in ("mnn_change/last", "matrix_entropy_change/last", "erank_se/layer_2", "diff_erank_se/layer_2"):
        assert math.isfinite(scalars[key]), key
    assert scalars["mnn_change_se/layer_2"] == pytest.approx(second.difference_errors["mnn_change"][2])
    assert scalars["mnn_change/last"] == pytest.approx(
        second.result.per_layer["mnn"][2] - monitor.reference.per_layer["mnn"][2]
    )
    monitor.close()


def test_paired_standard_error_input_checks():
    assert paired_standard_error([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 0.0
    assert math.isnan(paired_standard_error([1.0, math.nan], [1.0, 2.0]))  # one finite pair only
    with pytest.raises(ValueError, match="expected the same sequences"):
        paired_standard_error([1.0], [1.0, 2.0])
