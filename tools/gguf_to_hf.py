"""Dequantise a .gguf causal LM into a Hugging Face model directory (float32 safetensors + its tokenizer).

    python tools/gguf_to_hf.py --model SmolLM2-135M-Instruct.Q4_1.gguf --output teachers/smollm2 [--overwrite]
    python tools/extract_concepts.py --teacher-model teachers/smollm2 ...

Every tool's --teacher-model reads a .gguf directly, but transformers parses its metadata and 49k-token vocabulary
in Python on each load (~15-20 s on 2 CPU cores for SmolLM2-135M) where the written directory loads in about a
second: a pipeline that starts a dozen processes on one teacher converts it once. The weights are transformers'
dequantisation of the file, the same numbers --teacher-model FILE.gguf gives; the directory is written next to
--output and renamed into place after the check below, so an interrupted run leaves no half-written teacher.

Check: the written directory, loaded as a teacher, gives the .gguf teacher's next-token logits on fixed texts
(the same float32 weights: equal to 1e-5) and its tokenizer the same ids.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_cocomix.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # before transformers is imported

from megatron_cocomix.errors import cli_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--model", required=True, help="The .gguf file.")
    parser.add_argument("--output", required=True, help="Directory to write the Hugging Face model to.")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty --output.")
    return parser


def _check(gguf_model, gguf_tokenizer, directory: str, gguf: str) -> None:
    import torch

    from megatron_cocomix.concepts.teacher import (
        DEFAULT_CHECK_TEXTS,
        check_teacher_tokenizer,
        load_hf_model,
        load_teacher_tokenizer,
    )
    from megatron_cocomix.data.tokenizer import build_tokenizer_from_flags

    check_teacher_tokenizer(gguf, build_tokenizer_from_flags("HuggingFaceTokenizer", tokenizer_model=directory),
                            teacher_tokenizer=gguf_tokenizer)
    written = load_hf_model(directory, torch.float32).eval()
    tokenizer = load_teacher_tokenizer(directory)
    with torch.no_grad():
        for text in DEFAULT_CHECK_TEXTS[:2]:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            expected, got = gguf_model(input_ids=ids).logits, written(input_ids=ids).logits
            if not torch.allclose(got, expected, rtol=1e-5, atol=1e-5):
                diff = (got - expected).abs().max().item()
                raise RuntimeError(f"--output {directory}: the written model's logits differ from {gguf}'s by {diff} "
                                   f"on {text!r}")


@cli_main
def main(argv: Optional[List[str]] = None) -> int:
    options = build_parser().parse_args(argv)
    import torch

    from megatron_cocomix.concepts.teacher import load_hf_model, load_teacher_tokenizer
    from megatron_cocomix.conversion.export import check_output
    from megatron_cocomix.files import publishing_dir

    if not os.path.isfile(options.model) or not options.model.endswith(".gguf"):
        raise ValueError(f"--model {options.model}: expected a .gguf file")
    check_output(options.output, options.overwrite)
    try:
        model = load_hf_model(options.model, torch.float32).eval()
        tokenizer = load_teacher_tokenizer(options.model)
    except (ValueError, KeyError, OSError, struct.error) as e:
        raise ValueError(f"--model {options.model}: not a readable gguf causal LM ({type(e).__name__}: {e})") from None
    with publishing_dir(options.output) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _check(model, tokenizer, tmp, options.model)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"wrote {options.output}: {type(model).__name__}, {parameters / 1e6:.1f}M parameters (float32), "
          f"vocabulary {len(tokenizer)}; logits and token ids checked against {options.model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
