"""Process groups: backend choice, megatron-core's parallel state, seeding, and DeepSpeed's view of the groups.

Ranks are laid out as megatron-core does (TP fastest, then DP, then PP). NCCL when CUDA is available, gloo
otherwise; `torchrun`, the `deepspeed` launcher and a bare `python pretrain_cocomix.py` (one process) all work.
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import socket
from typing import Dict

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel

from megatron_cocomix import compat


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_single_process_env() -> None:
    """A bare `python pretrain_cocomix.py` has no launcher environment: make it a world of one."""
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _skip_deepspeed_shm_build() -> None:
    """DeepSpeed JIT-compiles a shared-memory all-reduce op on CPU at init (about a minute, once per machine)
    that only its inference path uses; training never calls it."""
    import importlib

    ds_torch = importlib.import_module("deepspeed.comm.torch")
    if hasattr(ds_torch, "build_shm_op"):
        ds_torch.build_shm_op = lambda: None


def _attempt_store(timeout: datetime.timedelta):
    """Under torchrun, the store this attempt's process groups register in: torchrun's own (its agent hosts it),
    under a prefix naming the restart. torchrun (torch 2.13) keeps that store across the restarts of
    --max-restarts, and the keys process groups register their ranks' addresses under do not name the attempt: a
    restarted group would read the dead ranks' addresses (gloo: connection refused, or a hang). None under other
    launchers, which start every process group afresh."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    agent_store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                             int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    return torch.distributed.PrefixStore(f"megatron_cocomix/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}",
                                         agent_store)


def initialize_distributed(args: argparse.Namespace) -> None:
    """Process groups and seeds for a run. On a machine without CUDA the caller must have activated
    `compat.install()` first (entry points do), since megatron-core's state below assumes a GPU."""
    _set_single_process_env()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = args.distributed_backend or ("nccl" if compat.cuda_available() else "gloo")
    if compat.cuda_available():
        torch.cuda.set_device(local_rank)
    timeout = datetime.timedelta(minutes=args.distributed_timeout_minutes)
    if not torch.distributed.is_initialized():
        store = _attempt_store(timeout)
        if store is not None:
            torch.distributed.init_process_group(backend=backend, timeout=timeout, store=store,
                                                 rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        if args.deepspeed:
            import deepspeed

            if not compat.cuda_available():
                _skip_deepspeed_shm_build()
            deepspeed.init_distributed(dist_backend=backend, timeout=timeout)  # adopts a group made above
        elif store is None:
            torch.distributed.init_process_group(backend=backend, timeout=timeout)
    world_size = torch.distributed.get_world_size()
    if world_size != args.world_size:
        raise RuntimeError(f"validated for world size {args.world_size} but the launcher started {world_size}")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        )
    global _HOST_GROUP
    if torch.distributed.get_backend() != "gloo" and (args.exit_signal_handler or args.exit_duration_in_mins):
        # Agreeing to stop (exit_conditions.py) is a per-iteration all-reduce of one flag held on the host: on a
        # gloo group it never waits for the GPU. Created on every rank, in the same order (a collective).
        _HOST_GROUP = torch.distributed.new_group(backend="gloo", timeout=timeout)
    set_random_seed(args.seed)


_HOST_GROUP = None


def init_data_parallel() -> tuple:
    """(rank, world size, device) of a data-parallel tool (no model parallelism): torchrun's process group (NCCL
    with GPUs, gloo without) when it launched several processes, or a world of one without a process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), world, device


def host_group():
    """A gloo group over all ranks for host-side collectives, or None when the default group is gloo already."""
    return _HOST_GROUP


def set_random_seed(seed: int) -> None:
    """Megatron's seeding: one stream per pipeline stage; tensor-parallel streams from the RNG tracker."""
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def destroy_distributed() -> None:
    global _HOST_GROUP
    _HOST_GROUP = None
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_rank_0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def print_rank_0(*message) -> None:
    if is_rank_0():
        print(*message, flush=True)


def current_layout() -> Dict[str, int]:
    """This run's parallel layout, as checkpoints record it."""
    return {"tensor": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline": parallel_state.get_pipeline_model_parallel_world_size(),
            "data": parallel_state.get_data_parallel_world_size(with_context_parallel=True)}


def layout_string(layout: Dict[str, int]) -> str:
    return f"TP{layout['tensor']} x PP{layout['pipeline']} x DP{layout['data']}"


class DeepSpeedMPU:
    """megatron-core's groups in the shape DeepSpeed's `mpu` argument expects.

    DeepSpeed uses "model parallel" for two things: the group over which the gradient norm is summed (all
    model-parallel ranks: TP x PP) and the rank test that keeps parameters duplicated across tensor-parallel
    ranks from being counted twice (the TP rank). Mapping both to megatron's model-parallel group/rank would
    drop non-TP parameters of every stage but the first, so the rank is the TP rank.
    """

    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_pipeline_model_parallel_group = staticmethod(parallel_state.get_pipeline_model_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(parallel_state.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(parallel_state.get_pipeline_model_parallel_world_size)
    get_model_parallel_group = staticmethod(parallel_state.get_model_parallel_group)
    get_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return torch.distributed.get_world_size(parallel_state.get_model_parallel_group())
