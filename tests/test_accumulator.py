"""MetricAccumulator: means, standard errors and counts that add up across shards exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import make_hidden

from mnn_callback.core.accumulator import MetricAccumulator
from mnn_callback.core.metrics import compute_metrics

FIELDS = ("mnn", "nuclear_norm", "matrix_entropy", "entropy_nats", "renyi2_entropy")


def metrics_of(seed: int, batch: int) -> dict[str, torch.Tensor]:
    hidden = make_hidden("anisotropic", batch, 9, 6, seed=seed)
    hidden[0, 0, 0] = math.nan  # one NaN sequence per batch
    return compute_metrics(hidden)


def test_means_erank_inputs_and_counts_as_the_authors_aggregate():
    first, second = metrics_of(1, 4), metrics_of(2, 3)
    accumulator = MetricAccumulator(num_groups=2, fields=FIELDS)
    accumulator.update(first, group=0)
    accumulator.update(second, group=0)
    accumulator.update(second, group=1)
    result = accumulator.compute()
    combined = {key: torch.cat([first[key], second[key]]).double() for key in FIELDS}
    finite = torch.isfinite(combined["mnn"])
    assert result["sequences"].tolist() == [7, 3]
    assert result["nan_sequences"].tolist() == [2, 1]
    assert result["mnn"][0].item() == pytest.approx(combined["mnn"][finite].mean().item(), rel=1e-12)
    assert result["entropy_nats"][0].item() == pytest.approx(combined["entropy_nats"][finite].mean().item(), rel=1e-12)
    assert math.isnan(MetricAccumulator(fields=FIELDS).compute()["mnn"][0].item())


def test_standard_error_is_the_sample_sd_over_root_n():
    values = torch.tensor([0.31, 0.52, 0.47, 0.66, 0.29, math.nan])
    accumulator = MetricAccumulator(fields=("mnn",))
    accumulator.update({"mnn": values[:2]})
    accumulator.update({"mnn": values[2:]})  # in two micro-batches
    finite = values[torch.isfinite(values)].numpy().astype(np.float64)
    expected = np.std(finite, ddof=1) / math.sqrt(len(finite))
    assert accumulator.compute()["mnn_se"].item() == pytest.approx(expected, rel=1e-12)
    single = MetricAccumulator(fields=("mnn",))
    single.update({"mnn": torch.tensor([0.5])})
    assert math.isnan(single.compute()["mnn_se"].item())  # one value: no standard error


def test_states_of_shards_add_up_to_the_single_pass():
    whole = MetricAccumulator(num_groups=1, fields=FIELDS)
    left, right = MetricAccumulator(fields=FIELDS), MetricAccumulator(fields=FIELDS)
    for seed, batch, shard in [(1, 4, left), (2, 3, right), (3, 1, right)]:
        values = metrics_of(seed, batch)
        whole.update(values)
        shard.update(values)
    torch.testing.assert_close(left.state + right.state, whole.state)


def test_update_reports_which_sequences_have_a_nan():
    accumulator = MetricAccumulator(fields=("mnn", "nuclear_norm"))
    values = {"mnn": torch.tensor([0.1, 0.2, 0.3]), "nuclear_norm": torch.tensor([0.1, math.nan, 0.3])}
    has_nan = accumulator.update(values)
    assert has_nan.tolist() == [False, True, False]


def test_bad_input_gives_clear_errors():
    with pytest.raises(KeyError, match="compute_metrics"):
        MetricAccumulator(fields=FIELDS).update({"mnn": torch.ones(2)})
    with pytest.raises(ValueError, match="num_groups"):
        MetricAccumulator(0)
    with pytest.raises(ValueError, match="fields"):
        MetricAccumulator(fields=())
