"""Training in the test's own process through Megatron's `pretrain()` API, with the caller's providers.

A test that needs to see inside a step (which kernels run, whether the host waits for the device) passes its own
`model_provider` / `forward_step_func`, as a Megatron user does, wrapping pretrain_cocomix's. The caller holds a
world of one (the `single_process` fixture); megatron's model-parallel state is torn down after each run so the
next run builds its own, as tests/helpers/multi_run_worker.py does between runs.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from megatron.core import parallel_state


def train_in_process(argv: Sequence[str], model_provider: Optional[Callable] = None,
                     forward_step: Optional[Callable] = None) -> dict:
    """pretrain() with pretrain_cocomix's datasets provider and argument hook; returns its summary."""
    import pretrain_cocomix
    from megatron_cocomix.training.loop import pretrain

    try:
        return pretrain(pretrain_cocomix.train_valid_test_datasets_provider,
                        model_provider or pretrain_cocomix.model_provider,
                        forward_step or pretrain_cocomix.forward_step, argv=list(argv),
                        extra_args_hook=pretrain_cocomix.resolve_concept_args)
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()


def attention_layers(model) -> list:
    """(global layer number, attention module) of each transformer layer of a model chunk, in order; the attention
    module's `core_attention` is the kernel call (SDPAttention, or megatron's DotProductAttention)."""
    return [(module.layer_number, module) for module in model.modules() if hasattr(module, "core_attention")]
