"""Concept steering in the exported CoCoMix class: chosen concept logits scaled (or shifted) before the top-k at
the concept layer, at every position of the prompt and of the generation, as a generate() argument."""

import pytest
import torch

from megatron_cocomix.hf import CoCoMixConfig, CoCoMixForCausalLM


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = CoCoMixConfig(vocab_size=97, n_positions=64, n_embd=32, n_layer=4, n_head=4, concept_dim=64,
                           insert_layer_idx=2, concept_num=4, activation_function="gelu_new")
    return CoCoMixForCausalLM(config).eval()


def _generate(model, prompt, **kwargs):
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=True,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.logits)


def test_scale_one_is_the_unsteered_model(model):
    prompt = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    tokens, logits = _generate(model, prompt)
    steered_tokens, steered_logits = _generate(model, prompt, concept_steering={5: 1.0, 17: 1.0})
    assert torch.equal(tokens, steered_tokens) and torch.equal(logits, steered_logits)
    added_tokens, added_logits = _generate(model, prompt, concept_steering={5: 0.0, "mode": "add"})
    assert torch.equal(tokens, added_tokens) and torch.equal(logits, added_logits)


def test_large_scale_puts_a_positive_concept_in_every_top_k(model):
    """At every position where the chosen concept's logit is positive, scale 100 puts it into the top-k (a
    multiplicative scale cannot lift a negative logit); -10 takes it out of every top-k."""
    prompt = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(2))
    k = model.config.concept_num
    with torch.no_grad():
        _, logits, _ = model.transformer(prompt)
        concept = int((logits[0] > 0).sum(dim=0).argmax())  # positive at the most positions
        positive = logits[0, :, concept] > 0
        before = (logits[0].topk(k, dim=-1).indices == concept).any(-1)
        assert (positive & ~before).any(), "already in those top-k: the test would prove nothing"
        _, steered, _ = model.transformer(prompt, concept_steering={concept: 100.0})
        after = (steered[0].topk(k, dim=-1).indices == concept).any(-1)
        assert after[positive].all()
        _, suppressed, _ = model.transformer(prompt, concept_steering={concept: -10.0})
        assert not (suppressed[0].topk(k, dim=-1).indices == concept).any(-1)[positive].any()
        # An additive shift lifts it everywhere.
        _, shifted, _ = model.transformer(prompt, concept_steering={concept: 100.0, "mode": "add"})
        assert (shifted[0].topk(k, dim=-1).indices == concept).any(-1).all()
    # ... and steering changes what the model says next.
    _, logits_out = _generate(model, prompt)
    _, steered_out = _generate(model, prompt, concept_steering={concept: 100.0})
    assert not torch.allclose(logits_out, steered_out)
