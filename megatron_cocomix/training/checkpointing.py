"""Checkpoints with megatron-core dist_checkpointing (torch_dist format), loadable at another TP / PP / DP layout.

Directory layout (Megatron-LM's):

    <save>/latest_checkpointed_iteration.txt      "100": the last complete checkpoint
    <save>/iter_0000100/                          one torch_dist checkpoint
        common.pt                                 plain state, identical on every rank (iteration, args, scheduler)
        __<rank>_<n>.distcp, .metadata            sharded tensors: model weights and optimizer state, keyed by
                                                  the global parameter name and its offset in the full tensor
        metadata.json                             backend + version (written last by dist_checkpointing)
        <optimizer files>                         only for a back end that keeps its optimizer state in files of
                                                  its own (each back end decides where its state goes)

What reshards. Each model chunk's `sharded_state_dict()` describes every local tensor as a slice
(global offset, global shape) of the full tensor, with layer numbers made global (virtual pipeline chunks
included), so the weights load at any TP / PP / virtual-PP layout. The optimizer state is the back end's
business (training/backends/, where each back end says what reshards). This module never asks which back end
it holds: it saves and loads what the back end's `checkpoint_metadata`, `optimizer_sharded_state`,
`save_optimizer_files` and `load_optimizer_state` give, and refuses what `check_optimizer_loadable` refuses.

What is per rank. RNG states (python, numpy, torch CPU, CUDA, and megatron's tensor-parallel tracker) differ
between ranks, so each rank writes its own ShardedObject at offset (pp, tp, dp) of a (PP, TP, DP) grid; they are
restored only when the layout is unchanged (another layout has other ranks and another dropout pattern).

Atomicity. Every rank writes into `iter_0000100.tmp-<token>/`; after a barrier rank 0 renames it to
`iter_0000100/` and then replaces the tracker file (write a temporary file, fsync, os.replace). A save that dies
midway leaves only a `.tmp-` directory, which the next save removes and loading never reads, so `latest`
always names a complete checkpoint.

Save cost. dist_checkpointing's default torch_dist writer prepares an asynchronous save: it creates its result
queue through a spawn-context multiprocessing Manager (a fresh interpreter re-importing torch and megatron,
seconds per process) and forks writer processes, even for a synchronous save. `InProcessTorchDistSave` writes
the same format with torch.distributed.checkpoint's synchronous FileSystemWriter from the calling process.

Asynchronous saves (--async-save) use exactly that machinery. megatron-core's torch_dist strategy prepares the
write (common.pt is still written in the foreground; so would DeepSpeed's own optimizer files be, which is why
--async-save is refused with --deepspeed); its AsyncCallsQueue forks a writer that snapshots the state (fork is
copy-on-write) and writes the shards while training goes on; `finalize_async_saves`, called after every
iteration, finalizes a save once the writers of every rank are done (megatron's check is an all-reduce):
megatron writes the index, then the publishing step above moves the directory into place and the tracker. A kill
at any moment before that leaves the previous checkpoint as the one --load picks. At most one save is in flight:
a new save (and the end of training) first waits for the last. The writers' result queue is created up front
(`prepare_async_saves`) so that the first save does not start a second interpreter.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import time
from typing import Dict, List, Optional

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from megatron.core.utils import unwrap_model

from megatron_cocomix.distributed import current_layout, layout_string
from megatron_cocomix.files import fsync_dir, fsync_tree, replace_dir
from megatron_cocomix.training.backends import OptimizerBackend
from megatron_cocomix.training.exit_conditions import children_ignore_exit_signal, exit_signal

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 1

# Flags that fix tensor shapes: a checkpoint that disagrees on any of them cannot be loaded into this model.
MODEL_SHAPE_ARGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                    "padded_vocab_size", "true_vocab_size")
# Tensors with a (padded) vocabulary dimension: re-padded on load when this run pads differently (another TP).
VOCAB_TENSOR_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used with these flags (the message names the file and the flag)."""


class InProcessTorchDistSave(TorchDistSaveShardedStrategy):
    """The torch_dist format written synchronously by the calling process (no spawned queue, no forked writers).

    The translation from megatron ShardedTensors to torch.distributed.checkpoint objects and the planner are
    megatron's own, so the files are what the default strategy writes and its loader reads them."""

    def __init__(self) -> None:
        super().__init__("torch_dist", 1)

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        from torch.distributed.checkpoint import FileSystemWriter
        from torch.distributed.checkpoint import save as dcp_save

        sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, self.keep_only_main_replica)
        pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, False)
        dcp_save(pyt_state_dict, storage_writer=FileSystemWriter(str(checkpoint_dir), thread_count=1),
                 planner=MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica,
                                          flatten_state_dict=False, can_run_decentralized_global_plan=False))


