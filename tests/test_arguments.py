"""Flag validation: Megatron's derived defaults, and one line naming the flag for each bad combination."""

import pytest

from megatron_cocomix.arguments import ArgumentError, build_parser, parse_args

BASE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--train-iters", "10", "--lr", "1e-3", "--mock-data", "--vocab-size", "255"]


def test_megatron_defaults():
    args = parse_args(BASE + ["--swiglu", "--tensor-model-parallel-size", "2", "--global-batch-size", "16"],
                      world_size=4)
    assert args.data_parallel_size == 2 and args.num_micro_batches == 4
    assert args.ffn_hidden_size == 192  # 8h/3 rounded up to a multiple of 64, as Megatron
    assert args.max_position_embeddings == 32 and args.lr_decay_iters == 10
    assert args.tokenizer_type == "NullTokenizer" and args.num_query_groups == 4
    assert parse_args(BASE, world_size=1).sequence_parallel is False


@pytest.mark.parametrize("extra, world_size, message", [
    (["--tensor-model-parallel-size", "3"], 4, "world size 4 is not divisible by --tensor-model-parallel-size 3"),
    (["--pipeline-model-parallel-size", "3"], 3, "--num-layers 4 is not divisible by --pipeline-model-parallel-size 3"),
    (["--global-batch-size", "6"], 2, "--global-batch-size 6 is not divisible by --micro-batch-size 2"),
    (["--num-layers-per-virtual-pipeline-stage", "1"], 1, "--num-layers-per-virtual-pipeline-stage needs"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
      "--no-overlap-p2p-communication"], 2, "--no-overlap-p2p-communication with the interleaved schedule"),
    (["--lr-warmup-iters", "10"], 1, "--lr-warmup-iters 10 must be smaller than --lr-decay-iters 10"),
    (["--bf16", "--fp16"], 1, "--bf16 and --fp16 are mutually exclusive"),
    (["--cross-entropy-loss-fusion"], 1, "--cross-entropy-loss-fusion needs --bf16"),
    (["--deepspeed"], 1, "--deepspeed needs --deepspeed_config PATH"),
    (["--deepspeed", "--deepspeed_config", "missing.json"], 1, "--deepspeed_config missing.json: no such file"),
    (["--cocomix"], 1, "--concept-layer is required with --cocomix"),
    (["--cocomix", "--concept-layer", "4"], 1, "--concept-layer 4 must be in [1, --num-layers 4)"),
    (["--cocomix", "--concept-layer", "2"], 1, "--concept-labels online needs --teacher-model"),
    (["--cocomix", "--concept-layer", "2", "--concept-labels", "nowhere/labels"], 1,
     "--concept-labels nowhere/labels: no such file nowhere/labels.bin"),
    (["--kd"], 1, "--kd needs --teacher-model"),
    (["--kd-teacher-states", "nowhere/states"], 1, "--kd-teacher-states needs --kd"),
    (["--kd", "--teacher-model", ".", "--kd-teacher-states", "nowhere/states"], 1,
     "--kd-teacher-states nowhere/states: no such file nowhere/states.bin"),
    (["--recompute-method", "block"], 1, "--recompute-method needs --recompute-granularity full"),
    (["--wandb-project", "p"], 1, "--wandb-project needs --wandb-exp-name"),
    (["--wandb-project", "p", "--wandb-exp-name", "e"], 1, "--wandb-project needs --wandb-save-dir (or --save"),
    (["--use-distributed-optimizer", "--overlap-param-gather"], 2,
     "--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce"),
    (["--dist-ckpt-optim-fully-reshardable"], 1, "--dist-ckpt-optim-fully-reshardable needs --use-distributed-optimizer"),
    (["--deepspeed", "--deepspeed_config", "examples/ds_config_zero1.json", "--async-save"], 1,
     "--async-save writes megatron's dist checkpoint in the background, but DeepSpeed"),
])
def test_bad_flags_give_one_line(extra, world_size, message):
    with pytest.raises(ArgumentError) as error:
        parse_args(BASE + extra, world_size=world_size)
    assert "\n" not in str(error.value)
    assert str(error.value).startswith(message), str(error.value)


def test_kernel_flags():
    """Megatron-LM's fusion flags (on by default, --no-... turns each off) and the kernel choices."""
    args = parse_args(BASE, world_size=1)
    assert args.bias_gelu_fusion and args.bias_swiglu_fusion and args.bias_dropout_fusion
    assert args.masked_softmax_fusion and args.persist_layer_norm and args.gradient_accumulation_fusion
    assert not args.cross_entropy_loss_fusion and not args.torch_compile_layers
    assert args.teacher_dtype == "fp32" and args.teacher_lm_head == "chunked" and args.attention_backend == "sdpa"
    args = parse_args(BASE + ["--no-bias-gelu-fusion", "--no-bias-dropout-fusion", "--bf16", "--cross-entropy-loss-fusion",
                              "--teacher-dtype", "tf32", "--teacher-lm-head", "full", "--attention-backend",
                              "sdpa-cudnn", "--torch-compile-layers"], world_size=1)
    assert not args.bias_gelu_fusion and not args.bias_dropout_fusion and args.cross_entropy_loss_fusion
    assert (args.teacher_dtype, args.teacher_lm_head, args.attention_backend) == ("tf32", "full", "sdpa-cudnn")
    assert args.torch_compile_layers


def test_every_flag_has_help():
    for action in build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no --help text"


def test_checkpoint_flags_saved_before_a_flag_existed():
    """A checkpoint's recorded flags lack the flags added since: they take their defaults when it is loaded."""
    from megatron_cocomix.conversion.checkpoint import _rebuild_args

    saved = dict(vars(parse_args(BASE, world_size=1)))
    for name in ("bias_gelu_fusion", "bias_dropout_fusion", "teacher_lm_head", "torch_compile_layers"):
        del saved[name]
    args = _rebuild_args(saved, None, "iter_0000010")
    assert args.bias_gelu_fusion and args.bias_dropout_fusion and not args.torch_compile_layers
    assert args.teacher_lm_head == "chunked" and args.num_layers == 4
