"""A training checkpoint as one TP1 / PP1 model in this process, on CPU, whatever layout it was saved at.

The model is rebuilt from the flags saved in the checkpoint's common state (`export.args`, written by
training/checkpointing.py) with the parallel sizes set to 1, and its weights are read through megatron-core's
dist_checkpointing, which reshards: every saved tensor is a slice (global offset, global shape) of the full tensor,
so TP / PP / virtual-PP shards and megatron-distributed or DeepSpeed ZeRO checkpoints (whose weights live in the
same dist checkpoint, gathered at save time) all load into the full tensors here. Checkpoints written before the
flags were saved take the training flags from the caller (`train_argv`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from megatron_cocomix.training.checkpointing import (
    TRACKER,
    CheckpointError,
    checkpoint_dir,
    complete_checkpoints,
    read_tracker,
    verify_checkpoint_files,
)

# Flags that only describe how a run was parallelised or scheduled: reset for the single-process rebuild.
_SINGLE_PROCESS = dict(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                       virtual_pipeline_model_parallel_size=None, num_layers_per_virtual_pipeline_stage=None,
                       sequence_parallel=False, world_size=1, data_parallel_size=1, deepspeed=False,
                       recompute_granularity=None, recompute_method=None, recompute_num_layers=None,
                       variable_seq_lengths=False, overlap_p2p_comm=False, distributed_backend="gloo",
                       use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0)


@dataclass
class LoadedCheckpoint:
    path: str
    iteration: int
    args: object            # the run's flags, at TP1 / PP1
    model: torch.nn.Module  # megatron-core GPTModel, eval mode, the trained dtype
    tokenizer: Optional[dict]  # {type, vocab_size, eod, files} or None when the checkpoint has none


def find_checkpoint(root: str, iteration: Optional[int] = None) -> str:
    """The complete iter_XXXXXXX directory: `iteration`, or the one the tracker names. Raises CheckpointError."""
    if not os.path.isdir(root):
        raise CheckpointError(f"--load {root}: no such directory")
    if iteration is not None:
        path = checkpoint_dir(root, iteration)
        if os.path.basename(path) not in complete_checkpoints(root) or \
                not os.path.isfile(os.path.join(path, "common.pt")):
            raise CheckpointError(f"--iteration {iteration}: {path} is not a complete checkpoint")
        return path
    latest = read_tracker(root)
    if latest is None:
        raise CheckpointError(f"--load {root}: no complete checkpoint ({TRACKER} is missing)")
    path = checkpoint_dir(root, latest)
    if not os.path.isfile(os.path.join(path, "common.pt")):
        raise CheckpointError(f"--load {root}: {TRACKER} names iteration {latest} but {path} is not complete")
    return path


def read_common(path: str) -> dict:
    """The checkpoint's common state (common.pt: iteration, model_args, export, ...), read as training reads it
    (megatron's loader; no second unpickling path of our own), after the files were checked for completeness."""
    from megatron.core import dist_checkpointing

    verify_checkpoint_files(path)
    try:
        return dist_checkpointing.load_common_state_dict(path)
    except Exception as e:
        raise CheckpointError(f"{path}/common.pt: unreadable ({type(e).__name__}: {str(e)[:200]})") from None


def _rebuild_args(saved: Optional[dict], train_argv: Optional[Sequence[str]], path: str):
    from megatron_cocomix.arguments import RunArguments, parse_args

    if saved is None and not train_argv:
        raise CheckpointError(f"{path} does not record its training flags (saved before they were): give the "
                              f"training flags after `--`")
    if train_argv:
        args = parse_args(list(train_argv), world_size=None)
        args.padded_vocab_size = None
    else:
        args = RunArguments(**saved)
    for name, value in _SINGLE_PROCESS.items():
        setattr(args, name, value)
    return args


def _init_single_process(args) -> None:
    """A world of one on gloo, megatron's parallel state at TP1 / PP1 (no-op when one is already up)."""
    from megatron_cocomix import compat
    from megatron_cocomix.distributed import initialize_distributed

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    compat.install()
    initialize_distributed(args)


def build_model(args) -> torch.nn.Module:
    """The whole model (first and last stage) as pretrain_cocomix.model_provider builds it, at TP1 / PP1."""
    from megatron_cocomix import metrics
    from megatron_cocomix.global_vars import set_args
    from megatron_cocomix.model.concept_mixing import CONCEPT_METRICS, concept_layer_spec_for
    from megatron_cocomix.model.gpt import build_gpt_model, build_transformer_config, gpt_block_spec, gpt_layer_spec

    set_args(args)
    config = build_transformer_config(args)
    if args.cocomix:
        metrics.declare(*CONCEPT_METRICS)  # the concept layer records its metrics on every forward
    spec_for = concept_layer_spec_for(args, gpt_layer_spec(args)) if (args.cocomix or args.pause_tokens) else None
    block_spec = gpt_block_spec(args, config, None, spec_for)
    return build_gpt_model(args, config, pre_process=True, post_process=True, block_spec=block_spec)


def load_checkpoint_tp1(root: str, iteration: Optional[int] = None, train_argv: Optional[List[str]] = None,
                        check_args: Optional[Callable] = None) -> LoadedCheckpoint:
    """Read `root` (latest, or `iteration`) into one TP1 / PP1 model in this process. `check_args(args)` may
    refuse the run's flags before any weight is read."""
    from megatron.core import dist_checkpointing

    path = find_checkpoint(root, iteration)
    common = read_common(path)
    export = common.get("export") or {}
    args = _rebuild_args(export.get("args"), train_argv, path)
    if args.padded_vocab_size is None:
        args.padded_vocab_size = common["model_args"]["padded_vocab_size"]
    if check_args is not None:
        check_args(args)
    _init_single_process(args)
    model = build_model(args)
    sharded = {"model": model.sharded_state_dict()}
    try:
        loaded = dist_checkpointing.load(sharded, path)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: {first[:300]}") from e
    model.load_state_dict(loaded["model"], strict=True)
    return LoadedCheckpoint(path=path, iteration=int(common["iteration"]), args=args, model=model.eval(),
                            tokenizer=export.get("tokenizer"))


def megatron_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [b, s, padded V] of the megatron model for tokens [b, s] (no mask: causal), in fp32."""
    from megatron_cocomix import metrics

    device = next(model.parameters()).device  # CPU here; where CUDA is available megatron may have used it
    tokens = tokens.to(device)
    positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        logits = model(tokens, positions, None)
    metrics.reset()
    return logits.float().cpu()
