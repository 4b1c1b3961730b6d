"""megatron-core's DistributedDataParallel + optimizer as the back end.

DDP: contiguous grad buffers, bucketed data-parallel reduce inside the schedule (`finalize_model_grads`).
Optimizer (`get_megatron_optimizer`): Adam with decoupled weight decay; bf16 / fp16 with fp32 master weights;
fp16 dynamic loss scaling; global-norm clipping over all model-parallel ranks; `--use-distributed-optimizer`
shards optimizer state over data-parallel ranks.

Without apex or Transformer Engine, megatron-core falls back to torch's AdamW in its foreach form, a gradient norm
that reads every parameter's norm on the host (one device sync per tensor) and master-to-model copies tensor by
tensor. This back end keeps megatron's optimizer classes and their order of operations, and swaps those three for
torch's fused AdamW (its `found_inf` input also skips a diverged update on the device), a norm computed with
`torch._foreach_norm` and clipped with `torch._foreach_mul_` that stays on the device, and `torch._foreach_copy_`.
A bf16 / fp32 step then never waits for the device; fp16's dynamic loss scaling still reads its overflow flag on
the host, as in megatron.

Checkpoints. The optimizer state is saved inside the dist checkpoint, as slices of the same global tensors as
the weights, so the non-distributed optimizer reshards freely. The distributed optimizer is saved in megatron's
`dp_reshardable` form (its grad-buffer buckets), which loads at any DP size but only at the same TP and PP:
megatron-core 0.16.1's fully reshardable forms cannot be loaded with torch's Adam (no apex / Transformer Engine),
because DistributedOptimizer._set_main_param_and_optimizer_states copies every key of the live Adam state,
which holds `step`, while those loaders drop `step` from the source (KeyError: 'step').
"""

from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Tuple

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_cocomix import compat
from megatron_cocomix.distributed import layout_string
from megatron_cocomix.training.backends.base import OptimizerBackend, build_scheduler
from megatron_cocomix.training.exit_conditions import DivergenceGuard

# `dp_reshardable`: the distributed optimizer's buckets (any DP size, same TP / PP; see above).
# `chained_optim_avoid_prefix`: the keys do not depend on how many optimizers megatron chained together.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable", "chained_optim_avoid_prefix": True}


def _foreach_copy(this: List[torch.Tensor], that: List[torch.Tensor], overflow_buf=None) -> None:
    """megatron's _multi_tensor_copy_this_to_that (master -> model weights after each step) in one foreach call."""
    if this:
        torch._foreach_copy_(that, this)


def _use_foreach_copies() -> None:
    """Where megatron-core fell back to copying tensor by tensor (no apex / TE), give it the foreach copy."""
    from megatron.core.optimizer import optimizer as megatron_optimizer
    from megatron.core.utils import local_multi_tensor_applier

    if megatron_optimizer.multi_tensor_applier is local_multi_tensor_applier:
        megatron_optimizer._multi_tensor_copy_this_to_that = _foreach_copy


