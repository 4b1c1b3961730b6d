"""The DeepSpeed JSON checked against the Megatron flags, before any process group or DeepSpeed import.

Lives beside arguments.py (which calls it while validating flags) so that a bad config is one line at start-up;
the DeepSpeed back end (training/backends/deepspeed.py) uses the filled-in copy it returns.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os


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
        config["fp16"].setdefault("initial_scale_power", int(round(math.log2(float(args.initial_loss_scale)))))

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
