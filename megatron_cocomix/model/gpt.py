"""The student: a megatron-core `GPTModel` built from a local (non-Transformer-Engine) layer spec.

Activations are [s, b, h] as everywhere in megatron-core. The spec is megatron's local spec with two swaps:
- core attention = `SDPAttention` (torch SDPA; `--attention-backend local` keeps megatron's DotProductAttention);
- norms = `ParallelNorm`, torch LayerNorm / RMSNorm whose parameters carry the `sequence_parallel` mark, so
  that under sequence parallelism megatron's `finalize_model_grads` all-reduces their gradients over the
  tensor-parallel group (megatron's torch-norm wrapper refuses sequence parallelism outright without apex).
  apex's fused norm is used instead when apex is importable.

Initialisation does not depend on the parallel layout (`initialize_weights`): every parameter is drawn in
full, on the CPU, from a generator seeded by (--seed, its global name), and each rank keeps its
tensor-parallel slice. The same seed therefore gives the same model at any TP / PP / virtual-PP layout.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import re
from typing import Callable, Iterable, List, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset

from megatron_cocomix import compat
from megatron_cocomix.model.attention import SDPAttention
from megatron_cocomix.model.fusions import fusion_settings


def dtype_from_args(args: argparse.Namespace) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def openai_gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation, 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))): GPT-2's `gelu_new`
    (--openai-gelu, Megatron's name)."""
    return F.gelu(x, approximate="tanh")


def activation_from_args(args: argparse.Namespace):
    if args.swiglu:
        return F.silu
    return openai_gelu if args.openai_gelu else F.gelu


def build_transformer_config(args: argparse.Namespace, device_type: Optional[str] = None) -> TransformerConfig:
    """Megatron flags -> megatron-core TransformerConfig, with the fusions `fusion_settings` picks for
    `device_type` (default: this process's device)."""
    dtype = dtype_from_args(args)
    fusions = fusion_settings(args, device_type or compat.device().type)
    activation = fusions.pop("activation_func", activation_from_args(args))
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=args.swiglu,
        activation_func=activation,
        add_bias_linear=not args.disable_bias_linear,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        bf16=args.bf16,
        fp16=args.fp16,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        init_method_std=0.02,
        use_cpu_initialization=args.use_cpu_initialization,
        # Weights are drawn by `initialize_weights`, layout-independently, so megatron's own draw would be
        # wasted work. Initialisation stays "performed" because megatron sets the tensor-parallel attributes
        # of weights on that path; the init functions are no-ops.
        perform_initialization=True,
        init_method=_keep,
        output_layer_init_method=_keep,
        **fusions,
        # Stages after a CoCoMix mixing layer carry 2s positions: let stages exchange shapes.
        variable_seq_lengths=args.variable_seq_lengths,
        # megatron's config check refuses variable lengths with the default MoE dispatcher even without MoE.
        moe_token_dispatcher_type="alltoall",
        deallocate_pipeline_outputs=compat.can_deallocate_pipeline_outputs(),
        overlap_p2p_comm=args.overlap_p2p_comm,
        batch_p2p_comm=not args.overlap_p2p_comm,
        # No CUDA graphs; megatron-core 0.16's default scope "full" is deprecated (and warns) for the empty list.
        cuda_graph_scope=[],
    )


def _apex_norm_available() -> bool:
    try:
        import apex.normalization  # noqa: F401
        return True
    except ImportError:
        return False


