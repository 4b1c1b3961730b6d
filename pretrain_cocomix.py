"""Pretrain a GPT with megatron-core, optionally with CoCoMix (continuous concept mixing).

Shaped like Megatron-LM's pretrain_gpt.py: `model_provider`, `get_batch`, `loss_func`, `forward_step`,
`train_valid_test_datasets_provider`, then `pretrain(...)`. Launch with torchrun or the deepspeed launcher:

    torchrun --nproc_per_node 8 pretrain_cocomix.py --tensor-model-parallel-size 2 ... (Megatron flags)
    deepspeed pretrain_cocomix.py --deepspeed --deepspeed_config ds_config.json ...

The CoCoMix delta over plain GPT pretraining: layers >= --concept-layer come from `concept_layer_spec_for`
(model/concept_mixing.py), the stage holding the concept layer also reads the batch (token ids for online labels,
or precomputed labels), and the concept loss joins the NTP loss inside that layer. KD adds a teacher KL term
to the loss on the last stage.

With no arguments at all it runs the tiny CPU quickstart (examples/quickstart_args.txt).
"""

from __future__ import annotations

import megatron_cocomix  # noqa: F401  (first: its import keeps megatron.core from importing wandb at start-up)
from megatron_cocomix.quiet import quiet_third_party

quiet_third_party()  # before megatron-core is imported

# isort: split
import os
import sys
from functools import partial
from typing import Dict, Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.utils import get_attr_wrapped_model, get_model_config

from megatron_cocomix import compat, metrics
from megatron_cocomix.global_vars import get_args, get_teacher, get_tokenizer, set_teacher
from megatron_cocomix.model.concept_mixing import CONCEPT_METRICS, concept_layer_spec_for, find_concept_mixing
from megatron_cocomix.model.gpt import build_gpt_model, build_transformer_config, gpt_block_spec, gpt_layer_spec
from megatron_cocomix.model.losses import kd_kl_divergence
from megatron_cocomix.training.loop import pretrain

QUICKSTART_ARGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples", "quickstart_args.txt")


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None):
    """The megatron-core GPTModel for this pipeline stage (and virtual stage)."""
    args = get_args()
    config = build_transformer_config(args)
    if args.cocomix:
        # Every rank joins the reduction of the concept layer's metrics, whichever stage holds the layer.
        metrics.declare(*CONCEPT_METRICS)
    layer_spec_for = None
    if args.cocomix or args.pause_tokens:
        layer_spec_for = concept_layer_spec_for(args, gpt_layer_spec(args))
    block_spec = gpt_block_spec(args, config, vp_stage, layer_spec_for)
    return build_gpt_model(args, config, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage,
                           block_spec=block_spec)


def get_batch(data_iterator, vp_stage: Optional[int] = None, concept_stage: bool = False,
              kd_states: bool = False) -> Dict[str, torch.Tensor]:
    """The tensors this stage needs, read on TP rank 0 and broadcast to the other TP ranks (as Megatron).

    First stage: tokens, position ids (and the attention mask); last stage: labels and loss mask (and for KD the
    tokens, or with `kd_states` the teacher's precomputed final states); the stage holding the concept layer:
    tokens (online labels) or the precomputed concept labels."""
    args = get_args()
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    online = args.concept_labels == "online"
    int_keys, float_keys = [], []
    if first or (last and args.kd and not kd_states) or (concept_stage and online):
        int_keys.append("tokens")
    if first:
        int_keys.append("position_ids")
    if last:
        int_keys.append("labels")
        float_keys.append("loss_mask")
        if kd_states:
            float_keys.append("teacher_states")
    if concept_stage and not online:
        int_keys.append("concept_labels")
    if not int_keys:
        return {}
    data = next(data_iterator) if data_iterator is not None else None
    batch = _broadcast(int_keys, data, torch.int64)
    if float_keys:
        batch.update(_broadcast(float_keys, data, torch.float32))
    if first and args.reset_attention_mask:
        batch.update(_broadcast(["attention_mask"], data, torch.bool))
    return batch


