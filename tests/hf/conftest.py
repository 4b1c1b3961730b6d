"""Fixtures for the Hugging Face tests: the tiny checkpoints of tests/helpers/hf_checkpoints.py, trained on first
use, once per session, and a folder for the exports."""

from __future__ import annotations

import pytest

from tests.helpers.hf_checkpoints import train_layout

_TRAINED = {}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """checkpoints(layout) -> {variant: checkpoint dir}, trained on first use."""
    def get(layout: str) -> dict:
        if layout not in _TRAINED:
            _TRAINED[layout] = train_layout(layout, str(tmp_path_factory.mktemp(f"ckpt_{layout}")))
        return _TRAINED[layout]
    return get


@pytest.fixture(scope="session")
def export_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("exports"))
