"""Held-out evaluation under a launcher (torchrun): checkpoints split over ranks at a TP x PP layout, data parallel
over the rest of the world (docs/design.md §18).

Every rank builds its stage and tensor-parallel shard of the checkpoint (conversion/checkpoint.py's
`load_checkpoint_parallel`: training's model building and parallel state, dist_checkpointing resharding any saved
layout) and walks the same documents, windows and batches as one process (evaluation/lm.py); only "log p of the
targets of a batch" differs. Each model replica (a TP x PP group) scores every DP-th batch; a batch is padded to a
fixed shape [micro-batch x micro-batches, s] (the pipeline exchanges activations of one shape per call, and every
rank of a replica holds the same batch; padded rows and positions are never scored, and attention is causal) and
run through megatron-core's forward-only schedule. On the last stage the vocabulary-parallel logits are gathered
over TP and turned into log p(targets) over the true vocabulary (lm.log_probs_of_targets, as one process); TP rank
0 of the last stage accumulates the per-document NLL, and a sum over the world gives every rank the totals.

Concept metrics: the concept logits are captured on the stage that holds the concept layer during the same
schedule, gathered over TP (column-parallel over C), and that stage's TP rank 0 adds the sums of
concepts.score_concepts, which are then summed over the world.

Hugging Face models under a launcher: every rank loads the whole model and scores a 1 / world share of the
batches (data parallel only), through the same path.
"""

from __future__ import annotations

import datetime
import os
from functools import partial
from typing import List, Optional

import torch

from megatron_cocomix.evaluation import lm


