"""Runs shared by several test modules, paid for once: a logged training run for the log tests (tensorboard,
stdout) and the W&B test, so that both trackers are compared on the very same run; and the uninterrupted run that
the interrupted ones (signals, kills, restarts) are compared with."""

import pytest

from megatron_cocomix.arguments import parse_args
from tests.helpers.interrupted_runs import flags
from tests.helpers.launch import TINY_GPT, losses, run_pretrain


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


@pytest.fixture(scope="package")
def uninterrupted(tmp_path_factory):
    """The lm losses of 20 uninterrupted iterations on 2 ranks (of tests.helpers.interrupted_runs.flags()'s
    200-iteration schedule)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    return losses(run_pretrain(flags(**{"--exit-interval": "20"}), tmp, nproc=2))
