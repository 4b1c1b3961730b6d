"""Tokens/s of the exported CoCoMix class on CPU: generate() with the KV cache against without it.

    PYTHONPATH=. python benchmarks/hf_generation_cpu.py [--threads 1]

A randomly initialised small CoCoMix model (GPT-2 vocabulary, d=256, 8 blocks, concept layer 4, C=4096, k=32),
one prompt of 64 tokens, 64 new greedy tokens (min_new_tokens so both runs generate the same count). The two runs
must produce the same tokens; the rates are new tokens per second of wall time, best of three.
"""

import argparse
import time

import torch

from megatron_cocomix.hf import CoCoMixConfig, CoCoMixForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    torch.manual_seed(0)
    config = CoCoMixConfig(vocab_size=50257, n_positions=256, n_embd=256, n_layer=8, n_head=8, concept_dim=4096,
                           insert_layer_idx=4, concept_num=32, activation_function="gelu_new")
    model = CoCoMixForCausalLM(config).eval()
    prompt = torch.randint(0, 50257, (1, 64))
    results = {}
    for use_cache in (True, False):
        best, tokens = 0.0, None
        for _ in range(3):
            start = time.perf_counter()
            with torch.no_grad():
                tokens = model.generate(prompt, max_new_tokens=options.new_tokens, min_new_tokens=options.new_tokens,
                                        do_sample=False, use_cache=use_cache, pad_token_id=0)
            best = max(best, options.new_tokens / (time.perf_counter() - start))
        results[use_cache] = (best, tokens)
    assert torch.equal(results[True][1], results[False][1])
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"CoCoMix class, {params:.1f}M parameters, {options.threads} threads, prompt 64, {options.new_tokens} new "
          f"tokens: cached {results[True][0]:.1f} tokens/s, uncached {results[False][0]:.1f} tokens/s")


if __name__ == "__main__":
    main()
