"""Command-line flags: Megatron-LM names and meanings, plus the CoCoMix ones, validated in one place.

Users copy their Megatron-LM launch scripts, so every flag that exists in Megatron-LM keeps its name, default and
meaning. Flags are grouped as in Megatron (`network size`, `training`, ...) so `--help` reads like Megatron's.
All cross-flag checks live in `validate_args`, which raises `ArgumentError` with one line naming the flag and value.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

from megatron_cocomix.deepspeed_config import check_deepspeed_config

# --teacher-dtype names (megatron_cocomix.concepts.teacher.TEACHER_DTYPES maps them to storage dtypes).
TEACHER_DTYPE_CHOICES = ("fp32", "tf32", "bf16", "fp16")


class ArgumentError(ValueError):
    """A bad flag value; the message names the flag and the value."""


class RunArguments(argparse.Namespace):
    """The parsed flags plus the values derived from them (padded vocabulary, data-parallel size, the teacher's
    and the SAE's shapes, ...). `pretrain()` resolves every derived value in one step, then `freeze()`s them:
    from then on they are read-only, so any reader can rely on every attribute being present and final."""

    def __setattr__(self, name, value):
        if self.__dict__.get("_frozen"):
            raise AttributeError(f"arguments are read-only once resolved (tried to set {name}); derive values "
                                 f"before pretrain() publishes them")
        super().__setattr__(name, value)

    def freeze(self) -> "RunArguments":
        self.__dict__["_frozen"] = True
        return self


def _add_network_size_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("network size")
    g.add_argument("--num-layers", type=int, default=None, help="Number of transformer layers.")
    g.add_argument("--hidden-size", type=int, default=None, help="Transformer hidden size.")
    g.add_argument("--ffn-hidden-size", type=int, default=None,
                   help="MLP hidden size; default 4 x hidden-size (or 8/3 x hidden-size with --swiglu, as Megatron).")
    g.add_argument("--num-attention-heads", type=int, default=None, help="Number of attention heads.")
    g.add_argument("--group-query-attention", action="store_true", help="Use grouped-query attention.")
    g.add_argument("--num-query-groups", type=int, default=1, help="Number of KV groups with --group-query-attention.")
    g.add_argument("--kv-channels", type=int, default=None, help="Per-head size; default hidden-size / heads.")
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="Size of the learned position table; default --seq-length.")
    g.add_argument("--position-embedding-type", choices=["learned_absolute", "rope"], default="learned_absolute",
                   help="Position embedding type.")
    g.add_argument("--rotary-base", type=int, default=10000, help="RoPE base period.")
    g.add_argument("--rotary-percent", type=float, default=1.0, help="Fraction of head dims that get RoPE.")
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm", help="Norm layer type.")
    g.add_argument("--norm-epsilon", type=float, default=1e-5, help="Epsilon of the norm layers.")
    g.add_argument("--swiglu", action="store_true", help="Use SwiGLU gated MLP (implies gated linear unit).")
    g.add_argument("--openai-gelu", action="store_true",
                   help="GELU's tanh approximation (GPT-2's and the official CoCoMix student's `gelu_new`) instead of "
                        "exact GELU.")
    g.add_argument("--disable-bias-linear", action="store_true", help="No bias in linear layers.")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                   help="Separate input embedding and output layer weights.")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="Pad the vocabulary to a multiple of this value times the tensor-parallel size.")
    g.add_argument("--attention-backend", choices=["sdpa", "sdpa-cudnn", "local"], default="sdpa",
                   help="Core attention: torch scaled_dot_product_attention (flash / memory-efficient kernels on GPU), "
                        "the same with cuDNN's attention tried first (sdpa-cudnn; elsewhere SDPA's own order), or "
                        "megatron-core's local DotProductAttention (materialises [b, heads, s, s] scores).")


def _add_kernel_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("fusions and kernels (docs/performance.md)")
    g.add_argument("--no-bias-gelu-fusion", action="store_false", dest="bias_gelu_fusion",
                   help="CUDA: do not fuse bias + GELU. The fused kernel is GELU's tanh form, so it is used only "
                        "with --openai-gelu and biases (exact GELU is never fused).")
    g.add_argument("--no-bias-swiglu-fusion", action="store_false", dest="bias_swiglu_fusion",
                   help="CUDA: do not fuse bias + SwiGLU (--swiglu).")
    g.add_argument("--no-bias-dropout-fusion", action="store_false", dest="bias_dropout_fusion",
                   help="CUDA: do not fuse bias + dropout + residual add.")
    g.add_argument("--no-masked-softmax-fusion", action="store_false", dest="masked_softmax_fusion",
                   help="CUDA, --attention-backend local: do not use the fused scaled masked softmax (used only "
                        "where its compiled CUDA extensions import).")
    g.add_argument("--no-persist-layer-norm", action="store_false", dest="persist_layer_norm",
                   help="CUDA: do not use apex's persistent LayerNorm (used only where apex imports).")
    g.add_argument("--no-gradient-accumulation-fusion", action="store_false", dest="gradient_accumulation_fusion",
                   help="CUDA: do not accumulate weight gradients into main_grad inside the GEMM (used only where "
                        "apex's fused_weight_gradient_mlp_cuda imports, and not with --deepspeed).")
    g.add_argument("--cross-entropy-loss-fusion", action="store_true",
                   help="CUDA, --bf16: megatron-core's fused vocab-parallel cross-entropy for the LM loss (its "
                        "backward returns bf16 logit gradients, hence --bf16 only).")
    g.add_argument("--cross-entropy-fusion-impl", choices=["native"], default="native",
                   help="Implementation of --cross-entropy-loss-fusion: native (torch.compile; Transformer "
                        "Engine's is not available here).")
    g.add_argument("--torch-compile-layers", action="store_true",
                   help="torch.compile each transformer layer (regional compilation, compiled lazily at its first "
                        "forward). Off by default: its gain is measured on a GPU (docs/performance.md).")


def _add_regularization_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("regularization")
    g.add_argument("--attention-dropout", type=float, default=0.1, help="Dropout on attention probabilities.")
    g.add_argument("--hidden-dropout", type=float, default=0.1, help="Dropout on the residual branches.")
    g.add_argument("--weight-decay", type=float, default=0.01, help="Decoupled weight decay (AdamW).")
    g.add_argument("--weight-decay-all-params", action="store_true",
                   help="Decay every parameter, biases and norm weights included (the official CoCoMix recipe); "
                        "by default, as in Megatron-LM, biases and 1-D parameters are not decayed.")
    g.add_argument("--clip-grad", type=float, default=1.0, help="Gradient clipping on the global L2 norm (0: off).")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="Adam beta1.")
    g.add_argument("--adam-beta2", type=float, default=0.999, help="Adam beta2.")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="Adam epsilon.")


def _add_training_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=None, help="Sequences per micro-batch per data-parallel rank.")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="Sequences per optimizer step over all data-parallel ranks; default micro-batch x DP.")
    g.add_argument("--train-iters", type=int, default=None, help="Number of optimizer steps.")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                   help="Activation recomputation: whole layers (full) or attention core only (selective).")
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None,
                   help="With full recompute: how layers are grouped (uniform) or how many are recomputed (block).")
    g.add_argument("--recompute-num-layers", type=int, default=None, help="Layers per recompute group / block.")
    g.add_argument("--use-cpu-initialization", action="store_true",
                   help="Create weights on the CPU before moving them to the device.")
    g.add_argument("--seed", type=int, default=1234, help="Random seed; the initial model depends only on it.")
    g.add_argument("--exit-interval", type=int, default=None, help="Exit after this many iterations (after a save).")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="Save a checkpoint and exit 0 once this much wall time has passed since start-up (checked "
                        "after every iteration, agreed by all ranks).")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="On --exit-signal (e.g. a scheduler's warning before preemption) every rank finishes the "
                        "current iteration, saves a checkpoint and exits 0.")
    g.add_argument("--exit-signal", choices=["SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"], default="SIGTERM",
                   help="The signal --exit-signal-handler waits for.")
    g.add_argument("--check-for-nan-in-loss-and-grad", action="store_true", default=True,
                   help="Stop with one line (iteration, rank, quantity) when a loss or the gradient norm is NaN or "
                        "Inf, before the optimizer step, so the last checkpoint stays clean (on by default).")
    g.add_argument("--no-check-for-nan-in-loss-and-grad", action="store_false",
                   dest="check_for_nan_in_loss_and_grad", help="Train on through NaN / Inf.")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="megatron-core DistributedOptimizer (optimizer state sharded over data-parallel ranks).")
    g.add_argument("--overlap-grad-reduce", action="store_true", help="Overlap DP gradient reduce with backward.")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="With --use-distributed-optimizer and --overlap-grad-reduce: all-gather the updated parameters "
                        "bucket by bucket during the next forward instead of right after the optimizer step.")
    g.add_argument("--deepspeed", action="store_true", help="Use DeepSpeed ZeRO as the optimizer (see --deepspeed_config).")
    g.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
                   help="DeepSpeed JSON config; its batch sizes must agree with the batch flags.")
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help="Set by the deepspeed launcher; ignored otherwise (LOCAL_RANK is read from the environment).")


def _add_learning_rate_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("learning rate")
    g.add_argument("--lr", type=float, default=None, help="Peak learning rate.")
    g.add_argument("--min-lr", type=float, default=0.0, help="Learning rate at the end of the decay.")
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="linear",
                   help="Decay from --lr to --min-lr after warmup.")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="Iterations of warmup + decay; default --train-iters.")
    g.add_argument("--lr-warmup-iters", type=int, default=0, help="Linear warmup iterations.")
    g.add_argument("--lr-warmup-fraction", type=float, default=None, help="Warmup as a fraction of --lr-decay-iters.")


def _add_mixed_precision_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("mixed precision")
    g.add_argument("--bf16", action="store_true", help="bf16 parameters and activations, fp32 master weights.")
    g.add_argument("--fp16", action="store_true", help="fp16 with dynamic loss scaling and fp32 master weights.")
    g.add_argument("--loss-scale", type=float, default=None, help="Static loss scale for fp16 (default: dynamic).")
    g.add_argument("--initial-loss-scale", type=float, default=2 ** 32, help="Initial dynamic loss scale.")


def _add_distributed_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("distributed")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="Tensor-parallel degree.")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="Pipeline-parallel degree.")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="Layers per virtual pipeline stage (interleaved 1F1B schedule).")
    g.add_argument("--no-overlap-p2p-communication", action="store_false", dest="overlap_p2p_comm",
                   help="Interleaved schedule: batch pipeline sends/receives instead of overlapping them with "
                        "compute (needs --pipeline-model-parallel-size > 2).")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="Shard norms/dropout activations over the sequence dimension across tensor-parallel ranks.")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=None,
                   help="Default: nccl when CUDA is available, gloo otherwise.")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10, help="Collective timeout.")


def _add_logging_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=100, help="Iterations between log lines.")
    g.add_argument("--tensorboard-dir", default=None, help="Write tensorboard event files here.")
    g.add_argument("--tensorboard-log-interval", type=int, default=1, help="Iterations between tensorboard writes.")
    g.add_argument("--log-throughput", action="store_true", default=True,
                   help="Log tokens/s, TFLOP/s per device and MFU (on by default here).")
    g.add_argument("--no-log-throughput", action="store_false", dest="log_throughput",
                   help="Leave throughput out of the log line.")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="Dense peak TFLOP/s of one device for the MFU column; default from a table of known GPUs "
                        "(e.g. H100/H200 989 bf16).")
    g.add_argument("--wandb-project", default=None,
                   help="Weights & Biases project: the last rank logs the tensorboard scalars to W&B too (needs "
                        "`pip install wandb`). W&B is off without it.")
    g.add_argument("--wandb-exp-name", default=None,
                   help="Name of the W&B run (required with --wandb-project, as in Megatron-LM).")
    g.add_argument("--wandb-save-dir", default=None,
                   help="Local folder of the W&B run files (W&B adds wandb/<run>/ below it); default <--save>/wandb, "
                        "as in Megatron-LM.")
    g.add_argument("--wandb-entity", default=None, help="W&B team or user owning the project; default W&B's own.")
    g.add_argument("--wandb-mode", choices=["online", "offline", "disabled"], default=None,
                   help="W&B mode; default: $WANDB_MODE, else online (Megatron-LM's behaviour). Without network use "
                        "offline (online gives up after wandb.init's timeout, 90 s) and upload later with "
                        "`wandb sync DIR`.")


def _add_validation_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("validation")
    g.add_argument("--eval-interval", type=int, default=1000, help="Iterations between validation runs.")
    g.add_argument("--eval-iters", type=int, default=100, help="Validation iterations per run (0: no validation).")
    g.add_argument("--skip-train", action="store_true", help="Only evaluate (after --load).")


def _add_checkpointing_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="Directory for checkpoints (iter_XXXXXXX/ + latest).")
    g.add_argument("--load", default=None, help="Directory to resume from (reads its `latest`).")
    g.add_argument("--save-interval", type=int, default=None, help="Iterations between checkpoints.")
    g.add_argument("--no-load-optim", action="store_true", help="Do not load the optimizer state.")
    g.add_argument("--no-load-rng", action="store_true", help="Do not load RNG states.")
    g.add_argument("--finetune", action="store_true", help="Load weights only and reset iteration to 0.")
    g.add_argument("--ckpt-format", choices=["torch_dist"], default="torch_dist",
                   help="megatron-core dist_checkpointing format (loads at any TP/PP layout).")
    g.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_true",
                   help="Save the distributed optimizer's state per parameter (gathered over data-parallel ranks), "
                        "so that it reloads at any TP / PP / DP; by default it is saved in its data-parallel "
                        "buckets, which reload at any DP but only at the same TP and PP (as Megatron-LM).")
    g.add_argument("--async-save", action="store_true",
                   help="Write checkpoints in background processes (megatron-core's asynchronous "
                        "dist_checkpointing) while training continues; the tracker moves once every rank's files "
                        "are written.")


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    from megatron_cocomix.data.tokenizer import add_tokenizer_args  # light: no megatron-core import

    g = parser.add_argument_group("data and dataloader")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="Dataset prefix(es) of .bin/.idx pairs: `PREFIX` or `W1 PREFIX1 W2 PREFIX2 ...` to blend "
                        "(weights are normalised; each prefix is split by --split).")
    g.add_argument("--split", default=None,
                   help="Train/valid/test weights of each --data-path prefix's documents (default 969,30,1).")
    g.add_argument("--train-data-path", nargs="*", default=None,
                   help="Prefix(es) used only for training (`P` or `W1 P1 ...`); instead of --data-path/--split.")
    g.add_argument("--valid-data-path", nargs="*", default=None, help="Prefix(es) used only for validation.")
    g.add_argument("--test-data-path", nargs="*", default=None, help="Prefix(es) used only for test.")
    g.add_argument("--data-cache-path", default=None,
                   help="Where megatron-core writes its index caches (default: a cache/ folder next to the data).")
    g.add_argument("--mock-data", action="store_true", help="Synthetic token data (megatron-core MockGPTDataset).")
    g.add_argument("--seq-length", type=int, default=None, help="Tokens per training sequence.")
    g.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes.")
    g.add_argument("--reset-position-ids", action="store_true", help="Restart position ids after each EOD.")
    g.add_argument("--reset-attention-mask", action="store_true",
                   help="Block attention across EOD boundaries (samples then carry an attention_mask).")
    g.add_argument("--eod-mask-loss", action="store_true", help="No loss on EOD tokens.")
    add_tokenizer_args(g)


def _add_cocomix_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("CoCoMix")
    g.add_argument("--cocomix", action="store_true", help="Train with continuous concept mixing.")
    g.add_argument("--concept-layer", type=int, default=None,
                   help="Insert the concept layer at the input of this (0-indexed) transformer block.")
    g.add_argument("--concept-dim", type=int, default=None, help="Number of concepts C (read from --sae when given).")
    g.add_argument("--concept-topk", type=int, default=32, help="Predicted concept logits kept per token.")
    g.add_argument("--concept-num-labels", type=int, default=4, help="Attribution labels per token (K_attr).")
    g.add_argument("--concept-loss-weight", type=float, default=0.1, help="Weight of the concept cross-entropy.")
    g.add_argument("--no-concept-loss", action="store_true", help="Ablation: train without the concept loss.")
    g.add_argument("--concept-mixing", choices=["interleave", "add", "none"], default="interleave",
                   help="How the continuous concept enters the stream (ablations: add, none).")
    g.add_argument("--concept-labels", default="online",
                   help="`online` (teacher + SAE in the training step) or the prefix of precomputed labels.")
    g.add_argument("--concept-attribution", choices=["act", "preact", "abs"], default="act",
                   help="Attribution score: gradient projection x SAE activation over the k active latents (act, "
                        "the official code), x pre-activation over all C latents (preact, the paper's text), or "
                        "|act| (abs).")
    g.add_argument("--concept-label-masking", choices=["ignore", "reference"], default="ignore",
                   help="ignore: a label whose attribution score is not positive, and every label of a sequence's "
                        "last position (it predicts no token), is -1 and takes no part in the concept loss. "
                        "reference: the official code's labels, the top --concept-num-labels over all latents "
                        "whatever their score (zero-score ties in latent-id order; the official code leaves "
                        "their order undefined). Online and precomputed labels alike.")
    g.add_argument("--teacher-dtype", choices=TEACHER_DTYPE_CHOICES, default="fp32",
                   help="Precision of the frozen teacher and of its SAE (labels, KD). tf32: fp32 weights, CUDA "
                        "matmuls on TF32 tensor cores inside the teacher's and the SAE's work only (CPU: as fp32). "
                        "Default fp32, as the official teacher: in bf16 only 80.6%% of tokens kept the same label "
                        "set (93.7%% the same top-1) on SmolLM2-135M and the shipped corpus, on CPU "
                        "(benchmarks/teacher_dtype.md); the GPU measurement of tf32 and bf16 is "
                        "benchmarks/teacher_dtype_agreement.py's (docs/performance.md).")
    g.add_argument("--teacher-lm-head", choices=["chunked", "full"], default="chunked",
                   help="How the teacher's next-token loss (whose gradient gives the attribution labels) reads its "
                        "output layer: chunked, a linear cross-entropy over chunks of tokens and a vocabulary padded "
                        "to a multiple of 64, never holding the [tokens x vocabulary] fp32 logits (GPT-2 and the "
                        "Llama family; other architectures use their own head); full, the model's own logits. Same "
                        "numbers to fp32 rounding.")
    g.add_argument("--teacher-model", default=None, help="Local Hugging Face model directory or .gguf file.")
    g.add_argument("--teacher-layer", type=int, default=None, help="SAE hook: the teacher's hidden_states[layer].")
    g.add_argument("--sae", default=None, help="TopK SAE: OpenAI .pt, SAELens folder or sparsify folder.")
    g.add_argument("--kd", action="store_true", help="Baseline: knowledge distillation from --teacher-model.")
    g.add_argument("--kd-weight", type=float, default=0.1, help="Weight of KL(teacher || student).")
    g.add_argument("--kd-teacher-states", default=None, metavar="PREFIX",
                   help="KD from the teacher's final hidden states of the training samples, precomputed by "
                        "tools/extract_concepts.py --teacher-states-prefix (PREFIX.{bin,idx,json}): the teacher's "
                        "head turns them into its distributions, with no teacher forward per step (same numbers). "
                        "Default: the teacher runs on every training batch.")
    g.add_argument("--pause-tokens", action="store_true",
                   help="Baseline: interleave a learned pause vector at --concept-layer instead of concepts.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Pretrain a megatron-core GPT with CoCoMix (continuous concept mixing).",
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for add in (_add_network_size_args, _add_regularization_args, _add_training_args, _add_learning_rate_args,
                _add_mixed_precision_args, _add_kernel_args, _add_distributed_args, _add_logging_args,
                _add_validation_args, _add_checkpointing_args, _add_data_args, _add_cocomix_args):
        add(parser)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None, world_size: Optional[int] = None) -> argparse.Namespace:
    """Parse and validate. `world_size` defaults to $WORLD_SIZE (1 when unset)."""
    args = build_parser().parse_args(argv, namespace=RunArguments())
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate_args(args, world_size)
    return args


def _require(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) is None:
            raise ArgumentError(f"--{name.replace('_', '-')} is required")


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ArgumentError(f"--{name.replace('_', '-')} must be positive, got {value}")


def check_parallel_sizes(world_size: int, tensor: int, pipeline: int) -> None:
    """Positive tensor- and pipeline-parallel sizes whose product divides the world (one ArgumentError line)."""
    for flag, value in (("--tensor-model-parallel-size", tensor), ("--pipeline-model-parallel-size", pipeline)):
        if value <= 0:
            raise ArgumentError(f"{flag} must be positive, got {value}")
    if world_size % (tensor * pipeline) != 0:
        raise ArgumentError(f"world size {world_size} is not divisible by --tensor-model-parallel-size {tensor} x "
                            f"--pipeline-model-parallel-size {pipeline}")


def validate_args(args: argparse.Namespace, world_size: int) -> None:
    """Fill derived defaults (Megatron's rules) and refuse inconsistent combinations.

    Values that need files (the padded vocabulary from the tokenizer, the teacher's and the SAE's shapes) are
    declared here as None and filled by pretrain() before the arguments are frozen."""
    args.padded_vocab_size = None
    args.true_vocab_size = None
    args.teacher_shape = None
    args.sae_topk = None
    args.deepspeed_config_dict = None
    _require(args, "num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
             "train_iters", "lr")
    _positive(args, "num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
              "global_batch_size", "train_iters", "tensor_model_parallel_size", "pipeline_model_parallel_size",
              "log_interval", "eval_interval", "save_interval", "ffn_hidden_size", "exit_duration_in_mins")

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    check_parallel_sizes(world_size, tp, pp)
    args.world_size = world_size
    args.data_parallel_size = world_size // (tp * pp)

    if args.hidden_size % args.num_attention_heads != 0 and args.kv_channels is None:
        raise ArgumentError(f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads "
                            f"{args.num_attention_heads} (set --kv-channels)")
    if args.num_attention_heads % tp != 0:
        raise ArgumentError(f"--num-attention-heads {args.num_attention_heads} is not divisible by "
                            f"--tensor-model-parallel-size {tp}")
    if not args.group_query_attention:
        args.num_query_groups = args.num_attention_heads
    elif args.num_attention_heads % args.num_query_groups != 0 or args.num_query_groups % tp != 0:
        raise ArgumentError(f"--num-query-groups {args.num_query_groups} must divide --num-attention-heads "
                            f"{args.num_attention_heads} and be divisible by --tensor-model-parallel-size {tp}")
    if args.ffn_hidden_size is None:
        # Megatron's defaults: 4h, or 8h/3 rounded up to a multiple of 64 for SwiGLU.
        args.ffn_hidden_size = 4 * args.hidden_size
        if args.swiglu:
            args.ffn_hidden_size = ((8 * args.hidden_size // 3 + 63) // 64) * 64
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.position_embedding_type == "learned_absolute" and args.max_position_embeddings < args.seq_length:
        raise ArgumentError(f"--max-position-embeddings {args.max_position_embeddings} is smaller than "
                            f"--seq-length {args.seq_length}")
    if args.sequence_parallel and tp == 1:
        args.sequence_parallel = False  # Megatron silently drops it at TP1 as there is nothing to shard.

    # Pipeline and virtual pipeline.
    if args.num_layers % pp != 0:
        raise ArgumentError(f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size {pp}")
    args.virtual_pipeline_model_parallel_size = None
    if args.num_layers_per_virtual_pipeline_stage is not None:
        per_stage = args.num_layers // pp
        if pp < 2:
            raise ArgumentError("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
        if per_stage % args.num_layers_per_virtual_pipeline_stage != 0:
            raise ArgumentError(f"--num-layers-per-virtual-pipeline-stage {args.num_layers_per_virtual_pipeline_stage}"
                                f" does not divide the {per_stage} layers of each pipeline stage")
        args.virtual_pipeline_model_parallel_size = per_stage // args.num_layers_per_virtual_pipeline_stage
        if not args.overlap_p2p_comm and pp <= 2:
            # Batched p2p would post two sends and two receives between the same two ranks in one batch,
            # which the transport may pair up the wrong way round.
            raise ArgumentError("--no-overlap-p2p-communication with the interleaved schedule needs "
                                f"--pipeline-model-parallel-size > 2, got {pp}")
    else:
        args.overlap_p2p_comm = False

    # Batch sizes.
    dp = args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    if args.global_batch_size % (args.micro_batch_size * dp) != 0:
        raise ArgumentError(f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
                            f"{args.micro_batch_size} x data-parallel size {dp}")
    args.num_micro_batches = args.global_batch_size // (args.micro_batch_size * dp)
    if args.virtual_pipeline_model_parallel_size is not None and args.num_micro_batches % pp != 0:
        raise ArgumentError(f"the interleaved schedule needs the number of micro-batches ({args.num_micro_batches}) "
                            f"to be a multiple of --pipeline-model-parallel-size {pp}")

    # Learning rate schedule.
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_warmup_fraction is not None:
        args.lr_warmup_iters = int(args.lr_warmup_fraction * args.lr_decay_iters)
    if args.lr_warmup_iters >= args.lr_decay_iters and args.lr_decay_style != "constant":
        raise ArgumentError(f"--lr-warmup-iters {args.lr_warmup_iters} must be smaller than --lr-decay-iters "
                            f"{args.lr_decay_iters} (default: --train-iters)")
    if args.min_lr > args.lr:
        raise ArgumentError(f"--min-lr {args.min_lr} is larger than --lr {args.lr}")

    # Precision.
    if args.bf16 and args.fp16:
        raise ArgumentError("--bf16 and --fp16 are mutually exclusive")
    if args.cross_entropy_loss_fusion and not args.bf16:
        raise ArgumentError("--cross-entropy-loss-fusion needs --bf16: megatron-core's fused cross-entropy returns "
                            "bf16 logit gradients, which would round fp32 / fp16 training's")

    # Recompute.
    if args.recompute_granularity == "full" and args.recompute_method is None:
        args.recompute_method = "uniform"
    if args.recompute_granularity == "full" and args.recompute_num_layers is None:
        args.recompute_num_layers = 1
    if args.recompute_granularity != "full" and args.recompute_method is not None:
        raise ArgumentError("--recompute-method needs --recompute-granularity full")

    # Optimizer choice.
    if args.deepspeed and args.use_distributed_optimizer:
        raise ArgumentError("--deepspeed and --use-distributed-optimizer are mutually exclusive")
    if args.async_save and args.deepspeed:
        raise ArgumentError("--async-save writes megatron's dist checkpoint in the background, but DeepSpeed writes its "
                            "optimizer files itself, in the foreground: drop --async-save with --deepspeed")
    if args.deepspeed and args.deepspeed_config is None:
        raise ArgumentError("--deepspeed needs --deepspeed_config PATH")
    if args.deepspeed_config is not None:
        args.deepspeed_config_dict = _read_json(args.deepspeed_config, "--deepspeed_config")
    if args.deepspeed:
        try:
            check_deepspeed_config(args, args.deepspeed_config_dict, args.deepspeed_config)
        except ValueError as e:
            raise ArgumentError(str(e)) from None

    if args.overlap_param_gather and not (args.use_distributed_optimizer and args.overlap_grad_reduce):
        raise ArgumentError("--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce")

    # Checkpointing.
    if args.save is not None and args.save_interval is None:
        args.save_interval = args.train_iters
    if args.dist_ckpt_optim_fully_reshardable and not args.use_distributed_optimizer:
        raise ArgumentError("--dist-ckpt-optim-fully-reshardable needs --use-distributed-optimizer (the other "
                            "optimizers' state reshards anyway)")

    # Weights & Biases: the import is checked here, before anything is built; runs without the flag never import it.
    if args.wandb_project:
        if not args.wandb_exp_name:
            raise ArgumentError("--wandb-project needs --wandb-exp-name (the W&B run's name)")
        if not args.wandb_save_dir:
            if not args.save:
                raise ArgumentError("--wandb-project needs --wandb-save-dir (or --save: its wandb/ folder is the "
                                    "default)")
            args.wandb_save_dir = os.path.join(args.save, "wandb")
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ArgumentError("--wandb-project needs the wandb package: pip install wandb==0.30.0") from None

    # Data.
    validate_data_args(args)

    # CoCoMix.
    if args.cocomix or args.pause_tokens:
        if args.concept_layer is None:
            raise ArgumentError("--concept-layer is required with --cocomix / --pause-tokens")
        if not 0 < args.concept_layer < args.num_layers:
            raise ArgumentError(f"--concept-layer {args.concept_layer} must be in [1, --num-layers {args.num_layers})")
    if args.cocomix and args.pause_tokens:
        raise ArgumentError("--cocomix and --pause-tokens are mutually exclusive")
    if args.cocomix:
        if args.concept_labels == "online":
            for flag in ("teacher_model", "teacher_layer", "sae"):
                if getattr(args, flag) is None:
                    raise ArgumentError(f"--concept-labels online needs --{flag.replace('_', '-')}")
        else:
            for suffix in (".bin", ".idx", ".json"):
                if not os.path.exists(args.concept_labels + suffix):
                    raise ArgumentError(f"--concept-labels {args.concept_labels}: no such file "
                                        f"{args.concept_labels + suffix} (write it with tools/extract_concepts.py)")
        if args.concept_topk <= 0 or args.concept_num_labels <= 0:
            raise ArgumentError("--concept-topk and --concept-num-labels must be positive")
    # Pipeline stages after an interleaving layer carry 2s positions: stages exchange shapes first.
    doubles = args.pause_tokens or (args.cocomix and args.concept_mixing == "interleave")
    args.variable_seq_lengths = doubles and pp > 1
    if args.kd and args.teacher_model is None:
        raise ArgumentError("--kd needs --teacher-model")
    if args.kd_teacher_states is not None:
        if not args.kd:
            raise ArgumentError("--kd-teacher-states needs --kd")
        for suffix in (".bin", ".idx", ".json"):
            if not os.path.exists(args.kd_teacher_states + suffix):
                raise ArgumentError(f"--kd-teacher-states {args.kd_teacher_states}: no such file "
                                    f"{args.kd_teacher_states + suffix} (write it with tools/extract_concepts.py "
                                    f"--teacher-states-prefix)")
    # --load equal to --save may not exist yet: the first run of a job that is requeued after preemption
    # (Megatron's resume-or-start pattern) starts from scratch there.
    load = ("load",) if args.load is not None and args.load != args.save else ()
    for flag in ("teacher_model", "sae") + load:
        path = getattr(args, flag)
        if path is not None and not os.path.exists(path):
            raise ArgumentError(f"--{flag.replace('_', '-')} {path}: no such file or directory")


def validate_data_args(args: argparse.Namespace) -> None:
    """Data and tokenizer flags: what can be checked before any file is opened (files are checked by
    megatron_cocomix.data.datasets before training starts)."""
    from megatron_cocomix.data.datasets import parse_blend

    has_per_split = any(getattr(args, f"{s}_data_path") for s in ("train", "valid", "test"))
    if args.mock_data and (args.data_path or has_per_split):
        raise ArgumentError("--mock-data cannot be combined with --data-path / --train-data-path")
    if not args.mock_data and not (args.data_path or args.train_data_path):
        raise ArgumentError("no training data: give --data-path (or --train-data-path), or --mock-data")
    if args.data_path and has_per_split:
        raise ArgumentError("--data-path and --train/valid/test-data-path are mutually exclusive")
    if args.split is not None and not args.data_path:
        raise ArgumentError(f"--split {args.split} only applies to --data-path")
    for flag in ("data_path", "train_data_path", "valid_data_path", "test_data_path"):
        try:
            parse_blend(getattr(args, flag), f"--{flag.replace('_', '-')}")
        except ValueError as e:
            raise ArgumentError(str(e)) from None
    if args.data_path:
        if args.split is None:
            args.split = "969,30,1"
        parts = args.split.replace("/", ",").split(",")
        try:
            weights = [float(p) for p in parts]
        except ValueError:
            weights = []
        if not 1 <= len(weights) <= 3 or any(w < 0 for w in weights) or sum(weights) <= 0 or weights[0] <= 0:
            raise ArgumentError(f"--split {args.split}: expected up to 3 non-negative weights with a positive "
                                f"train share, e.g. 969,30,1")
    if args.num_workers < 0:
        raise ArgumentError(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.make_vocab_size_divisible_by <= 0:
        raise ArgumentError(f"--make-vocab-size-divisible-by must be positive, got {args.make_vocab_size_divisible_by}")
    if args.mock_data and args.tokenizer_type is None:
        args.tokenizer_type = "NullTokenizer"
    if args.tokenizer_type is None:
        raise ArgumentError("--tokenizer-type is required with --data-path")
    if args.tokenizer_type == "NullTokenizer" and (args.vocab_size is None or args.vocab_size <= 0):
        raise ArgumentError("--vocab-size (positive) is required with --tokenizer-type NullTokenizer / --mock-data")
    needed = {"GPT2BPETokenizer": ("vocab_file", "merge_file"), "SentencePieceTokenizer": ("tokenizer_model",),
              "HuggingFaceTokenizer": ("tokenizer_model",)}.get(args.tokenizer_type, ())
    for flag in needed:
        path = getattr(args, flag)
        name = f"--{flag.replace('_', '-')}"
        if path is None:
            raise ArgumentError(f"--tokenizer-type {args.tokenizer_type} needs {name}")
        if not os.path.exists(path):
            raise ArgumentError(f"{name} {path}: no such file or directory")


def _read_json(path: str, flag: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ArgumentError(f"{flag} {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ArgumentError(f"{flag} {path}: invalid JSON ({e})") from None