class ParallelNorm:
    """torch LayerNorm / RMSNorm usable under sequence parallelism (megatron's norm-spec constructor signature)."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        for param in norm.parameters():
            # finalize_model_grads all-reduces grads of params marked so over the TP group.
            setattr(param, "sequence_parallel", config.sequence_parallel)
        return norm


def _norm_impl(args: argparse.Namespace):
    if _apex_norm_available() and args.normalization == "LayerNorm":
        from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

        return FusedLayerNorm
    return ParallelNorm


def gpt_layer_spec(args: argparse.Namespace) -> ModuleSpec:
    """One transformer layer: megatron's local spec with SDPA core attention and sequence-parallel-safe norms."""
    spec = get_gpt_layer_local_spec(normalization=args.normalization)
    submodules = spec.submodules
    if args.attention_backend in ("sdpa", "sdpa-cudnn"):
        submodules.self_attention.submodules.core_attention = ModuleSpec(
            module=SDPAttention, params={"cudnn_first": args.attention_backend == "sdpa-cudnn"})
    submodules.input_layernorm = _norm_impl(args)
    submodules.pre_mlp_layernorm = _norm_impl(args)
    return spec


def gpt_block_spec(args: argparse.Namespace, config: TransformerConfig, vp_stage: Optional[int] = None,
                   layer_spec_for: Optional[Callable[[int], ModuleSpec]] = None) -> TransformerBlockSubmodules:
    """The layers this pipeline stage (and virtual stage) builds; `layer_spec_for(global_index)` may swap
    in a different layer at a given depth (the CoCoMix mixing layer uses this)."""
    num_local = get_num_layers_to_build(config, vp_stage=vp_stage)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    default = gpt_layer_spec(args)
    specs = [layer_spec_for(offset + i) if layer_spec_for else default for i in range(num_local)]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=_norm_impl(args))


def mask_padded_vocab(true_vocab_size: int):
    """A forward hook for the output layer: the logits of the padded vocabulary rows (ids >= true_vocab_size, on
    the last TP shards) become the dtype's lowest value, so they take no part in any softmax (LM loss, KD, sampling)
    and the padding, which depends on TP, changes no number. In place, on the linear's fresh output."""
    def hook(module, inputs, output):
        logits = output[0] if isinstance(output, tuple) else output
        local = logits.shape[-1]
        first_padded = true_vocab_size - parallel_state.get_tensor_model_parallel_rank() * local
        if first_padded < local:
            logits[..., max(first_padded, 0):] = torch.finfo(logits.dtype).min
        return output
    return hook


def build_gpt_model(args: argparse.Namespace, config: TransformerConfig, pre_process: bool, post_process: bool,
                    vp_stage: Optional[int] = None,
                    block_spec: Optional[TransformerBlockSubmodules] = None) -> GPTModel:
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec or gpt_block_spec(args, config, vp_stage),
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        vp_stage=vp_stage,
    )
    if post_process and args.true_vocab_size is not None and args.true_vocab_size < args.padded_vocab_size:
        model.output_layer.register_forward_hook(mask_padded_vocab(args.true_vocab_size))
    if getattr(args, "torch_compile_layers", False):
        compile_layers(model)
    return model


# torch.compile keyword arguments of --torch-compile-layers (default: inductor).
COMPILE_OPTIONS: dict = {}


def compile_layers(model: torch.nn.Module) -> List[torch.nn.Module]:
    """--torch-compile-layers: compile each transformer layer in place (`nn.Module.compile`, so parameter names
    and checkpoints are unchanged; compiled at the layer's first forward). The layer that holds the CoCoMix
    concept mixing stays eager: its distributed top-k, metrics and collectives would split the graph anyway.
    Returns the compiled layers."""
    compiled = []
    for module in model.modules():
        if isinstance(module, TransformerLayer) and getattr(module, "concept_mixing", None) is None:
            module.compile(**COMPILE_OPTIONS)
            compiled.append(module)
    return compiled


# ---------------------------------------------------------------------------------------------------------
# Layout-independent initialisation.

_LAYER_RE = re.compile(r"(^|\.)layers\.(\d+)\.")
_OUTPUT_PROJECTIONS = ("linear_proj.weight", "linear_fc2.weight")