# ----------------------------------------------------------------------------------------------------------
# Paths and the tracker file


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> Optional[int]:
    """The iteration named by `<root>/latest_checkpointed_iteration.txt`, or None when there is no tracker."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    try:
        iteration = int(text)
    except ValueError:
        raise CheckpointError(f"{path}: expected an iteration number, found {text[:40]!r}") from None
    if iteration < 0:
        raise CheckpointError(f"{path}: iteration {iteration} is negative")
    return iteration


def complete_checkpoints(root: str) -> List[str]:
    """iter_XXXXXXX directories (never `.tmp-` ones) under root, oldest first."""
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if n.startswith("iter_") and n[5:].isdigit()
             and os.path.isdir(os.path.join(root, n))]
    return sorted(names)


def _write_tracker(root: str, iteration: int, token: str) -> None:
    tmp = os.path.join(root, f"{TRACKER}.tmp-{token}")
    with open(tmp, "w") as f:
        f.write(str(iteration))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, TRACKER))
    fsync_dir(root)


def _remove_stale_temporaries(root: str) -> None:
    """Left-overs of saves killed before their rename: nothing refers to them."""
    for name in os.listdir(root):
        if ".tmp-" in name or ".old-" in name:
            path = os.path.join(root, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)


# ----------------------------------------------------------------------------------------------------------
# What goes into a checkpoint


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The model inside megatron's DDP / Float16Module (whose own sharded_state_dict would prefix every key with
    `module.`) or inside an engine that holds it as `.module`: keys are then those of Megatron-LM checkpoints."""
    chunk = unwrap_model(chunk)
    while not hasattr(chunk, "sharded_state_dict") and hasattr(chunk, "module"):
        chunk = unwrap_model(chunk.module)
    return chunk


def _model_keys(model: List[torch.nn.Module]) -> List[str]:
    return ["model"] if len(model) == 1 else [f"model{i}" for i in range(len(model))]


def _model_sharded_state_dict(model: List[torch.nn.Module]) -> Dict[str, dict]:
    # The key of each chunk is only a name in this dict: tensors are matched by their global key and offset,
    # so "model0"/"model1" (virtual pipeline) load into "model" (none) and back.
    return {key: _unwrap(chunk).sharded_state_dict() for key, chunk in zip(_model_keys(model), model)}


def get_rng_state() -> dict:
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(data) -> ShardedObject:
    """This rank's RNG states as cell (pp, tp, dp) of a (PP, TP, DP) grid: every rank saves its own."""
    layout = current_layout()
    shape = (layout["pipeline"], layout["tensor"], layout["data"])
    offset = (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank(),
              parallel_state.get_data_parallel_rank(with_context_parallel=True))
    return ShardedObject("rng_state", data, shape, offset, replica_id=0)


def model_shape_args(args: argparse.Namespace) -> Dict[str, Optional[int]]:
    return {name: getattr(args, name) for name in MODEL_SHAPE_ARGS}


def export_state(args: argparse.Namespace) -> dict:
    """What a checkpoint needs to be rebuilt and exported on its own (tools/convert_to_hf.py): every plain flag
    value (`args`) and the tokenizer (`tokenizer`: type, vocabulary size, eod, and the content of its files,
    so the export does not depend on paths that may have moved). Saved under the common key `export`."""
    from megatron_cocomix.data.tokenizer import tokenizer_export_state
    from megatron_cocomix.global_vars import get_tokenizer

    plain = (bool, int, float, str, type(None))
    flags = {name: value for name, value in vars(args).items() if not name.startswith("_")
             and (isinstance(value, plain) or (isinstance(value, (list, tuple))
                                                and all(isinstance(v, plain) for v in value)))}
    try:
        tokenizer = get_tokenizer()
    except RuntimeError:  # a model saved outside pretrain() (tools, tests) has no run tokenizer
        tokenizer = None
    return {"args": flags, "tokenizer": tokenizer_export_state(tokenizer) if tokenizer else None}


# ----------------------------------------------------------------------------------------------------------
# Save


