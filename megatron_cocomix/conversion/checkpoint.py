"""A training checkpoint as one TP1 / PP1 model in this process, on CPU, whatever layout it was saved at (or, under
a launcher, as this rank's part of the model at a TP / PP layout of the caller's choice: `load_checkpoint_parallel`).

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
    load_sharded,
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
    from megatron_cocomix.arguments import RunArguments, build_parser, parse_args

    if saved is None and not train_argv:
        raise CheckpointError(f"{path} does not record its training flags (saved before they were): give the "
                              f"training flags after `--`")
    if train_argv:
        args = parse_args(list(train_argv), world_size=None)
        args.padded_vocab_size = None
    else:
        # Flags added after the checkpoint was saved take their defaults.
        args = RunArguments(**{**vars(build_parser().parse_args([])), **saved})
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


def build_model(args, pre_process: bool = True, post_process: bool = True) -> torch.nn.Module:
    """This rank's pipeline stage of the model as pretrain_cocomix.model_provider builds it (the whole model by
    default: first and last stage, at TP1 / PP1)."""
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
    return build_gpt_model(args, config, pre_process=pre_process, post_process=post_process, block_spec=block_spec)


def load_checkpoint_tp1(root: str, iteration: Optional[int] = None, train_argv: Optional[List[str]] = None,
                        check_args: Optional[Callable] = None) -> LoadedCheckpoint:
    """Read `root` (latest, or `iteration`) into one TP1 / PP1 model in this process. `check_args(args)` may
    refuse the run's flags before any weight is read."""
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
    _load_weights(model, path, common, args)
    return LoadedCheckpoint(path=path, iteration=int(common["iteration"]), args=args, model=model.eval(),
                            tokenizer=export.get("tokenizer"))


def _load_weights(model: torch.nn.Module, path: str, common: dict, args) -> None:
    """This rank's tensors of the checkpoint into `model`, through dist_checkpointing (any saved layout); the
    vocabulary tensors are re-padded when this layout pads the vocabulary otherwise, as training's load does."""
    loaded = load_sharded({"model": model.sharded_state_dict()}, path, common["model_args"]["padded_vocab_size"],
                          args.padded_vocab_size,
                          args.true_vocab_size or common["model_args"].get("true_vocab_size"))
    model.load_state_dict(loaded["model"], strict=True)


def check_layout(args, world_size: int, tensor: int, pipeline: int, path: str) -> None:
    """One error line for a layout this world or this model cannot take (the rules of arguments.validate_args)."""
    from megatron_cocomix.arguments import check_parallel_sizes

    check_parallel_sizes(world_size, tensor, pipeline)
    if args.num_attention_heads % tensor or (args.num_query_groups or args.num_attention_heads) % tensor:
        raise ValueError(f"--tensor-model-parallel-size {tensor}: {path} has {args.num_attention_heads} attention "
                         f"heads and {args.num_query_groups} query groups, which it must divide")
    if args.num_layers % pipeline:
        raise ValueError(f"--pipeline-model-parallel-size {pipeline}: {path} has {args.num_layers} layers, which it "
                         f"must divide")


def load_checkpoint_parallel(root: str, iteration: Optional[int], tensor: Optional[int],
                             pipeline: Optional[int]) -> LoadedCheckpoint:
    """Under a launcher (the process group up, or its environment set): this rank's stage and tensor-parallel
    shard of `root` at TP `tensor` x PP `pipeline` (default: the saved layout), data-parallel over the rest of the
    world, on this rank's device, in eval mode. megatron's parallel state is (re)built for this layout, as
    training builds it (distributed.initialize_distributed), so several checkpoints load one after the other."""
    from megatron.core import parallel_state

    from megatron_cocomix import compat
    from megatron_cocomix.data.tokenizer import vocab_size_with_padding
    from megatron_cocomix.distributed import initialize_distributed

    path = find_checkpoint(root, iteration)
    common = read_common(path)
    export = common.get("export") or {}
    layout = common.get("layout") or {"tensor": 1, "pipeline": 1}
    tensor = tensor or int(layout["tensor"])
    pipeline = pipeline or int(layout["pipeline"])
    args = _rebuild_args(export.get("args"), None, path)
    world_size = (torch.distributed.get_world_size() if torch.distributed.is_initialized()
                  else int(os.environ.get("WORLD_SIZE", "1")))
    check_layout(args, world_size, tensor, pipeline, path)
    args.tensor_model_parallel_size, args.pipeline_model_parallel_size = tensor, pipeline
    args.world_size, args.data_parallel_size = world_size, world_size // (tensor * pipeline)
    args.distributed_backend = None  # NCCL with GPUs, gloo without (as training)
    # Stages after an interleaving layer carry 2s positions: they exchange shapes first (arguments.py's rule).
    doubles = args.pause_tokens or (args.cocomix and args.concept_mixing == "interleave")
    args.variable_seq_lengths = bool(doubles) and pipeline > 1
    saved_padded = common["model_args"]["padded_vocab_size"]
    args.padded_vocab_size = saved_padded
    if saved_padded % tensor:
        args.padded_vocab_size = vocab_size_with_padding(args.true_vocab_size, args.make_vocab_size_divisible_by,
                                                         tensor)
    compat.install()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    initialize_distributed(args)
    model = build_model(args, pre_process=parallel_state.is_pipeline_first_stage(),
                        post_process=parallel_state.is_pipeline_last_stage())
    _load_weights(model, path, common, args)
    model.to(compat.device())
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
