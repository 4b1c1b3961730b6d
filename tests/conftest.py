"""Session-wide hooks: tests marked gpu are skipped without a CUDA device.

pyproject.toml's `pythonpath = ["."]` makes the repository root importable, so tests import `tests.helpers...`,
`tools...` and `pretrain_cocomix` as packages; subprocesses get it on PYTHONPATH from tests.helpers.launch."""

import os

import pytest


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        # The marker itself, not `"gpu" in item.keywords`: keywords also hold the names of the folders above a test.
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def single_process():
    """A world of one (gloo) with megatron's parallel state at TP1 / PP1, torn down afterwards."""
    from megatron_cocomix import compat
    from megatron_cocomix.distributed import destroy_distributed

    saved = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    from tests.helpers.launch import free_port

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    compat.install()
    yield
    destroy_distributed()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def smollm2_directory(tmp_path_factory):
    """The shipped SmolLM2-135M .gguf, dequantised once per session into a Hugging Face directory."""
    from tests.helpers.smollm2 import save_dequantised, smollm2_gguf

    return save_dequantised(smollm2_gguf(), str(tmp_path_factory.mktemp("smollm2") / "hf"))
