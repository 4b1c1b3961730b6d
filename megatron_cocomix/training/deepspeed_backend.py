"""DeepSpeed ZeRO as the optimizer back end, megatron-core's pipeline schedule still driving the micro-batches.

One iteration on a data-parallel rank (n = --global-batch-size / (--micro-batch-size x DP) micro-batches):

    for k in 1..n (order set by megatron's schedule: no pipelining, or 1F1B with PP):
        forward_k  on the raw model chunk        (ZeRO-3 gathers its parameter shards in module hooks)
        backward_k of loss_k / n (per-token mean) (DeepSpeed's grad hooks accumulate; ZeRO-2/3 reduce-scatter
                                                   every micro-batch into this rank's gradient partition)
    [ZeRO-1] sum grads of tied embeddings over the first/last PP stage and of sequence-parallel norms over TP,
             then reduce-scatter the accumulated grads over DP
    engine.step(): g <- mean over DP of sum_k grad_k (fp32 partition); ||g|| over all DP x TP x PP ranks;
                   g <- g * min(1, clip / (||g|| + 1e-6)); AdamW on the fp32 master partition; all-gather

DeepSpeed's `engine.forward` / `engine.backward` cannot be used: megatron's schedule already divides each
micro-batch loss by n and, with PP, calls backward on stage outputs with received gradients, so DeepSpeed's
own 1/gradient_accumulation_steps scaling would be applied twice. The schedule therefore runs the module
itself, and each micro-batch backward is framed by DeepSpeed's own prologue (a hook on the chunk's output,
as `engine.forward` registers) and epilogue (the ZeRO optimizer's post-backward callback), with the
gradient-accumulation boundary set explicitly. That per-micro-batch epilogue is what ZeRO-2 needs between
micro-batches ("gradient computed twice" without it).

Gradient norm: DeepSpeed sums squared norms over the data-parallel group and megatron's model-parallel group
(TP x PP, `DeepSpeedMPU.get_model_parallel_group`); a parameter counts on every TP rank if it is
tensor-parallel, else only on TP rank 0; the last stage's copy of a tied embedding is marked
`ds_pipe_replicated` so that it counts once, as in megatron's `clip_grad_norm`.

Supported: ZeRO-1 with any TP x PP; ZeRO-2 and ZeRO-3 with PP = 1 (their per-micro-batch gradient
partitioning does not follow a pipeline schedule's interleaved forwards and backwards, and DeepSpeed's own
pipeline engine refuses them too); no virtual pipeline.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
from typing import Dict, List, Optional, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_cocomix.distributed import DeepSpeedMPU
from megatron_cocomix.training.optimizers import build_scheduler

LAYOUT_FILE = "layout.json"
CHECKPOINT_TAG = "zero"


def _mismatch(path: str, key: str, value, flag_text: str) -> ValueError:
    return ValueError(f"{os.path.basename(path)}: {key} {value} != {flag_text}")


def check_deepspeed_config(args: argparse.Namespace, ds_config: dict, path: str) -> dict:
    """The DeepSpeed JSON checked against the Megatron flags; returns a copy with the missing keys filled.

    Batch: train_batch_size = --global-batch-size, train_micro_batch_size_per_gpu = --micro-batch-size,
    gradient_accumulation_steps = --global-batch-size / (--micro-batch-size x DP). Precision: bf16.enabled /
    fp16.enabled = --bf16 / --fp16. gradient_clipping = --clip-grad. ZeRO stage 1 with any layout, stages 2
    and 3 with --pipeline-model-parallel-size 1, never a virtual pipeline. Raises a one-line ValueError
    naming the JSON key, its value and the flag.
    """
    if not isinstance(ds_config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(ds_config).__name__}")
    name = os.path.basename(path)
    config = copy.deepcopy(ds_config)
    dp = args.data_parallel_size
    expected = {
        "train_batch_size": (args.global_batch_size, f"--global-batch-size {args.global_batch_size}"),
        "train_micro_batch_size_per_gpu": (args.micro_batch_size, f"--micro-batch-size {args.micro_batch_size}"),
        "gradient_accumulation_steps": (
            args.num_micro_batches,
            f"--global-batch-size {args.global_batch_size} / (--micro-batch-size {args.micro_batch_size} x "
            f"data-parallel size {dp}) = {args.num_micro_batches}"),
    }
    for key, (value, flag_text) in expected.items():
        if key in config and config[key] != "auto" and config[key] != value:
            raise _mismatch(path, key, config[key], flag_text)
        config[key] = value

    for section, flag, enabled in (("bf16", "--bf16", args.bf16), ("fp16", "--fp16", args.fp16)):
        sub = config.setdefault(section, {})
        if not isinstance(sub, dict):
            raise ValueError(f"{name}: {section} must be an object, got {sub!r}")
        if "enabled" in sub and sub["enabled"] != "auto" and bool(sub["enabled"]) != enabled:
            raise _mismatch(path, f"{section}.enabled", json.dumps(sub["enabled"]),
                            f"{flag} {'given' if enabled else 'not given'}")
        sub["enabled"] = enabled
    if args.fp16 and args.loss_scale is not None:
        current = config["fp16"].get("loss_scale")
        if current not in (None, "auto") and float(current) != args.loss_scale:
            raise _mismatch(path, "fp16.loss_scale", current, f"--loss-scale {args.loss_scale}")
        config["fp16"]["loss_scale"] = args.loss_scale
    elif args.fp16:
        config["fp16"].setdefault("initial_scale_power", int(round(torch.log2(torch.tensor(
            float(args.initial_loss_scale))).item())))

    clip = config.get("gradient_clipping")
    if clip is not None and clip != "auto" and float(clip) != float(args.clip_grad):
        raise _mismatch(path, "gradient_clipping", clip, f"--clip-grad {args.clip_grad}")
    config["gradient_clipping"] = float(args.clip_grad)

    zero = config.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ValueError(f"{name}: zero_optimization must be an object, got {zero!r}")
    stage = zero.setdefault("stage", 1)
    if stage not in (1, 2, 3):
        raise ValueError(f"{name}: zero_optimization.stage {stage} is not supported with --deepspeed "
                         f"(use 1, 2 or 3; without ZeRO, drop --deepspeed to use megatron's optimizer)")
    pp = args.pipeline_model_parallel_size
    if stage > 1 and pp > 1:
        raise ValueError(f"{name}: zero_optimization.stage {stage} needs --pipeline-model-parallel-size 1, got {pp} "
                         f"(ZeRO-{stage} partitions gradients during each micro-batch backward; use stage 1 "
                         f"with pipeline parallelism)")
    if args.virtual_pipeline_model_parallel_size is not None:
        raise ValueError("--num-layers-per-virtual-pipeline-stage (virtual pipeline) is not supported with "
                         "--deepspeed; use megatron's optimizer (drop --deepspeed)")
    accum = (config.get("data_types") or {}).get("grad_accum_dtype")
    if stage == 1 and args.bf16 and accum in ("fp32", "float32", "float"):
        # DeepSpeed hands this combination to its BF16_Optimizer, which accumulates micro-batch gradients
        # outside the ZeRO gradient hooks that frame megatron's micro-batches here.
        raise ValueError(f"{name}: data_types.grad_accum_dtype {accum} with bf16 needs zero_optimization.stage 2 "
                         f"or 3 with --deepspeed (stage 1 accumulates in bf16: drop the key)")
    if zero.get("overlap_comm") and stage == 1:
        # Stage 1 reduces once after the schedule; overlapping would start reducing inside the backward.
        raise ValueError(f"{name}: zero_optimization.overlap_comm needs stage 2 or 3 with --deepspeed")
    for key in ("offload_param",):
        if zero.get(key) and stage != 3:
            raise ValueError(f"{name}: zero_optimization.{key} needs stage 3, got stage {stage}")
    if args.overlap_grad_reduce:
        raise ValueError("--overlap-grad-reduce applies to megatron's DDP; with --deepspeed set "
                         "zero_optimization.overlap_comm in the DeepSpeed config")
    config.setdefault("steps_per_print", 2 ** 31 - 1)  # the training log line reports the same numbers
    config.setdefault("wall_clock_breakdown", False)
    return config


def param_groups(module: torch.nn.Module, weight_decay: float) -> List[dict]:
    """Megatron's default grouping: no weight decay on biases and on 1-D parameters (norm weights).
    `wd_mult` is what megatron's OptimizerParamScheduler multiplies the scheduled weight decay by."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or param.dim() == 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "wd_mult": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0}]
    return [g for g in groups if g["params"]]


