"""Inspect the concepts of a CoCoMix model on one text: per token, the student's top predicted concepts (ids and
logits) and, with a teacher and SAE, the teacher's attribution labels beside them.

    python tools/inspect_concepts.py --hf-model HF_DIR --text "To be, or not to be" [--top 5]
    python tools/inspect_concepts.py --load CKPT_DIR [--iteration N] --text ... \
        --teacher-model MODEL --teacher-layer 6 --sae SAE [--concept-num-labels 4 --concept-attribution act] \
        [--latent-descriptions explanations.json] [--html concepts.html]

The student's concept logits come from the concept layer of the CoCoMix class (CoCoMixForCausalLM.concept_logits);
a checkpoint is converted to that class in memory, as tools/convert_to_hf.py would write it. The teacher labels are
computed by the function training and tools/extract_concepts.py use, with the same flags, on the student's
tokenisation of the text (the teacher must share the student's tokenizer). The logic is in
megatron_cocomix/concepts/inspection.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import List, Optional

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_cocomix.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # before megatron-core and transformers are imported

from megatron_cocomix.errors import cli_main  # noqa: E402

NO_CONCEPT_HEAD = "has no concept head (not a CoCoMix model)"


def build_parser() -> argparse.ArgumentParser:
    from megatron_cocomix.concepts.attribution import ATTRIBUTION_MODES
    from megatron_cocomix.concepts.teacher import TEACHER_DTYPES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     epilog="Example: python tools/inspect_concepts.py --hf-model HF_DIR --text "
                                            "\"To be, or not to be\" --teacher-model MODEL --teacher-layer 6 "
                                            "--sae SAE --html concepts.html")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-model", metavar="HF_DIR", help="A CoCoMix export (tools/convert_to_hf.py).")
    source.add_argument("--load", metavar="CKPT_DIR", help="A CoCoMix training checkpoint directory.")
    parser.add_argument("--iteration", type=int, default=None, help="With --load: iteration (default latest).")
    parser.add_argument("--text", required=True, help="The text to inspect (tokenised by the student's tokenizer).")
    parser.add_argument("--top", type=int, default=5, metavar="N",
                        help="Predicted concepts shown per token (default 5).")
    teacher = parser.add_argument_group("teacher labels (training's flags and defaults)")
    teacher.add_argument("--teacher-model", metavar="MODEL", help="Local Hugging Face model directory or .gguf file.")
    teacher.add_argument("--teacher-layer", type=int, metavar="N", help="The SAE reads the teacher's hidden_states[N].")
    teacher.add_argument("--sae", metavar="SAE", help="TopK SAE: OpenAI .pt, SAELens folder or sparsify folder.")
    teacher.add_argument("--concept-num-labels", type=int, default=4, metavar="K",
                         help="Attribution labels per token (4).")
    teacher.add_argument("--concept-attribution", choices=ATTRIBUTION_MODES, default="act",
                         help="Attribution score (act).")
    teacher.add_argument("--concept-label-masking", choices=["ignore", "reference"], default="ignore",
                         help="ignore: non-positive scores and the last position have no label; reference: the "
                              "official top K over all latents.")
    teacher.add_argument("--teacher-dtype", choices=list(TEACHER_DTYPES), default="fp32",
                         help="Precision of the frozen teacher (fp32).")
    teacher.add_argument("--no-tokenizer-check", action="store_true",
                         help="Compare only the vocabulary sizes of the teacher's and the student's tokenizers.")
    output = parser.add_argument_group("output")
    output.add_argument("--latent-descriptions", metavar="FILE",
                        help="Words for the concept ids: JSON {\"id\": \"text\"} or a list of {index|id, "
                             "description|explanation} (e.g. exported from Neuronpedia), JSON lines, or CSV with "
                             "id,description columns; .gz allowed.")
    output.add_argument("--html", metavar="FILE", help="Also write a self-contained HTML page (hover a token for its "
                                                       "concepts).")
    output.add_argument("--latents-page", metavar="URL",
                        help="With --html: link each concept id to its card on this page of tools/describe_latents.py "
                             "(URL#latent-<id>; a path relative to the --html file, e.g. latents.html).")
    return parser


def _check_options(options: argparse.Namespace) -> bool:
    """True when teacher labels are asked for."""
    if options.top <= 0:
        raise ValueError(f"--top must be positive, got {options.top}")
    teacher_flags = {"--teacher-model": options.teacher_model, "--teacher-layer": options.teacher_layer,
                     "--sae": options.sae}
    given = [flag for flag, value in teacher_flags.items() if value is not None]
    if given and len(given) != len(teacher_flags):
        missing = [flag for flag in teacher_flags if flag not in given]
        raise ValueError(f"{', '.join(given)} needs {' and '.join(missing)} too (teacher labels need all three)")
    if options.concept_num_labels <= 0:
        raise ValueError(f"--concept-num-labels must be positive, got {options.concept_num_labels}")
    if options.latents_page and not options.html:
        raise ValueError("--latents-page links the --html page's concept ids: give --html too")
    if options.html:
        parent = os.path.dirname(os.path.abspath(options.html))
        if os.path.isdir(options.html) or not os.path.isdir(parent):
            raise ValueError(f"--html {options.html}: not a file in an existing directory")
    return bool(given)


def _load_hf(path: str):
    """(CoCoMix model, tokenizer) of an export, through this package's class (an export's own copy of it may
    predate concept_logits)."""
    from transformers import AutoTokenizer

    from megatron_cocomix.hf import CoCoMixForCausalLM

    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"--hf-model {path}: no config.json there")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("model_type") != "cocomix" or config.get("mixing", "concept") != "concept":
        kind = "pause-token" if config.get("model_type") == "cocomix" else config.get("model_type", "unknown")
        raise ValueError(f"--hf-model {path}: this {kind} model {NO_CONCEPT_HEAD}")
    model = CoCoMixForCausalLM.from_pretrained(path, local_files_only=True)
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def _load_checkpoint(root: str, iteration: Optional[int], directory: str):
    from megatron_cocomix.conversion.export import hf_model_from_checkpoint

    def needs_concepts(args) -> None:
        if not args.cocomix:
            kind = "pause-token" if args.pause_tokens else "NTP"
            raise ValueError(f"--load {root}: this {kind} checkpoint {NO_CONCEPT_HEAD}")

    return hf_model_from_checkpoint(root, iteration, directory, check_args=needs_concepts)


def load_concept_model(hf_model: Optional[str], load: Optional[str], iteration: Optional[int]):
    """(CoCoMix model, tokenizer) of an export (--hf-model) or a checkpoint (--load, converted in memory); a model
    without a concept head is refused in one line. Shared with tools/steer.py."""
    with tempfile.TemporaryDirectory() as directory:
        if hf_model:
            return _load_hf(hf_model)
        return _load_checkpoint(load, iteration, directory)


@cli_main
def main(argv: Optional[List[str]] = None) -> int:
    options = build_parser().parse_args(argv)
    with_teacher = _check_options(options)
    import torch
    from transformers.utils import logging as transformers_logging

    from megatron_cocomix.concepts import inspection

    transformers_logging.disable_progress_bar()  # loading one small model needs no bar on the terminal

    descriptions = None
    if options.latent_descriptions:  # read before any model, so a bad file fails at once
        descriptions = inspection.load_latent_descriptions(options.latent_descriptions)
    model, tokenizer = load_concept_model(options.hf_model, options.load, options.iteration)
    config = model.config
    if options.top > config.concept_dim:
        raise ValueError(f"--top {options.top}: the model has {config.concept_dim} concepts")
    if descriptions is not None:
        descriptions = inspection.load_latent_descriptions(options.latent_descriptions, config.concept_dim)
    ids = tokenizer(options.text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if ids.numel() == 0:
        raise ValueError("--text: the text has no tokens")
    if config.position_embedding_type == "learned_absolute" and ids.numel() > config.n_positions:
        raise ValueError(f"--text has {ids.numel()} tokens but the model takes at most {config.n_positions}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.float().to(device).eval()
    with torch.no_grad():
        concept_logits = model.concept_logits(ids[None].to(device))[0]
    labels = None
    if with_teacher:
        labels = inspection.teacher_labels(
            ids, tokenizer, options.teacher_model, options.teacher_layer, options.sae, config.concept_dim,
            options.concept_num_labels, options.concept_attribution, options.concept_label_masking,
            options.teacher_dtype, check_tokenizer=not options.no_tokenizer_check)
    texts = inspection.token_pieces(tokenizer, ids.tolist())
    rows = inspection.inspection_rows(ids.tolist(), texts, concept_logits, options.top, labels)

    source = options.hf_model or options.load
    notes = [f"model {source}: concept layer at block {config.insert_layer_idx} of {config.n_layer}, "
             f"{config.concept_dim} concepts, top {config.concept_num} mixed"]
    if with_teacher:
        notes.append(f"teacher {options.teacher_model} layer {options.teacher_layer}, SAE {options.sae}: "
                     f"{options.concept_num_labels} {options.concept_attribution} attribution labels per token "
                     f"({options.concept_label_masking} masking)")
    print("\n".join(notes))
    print(inspection.format_table(rows, descriptions, options.concept_attribution if with_teacher else None), end="")
    if options.html:
        title = f"Concepts of {os.path.join(*os.path.normpath(source).split(os.sep)[-2:])}"
        page = inspection.render_html(rows, descriptions, title=title, notes=notes + [f"text: {options.text}"],
                                      latent_url=options.latents_page)
        with open(options.html, "w", encoding="utf-8") as f:
            f.write(page)
        print(f"wrote {options.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
