"""examples/multinode/ for real, on one machine: two "nodes" of one process each, started as a cluster would start
them, train the same losses as one 2-process torchrun of the same flags.

- examples/multinode/launch_torchrun.sh, run twice (NNODES=2, MASTER_ADDR=127.0.0.1): torchrun's c10d
  rendezvous assigns the node ranks, as on a cluster.
- examples/multinode/launch_deepspeed.sh, run twice with NO_SSH=1 and NODE_RANK 0 / 1: the DeepSpeed launcher's
  `--no_ssh --node_rank` mode, which starts this node's ranks only (the hostfile's host names are never
  contacted), instead of reaching the other hosts over ssh (pdsh).
- The reference: examples/pretrain_paper.sh with NNODES=1 GPUS_PER_NODE=2, one torchrun of 2 processes.

All three run the paper's 69M NTP configuration shrunk by extra flags (as pretrain_paper.sh documents) on a small
GPT-2-token dataset, with DeepSpeed ZeRO-1 (the DeepSpeed launcher's default optimizer; ZERO_STAGE=1 for torchrun)
so that one reference serves both launchers: the same 2 ranks, optimizer and data give the same losses, digit
for digit.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.helpers import launch
from tests.helpers.data_files import write_token_dataset
from tests.helpers.interrupted_runs import printed_losses
from tests.helpers.paths import ROOT

pytestmark = pytest.mark.slow
EXAMPLES = os.path.join(ROOT, "examples")
TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3",
        "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-iters", "0", "--split", "98,1,1",
        "--num-workers", "1"]
LAUNCH_SETTINGS = ("NNODES", "NODE_RANK", "GPUS_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "RDZV_ID", "RDZV_BACKEND",
                   "HOSTFILE", "NO_SSH", "ZERO_STAGE", "LAUNCHER", "MAX_RESTARTS", "DRY_RUN")


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("multinode_data") / "tokens")
    write_token_dataset(prefix, vocab_size=50257, num_docs=200)
    return prefix


def _start(script: str, tmp, name: str, data_prefix: str, **settings) -> subprocess.Popen:
    env = {k: v for k, v in launch.test_env().items() if k not in LAUNCH_SETTINGS}
    env.update(SIZE="69m", METHOD="ntp", DATA_PATH=data_prefix, CHECKPOINT_DIR=str(tmp / f"ckpt_{name}"),
               MASTER_ADDR="127.0.0.1", **settings)
    log = open(tmp / f"{name}.log", "w")
    return subprocess.Popen(["bash", os.path.join(EXAMPLES, script), *TINY], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(procs: dict, tmp) -> str:
    """Wait for every process; returns their logs, concatenated (the last rank prints the losses)."""
    try:
        for name, proc in procs.items():
            proc.wait(timeout=900)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
    logs = {name: (tmp / f"{name}.log").read_text() for name in procs}
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{logs[name][-4000:]}"
    return "".join(logs.values())


def test_two_nodes_train_as_one_two_process_job(tmp_path, data_prefix):
    one_node = _finish({"reference": _start("pretrain_paper.sh", tmp_path, "reference", data_prefix,
                                            NNODES="1", GPUS_PER_NODE="2", ZERO_STAGE="1",
                                            MASTER_PORT=str(launch.free_port()))}, tmp_path)
    reference = printed_losses(one_node)
    assert sorted(reference) == [1, 2, 3]

    port = str(launch.free_port())
    torchrun = _finish({f"torchrun_node{rank}": _start(
        "multinode/launch_torchrun.sh", tmp_path, f"torchrun_node{rank}", data_prefix, NNODES="2",
        GPUS_PER_NODE="1", MASTER_PORT=port, RDZV_ID=f"test-{port}", ZERO_STAGE="1") for rank in (0, 1)}, tmp_path)
    assert printed_losses(torchrun) == reference

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = str(launch.free_port())
    deepspeed = _finish({f"deepspeed_node{rank}": _start(
        "multinode/launch_deepspeed.sh", tmp_path, f"deepspeed_node{rank}", data_prefix, HOSTFILE=str(hostfile),
        NO_SSH="1", NODE_RANK=str(rank), GPUS_PER_NODE="1", MASTER_PORT=port) for rank in (0, 1)}, tmp_path)
    assert "--node_rank=1" in deepspeed  # DeepSpeed's runner logs the launch command of the second node
    assert printed_losses(deepspeed) == reference
