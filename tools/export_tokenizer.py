"""Write a teacher's tokenizer as a Hugging Face tokenizer directory, so students can train on its ids.

    python tools/export_tokenizer.py --model SmolLM2-135M-Instruct.Q4_1.gguf --output tokenizers/smollm2
    python tools/preprocess_data.py ... --tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizers/smollm2

--model is what --teacher-model takes: a local Hugging Face directory or a .gguf file (whose tokenizer transformers
rebuilds from the gguf metadata). The written directory (tokenizer.json + tokenizer_config.json, ...) is then
checked against the model as training checks a teacher: the same text must give the same ids.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_cocomix.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # before megatron-core and transformers are imported

from megatron_cocomix.errors import cli_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--model", required=True, help="Local Hugging Face model directory or .gguf file.")
    parser.add_argument("--output", required=True, help="Directory to write the tokenizer files to.")
    return parser


@cli_main
def main(argv: Optional[List[str]] = None) -> int:
    options = build_parser().parse_args(argv)
    from megatron_cocomix.concepts.teacher import check_teacher_tokenizer, load_teacher_tokenizer
    from megatron_cocomix.data.tokenizer import build_tokenizer_from_flags

    if os.path.isfile(options.output):
        raise ValueError(f"--output {options.output}: is a file, expected a directory")
    tokenizer = load_teacher_tokenizer(options.model)
    os.makedirs(options.output, exist_ok=True)
    tokenizer.save_pretrained(options.output)
    # The students read the directory through the data tokenizer: it must give the teacher's ids.
    check_teacher_tokenizer(options.model, build_tokenizer_from_flags("HuggingFaceTokenizer",
                                                                      tokenizer_model=options.output),
                            teacher_tokenizer=tokenizer)
    print(f"wrote {options.output}: {type(tokenizer).__name__}, vocabulary {len(tokenizer)}, "
          f"eos {tokenizer.eos_token!r} ({tokenizer.eos_token_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
