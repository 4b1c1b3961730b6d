"""megatron-core's DistributedDataParallel + optimizer as the back end.

DDP: contiguous grad buffers, bucketed data-parallel reduce inside the schedule (`finalize_model_grads`).
Optimizer (`get_megatron_optimizer`): Adam with decoupled weight decay; bf16 / fp16 with fp32 master weights;
fp16 dynamic loss scaling; global-norm clipping over all model-parallel ranks; `--use-distributed-optimizer`
shards optimizer state over data-parallel ranks.

Checkpoints. The optimizer state is saved inside the dist checkpoint, as slices of the same global tensors as
the weights, so the non-distributed optimizer reshards freely. The distributed optimizer is saved, as in
Megatron-LM, in megatron-core's `dp_reshardable` form (its grad-buffer buckets: a parallel write, loads at any
DP size but only at the same TP and PP), or with --dist-ckpt-optim-fully-reshardable in its `fully_reshardable`
form (each parameter's fp32 copy and Adam moments as slices of that parameter's global tensor, gathered over DP:
loads at any TP / PP / DP). The form is recorded in the checkpoint, and loading uses the recorded one.

megatron-core 0.16.1 cannot load the fully reshardable form into torch's Adam (no apex / Transformer Engine) by
itself: DistributedOptimizer._set_main_param_and_optimizer_states copies every key of the live Adam state, which
holds `step`, while the loader hands it only the tensors (KeyError: 'step'). `load_optimizer_state` therefore
runs megatron's loader in two steps and keeps the step counts out of the way of the second.

--overlap-param-gather: the distributed optimizer's all-gather of the updated parameters is deferred to forward
pre-hooks of the next forward (megatron's DDP), so between an optimizer step and the next forward the
parameters outside this rank's shard are stale; `full_parameters` gathers them (checkpoint saves).
"""

from __future__ import annotations

import argparse
import contextlib
import math
from typing import ContextManager, Dict, List, Optional, Tuple

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_cocomix.distributed import layout_string
from megatron_cocomix.training.backends.base import OptimizerBackend, build_scheduler
from megatron_cocomix.training.exit_conditions import NonFiniteError, lowest_rank_where

# The distributed optimizer's checkpoint forms (see above). `chained_optim_avoid_prefix`: the keys do not depend
# on how many optimizers megatron chained together.
DP_RESHARDABLE, FULLY_RESHARDABLE = "dp_reshardable", "fully_reshardable"


def optimizer_metadata(sharding_type: str) -> Dict[str, object]:
    return {"distrib_optim_sharding_type": sharding_type, "chained_optim_avoid_prefix": True}


