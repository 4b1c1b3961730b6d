"""A checkpoint's megatron model (TP1, this process) and its Hugging Face export, both in fp32 on this machine's
device (the GPU where there is one), on the prompts tools/convert_to_hf.py verifies with.

Usage: python tests/helpers/export_logits_worker.py CHECKPOINT_DIR EXPORT_DIR
(with the repository root on PYTHONPATH, as tests/helpers/launch.py's test_env() sets it)
Prints one JSON line: the two models' devices, max |logit difference| and mean KL (conversion/export.py).
"""

import json
import sys

import torch

from megatron_cocomix.conversion.checkpoint import load_checkpoint_tp1, megatron_logits
from megatron_cocomix.conversion.export import compare_logits, fixed_prompts, hf_logits, load_export
from megatron_cocomix.distributed import destroy_distributed


def main() -> None:
    checkpoint, export = sys.argv[1:3]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_checkpoint_tp1(checkpoint)
    model = loaded.model.float().to(device)
    hf = load_export(export, torch.float32).to(device)
    vocab = hf.config.vocab_size
    tokens = fixed_prompts(vocab, loaded.args.seq_length)
    reference = megatron_logits(model, tokens)[..., :vocab]
    exported = hf_logits(hf, tokens.to(device)).cpu()
    devices = {str(p.device) for p in model.parameters()} | {str(p.device) for p in hf.parameters()}
    print(json.dumps({"devices": sorted(devices), **compare_logits(reference, exported)}), flush=True)
    destroy_distributed()


if __name__ == "__main__":
    main()
