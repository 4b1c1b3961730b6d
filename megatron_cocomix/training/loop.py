"""The training driver: `pretrain()` as in Megatron-LM, on megatron-core's pipeline schedules.

pretrain(datasets_provider, model_provider, forward_step):
    parse + validate flags -> process groups -> tokenizer -> model chunks (one per virtual pipeline stage)
    -> optimizer back end (megatron DDP + optimizer, or DeepSpeed ZeRO) -> optional checkpoint load
    -> data iterators positioned at the consumed samples -> train() with periodic log / eval / save.

One iteration = one global batch = `num_micro_batches` micro-batches per data-parallel rank, run by
`get_forward_backward_func()` (no pipelining, 1F1B, or interleaved 1F1B with virtual stages).
Nothing here is CoCoMix-specific: extra losses reach the log through the loss dictionary of `forward_step`.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from megatron.core.utils import get_model_config

from megatron_cocomix import compat, metrics
from megatron_cocomix.arguments import parse_args
from megatron_cocomix.distributed import host_group, initialize_distributed, print_rank_0
from megatron_cocomix.errors import exit_on_bad_input
from megatron_cocomix.global_vars import reset_global_vars, set_args, set_tokenizer
from megatron_cocomix.model.gpt import initialize_weights
from megatron_cocomix.training import checkpointing
from megatron_cocomix.training.backends import OptimizerBackend, build_optimizer_backend
from megatron_cocomix.training.exit_conditions import DivergenceGuard, ExitConditions, NonFiniteError
from megatron_cocomix.training.logging import TrainingLogger


def get_model(model_provider: Callable, args: argparse.Namespace) -> List[torch.nn.Module]:
    """Build this rank's model chunks (one per virtual pipeline stage), initialise them, move them to the device."""
    vp_size = args.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vp_size or 1):
        stage = vp_stage if vp_size else None
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        chunk = model_provider(pre_process=pre_process, post_process=post_process, vp_stage=stage)
        chunk.vp_stage = stage
        chunks.append(chunk)
    config = get_model_config(chunks[0])
    initialize_weights(chunks, args.seed, config, tied_embeddings=not args.untie_embeddings_and_output_weights,
                       vocab_size=args.true_vocab_size)
    for chunk in chunks:
        for param in chunk.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
        chunk.to(compat.device())
    if args.fp16 or args.bf16:
        chunks = [Float16Module(config, chunk) for chunk in chunks]
    num_params = sum(p.numel() for chunk in chunks for p in chunk.parameters())
    if parallel_state.get_data_parallel_rank() == 0:
        print(f" > number of parameters on (tensor, pipeline) model parallel rank "
              f"({parallel_state.get_tensor_model_parallel_rank()}, "
              f"{parallel_state.get_pipeline_model_parallel_rank()}): {num_params}", flush=True)
    return chunks


def _needs_data() -> bool:
    """TP rank 0 of every pipeline stage reads data and get_batch broadcasts it within TP. Megatron reads on the
    first and last stages only; a middle stage may need the batch too (token ids for a teacher, precomputed
    labels), and one that does not simply never advances its iterator."""
    return parallel_state.get_tensor_model_parallel_rank() == 0


class DataIterators:
    """Train/valid/test datasets and the loaders over them, positioned by consumed samples."""

    def __init__(self, args: argparse.Namespace, datasets_provider: Callable):
        from megatron_cocomix.data.datasets import build_pretraining_data_loader

        self._build_loader = build_pretraining_data_loader
        self.args = args
        gbs = args.global_batch_size
        evals = args.train_iters // args.eval_interval + 1 if args.eval_iters > 0 else 0
        num_samples = [args.train_iters * gbs, evals * args.eval_iters * gbs, args.eval_iters * gbs]
        self.train_ds, self.valid_ds, self.test_ds = datasets_provider(num_samples)

    def _loader_iter(self, dataset, consumed: int) -> Optional[Iterator]:
        if dataset is None or not _needs_data():
            return None
        loader = self._build_loader(dataset, consumed, self.args.micro_batch_size,
                                    parallel_state.get_data_parallel_rank(),
                                    parallel_state.get_data_parallel_world_size(), self.args.num_workers)
        # iter() draws the workers' base seed from torch's default generator, on the data-reading ranks only.
        # Where dropout draws from that generator too (CPU), the TP ranks' streams would part, their replicated
        # weights drift apart, and a resumed run (one copy per replicated tensor) would differ: leave it alone.
        with torch.random.fork_rng(devices=[]):
            return iter(loader)

    def _per_chunk(self, dataset, consumed: int):
        vp = self.args.virtual_pipeline_model_parallel_size
        if vp is None:
            return self._loader_iter(dataset, consumed)
        # Every virtual stage consumes every micro-batch once, so each gets its own iterator over the same data.
        return [self._loader_iter(dataset, consumed) for _ in range(vp)]

    def train(self, consumed_samples: int):
        return self._per_chunk(self.train_ds, consumed_samples)

    def valid(self):
        # The same validation samples at every evaluation, so successive validation losses are comparable.
        return self._per_chunk(self.valid_ds, 0)

    def test(self):
        return self._per_chunk(self.test_ds, 0)