class MegatronOptimizerBackend(OptimizerBackend):
    """megatron-core DDP + optimizer. `model` holds the DDP-wrapped chunks the schedule runs."""

    name = "megatron"

    def __init__(self, args: argparse.Namespace, model_chunks: List[torch.nn.Module], config: TransformerConfig):
        self.distributed = bool(args.use_distributed_optimizer)
        self.sharding_type = FULLY_RESHARDABLE if args.dist_ckpt_optim_fully_reshardable else DP_RESHARDABLE
        self.clip_grad = args.clip_grad
        self.check_nonfinite = args.check_for_nan_in_loss_and_grad
        self.overlap_param_gather = bool(args.overlap_param_gather)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=args.bf16 or args.fp16,
            overlap_grad_reduce=args.overlap_grad_reduce,
            overlap_param_gather=self.overlap_param_gather,
            use_distributed_optimizer=self.distributed,
        )
        self.model = [
            # Only the first chunk buckets its grads: later virtual-pipeline chunks finish backward first.
            DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
            for i, chunk in enumerate(model_chunks)
        ]
        opt_config = OptimizerConfig(
            optimizer="adam",
            lr=args.lr,
            min_lr=args.min_lr,
            weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2,
            adam_eps=args.adam_eps,
            bf16=args.bf16,
            fp16=args.fp16,
            params_dtype=config.params_dtype,
            loss_scale=args.loss_scale,
            initial_loss_scale=args.initial_loss_scale,
            clip_grad=args.clip_grad,
            use_distributed_optimizer=self.distributed,
        )
        # megatron's default groups leave biases and 1-D parameters undecayed; no overrides decays every one.
        overrides = {} if args.weight_decay_all_params else None
        self.optimizer = get_megatron_optimizer(opt_config, self.model, config_overrides=overrides)
        self.scheduler = build_scheduler(args, self.optimizer)
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss
        no_sync = [chunk.no_sync for chunk in self.model]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        if args.overlap_grad_reduce:
            sync = [chunk.start_grad_sync for chunk in self.model]
            config.grad_sync_func = sync[0] if len(sync) == 1 else sync

    # ---- one iteration -------------------------------------------------------------------------------
    def zero_grad(self) -> None:
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def step(self) -> Tuple[bool, Optional[float]]:
        """Gradients were reduced inside the schedule (finalize_model_grads). fp16 overflow skips the update.

        megatron's `optimizer.step()`, opened up so that a NaN / Inf gradient norm stops the run between
        computing the norm and applying the update (--check-for-nan-in-loss-and-grad); the same calls in the
        same order, so the update is bit-identical."""
        optimizer = self.optimizer
        if optimizer.prepare_grads():  # fp16: inf / NaN found while unscaling; the loss scale backs off
            return False, None
        grad_norm = None
        if self.clip_grad > 0.0 or self.check_nonfinite:
            grad_norm = optimizer.get_grad_norm()
        if self.check_nonfinite and not math.isfinite(grad_norm):
            raise NonFiniteError("grad norm", grad_norm, self._rank_with_nonfinite_grads())
        if self.clip_grad > 0.0:
            for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
                params = sub.get_parameters()
                if params:
                    clip_grad_by_total_norm_fp32(params, self.clip_grad, grad_norm,
                                                 sub.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
        update_successful = optimizer.step_with_ready_grads()
        if update_successful:
            self.scheduler.step(increment=1)
        return update_successful, grad_norm

    def _rank_with_nonfinite_grads(self) -> int:
        """Collective: the lowest rank holding a NaN / Inf in its own gradients (the norm is global)."""
        local = [g for sub in getattr(self.optimizer, "chained_optimizers", [self.optimizer])
                 for g in sub.get_main_grads_for_grad_norm()]
        bad = any(not torch.isfinite(g).all() for g in local)
        rank = lowest_rank_where(bad)
        return 0 if rank is None else rank

    @property
    def loss_scale(self) -> Optional[float]:
        scale = self.optimizer.get_loss_scale()
        return float(scale.item()) if torch.is_tensor(scale) else float(scale)

    def full_parameters(self, modify: bool = False) -> ContextManager:
        if not self.overlap_param_gather:
            return contextlib.nullcontext()
        return self._parameters_gathered()

    @contextlib.contextmanager
    def _parameters_gathered(self):
        """Gather the updated parameters now (megatron's DDP would in the next forward's pre-hooks), as
        Megatron-LM does around a checkpoint save."""
        for chunk in self.model:
            chunk.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            for chunk in self.model:
                chunk.enable_forward_pre_hook()

    def reload_model_params(self) -> None:
        # The fp32 master weights of bf16/fp16 training were copied from the initial model: refresh them.
        if hasattr(self.optimizer, "reload_model_params"):
            self.optimizer.reload_model_params()

    # ---- checkpoints ---------------------------------------------------------------------------------
    def checkpoint_metadata(self) -> Dict[str, object]:
        return {"optimizer_backend": self.name, "distributed_optimizer": self.distributed,
                "distrib_optim_sharding_type": self.sharding_type if self.distributed else None,
                "adam_step": self._adam_step()}

    @staticmethod
    def _saved_sharding_type(common: dict) -> str:
        # Checkpoints written before the form was recorded hold the bucket form.
        return common.get("distrib_optim_sharding_type") or DP_RESHARDABLE

    def check_optimizer_loadable(self, common: dict, saved_layout: Dict[str, int], layout: Dict[str, int],
                                 checkpoint_dir: str) -> Optional[str]:
        reason = super().check_optimizer_loadable(common, saved_layout, layout, checkpoint_dir)
        if reason:
            return reason
        if bool(common.get("distributed_optimizer")) != self.distributed:
            return (f"it holds {'distributed' if common.get('distributed_optimizer') else 'non-distributed'} "
                    f"optimizer state and this run {'uses' if self.distributed else 'does not use'} "
                    f"--use-distributed-optimizer")
        if (self.distributed and self._saved_sharding_type(common) == DP_RESHARDABLE
                and (saved_layout["tensor"], saved_layout["pipeline"]) != (layout["tensor"], layout["pipeline"])):
            return (f"distributed optimizer state saved at {layout_string(saved_layout)} in data-parallel buckets "
                    f"reloads only at the same TP and PP (any DP), this run is {layout_string(layout)}; save with "
                    f"--dist-ckpt-optim-fully-reshardable to change TP or PP")
        return None

    def optimizer_sharded_state(self, model_sharded_state: dict, common: Optional[dict] = None) -> dict:
        loading = common is not None
        sharding_type = self.sharding_type
        if loading:
            self._prepare_adam_state_for_load(common.get("adam_step"))
            sharding_type = self._saved_sharding_type(common)
        return {"optimizer": self.optimizer.sharded_state_dict(dict(model_sharded_state), is_loading=loading,
                                                               metadata=optimizer_metadata(sharding_type))}

    def load_optimizer_state(self, loaded: dict, checkpoint_dir: str) -> None:
        # The distributed optimizer copies into views of the (grad-requiring) fp32 parameters.
        subs = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        states = [loaded["optimizer"]] if len(subs) == 1 else [v for _, v in sorted(loaded["optimizer"].items())]
        # megatron's loader of the fully reshardable form fails on torch Adam's `step` (see the module docstring):
        # load everything else first, then the per-parameter tensors with the step counts set aside.
        deferred = [state.pop("param_state") if state.get("param_state_sharding_type") == FULLY_RESHARDABLE
                    else None for state in states]
        with torch.no_grad():
            self.optimizer.load_state_dict(loaded["optimizer"])
            for sub, param_state in zip(subs, deferred):
                if param_state is not None:
                    steps = {param: state.pop("step") for param, state in sub.optimizer.state.items()
                             if "step" in state}
                    sub.load_parameter_state_from_fully_reshardable(param_state)
                    for param, step in steps.items():
                        sub.optimizer.state[param]["step"] = step
        self._unshare_adam_steps()

    # torch Adam's `step` inside megatron's distributed optimizer needs care on both sides of a checkpoint.
    def _distributed_optimizers(self) -> list:
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        return [s for s in getattr(self.optimizer, "chained_optimizers", [self.optimizer])
                if isinstance(s, DistributedOptimizer)]

    def _adam_step(self) -> Optional[float]:
        """torch Adam's step count inside megatron's distributed optimizer (the same for every parameter)."""
        steps = {float(state["step"]) for sub in self._distributed_optimizers()
                 for state in sub.optimizer.state.values() if "step" in state}
        return steps.pop() if len(steps) == 1 else None

    def _prepare_adam_state_for_load(self, step: Optional[float]) -> None:
        """megatron's distributed optimizer describes what to load from its live torch-Adam state: it reads every
        entry's step count (there is none before the first step) and hands back the step of that live state, not
        the saved one. Live entries holding zeros and the saved step load correctly; the rest is overwritten."""
        for sub in self._distributed_optimizers():
            for group in sub.optimizer.param_groups:
                for param in group["params"]:
                    state = sub.optimizer.state[param]
                    if "exp_avg" not in state:
                        state.update(exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
                    state["step"] = torch.tensor(step or 0.0)

    def _unshare_adam_steps(self) -> None:
        """megatron's distributed optimizer restores torch Adam's step count as ONE tensor shared by every
        parameter's state; Adam increments each parameter's step in place, so the shared count would advance once
        per parameter per iteration (wrong bias correction from the first resumed step on). Give each its own."""
        for sub in self._distributed_optimizers():
            for state in sub.optimizer.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()