def _tp_summed_params(module: torch.nn.Module, config: TransformerConfig) -> List[torch.nn.Parameter]:
    """Parameters replicated over TP whose gradient each TP rank computes only partially: norm weights under
    sequence parallelism (each rank sees its sequence shard) and QK-layernorm weights. Their gradients are
    summed over TP, as megatron's finalize_model_grads does."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return []
    out = []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if (config.sequence_parallel and getattr(param, "sequence_parallel", False)) or (
                getattr(config, "qk_layernorm", False) and ("q_layernorm" in name or "k_layernorm" in name)):
            out.append(param)
    return out


def _tied_embedding_weight(module: torch.nn.Module) -> Optional[torch.nn.Parameter]:
    """This stage's copy of the word embedding tied to the output layer, when PP puts the two on different
    stages (megatron keeps one copy on the first and one on the last stage, summing their gradients)."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return None
    inner = module
    while not hasattr(inner, "share_embeddings_and_output_weights") and hasattr(inner, "module"):
        inner = inner.module
    if not getattr(inner, "share_embeddings_and_output_weights", False):
        return None
    if not (parallel_state.is_pipeline_first_stage(ignore_virtual=True)
            or parallel_state.is_pipeline_last_stage(ignore_virtual=True)):
        return None
    return inner.shared_embedding_or_output_weight()