def _broadcast(keys, data, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """megatron's broadcast_data from TP rank 0 (it reads the tensor sizes back on the host first). At TP=1 there
    is nobody to send to: a copy from the loader's pinned memory that the host does not wait for."""
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        return tensor_parallel.broadcast_data(keys, data, dtype)
    return {key: data[key].to(compat.device(), non_blocking=True).to(dtype) for key in keys}


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Per-token cross-entropy [b, s] -> (sum, token count, {'lm loss': [sum, count]}); the schedule divides."""
    losses = output_tensor.float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses.view(-1) * loss_mask)
    num_tokens = loss_mask.sum().to(torch.int)
    report = torch.cat([loss.detach().view(1), num_tokens.float().view(1)])
    return loss, num_tokens, {"lm loss": report}


def kd_loss_func(labels: torch.Tensor, loss_mask: torch.Tensor, teacher_log_probs: torch.Tensor,
                 logits: torch.Tensor):
    """NTP + kd_weight x KL(teacher || student), both summed over tokens (the schedule divides by the count)."""
    args = get_args()
    ce = vocab_parallel_cross_entropy(logits.float().clone(), labels)
    mask = loss_mask.float()
    ce_sum = (ce * mask).sum()
    kl_sum, count = kd_kl_divergence(logits, teacher_log_probs, loss_mask)
    loss = ce_sum + args.kd_weight * kl_sum
    num_tokens = mask.sum().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.stack([ce_sum.detach(), count]),
                              "kd loss": torch.stack([kl_sum.detach(), count])}


def _set_concept_loss_scale(model) -> None:
    """The concept loss enters the backward on its own stage: scale it like the main loss (1 / micro-batches,
    times the fp16 loss scale), as megatron's schedule does for MoE auxiliary losses."""
    config = get_model_config(model)
    scale = torch.ones(1, device=compat.device())
    if config.grad_scale_func is not None:
        scale = config.grad_scale_func(scale)
    MoEAuxLossAutoScaler.set_loss_scale(scale / get_args().num_micro_batches)


def forward_step(data_iterator, model):
    args = get_args()
    vp_stage = get_attr_wrapped_model(model, "vp_stage")
    concept_stage = args.cocomix and find_concept_mixing(model) is not None
    # Precomputed teacher states exist for the training samples only (KD validation runs the student alone).
    kd_states = bool(args.kd and args.kd_teacher_states and model.training)
    batch = get_batch(data_iterator, vp_stage, concept_stage, kd_states)
    tokens, labels = batch.get("tokens"), batch.get("labels")
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)

    extra_block_kwargs = None
    if concept_stage:
        if args.concept_labels == "online":
            concept_labels = get_teacher().concept_labels(tokens)
        else:
            concept_labels = batch["concept_labels"]
        # [b, s, K] -> [s, b, K]; carried to the concept layer in the block's `context` argument.
        extra_block_kwargs = {"context": concept_labels.transpose(0, 1).contiguous()}
        _set_concept_loss_scale(model)

    input_ids = tokens if first else None
    position_ids = batch.get("position_ids")
    attention_mask = batch.get("attention_mask")
    if args.kd and labels is not None and model.training:
        # Training only: validation reports the LM loss, what compares with the other students, without paying
        # a teacher forward per validation batch (design §6).
        logits = model(input_ids, position_ids, attention_mask, extra_block_kwargs=extra_block_kwargs)
        if kd_states:
            teacher_log_probs = get_teacher().log_probs_from_final_states(batch["teacher_states"])
        else:
            teacher_log_probs = get_teacher().log_probs(tokens)
        return logits, partial(kd_loss_func, labels, batch["loss_mask"], teacher_log_probs)
    output_tensor = model(input_ids, position_ids, attention_mask, labels=labels,
                          extra_block_kwargs=extra_block_kwargs)
    return output_tensor, partial(loss_func, batch.get("loss_mask"))


def train_valid_test_datasets_provider(train_val_test_num_samples):
    from megatron_cocomix.data.datasets import build_train_valid_test_datasets

    args = get_args()
    if args.teacher_model and (args.kd or (args.cocomix and args.concept_labels == "online")):
        from megatron_cocomix.concepts.labeling import check_teacher_reads_student_ids

        check_teacher_reads_student_ids(args, get_tokenizer(), args.teacher_shape.vocab_size)
    train, valid, test = build_train_valid_test_datasets(args, get_tokenizer(), train_val_test_num_samples)
    if args.kd and args.kd_teacher_states:
        train = _attach_teacher_states(args, train)
    if args.cocomix and args.concept_labels != "online":
        from megatron_cocomix.concepts.labeling import ConceptLabeledDataset

        train = _attach_precomputed_labels(args, train)
        valid, test = (ConceptLabeledDataset(ds, None, args.seq_length, args.concept_num_labels)
                       if ds is not None else None for ds in (valid, test))
    return train, valid, test


