"""CoCoMixForCausalLM.concept_logits: the concept layer's logits, equal to the SAE layer norm + predictor applied by
hand to the residual stream entering block L; pause-token models have none."""

import pytest
import torch
import torch.nn.functional as F

from megatron_cocomix.hf import CoCoMixConfig, CoCoMixForCausalLM


def _model(mixing="concept"):
    torch.manual_seed(0)
    config = CoCoMixConfig(vocab_size=97, n_positions=64, n_embd=32, n_layer=4, n_head=4, concept_dim=48,
                           insert_layer_idx=2, concept_num=4, activation_function="gelu_new", mixing=mixing)
    model = CoCoMixForCausalLM(config).eval()
    with torch.no_grad():  # pre_bias is zero at initialisation: make it count
        if mixing == "concept":
            model.transformer.pre_bias.normal_(0, 0.5)
    return model


def test_concept_logits_are_the_predictor_on_the_stream_entering_the_concept_layer():
    model = _model()
    tokens = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    captured = []
    model.transformer.h[1].register_forward_hook(lambda module, inputs, output: captured.append(output))
    with torch.no_grad():
        logits = model.concept_logits(tokens)
        h = captured[-1]  # [b, t, d], the output of block L-1
        mu = h.mean(-1, keepdim=True)
        std = (h - mu).std(-1, keepdim=True, unbiased=True)
        predictor = model.transformer.concept_predictor
        expected = F.linear((h - mu) / (std + 1e-5) - model.transformer.pre_bias, predictor.weight, predictor.bias)
    assert logits.shape == (2, 9, 48)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_pause_model_has_no_concept_logits():
    with pytest.raises(ValueError, match="pause-token model has no concept head"):
        _model("pause").concept_logits(torch.zeros(1, 3, dtype=torch.long))