class MegatronOptimizerBackend(OptimizerBackend):
    """megatron-core DDP + optimizer. `model` holds the DDP-wrapped chunks the schedule runs."""

    name = "megatron"

    def __init__(self, args: argparse.Namespace, model_chunks: List[torch.nn.Module], config: TransformerConfig):
        self.distributed = bool(args.use_distributed_optimizer)
        self.clip_grad = args.clip_grad
        self.check_nonfinite = args.check_for_nan_in_loss_and_grad
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=args.bf16 or args.fp16,
            overlap_grad_reduce=args.overlap_grad_reduce,
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
        self._use_fused_adam()
        _use_foreach_copies()
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

    def step(self, guard: Optional[DivergenceGuard] = None) -> Tuple[bool, Optional[torch.Tensor]]:
        """Gradients were reduced inside the schedule (finalize_model_grads). fp16 overflow skips the update.

        megatron's `optimizer.step()`, opened up: the same calls in the same order, with the norm and the clipping
        kept on the device. With `guard` (--check-for-nan-in-loss-and-grad), a NaN / Inf loss or gradient norm
        skips the update on the device (fused Adam's `found_inf`); the loop reads the guard at its next sync."""
        optimizer = self.optimizer
        if optimizer.prepare_grads():  # fp16: inf / NaN found while unscaling; the loss scale backs off
            return False, None
        grad_norm = skip = None
        if self.clip_grad > 0.0 or guard is not None:
            grad_norm, own_share_bad = self._grad_norm()
        if guard is not None:
            skip = guard.observe_grad_norm(grad_norm, own_share_bad)
            if not self.skips_on_device and bool(skip):  # apex / TE Adam has no found_inf: decide on the host
                guard.check()
        if self.clip_grad > 0.0:
            self._clip(grad_norm)
        for inner in self._inner_optimizers():
            inner.found_inf = None if skip is None else skip.float().reshape(())
        update_successful = optimizer.step_with_ready_grads()
        if update_successful:
            self.scheduler.step(increment=1)
        return update_successful, grad_norm

    def _sub_optimizers(self) -> list:
        return list(getattr(self.optimizer, "chained_optimizers", [self.optimizer]))

    def _inner_optimizers(self) -> list:
        return [sub.optimizer for sub in self._sub_optimizers() if getattr(sub, "optimizer", None) is not None]

    def _use_fused_adam(self) -> None:
        """megatron's torch AdamW (built when neither apex nor TE imports) switched to its fused kernels. Applied
        again after loading optimizer state, which brings back the saved groups' settings."""
        torch_adams = [inner for inner in self._inner_optimizers() if type(inner) in (torch.optim.AdamW,
                                                                                       torch.optim.Adam)]
        for inner in torch_adams:
            for group in inner.param_groups:
                group.update(fused=True, foreach=None)
            inner.defaults.update(fused=True, foreach=None)
        self.skips_on_device = len(torch_adams) == len(self._inner_optimizers())

    def _grad_norm(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(global L2 norm of the main grads, float64; whether this rank's own share is NaN / Inf), on the device.

        megatron's get_grad_norm_fp32 per sub-optimizer (the norm of the per-tensor norms, squared, summed over
        the sub-optimizer's grad-stats group; the square root in double precision) and its chaining
        (sqrt of the sum of squares), without reading anything on the host."""
        squares, own_bad = [], []
        for sub in self._sub_optimizers():
            grads = sub.get_main_grads_for_grad_norm()
            if grads:
                square = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).square()
            else:
                square = torch.zeros((), device=compat.device())
            own_bad.append(~torch.isfinite(square))
            torch.distributed.all_reduce(square, group=sub.get_grad_stats_parallel_group())
            squares.append(square)
        return torch.stack(squares).double().sum().sqrt(), torch.stack(own_bad).any()

    def _clip(self, grad_norm: torch.Tensor) -> None:
        """megatron's clip_grad_by_total_norm_fp32 with the coefficient on the device: grads x max_norm / (norm +
        1e-6) where that is below 1 (not for a NaN norm, as megatron's `clip_coeff < 1.0`)."""
        coeff = self.clip_grad / (grad_norm + 1.0e-6)
        coeff = torch.where(coeff < 1.0, coeff, torch.ones_like(coeff)).float()
        for sub in self._sub_optimizers():
            grads = [p.grad for p in sub.get_parameters() if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, coeff)

    @property
    def loss_scale(self):
        """1.0 without a grad scaler (bf16 / fp32: nothing to read from the device); else fp16's current scale, a
        device tensor the logger reads at its next sync."""
        if not any(getattr(sub, "grad_scaler", None) for sub in self._sub_optimizers()):
            return 1.0
        return self.optimizer.get_loss_scale().detach().clone()

    def reload_model_params(self) -> None:
        # The fp32 master weights of bf16/fp16 training were copied from the initial model: refresh them.
        if hasattr(self.optimizer, "reload_model_params"):
            self.optimizer.reload_model_params()

    # ---- checkpoints ---------------------------------------------------------------------------------
    def checkpoint_metadata(self) -> Dict[str, object]:
        return {"optimizer_backend": self.name, "distributed_optimizer": self.distributed,
                "adam_step": self._adam_step()}

    def check_optimizer_loadable(self, common: dict, saved_layout: Dict[str, int],
                                 layout: Dict[str, int]) -> Optional[str]:
        reason = super().check_optimizer_loadable(common, saved_layout, layout)
        if reason:
            return reason
        if bool(common.get("distributed_optimizer")) != self.distributed:
            return (f"it holds {'distributed' if common.get('distributed_optimizer') else 'non-distributed'} "
                    f"optimizer state and this run {'uses' if self.distributed else 'does not use'} "
                    f"--use-distributed-optimizer")
        if self.distributed and (saved_layout["tensor"], saved_layout["pipeline"]) != (layout["tensor"],
                                                                                       layout["pipeline"]):
            return (f"distributed optimizer state saved at {layout_string(saved_layout)} reloads only at the "
                    f"same TP and PP (any DP); this run is {layout_string(layout)}")
        return None

    def optimizer_sharded_state(self, model_sharded_state: dict, common: Optional[dict] = None) -> dict:
        loading = common is not None
        if loading:
            self._prepare_adam_state_for_load(common.get("adam_step"))
        return {"optimizer": self.optimizer.sharded_state_dict(dict(model_sharded_state), is_loading=loading,
                                                               metadata=OPTIMIZER_METADATA)}

    def load_optimizer_state(self, loaded: dict, checkpoint_dir: str) -> None:
        # The distributed optimizer copies into views of the (grad-requiring) fp32 parameters.
        with torch.no_grad():
            self.optimizer.load_state_dict(loaded["optimizer"])
        self._unshare_adam_steps()
        self._use_fused_adam()

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
        per parameter per iteration (wrong bias correction from the first resumed step on). Give each its own,
        as fused Adam keeps it: float32, on the parameter's device."""
        for sub in self._distributed_optimizers():
            for param, state in sub.optimizer.state.items():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(param.device, torch.float32, copy=True)