class DeepSpeedBackend:
    """DeepSpeed ZeRO (stage 1/2/3) behind the optimizer back-end interface of training/optimizers.py.

    `model` holds the raw chunk the schedule runs; `engine` is the DeepSpeedEngine around it.
    """

    name = "deepspeed"

    def __init__(self, args: argparse.Namespace, model_chunks: List[torch.nn.Module], config: TransformerConfig):
        import deepspeed

        if len(model_chunks) != 1:
            raise ValueError("--num-layers-per-virtual-pipeline-stage (virtual pipeline) is not supported with "
                             "--deepspeed; use megatron's optimizer (drop --deepspeed)")
        self.args = args
        self.ds_config = check_deepspeed_config(args, args.deepspeed_config_dict, args.deepspeed_config)
        self.stage = int(self.ds_config["zero_optimization"]["stage"])
        self.num_micro_batches = args.num_micro_batches
        chunk = model_chunks[0]

        for param in chunk.parameters():
            # The last stage's copy of a tied embedding: megatron marks it `shared`; DeepSpeed skips
            # parameters marked `ds_pipe_replicated` in the norm so that the embedding counts once.
            if getattr(param, "shared", False):
                param.ds_pipe_replicated = True
        self._tp_summed = _tp_summed_params(chunk, config)
        self._tied_embedding = _tied_embedding_weight(chunk)

        client_optimizer = None
        if "optimizer" not in self.ds_config:
            client_optimizer = torch.optim.AdamW(
                param_groups(chunk, args.weight_decay), lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                eps=args.adam_eps, weight_decay=args.weight_decay)
        self.engine, _, _, _ = deepspeed.initialize(
            model=chunk, optimizer=client_optimizer,
            model_parameters=None if client_optimizer is not None else param_groups(chunk, args.weight_decay),
            config=self.ds_config, mpu=DeepSpeedMPU, dist_init_required=False)
        self.optimizer = self.engine.optimizer
        # megatron's scheduler sets lr / weight decay on DeepSpeed's (fp32 partition) parameter groups.
        for group in self.optimizer.param_groups:
            group.setdefault("wd_mult", 1.0 if group.get("weight_decay", 0.0) > 0 else 0.0)
        self.scheduler = build_scheduler(args, self.optimizer)
        self.model = [chunk]

        self._backwards = 0
        self._hooks = [chunk.register_forward_pre_hook(self._before_forward),
                       chunk.register_forward_hook(self._after_forward)]
        if self.stage >= 2:
            # Gradients are reduce-scattered during the backward, so the TP sum has to happen before DeepSpeed's
            # own gradient hook sees them: a tensor hook runs on the freshly computed gradient.
            for param in self._tp_summed:
                self._hooks.append(param.register_hook(self._sum_over_tp))
        needs_scaler = getattr(self.optimizer, "needs_scaler", lambda: False)()
        self._needs_scaler = needs_scaler
        # fp16: megatron's schedule multiplies the last stage's loss by this before its backward.
        config.grad_scale_func = self.engine.scale if needs_scaler else None
        config.finalize_model_grads_func = None
        config.no_sync_func = None
        config.grad_sync_func = None

    # Micro-batch framing (see the module docstring).
    def _before_forward(self, module, inputs) -> None:
        if torch.is_grad_enabled():
            self.optimizer.clear_backward_seen_flag()

    def _after_forward(self, module, inputs, output) -> None:
        if not torch.is_grad_enabled():
            return
        from deepspeed.runtime.utils import register_output_backward_hooks

        register_output_backward_hooks(output, preprocess_once_fn=self._before_backward)

    def _before_backward(self) -> None:
        self._backwards += 1
        if self._backwards > self.num_micro_batches:
            raise RuntimeError(f"{self._backwards} micro-batch backwards in one iteration, expected "
                               f"{self.num_micro_batches}")
        # ZeRO-2/3 reduce in every backward and finish the partition at the last one; ZeRO-1 reduces after
        # the schedule, once gradients that megatron sums across stages have been summed.
        last = self._backwards == self.num_micro_batches
        self.engine.set_gradient_accumulation_boundary(last and self.stage >= 2)
        if self._needs_scaler:
            # The loss (last stage) or the received output gradient (other stages) is already scaled by
            # DeepSpeed's loss scale through config.grad_scale_func.
            self.engine._manual_backward_expected = True
        self.engine._backward_prologue()

    @staticmethod
    def _sum_over_tp(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
        return grad

    def _accumulated_grad(self, param: torch.nn.Parameter) -> Optional[torch.Tensor]:
        getter = getattr(self.optimizer, "get_gradient_for_reduction", None)
        return getter(param) if getter is not None else param.grad

    def _sum_cross_rank_grads(self) -> None:
        """ZeRO-1: the gradient sums megatron's finalize_model_grads does before the data-parallel reduce."""
        if self._tp_summed:
            grads = [self._accumulated_grad(p) for p in self._tp_summed]
            grads = [g for g in grads if g is not None]
            if grads:
                flat = torch._utils._flatten_dense_tensors(grads)
                torch.distributed.all_reduce(flat, group=parallel_state.get_tensor_model_parallel_group())
                for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                    grad.copy_(synced)
        if self._tied_embedding is not None:
            grad = self._accumulated_grad(self._tied_embedding)
            if grad is None:
                grad = torch.zeros_like(self._tied_embedding)
                self._tied_embedding.grad = grad
            torch.distributed.all_reduce(grad, group=parallel_state.get_embedding_group())

    # Back-end interface.
    def zero_grad(self) -> None:
        self._backwards = 0

    def after_forward_backward(self) -> None:
        if self._backwards != self.num_micro_batches:
            raise RuntimeError(f"the schedule ran {self._backwards} micro-batch backwards, expected "
                               f"{self.num_micro_batches}")
        if self.stage == 1:
            self._sum_cross_rank_grads()
            self.engine.set_gradient_accumulation_boundary(True)
            self.engine.allreduce_gradients()

    def step(self) -> Tuple[bool, Optional[float]]:
        """(update applied, grad norm before clipping). fp16 overflow skips the update and the LR step."""
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()
        self._backwards = 0
        applied = self.engine.was_step_applied()
        if applied:
            self.scheduler.step(increment=1)
        grad_norm = self.engine.get_global_grad_norm()
        if torch.is_tensor(grad_norm):
            grad_norm = grad_norm.item()
        return applied, None if grad_norm is None else float(grad_norm)

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @property
    def loss_scale(self) -> Optional[float]:
        if not self._needs_scaler:
            return 1.0
        scale = self.engine._get_optimizer_loss_scale()
        return None if scale is None else float(scale)

    @contextlib.contextmanager
    def gathered_parameters(self, modify: bool = False):
        """Full parameters inside the block (ZeRO-3 keeps only this rank's 1/DP shard otherwise): wrap building
        the model's state dict for saving, and loading weights into it (modify=True: data-parallel rank 0's
        values are re-partitioned on exit). A no-op for stages 1 and 2."""
        if self.stage != 3:
            yield
            return
        import deepspeed

        params = list(self.model[0].parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
            yield

    def reload_model_params(self) -> None:
        """After model weights were loaded without the optimizer state (--no-load-optim, --finetune): DeepSpeed's
        fp32 master copy still holds the initial weights and would overwrite the loaded ones at the next step."""
        self.optimizer.refresh_fp32_params()

    # Checkpoints: model weights go through megatron dist_checkpointing; DeepSpeed keeps its own optimizer
    # state (fp32 master partitions, Adam moments, loss scaler) in PATH/pp_rank_XXX/zero/ (PATH given by the
    # checkpointing code), plus PATH/layout.json.
    def _layout(self) -> Dict[str, int]:
        return {"tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
                "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
                "data_parallel_size": parallel_state.get_data_parallel_world_size(),
                "zero_stage": self.stage}

    @staticmethod
    def _stage_dir(path: str) -> str:
        # DeepSpeed names its files by TP rank ("mp_rank") and DP rank; one directory per pipeline stage keeps
        # the stages apart.
        return os.path.join(path, f"pp_rank_{parallel_state.get_pipeline_model_parallel_rank():03d}")

    def save_optimizer_state(self, path: str) -> None:
        """Collective over all ranks: DeepSpeed's optimizer state of this rank into directory `path`."""
        stage_dir = self._stage_dir(path)
        os.makedirs(stage_dir, exist_ok=True)
        if torch.distributed.get_rank() == 0:
            with open(os.path.join(path, LAYOUT_FILE), "w") as f:
                json.dump(self._layout(), f)
        self.engine.save_checkpoint(stage_dir, tag=CHECKPOINT_TAG, save_latest=False,
                                    client_state={"layout": self._layout()})

    def load_optimizer_state(self, path: str) -> None:
        """Collective: restore what save_optimizer_state wrote. DeepSpeed's ZeRO state loads only at the layout
        (TP, PP, DP, stage) it was saved at; anything else raises a one-line ValueError."""
        layout_file = os.path.join(path, LAYOUT_FILE)
        if not os.path.exists(layout_file):
            raise FileNotFoundError(f"{layout_file}: no DeepSpeed optimizer state in this checkpoint")
        with open(layout_file) as f:
            saved = json.load(f)
        if saved != self._layout():
            raise ValueError(f"{layout_file}: DeepSpeed optimizer state saved at {saved} cannot load at "
                             f"{self._layout()} (load the model weights only)")
        load_path, _ = self.engine.load_checkpoint(self._stage_dir(path), tag=CHECKPOINT_TAG,
                                                   load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise FileNotFoundError(f"{self._stage_dir(path)}/{CHECKPOINT_TAG}: DeepSpeed found no checkpoint")

    def state_dict_for_checkpoint(self, model_sharded_state_dict=None) -> dict:
        """What megatron's checkpoint keeps for this back end: the LR schedule (the optimizer state is
        DeepSpeed's, see save_optimizer_state)."""
        return {"opt_param_scheduler": self.scheduler.state_dict()}

    def load_state_dict_from_checkpoint(self, state: dict) -> None:
        if "opt_param_scheduler" in state:
            self.scheduler.load_state_dict(state["opt_param_scheduler"])