def save_checkpoint(args: argparse.Namespace, iteration: int, model: List[torch.nn.Module],
                    backend: OptimizerBackend, state: dict) -> None:
    """Write <args.save>/iter_<iteration> atomically and point the tracker at it. Called on every rank. With
    --async-save the shards are written in the background and published by a later `finalize_async_saves`."""
    finalize_async_saves(blocking=True)  # one save in flight at most; its temporary directory is not stale
    rng = get_rng_state()  # before anything below could draw random numbers
    root = args.save
    rank = torch.distributed.get_rank()
    start = time.time()
    if rank == 0:
        print(f"saving checkpoint at iteration {iteration:7d} to {root}", flush=True)
        os.makedirs(root, exist_ok=True)
        _remove_stale_temporaries(root)
    token = [f"{os.getpid()}-{time.time_ns()}" if rank == 0 else None]
    torch.distributed.broadcast_object_list(token, src=0)
    token = token[0]
    final = checkpoint_dir(root, iteration)
    tmp = f"{final}.tmp-{token}"
    if rank == 0:
        os.makedirs(tmp)
    torch.distributed.barrier()

    def publish() -> None:
        torch.distributed.barrier()  # every rank's files are on disk
        _publish(root, iteration, final, tmp, token, rank, start)

    # Processes started while saving (asynchronous writers and their result queue) leave the exit signal to
    # the ranks.
    with backend.full_parameters(), children_ignore_exit_signal(exit_signal(args)):
        request = _save_model_and_state(args, iteration, model, backend, state, rng, tmp)
        if request is not None:
            request.add_finalize_fn(publish)  # after megatron's own (the index, metadata.json)
            _async_queue().schedule_async_request(request)  # forks the writer: a snapshot of the state
    backend.save_optimizer_files(tmp)
    if request is None:
        publish()
    elif rank == 0:
        print(f"  checkpoint at iteration {iteration:7d} is being written in the background "
              f"[{time.time() - start:.2f} s in the foreground]", flush=True)


# ----------------------------------------------------------------------------------------------------------
# Asynchronous saves: megatron-core's queue, one in flight at most


_queue = None


def _async_queue():
    global _queue
    if _queue is None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        _queue = AsyncCallsQueue()
    return _queue


def prepare_async_saves(args: argparse.Namespace) -> None:
    """Give megatron's asynchronous writer its result queue before the first save. megatron creates it through a
    spawn-context multiprocessing Manager, a second interpreter that re-imports the training script (seconds to
    tens of seconds, in the foreground of the first save), because its persistent writer is spawned. The writer
    used here is forked after the queue exists, so a fork-context queue serves the same purpose."""
    if not (args.async_save and args.save):
        return
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = torch.multiprocessing.get_context("fork").Queue()


def finalize_async_saves(blocking: bool = False) -> None:
    """Collective: publish the asynchronous save in flight once every rank's writer is done (at once with
    blocking=True). A no-op when nothing is in flight."""
    if _queue is not None and _queue.get_num_unfinalized_calls():
        _queue.maybe_finalize_async_calls(blocking=blocking)


def _save_model_and_state(args, iteration, model, backend: OptimizerBackend, state, rng, tmp):
    """dist_checkpointing.save of the model, optimizer and run state into tmp; with --async-save the shards'
    write is returned as megatron's AsyncRequest (common.pt is written already), otherwise None."""
    sharded = _model_sharded_state_dict(model)
    sharded["rng_state"] = _rng_sharded_object(rng)
    sharded.update(
        checkpoint_version=CHECKPOINT_VERSION,
        iteration=iteration,
        consumed_train_samples=state["consumed_train_samples"],
        model_args=model_shape_args(args),
        export=export_state(args),
        layout=current_layout(),
        opt_param_scheduler=backend.scheduler.state_dict(),
        **backend.checkpoint_metadata(),
    )
    model_state = {k: v for k, v in sharded.items() if k.startswith("model")}
    sharded.update(backend.optimizer_sharded_state(model_state))
    if args.async_save:
        return dist_checkpointing.save(sharded, tmp, sharded_strategy=TorchDistSaveShardedStrategy("torch_dist", 1),
                                       async_sharded_save=True)
    dist_checkpointing.save(sharded, tmp, sharded_strategy=InProcessTorchDistSave())
    return None


def _publish(root, iteration, final, tmp, token, rank, start) -> None:
    """Rename the finished temporary directory into place and point the tracker at it."""
    if rank == 0:
        # Every rank's files are complete (barrier); make them durable before anything points at them, so a
        # crash right after the tracker update cannot leave it naming files still in the page cache.
        fsync_tree(tmp)
        replace_dir(tmp, final, f"{final}.old-{token}")  # the same iteration saved again replaces the old one
        fsync_dir(root)
        _write_tracker(root, iteration, token)
        print(f"  successfully saved checkpoint at iteration {iteration:7d} to {root} "
              f"[{time.time() - start:.2f} s]", flush=True)
    torch.distributed.barrier()


# ----------------------------------------------------------------------------------------------------------
# Load


