"""A logged training run shared by the log tests (tensorboard, stdout) and the W&B test, so that both trackers
are compared on the very same run and the run is paid for once."""

import pytest

from megatron_cocomix.arguments import parse_args
from tests.helpers.launch import TINY_GPT, run_pretrain


def wandb_offline_env(folder) -> dict:
    """Offline W&B (nothing leaves the machine), its caches, settings and temporary folders under `folder`."""
    (folder / "tmp").mkdir(parents=True)
    return {"WANDB_MODE": "offline", "WANDB_CACHE_DIR": str(folder / "cache"), "WANDB_CONFIG_DIR": str(folder / "config"),
            "WANDB_DATA_DIR": str(folder / "data"), "TMPDIR": str(folder / "tmp")}


@pytest.fixture(scope="package")
def pp2_run(tmp_path_factory):
    """PP2 x 2 processes, log every 2 iterations, tensorboard and W&B (offline, WANDB_MODE as a user sets it).
    Returns (summary, args, tensorboard dir, W&B save dir)."""
    tmp = tmp_path_factory.mktemp("logging")
    flags = TINY_GPT + ["--pipeline-model-parallel-size", "2", "--log-interval", "2", "--swiglu",
                        "--group-query-attention", "--num-query-groups", "2", "--tensorboard-dir", str(tmp / "tb"),
                        "--wandb-project", "cocomix-tests", "--wandb-exp-name", "tiny-pp2",
                        "--wandb-save-dir", str(tmp / "wandb")]
    result = run_pretrain(flags, tmp, nproc=2, env=wandb_offline_env(tmp / "wandb-home"))
    args = parse_args(flags, world_size=2)
    args.padded_vocab_size = 256
    return result, args, str(tmp / "tb"), str(tmp / "wandb")