def _reduce_losses(losses_reduced: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Per-token [sum, count] over the global batch for each entry of the loss dictionary, still on the device:
    summed over micro-batches here and over data-parallel ranks by one all-reduce."""
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True) or not losses_reduced:
        return {}
    keys = list(losses_reduced[0])
    total = torch.stack([torch.stack([x[key].float().view(2) for key in keys]) for x in losses_reduced]).sum(dim=0)
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return dict(zip(keys, total.unbind(0)))


def train_step(forward_step_func, data_iterator, model, backend: OptimizerBackend, args,
               guard: Optional[DivergenceGuard] = None, iteration: int = 0) -> tuple:
    """One iteration. Returns (losses as [sum, count] device tensors, update applied, gradient norm); nothing here
    waits for the device (the back end's fp16 overflow check aside)."""
    backend.zero_grad()
    forward_backward = get_forward_backward_func()
    losses_reduced = forward_backward(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=model,
        num_microbatches=args.num_micro_batches,
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        forward_only=False,
    )
    backend.after_forward_backward()
    losses = _reduce_losses(losses_reduced)
    losses.update(metrics.reduce_on_device())
    if guard is not None:
        guard.observe_losses(iteration, losses)  # a diverged step never reaches the weights
    update_successful, grad_norm = backend.step(guard)
    return losses, update_successful, grad_norm


def evaluate(forward_step_func, data_iterator, model, args, num_iters: int) -> Dict[str, float]:
    for chunk in model:
        chunk.eval()
    forward_backward = get_forward_backward_func()
    sums: Dict[str, List[float]] = {}
    with torch.no_grad():
        for _ in range(num_iters):
            losses_reduced = forward_backward(
                forward_step_func=forward_step_func, data_iterator=data_iterator, model=model,
                num_microbatches=args.num_micro_batches, seq_length=args.seq_length,
                micro_batch_size=args.micro_batch_size, forward_only=True)
            reduced = _reduce_losses(losses_reduced)
            reduced.update(metrics.reduce_on_device())
            for key, value in metrics.as_floats(reduced).items():
                sums.setdefault(key, []).append(value)
    for chunk in model:
        chunk.train()
    return {key: sum(values) / len(values) for key, values in sums.items()}


def train(forward_step_func, model, backend: OptimizerBackend, data: DataIterators, args, state: dict,
          logger: TrainingLogger) -> Optional[str]:
    """Iterations up to --train-iters with periodic log / validation / save. Returns why it stopped early
    (preemption signal, wall time, --exit-interval), or None. `state["valid"]` holds the last validation and
    `state["valid_iteration"]` the iteration it ran at.

    The host reads device values only at sync points: the log line, validation, a checkpoint, the end. Each
    sync point also reads the divergence guard, so a run that diverged stops there, before anything is saved."""
    train_iterator = data.train(state["consumed_train_samples"])
    rng_state = state.pop("rng_state", None)
    if rng_state is not None:
        # Restored after the loader's iterator drew its base seed from torch's generator (as the uninterrupted
        # run's did before its first iteration), so dropout continues from the saved streams.
        checkpointing.set_rng_state(rng_state)
    for chunk in model:
        chunk.train()
    exit_conditions = ExitConditions(args, group=host_group())
    guard = DivergenceGuard() if args.check_for_nan_in_loss_and_grad else None

    def sync_point() -> None:
        logger.materialize()
        if guard is not None:
            guard.check()

    iteration = start_iteration = state["iteration"]
    saved = False
    try:
        while iteration < args.train_iters:
            start = time.time()
            losses, update_successful, grad_norm = train_step(forward_step_func, train_iterator, model, backend,
                                                               args, guard, iteration + 1)
            iteration += 1
            state["iteration"] = iteration
            state["consumed_train_samples"] += args.global_batch_size
            logger.training_log(iteration, losses, backend.learning_rate, grad_norm, backend.loss_scale,
                                skipped=not update_successful, iteration_time=time.time() - start,
                                consumed_samples=state["consumed_train_samples"])
            if iteration % args.log_interval == 0:
                sync_point()

            if args.eval_iters > 0 and iteration % args.eval_interval == 0:
                sync_point()
                state["valid"] = evaluate(forward_step_func, data.valid(), model, args, args.eval_iters)
                state["valid_iteration"] = iteration
                logger.validation_log(iteration, state["valid"])
            saved = False
            if args.save and args.save_interval and iteration % args.save_interval == 0:
                sync_point()
                checkpointing.save_checkpoint(args, iteration, model, backend, state)
                saved = True
            reason = exit_conditions.reason()
            if reason is None and args.exit_interval and iteration % args.exit_interval == 0:
                reason = f"--exit-interval {args.exit_interval}"
            if reason is not None:
                sync_point()
                if args.save and not saved:
                    checkpointing.save_checkpoint(args, iteration, model, backend, state)
                print_rank_0(f"exiting program at iteration {iteration} after {reason}")
                return reason
        sync_point()
    except NonFiniteError as e:
        _exit_on_divergence(e, args)
    if args.save and iteration > start_iteration and not saved:
        # Megatron saves the end of training too when it does not fall on --save-interval.
        checkpointing.save_checkpoint(args, iteration, model, backend, state)
    return None


def _exit_on_divergence(error: NonFiniteError, args) -> None:
    """One line from the rank that saw it; every rank exits 1 before anything more is saved."""
    if torch.distributed.get_rank() == error.rank:
        last = checkpointing.read_tracker(args.save) if args.save else None
        saved = f"; the last checkpoint (iteration {last}) is clean" if last is not None else ""
        print(f"error: iteration {error.iteration}: {error} (its update was not applied{saved}; "
              f"--no-check-for-nan-in-loss-and-grad trains on)", file=sys.stderr, flush=True)
    raise SystemExit(1)


def pretrain(train_valid_test_datasets_provider: Callable, model_provider: Callable, forward_step_func: Callable,
             argv: Optional[Sequence[str]] = None, extra_args_hook: Optional[Callable] = None) -> dict:
    """Megatron-LM's entry point. Returns a summary (last losses, iteration) for tests and scripts.

    Every derived value is resolved before anything is built: the flags' own (parse_args), the padded
    vocabulary (the tokenizer), then the caller's (`extra_args_hook(args)`: for CoCoMix the teacher's and the
    SAE's shapes). The arguments are then frozen and published. A bad flag or file, found at any step up to the
    first iteration, ends the run with one `error:` line and exit status 2."""
    compat.install()
    reset_global_vars()
    metrics.reset()
    from megatron_cocomix.data.tokenizer import build_tokenizer

    with exit_on_bad_input():
        args = parse_args(argv)
        tokenizer = build_tokenizer(args)  # sets args.padded_vocab_size
        if extra_args_hook is not None:
            extra_args_hook(args)
    args.freeze()
    set_args(args)
    set_tokenizer(tokenizer)
    initialize_distributed(args)

    with exit_on_bad_input():
        model = get_model(model_provider, args)
        config = get_model_config(model[0])
        backend = build_optimizer_backend(args, model, config)
        model = backend.model
        state = {"iteration": 0, "consumed_train_samples": 0}
        if args.load:
            # Its `rng_state` entry is applied by train(), once nothing else will draw from the generators.
            state = checkpointing.load_checkpoint(args, model, backend)
        data = DataIterators(args, train_valid_test_datasets_provider)
        logger = TrainingLogger(args, backend.local_parameter_count())  # opens the W&B run: it may fail
    logger.log_startup()

    stopped_early = None
    if not args.skip_train:
        stopped_early = train(forward_step_func, model, backend, data, args, state, logger)
    state.pop("rng_state", None)
    if args.eval_iters > 0 and stopped_early is None and state.get("valid_iteration") != state["iteration"]:
        # Validated once more only when the last iteration did not just validate (Megatron's label).
        state["valid"] = evaluate(forward_step_func, data.valid(), model, args, args.eval_iters)
        logger.validation_log(state["iteration"], state["valid"], label="validation loss at the end of training")
    summary = dict(state)
    summary.pop("valid_iteration", None)
    summary["train_history"] = logger.history
    logger.close()
    return summary