def resolve_checkpoint(root: str) -> Optional[str]:
    """The directory `--load root` refers to; None (with a warning) when root holds no checkpoint at all."""
    iteration = read_tracker(root)
    if iteration is None:
        complete = complete_checkpoints(root)
        if complete:
            raise CheckpointError(
                f"{os.path.join(root, TRACKER)} is missing but {root} holds {', '.join(complete[-3:])}: write the "
                f"iteration to load into {TRACKER}")
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(f"WARNING: --load {root}: no {TRACKER} and no checkpoint there; training starts from scratch",
                  flush=True)
        return None
    path = checkpoint_dir(root, iteration)
    if not os.path.isdir(path):
        raise CheckpointError(f"{os.path.join(root, TRACKER)} names iteration {iteration} but {path} does not exist")
    return path


def verify_checkpoint_files(path: str) -> None:
    """Every file the checkpoint's index names is there and as long as the index says; otherwise one
    CheckpointError naming the first missing or truncated file (instead of an unpickling error mid-load)."""
    for name in ("common.pt", ".metadata"):
        if not os.path.isfile(os.path.join(path, name)):
            raise CheckpointError(f"{os.path.join(path, name)}: missing (the checkpoint is incomplete)")
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception as e:  # a truncated or foreign index
        raise CheckpointError(f"{os.path.join(path, '.metadata')}: unreadable ({type(e).__name__})") from None
    needed: Dict[str, int] = {}
    for item in (metadata.storage_data or {}).values():
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), item.offset + item.length)
    for relative, length in sorted(needed.items()):
        file = os.path.join(path, relative)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: missing (the checkpoint is incomplete)")
        size = os.path.getsize(file)
        if size < length:
            raise CheckpointError(f"{file}: truncated ({size} bytes, the checkpoint's index needs {length})")


def check_compatible(path: str, common: dict, args: argparse.Namespace) -> None:
    """Refuse a checkpoint whose tensor shapes cannot match this model, naming the first differing flag and both
    values. The padded vocabulary may differ (it depends on TP) when the true vocabularies agree: it is re-padded
    on load. Checkpoints that predate `true_vocab_size` must match the padded size."""
    saved = common.get("model_args")
    if saved is None:
        raise CheckpointError(f"{path}: not a checkpoint written by this project (no model_args in common.pt)")
    ours = model_shape_args(args)
    for name, value in ours.items():
        if name in ("padded_vocab_size", "true_vocab_size") or saved.get(name) == value:
            continue
        flag = "--" + name.replace("_", "-")
        raise CheckpointError(f"{path} was saved with {flag} {saved.get(name)}, but this run has {flag} {value}")
    if saved.get("true_vocab_size") is not None:
        if saved["true_vocab_size"] != ours["true_vocab_size"]:
            raise CheckpointError(
                f"{path} was saved with a vocabulary of {saved['true_vocab_size']} ids, but this run's tokenizer / "
                f"--vocab-size has {ours['true_vocab_size']}")
    elif saved.get("padded_vocab_size") != ours["padded_vocab_size"]:
        raise CheckpointError(
            f"{path} was saved with a padded vocabulary of {saved.get('padded_vocab_size')}, but this run's "
            f"tokenizer / --vocab-size and --make-vocab-size-divisible-by give {ours['padded_vocab_size']}")


def _request_whole_vocab_tensors(sharded: dict, saved_padded: int, padded: int) -> Dict[tuple, ShardedTensor]:
    """Replace every sharded tensor with this run's padded vocabulary dimension (weights, and the optimizer
    state built on them) by a request for the whole tensor as saved; returns {path in the dict: original}."""
    requests = {}

    def visit(container, path):
        for key, value in list(container.items() if isinstance(container, dict) else enumerate(container)):
            if (isinstance(value, ShardedTensor) and value.key.endswith(VOCAB_TENSOR_KEYS)
                    and value.global_shape[0] == padded and value.flattened_range is None):
                whole = torch.empty((saved_padded,) + tuple(value.global_shape[1:]), dtype=value.dtype,
                                    device=value.data.device)
                # Every TP rank now reads the same whole tensor: only TP rank 0's copy is the main replica.
                replica = tuple(value.replica_id) if isinstance(value.replica_id, tuple) else (value.replica_id,)
                replica = replica + (parallel_state.get_tensor_model_parallel_rank(),)
                container[key] = ShardedTensor.from_rank_offsets(value.key, whole, replica_id=replica)
                requests[path + (key,)] = value
            elif isinstance(value, (dict, list)):
                visit(value, path + (key,))

    visit(sharded, ())
    return requests


