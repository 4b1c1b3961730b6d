"""Session-wide hooks: tests marked gpu are skipped without a CUDA device.

pyproject.toml's `pythonpath = ["."]` makes the repository root importable, so tests import `tests.helpers...`,
`tools...` and `pretrain_cocomix` as packages; subprocesses get it on PYTHONPATH from tests.helpers.launch."""

import pytest


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