def launched() -> bool:
    """Whether this process is one of several started by a launcher (torchrun sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def init_world() -> None:
    """The process group of the launch (NCCL with GPUs, gloo without, as training), before any model."""
    from megatron_cocomix import compat

    compat.install()
    if compat.cuda_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if compat.cuda_available() else "gloo",
                                             timeout=datetime.timedelta(minutes=10))


def all_reduce_sum(values: torch.Tensor, group=None) -> torch.Tensor:
    from megatron_cocomix import compat

    out = values.to(compat.device()).clone()
    torch.distributed.all_reduce(out, group=group)
    return out.cpu()


def hf_scorer(path: str, name: Optional[str] = None) -> lm.Scorer:
    """lm.hf_scorer on every rank, each scoring a 1 / world share of the batches."""
    scorer = lm.hf_scorer(path, name)
    scorer.data_parallel = (torch.distributed.get_rank(), torch.distributed.get_world_size())
    scorer.all_reduce = all_reduce_sum
    return scorer


def checkpoint_scorer(root: str, iteration: Optional[int], name: Optional[str], tensor: Optional[int],
                      pipeline: Optional[int], batch_size: int) -> lm.Scorer:
    """This rank's part of `root` at TP `tensor` x PP `pipeline` (default: as saved), as a Scorer whose callables
    run the forward-only schedule; `batch_size` windows per call (the schedule's fixed batch)."""
    from megatron.core import parallel_state

    from megatron_cocomix.conversion.checkpoint import load_checkpoint_parallel
    from megatron_cocomix.model.concept_mixing import ConceptMixing, find_concept_mixing

    lm.check_checkpoint(root, iteration)
    loaded = load_checkpoint_parallel(root, iteration, tensor, pipeline)
    args = loaded.args
    model = loaded.model.float()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    micro = -(-batch_size // pp)  # at least PP micro-batches per call keep every stage busy
    forward = _Forward(model, micro, -(-batch_size // micro))
    scorer = lm.loaded_checkpoint_scorer(loaded, root, name)
    scorer.data_parallel = (parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size())
    scorer.all_reduce = all_reduce_sum
    scorer.parameters = _parameters_without_padding(model, args.padded_vocab_size, scorer.vocab_size)
    scorer.target_log_probs = partial(forward.target_log_probs, scorer.vocab_size)
    scorer.extra["layout"] = {"tensor": args.tensor_model_parallel_size,
                              "pipeline": args.pipeline_model_parallel_size, "data": args.data_parallel_size}
    mixing = find_concept_mixing(model)
    # Every rank must agree that the model has a concept layer, whichever stage holds it.
    has_concepts = all_reduce_sum(torch.tensor([float(isinstance(mixing, ConceptMixing))]))
    if float(has_concepts[0]) > 0:
        scorer.concept_logits = forward.concept_logits
        scorer.concept_topk = args.concept_topk
    return scorer


def _parameters_without_padding(model: torch.nn.Module, padded_vocab_size: int, vocab_size: int) -> int:
    """The parameter count of the whole model (lm._parameters_without_padding of the TP1 / PP1 model) from the
    global shapes of every rank's sharded state: each tensor counted once by its checkpoint key (TP shards,
    layers of every stage and the tied output layer share keys), less the vocabulary padding rows."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    shapes = {}
    state = model.sharded_state_dict()
    apply_factories(state)  # e.g. SwiGLU's fused fc1, saved as its two halves under one key
    for value in _leaves(state):
        if isinstance(value, ShardedTensor) and not value.key.endswith("_extra_state"):
            shapes[value.key] = tuple(value.global_shape)
    gathered: List[dict] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, shapes)
    merged = {key: shape for part in gathered for key, shape in part.items()}
    total = 0
    for key, shape in merged.items():
        numel = 1
        for d in shape:
            numel *= d
        if key.endswith(("word_embeddings.weight", "output_layer.weight")) and shape[0] == padded_vocab_size:
            numel -= (padded_vocab_size - vocab_size) * (numel // shape[0])
        total += numel
    return total


def _leaves(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(tree=value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _leaves(tree=value)
    else:
        yield tree


class _Forward:
    """megatron-core's forward-only schedule over one batch [b, s], padded to [micro x num_micro, s]: one shape for
    every micro-batch of a call, the same on every rank of a replica (they all hold the same batch)."""

    def __init__(self, model: torch.nn.Module, micro: int, num_micro: int):
        self.model, self.micro, self.num_micro = model, micro, num_micro

    def _run(self, tokens: torch.Tensor, output_func) -> list:
        """The schedule over `tokens` [b, s] padded with rows of id 0 (never scored); returns what `output_func`
        gave per micro-batch on the last stage (an empty list elsewhere)."""
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_cocomix import compat, metrics

        rows, width = self.micro * self.num_micro, tokens.shape[1]
        padded = torch.zeros((rows, width), dtype=torch.long)
        padded[:tokens.shape[0], :tokens.shape[1]] = tokens
        device = compat.device()
        first = parallel_state.is_pipeline_first_stage()
        model = self.model

        def step(data_iterator, chunk):
            part = next(data_iterator).to(device)
            positions = torch.arange(width, device=device).unsqueeze(0).expand_as(part)
            output = chunk(part if first else None, positions, None)
            return output, output_func

        parts = [padded[i * self.micro:(i + 1) * self.micro] for i in range(self.num_micro)]
        with torch.no_grad():
            out = get_forward_backward_func()(
                forward_step_func=step, data_iterator=iter(parts), model=[model], num_microbatches=self.num_micro,
                seq_length=width, micro_batch_size=self.micro, forward_only=True, collect_non_loss_data=True)
        metrics.reset()  # the concept layer records training metrics on every forward
        return out

    def target_log_probs(self, vocab_size: int, tokens: torch.Tensor, mask: torch.Tensor,
                         targets: torch.Tensor) -> Optional[torch.Tensor]:
        from megatron.core import parallel_state, tensor_parallel

        from megatron_cocomix import compat

        rows, width = self.micro * self.num_micro, tokens.shape[1]
        padded_targets = torch.zeros((rows, width), dtype=torch.long)
        padded_targets[:targets.shape[0], :targets.shape[1]] = targets
        parts = iter([padded_targets[i * self.micro:(i + 1) * self.micro] for i in range(self.num_micro)])

        def output_func(logits, non_loss_data=True):
            # [b, s, V / TP] -> [b, s, V] on every TP rank of the last stage (a collective of the TP group)
            full = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
            return lm.log_probs_of_targets(full, next(parts).to(compat.device()), vocab_size).cpu()

        out = self._run(tokens, output_func)
        if not (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0):
            return None
        return torch.cat(out)[:tokens.shape[0], :tokens.shape[1]]

    def concept_logits(self, tokens: torch.Tensor) -> Optional[torch.Tensor]:
        """Concept logits [b, s, C] on TP rank 0 of the stage holding the concept layer (None elsewhere)."""
        from megatron.core import parallel_state, tensor_parallel

        from megatron_cocomix.model.concept_mixing import find_concept_mixing

        mixing = find_concept_mixing(self.model)
        captured = []
        handle = None
        if mixing is not None:
            handle = mixing.predictor.register_forward_hook(
                lambda module, inputs, output: captured.append(
                    tensor_parallel.gather_from_tensor_model_parallel_region(output[0]).transpose(0, 1).float()))
        try:
            self._run(tokens, lambda output, non_loss_data=True: None)
        finally:
            if handle is not None:
                handle.remove()
        if mixing is None or parallel_state.get_tensor_model_parallel_rank() != 0:
            return None
        return torch.cat(captured).cpu()[:tokens.shape[0]]


__all__ = ["launched", "rank", "init_world", "hf_scorer", "checkpoint_scorer"]