def _attach_precomputed_labels(args, train):
    from megatron_cocomix.concepts.labeling import ConceptLabeledDataset
    from megatron_cocomix.data.concept_labels import ConceptLabelsDataset, expected_fingerprint

    labels = ConceptLabelsDataset(args.concept_labels)
    if labels.fingerprint.get("eval_split"):
        raise ValueError(f"--concept-labels {args.concept_labels}: labels of the held-out "
                         f"{labels.fingerprint['eval_split']} windows (extract_concepts.py --eval-split), not of "
                         f"training samples")
    if args.teacher_model and args.sae:
        from megatron_cocomix.concepts.sae import sae_fingerprint

        expected = expected_fingerprint(args, get_tokenizer(), len(labels), sae_fingerprint(args.sae))
        labels.check_fingerprint(expected, ignore={"num_samples"})
    return ConceptLabeledDataset(train, labels, args.seq_length,
                                 samples_needed=args.train_iters * args.global_batch_size)


def _attach_teacher_states(args, train):
    from megatron_cocomix.data.concept_labels import expected_fingerprint
    from megatron_cocomix.data.teacher_states import TeacherStatesAttached, TeacherStatesDataset

    states = TeacherStatesDataset(args.kd_teacher_states)
    if states.d_model != args.teacher_shape.hidden_size:
        raise ValueError(f"--kd-teacher-states {args.kd_teacher_states}: states of width {states.d_model} but teacher "
                         f"{args.teacher_model} has hidden size {args.teacher_shape.hidden_size}")
    states.check_fingerprint(expected_fingerprint(args, get_tokenizer(), len(states), sae_sha256=None),
                             ignore={"num_samples"})
    return TeacherStatesAttached(train, states, args.train_iters * args.global_batch_size, args.seq_length)


def resolve_concept_args(args) -> None:
    """The values CoCoMix derives from files, resolved once before the arguments are frozen: the teacher's shape
    (its config, checked against --teacher-layer), the SAE's shape (its header: width checked against the
    teacher, C -> --concept-dim, k for the FLOPs), or C from the precomputed labels; and the run's teacher."""
    from megatron_cocomix.concepts.labeling import OnlineTeacher
    from megatron_cocomix.concepts.sae import read_sae_shape
    from megatron_cocomix.concepts.teacher import read_teacher_shape

    uses_teacher = args.kd or (args.cocomix and args.concept_labels == "online")
    if args.teacher_model and (args.cocomix or args.kd):
        args.teacher_shape = teacher = read_teacher_shape(args.teacher_model)
        if args.cocomix and args.teacher_layer is not None and not 1 <= args.teacher_layer < teacher.num_layers:
            raise ValueError(f"--teacher-layer {args.teacher_layer} is out of range for teacher {args.teacher_model}: "
                             f"it has {teacher.num_layers} blocks (1 <= layer <= {teacher.num_layers - 1})")
    if uses_teacher:
        set_teacher(OnlineTeacher(args))
    if not args.cocomix:
        return
    num_latents = None
    if args.sae:
        sae = read_sae_shape(args.sae)
        num_latents, args.sae_topk = sae.num_latents, sae.k
        if args.teacher_shape is not None and sae.d_model != args.teacher_shape.hidden_size:
            raise ValueError(f"--sae {args.sae} reads width {sae.d_model} but teacher {args.teacher_model} has "
                             f"hidden size {args.teacher_shape.hidden_size}")
    elif args.concept_labels != "online":
        from megatron_cocomix.data.concept_labels import read_fingerprint

        num_latents = int(read_fingerprint(args.concept_labels)["num_latents"])
    if args.concept_dim is None:
        args.concept_dim = num_latents
    elif num_latents is not None and num_latents != args.concept_dim:
        raise ValueError(f"--concept-dim {args.concept_dim} disagrees with the SAE's {num_latents} latents")


def _quickstart_argv() -> list:
    with open(QUICKSTART_ARGS) as f:
        return [tok for line in f if not line.lstrip().startswith("#") for tok in line.split()]


def main(argv=None) -> dict:
    return pretrain(train_valid_test_datasets_provider, model_provider, forward_step, argv=argv,
                    extra_args_hook=resolve_concept_args)


if __name__ == "__main__":
    if len(sys.argv) == 1:
        os.chdir(os.path.dirname(os.path.abspath(__file__)))  # the quickstart's paths are relative to the repo
    main(sys.argv[1:] or _quickstart_argv())
