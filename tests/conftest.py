"""Shared test setup: offline everything, W&B and TensorBoard under temporary directories."""

from __future__ import annotations

import os
import sys

for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "WANDB_DISABLE_GIT": "true",
    "COMET_START_ONLINE": "0",  # a Comet experiment, if any, is an offline archive
    "COMET_ERROR_TRACKING_ENABLE": "false",  # and reports no error over the network
    "COMET_AUTO_LOG_ENV_DETAILS": "false",  # nor looks up its IP via www.comet.com or asks a cloud's metadata server
    "COMET_URL_OVERRIDE": "http://127.0.0.1:9/clientlib/",  # and an online start could reach no Comet server
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_name, _value)

import pytest  # noqa: E402

# Helper scripts run as subprocesses; importing them (doctest collection) would start training.
collect_ignore = ["scripts"]


@pytest.fixture(autouse=True)
def _isolated_tracking_dirs(tmp_path_factory, monkeypatch):
    """Every test gets its own W&B directory and no TensorBoard directory from the environment."""
    base = tmp_path_factory.mktemp("tracking")
    monkeypatch.setenv("WANDB_DIR", str(base / "wandb"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(base / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(base / "wandb-config"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(base / "wandb-data"))
    monkeypatch.setenv("COMET_OFFLINE_DIRECTORY", str(base / "comet"))
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    (base / "wandb").mkdir()
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and hasattr(wandb, "teardown"):
        wandb.teardown()  # wandb caches its settings (WANDB_DIR too) per process: start afresh