def _repad(loaded: dict, requests: Dict[tuple, ShardedTensor], true_vocab_size: int) -> None:
    """Cut this rank's slice of this run's padding out of each whole saved tensor (padded rows zero)."""
    for path, original in requests.items():
        container = loaded
        for key in path[:-1]:
            container = container[key]
        whole = container[path[-1]]
        start, rows = original.global_offset[0], original.local_shape[0]
        local = torch.zeros(original.local_shape, dtype=whole.dtype, device=whole.device)
        real = max(0, min(rows, true_vocab_size - start))
        local[:real] = whole[start:start + real]
        container[path[-1]] = local


def load_sharded(sharded: dict, path: str, saved_padded_vocab: int, padded_vocab: int, true_vocab_size: int) -> dict:
    """dist_checkpointing.load of `sharded` from `path` (any saved layout). When this layout pads the vocabulary to
    `padded_vocab` rows but the checkpoint was saved with `saved_padded_vocab`, the vocabulary tensors are read
    whole and this rank's slice of its own padding is cut out (padded rows zero). Errors: one-line CheckpointError."""
    requests = {}
    if saved_padded_vocab != padded_vocab:
        requests = _request_whole_vocab_tensors(sharded, saved_padded_vocab, padded_vocab)
    try:
        loaded = dist_checkpointing.load(sharded, path)
    except Exception as e:  # megatron's messages list every key: keep the first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: {first[:300]}") from e
    _repad(loaded, requests, true_vocab_size)
    return loaded


def load_checkpoint(args: argparse.Namespace, model: List[torch.nn.Module], backend: OptimizerBackend) -> dict:
    """Load `--load` into the model (and optimizer, scheduler, RNG unless told not to). Called on every rank.

    Returns the training state to continue from: iteration, consumed_train_samples, and `rng_state` (this
    rank's RNG states, or None) for `set_rng_state` right before training starts, so that nothing built in
    between (datasets, loaders) shifts the random streams."""
    fresh = {"iteration": 0, "consumed_train_samples": 0, "rng_state": None}
    path = resolve_checkpoint(args.load)
    if path is None:
        return fresh
    start = time.time()
    verify_checkpoint_files(path)
    common = dist_checkpointing.load_common_state_dict(path)
    check_compatible(path, common, args)
    saved_layout = common["layout"]
    same_layout = saved_layout == current_layout()
    load_optimizer = not args.finetune and not args.no_load_optim
    load_rng = not args.finetune and not args.no_load_rng
    if load_optimizer:
        reason = backend.check_optimizer_loadable(common, saved_layout, current_layout(), path)
        if reason:
            raise CheckpointError(f"{path}: {reason}: add --no-load-optim to load the weights only")
    if load_rng and not same_layout:
        load_rng = False
        if torch.distributed.get_rank() == 0:
            print(f"  RNG states not loaded: saved at {layout_string(saved_layout)}, running at "
                  f"{layout_string(current_layout())}", flush=True)

    # ZeRO-3 holds 1/DP of each weight: gather them to build the full-shape state and to load into it.
    with backend.full_parameters(modify=True):
        sharded = _model_sharded_state_dict(model)
        if load_optimizer:
            sharded.update(backend.optimizer_sharded_state(dict(sharded), common=common))
        if load_rng:
            sharded["rng_state"] = _rng_sharded_object(None)
        # A checkpoint saved at a TP that pads the vocabulary otherwise is re-padded.
        loaded = load_sharded(sharded, path, common["model_args"].get("padded_vocab_size"), args.padded_vocab_size,
                              args.true_vocab_size)

        for key, chunk in zip(_model_keys(model), model):
            _unwrap(chunk).load_state_dict(loaded[key], strict=True)
    if load_optimizer:
        try:
            backend.load_optimizer_state(loaded, path)
        except (ValueError, FileNotFoundError) as e:
            raise CheckpointError(str(e)) from None
        try:
            backend.scheduler.load_state_dict(common["opt_param_scheduler"])
        except AssertionError as e:  # megatron asserts that --lr etc. agree with the checkpoint
            raise CheckpointError(f"{path}: learning-rate schedule differs from the flags: {e}") from None
    else:
        backend.reload_model_params()

    out = dict(fresh)
    if not args.finetune:
        out.update(iteration=common["iteration"], consumed_train_samples=common["consumed_train_samples"])
    if load_rng:
        out["rng_state"] = loaded["rng_state"]
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        what = "weights only" if not load_optimizer else "weights, optimizer, scheduler"
        print(f"  loaded checkpoint {path} ({what}{', RNG' if load_rng else ''}; saved at "
              f"{layout_string(saved_layout)}) at iteration {common['iteration']} [{time.time() - start:.2f} s]",
              flush=True)
    return out