def _global_names(module: torch.nn.Module) -> Iterable[tuple]:
    """(global name, param, layer) for each parameter: local layer indices replaced by global ones."""
    layer_numbers = {}
    for name, sub in module.named_modules():
        if hasattr(sub, "layer_number") and _LAYER_RE.search(name + "."):
            layer_numbers[name] = sub.layer_number - 1  # megatron numbers layers from 1, globally
    for name, param in module.named_parameters():
        global_name = name
        match = _LAYER_RE.search(name)
        if match:
            layer_path = name[: match.end() - 1]
            if layer_path in layer_numbers:
                global_name = (name[: match.start(2)] + str(layer_numbers[layer_path])
                               + name[match.end(2):])
        yield global_name, param


def seed_for(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _canonical_name(name: str, tied: bool) -> str:
    # Strip wrappers (Float16Module's `module.`), and let a tied output layer share the embedding's draw.
    name = re.sub(r"^(module\.)+", "", name)
    if tied and name == "output_layer.weight":
        return "embedding.word_embeddings.weight"
    return name


_VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _full_tensor(name: str, shape: List[int], seed: int, std: float, out_std: float,
                 vocab_size: Optional[int] = None) -> torch.Tensor:
    if vocab_size is not None and name in _VOCAB_PARAMS and shape[0] > vocab_size:
        # The real rows are drawn as if there were no padding, the padded ones are zero: the model does not
        # depend on how far TP pads the vocabulary.
        real = _full_tensor(name, [vocab_size] + list(shape[1:]), seed, std, out_std)
        return torch.cat([real, torch.zeros([shape[0] - vocab_size] + list(shape[1:]))])
    leaf = name.rsplit(".", 1)[-1]
    if leaf.endswith("bias"):
        return torch.zeros(shape)
    if len(shape) == 1 and "norm" in name:
        return torch.ones(shape)
    generator = torch.Generator().manual_seed(seed_for(seed, name))
    scale = out_std if name.endswith(_OUTPUT_PROJECTIONS) else std
    return torch.randn(shape, generator=generator) * scale


def initialize_weights(model_chunks: List[torch.nn.Module], seed: int, config: TransformerConfig,
                       tied_embeddings: bool, vocab_size: Optional[int] = None) -> None:
    """Draw every parameter in full from (seed, global name) and keep this rank's tensor-parallel slice.

    std 0.02 (config.init_method_std); output projections std 0.02 / sqrt(2 * num_layers), as Megatron's
    scaled init; every parameter whose name ends in "bias" 0 (including CoCoMix's pre_bias); norm weights 1.
    Given `vocab_size` (the unpadded vocabulary), the padded rows of the embedding and output layer are 0.
    """
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    std = config.init_method_std
    out_std = std / math.sqrt(2.0 * config.num_layers)
    for chunk in model_chunks:
        for raw_name, param in _global_names(chunk):
            name = _canonical_name(raw_name, tied_embeddings)
            local_shape = list(param.shape)
            partitioned = getattr(param, "tensor_model_parallel", False) and tp_size > 1
            dim = getattr(param, "partition_dim", 0)
            full_shape = list(local_shape)
            if partitioned:
                full_shape[dim] *= tp_size
            full = _full_tensor(name, full_shape, seed, std, out_std, vocab_size)
            if partitioned:
                if config.gated_linear_unit and name.endswith("linear_fc1.weight"):
                    # The fused fc1 holds [gate; up]; each TP rank keeps its slice of both halves.
                    gate, up = full.chunk(2, dim=0)
                    full = torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]])
                elif config.gated_linear_unit and name.endswith("linear_fc1.bias"):
                    gate, up = full.chunk(2, dim=0)
                    full = torch.cat([gate.chunk(tp_size)[tp_rank], up.chunk(tp_size)[tp_rank]])
                else:
                    full = full.chunk(tp_size, dim=dim)[tp_rank]
            with torch.no_grad():
                param.copy_(full.to(dtype=param.dtype, device=param.device))
