"""Held-out language modelling of checkpoints and Hugging Face models: loss, perplexity, bits per byte.

    python tools/evaluate.py --load CKPT_A CKPT_B [--iteration N] --hf-model HF_DIR [--name A B C] \
        --data-path PREFIX [--split 969,30,1 --eval-split valid|test] [--seq-length C --stride S] \
        [--max-documents N] [--batch-size 8] [--output-json FILE] [--output-md FILE]

One row per model, in the order given. A checkpoint runs as its own megatron model (TP1, this process) with its
saved tokenizer; an HF directory through AutoModelForCausalLM (remote code: CoCoMix exports; local files only).
Each document is scored on its own after one EOD token, with a sliding window past the context; the maths is in
megatron_cocomix/evaluation/lm.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import List, Optional

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_cocomix.errors import cli_main  # noqa: E402

# megatron-core announces on import that it runs without Transformer Engine / Apex: noise for an evaluation.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


class _Models(argparse.Action):
    """--load / --hf-model append (kind, path) to one list, so rows keep the command line's order."""

    def __call__(self, parser, namespace, values, option_string=None):
        kind = "checkpoint" if self.dest == "load" else "hf"
        namespace.models = (namespace.models or []) + [(kind, v) for v in values]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.set_defaults(models=None)
    parser.add_argument("--load", nargs="+", action=_Models, help="Training checkpoint directory(ies).")
    parser.add_argument("--iteration", type=int, default=None, help="With --load: iteration (default latest).")
    parser.add_argument("--hf-model", nargs="+", action=_Models, help="Hugging Face directory(ies).")
    parser.add_argument("--name", nargs="+", action="extend", default=None,
                        help="A name per model, in the order the models are given (default: directory name).")
    parser.add_argument("--data-path", required=True, help="Prefix of the .bin/.idx token dataset.")
    parser.add_argument("--split", default=None, help="Training's --split (default 969,30,1 with --eval-split; needs --eval-split).")
    parser.add_argument("--eval-split", default=None, help="valid or test: score only that part of the documents.")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="Context in tokens (default: the trained sequence length, else the model's positions).")
    parser.add_argument("--stride", type=int, default=None, help="Sliding-window stride (default context // 2).")
    parser.add_argument("--max-documents", type=int, default=None, help="Score only the first N documents.")
    parser.add_argument("--batch-size", type=int, default=8, help="Windows per forward (does not change results).")
    parser.add_argument("--output-json", default=None, help="Write every number and its settings here.")
    parser.add_argument("--output-md", default=None, help="Write the markdown table here.")
    parser.add_argument("--no-progress", action="store_true", help="No tqdm progress bar.")
    g = parser.add_argument_group(
        "CoCoMix concept prediction",
        "Concept loss and top-1 / top-k accuracy of the models with a concept layer, on windows of --seq-length "
        "tokens of the same held-out documents, against the teacher's labels: computed online (the training "
        "run's --teacher-model, --teacher-layer and --sae) or read from --concept-labels.")
    g.add_argument("--teacher-model", default=None, help="The students' teacher: HF directory or .gguf file.")
    g.add_argument("--teacher-layer", type=int, default=None, help="Hook: the teacher's hidden_states[layer].")
    g.add_argument("--sae", default=None, help="The TopK SAE the students' labels came from.")
    g.add_argument("--teacher-dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="As training's flag.")
    g.add_argument("--concept-num-labels", type=int, default=4, help="Labels per token (as training).")
    g.add_argument("--concept-attribution", choices=["act", "preact", "abs"], default="act",
                   help="Attribution score (as training).")
    g.add_argument("--concept-label-masking", choices=["ignore", "reference"], default="ignore",
                   help="Label convention (as training).")
    g.add_argument("--concept-labels", default=None,
                   help="Labels of these held-out windows written by tools/extract_concepts.py --eval-split "
                        "(instead of the online teacher).")
    g.add_argument("--concept-max-windows", type=int, default=None, help="Score at most N windows.")
    return parser


def _concept_labels(options, documents, seq_length: int, progress: bool):
    """(windows [n, s], labels [n, s, K]) of the held-out documents, online or from --concept-labels."""
    from megatron_cocomix.evaluation import concepts

    windows = concepts.concept_windows(documents.docs, seq_length, options.concept_max_windows)
    if options.concept_labels:
        return windows, concepts.read_eval_labels(options.concept_labels, documents, windows)
    labeler = concepts.OnlineLabeler(options.teacher_model, options.teacher_layer, options.sae,
                                     options.concept_num_labels, options.concept_attribution,
                                     options.concept_label_masking, options.teacher_dtype)
    return windows, concepts.label_windows(labeler, windows, options.batch_size, progress)


@cli_main
def main(argv: Optional[List[str]] = None) -> int:
    options = build_parser().parse_args(argv)
    from megatron_cocomix.evaluation import concepts, lm

    models = options.models or []
    if not models:
        raise ValueError("give at least one model: --load CKPT_DIR and/or --hf-model HF_DIR")
    names = options.name or []
    if names and len(names) != len(models):
        raise ValueError(f"--name: {len(names)} names for {len(models)} models")
    if options.eval_split is not None and options.eval_split not in ("valid", "test"):
        raise ValueError(f"--eval-split {options.eval_split!r}: expected valid or test")
    online = [f for f in ("teacher_model", "teacher_layer", "sae") if getattr(options, f) is not None]
    if online and len(online) < 3:
        missing = sorted({"teacher_model", "teacher_layer", "sae"} - set(online))
        raise ValueError(f"concept evaluation needs --teacher-model, --teacher-layer and --sae: missing "
                         f"{', '.join('--' + m.replace('_', '-') for m in missing)}")
    concept_eval = bool(online) or options.concept_labels is not None
    # Every input is checked before the first model is loaded.
    documents = lm.read_documents(options.data_path, options.split, options.eval_split, options.max_documents)
    for flag in ("teacher_model", "sae"):
        if getattr(options, flag) is not None and not os.path.exists(getattr(options, flag)):
            raise FileNotFoundError(f"--{flag.replace('_', '-')} {getattr(options, flag)}: no such file or directory")
    for kind, path in models:
        if kind == "checkpoint":
            lm.check_checkpoint(path, options.iteration)
        else:
            lm.check_hf_dir(path)

    rows = []
    concept_data = None  # (seq_length, windows, labels): labelled once, scored for every concept model
    for index, (kind, path) in enumerate(models):
        name = names[index] if names else None
        scorer = (lm.checkpoint_scorer(path, options.iteration, name) if kind == "checkpoint"
                  else lm.hf_scorer(path, name))
        context, stride = lm.resolve_context(scorer, options.seq_length, options.stride)
        numbers = lm.score(scorer, documents.docs, context, stride, options.batch_size,
                           progress=not options.no_progress)
        rows.append({"name": scorer.name, "kind": kind, "path": scorer.path, "parameters": scorer.parameters,
                     "vocab_size": scorer.vocab_size,
                     **scorer.extra, **numbers, "data_path": documents.prefix, "split": documents.split,
                     "eval_split": documents.eval_split,
                     # the split's sequences [begin, end) of the index, before --max-documents
                     "document_range": [documents.begin, documents.end], "first_document": documents.begin,
                     "documents_in_split": documents.end - documents.begin, "context": context, "stride": stride,
                     "batch_size": options.batch_size})
        if concept_eval and scorer.concept_logits is not None:
            if concept_data is None or concept_data[0] != context:
                concept_data = (context, *_concept_labels(options, documents, context, not options.no_progress))
            _, windows, labels = concept_data
            rows[-1].update(concepts.score_concepts(scorer.concept_logits, scorer.concept_topk, windows, labels,
                                                    options.batch_size, scorer.name, not options.no_progress))
        del scorer
    table = lm.markdown_table(rows)
    if any("concept_loss" in row for row in rows):
        table += "\n" + concepts.markdown_table(rows)
    print(table, end="", flush=True)
    if options.output_md:
        with open(options.output_md, "w") as f:
            f.write(table)
    if options.output_json:
        settings = {k: getattr(options, k) for k in ("data_path", "split", "eval_split", "seq_length", "stride",
                                                      "max_documents", "batch_size", "iteration", "teacher_model",
                                                      "teacher_layer", "sae", "teacher_dtype", "concept_num_labels",
                                                      "concept_attribution", "concept_label_masking",
                                                      "concept_labels", "concept_max_windows")}
        with open(options.output_json, "w") as f:
            json.dump({"settings": settings, "models": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
