"""Held-out language modelling and zero-shot tasks (lm-eval, local files) of checkpoints and Hugging Face models.

    python tools/evaluate.py --load CKPT_A CKPT_B [--iteration N] --hf-model HF_DIR [--name A B C] \
        [--data-path PREFIX [--data-name NAME] [--split 969,30,1 --eval-split valid|test] [--stride S] \
            [--max-documents N]] \
        [--tasks lambada_openai,wikitext,hellaswag,piqa,social_iqa,arc_easy,winogrande --task-data-dir DIR \
            [--limit N]] \
        [--teacher-model T --teacher-layer L --sae SAE | --concept-labels PREFIX] \
        [--seq-length C] [--batch-size 8] [--output-json FILE] [--output-md FILE]

One row per model, in the order given; --data-path, --tasks or both. Held-out perplexity: a checkpoint runs as its
own megatron model (TP1, this process) with its saved tokenizer; an HF directory through AutoModelForCausalLM
(remote code: CoCoMix exports; local files only). Each document is scored on its own after one EOD token, with a
sliding window past the context; the maths is in megatron_cocomix/evaluation/lm.py. Zero-shot tasks: lm-eval's
own task configs on local JSON-lines files, the model wrapped by lm-eval's HFLM (a checkpoint through its
export); see megatron_cocomix/evaluation/zero_shot.py. With --tasks the table is laid out as the paper's Table 1:
the --data-path perplexity under --data-name (e.g. OpenWebText), then LAMBADA, WikiText (lm-eval's word
perplexity) and the accuracies.
CoCoMix concept prediction (with --data-path and the teacher flags or --concept-labels): concept loss, top-1 and
top-k accuracy of the models with a concept layer against the teacher's labels, on --seq-length windows of the
same held-out documents; see megatron_cocomix/evaluation/concepts.py.

Under torchrun (torchrun --nproc_per_node N tools/evaluate.py --load CKPT ...) each checkpoint is split over the
ranks at --tensor-model-parallel-size x --pipeline-model-parallel-size (default: its saved layout; any layout
loads), data parallel over the rest of the world, and run through megatron-core's forward-only schedule; a
Hugging Face model is loaded on every rank, each scoring a share of the windows. Rank 0 prints and writes the
same table and JSON as one process (perplexity and concept metrics); zero-shot tasks (--tasks) run in one
process only. See megatron_cocomix/evaluation/parallel.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_cocomix.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # before megatron-core and transformers are imported

from megatron_cocomix.arguments import TEACHER_DTYPE_CHOICES  # noqa: E402
from megatron_cocomix.errors import cli_main  # noqa: E402


class _Models(argparse.Action):
    """--load / --hf-model append (kind, path) to one list, so rows keep the command line's order."""

    def __call__(self, parser, namespace, values, option_string=None):
        kind = "checkpoint" if self.dest == "load" else "hf"
        namespace.models = (namespace.models or []) + [(kind, v) for v in values]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], allow_abbrev=False,
        epilog="Under torchrun (torchrun --nproc_per_node N tools/evaluate.py --load CKPT --data-path PREFIX ...) "
               "each checkpoint is split over the ranks at --tensor-model-parallel-size x "
               "--pipeline-model-parallel-size (default: its saved layout), data parallel over the rest; Hugging "
               "Face models share the windows over every rank; rank 0 reports. --tasks runs in one process only.")
    parser.set_defaults(models=None)
    parser.add_argument("--load", nargs="+", action=_Models, help="Training checkpoint directory(ies).")
    parser.add_argument("--iteration", type=int, default=None, help="With --load: iteration (default latest).")
    parser.add_argument("--hf-model", nargs="+", action=_Models, help="Hugging Face directory(ies).")
    parser.add_argument("--name", nargs="+", action="extend", default=None,
                        help="A name per model, in the order the models are given (default: directory name).")
    parser.add_argument("--data-path", default=None,
                        help="Prefix of the .bin/.idx token dataset: held-out perplexity (this and/or --tasks).")
    parser.add_argument("--data-name", default=None,
                        help="The --data-path corpus's name, heading its perplexity column ('NAME ppl', e.g. "
                             "OpenWebText or WikiText-103; default 'held-out ppl') and kept in --output-json.")
    parser.add_argument("--split", default=None, help="Training's --split (default 969,30,1 with --eval-split; needs --eval-split).")
    parser.add_argument("--eval-split", default=None, help="valid or test: score only that part of the documents.")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="Context in tokens, also lm-eval's max_length (default: the trained sequence length, "
                             "else the model's positions).")
    parser.add_argument("--stride", type=int, default=None, help="Sliding-window stride (default context // 2).")
    parser.add_argument("--max-documents", type=int, default=None, help="Score only the first N documents.")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="Windows per forward for held-out perplexity (does not change results); lm-eval's "
                             "batch size for --tasks.")
    parser.add_argument("--output-json", default=None, help="Write every number and its settings here.")
    parser.add_argument("--output-md", default=None, help="Write the markdown table here.")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=None,
                        help="Under torchrun: split each --load checkpoint over this many ranks (default: its saved "
                             "TP); one process evaluates at TP1 whatever the saved layout.")
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=None,
                        help="Under torchrun: pipeline stages of each --load checkpoint (default: its saved PP); "
                             "the world / (TP x PP) data-parallel replicas share the windows.")
    parser.add_argument("--no-progress", action="store_true",
                        help="No tqdm progress bars of this tool and of datasets (lm-eval keeps its own).")
    from megatron_cocomix.evaluation import zero_shot

    zero_shot.add_arguments(parser)
    g = parser.add_argument_group(
        "CoCoMix concept prediction",
        "Concept loss and top-1 / top-k accuracy of the models with a concept layer, on windows of --seq-length "
        "tokens of the --data-path held-out documents, against the teacher's labels: computed online (the "
        "training run's --teacher-model, --teacher-layer and --sae) or read from --concept-labels.")
    g.add_argument("--teacher-model", default=None, help="The students' teacher: HF directory or .gguf file.")
    g.add_argument("--teacher-layer", type=int, default=None, help="Hook: the teacher's hidden_states[layer].")
    g.add_argument("--sae", default=None, help="The TopK SAE the students' labels came from.")
    g.add_argument("--teacher-dtype", choices=TEACHER_DTYPE_CHOICES, default="fp32", help="As training's flag.")
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


CONCEPT_SETTINGS = ("teacher_model", "teacher_layer", "sae", "teacher_dtype", "concept_num_labels",
                    "concept_attribution", "concept_label_masking", "concept_labels", "concept_max_windows")


class ConceptEvaluation:
    """The teacher's labels of the held-out windows, made once (per window length) and scored for every model with
    a concept layer."""

    def __init__(self, options, documents):
        self.options, self.documents, self.cached = options, documents, None

    def __call__(self, scorer, seq_length: int) -> dict:
        from megatron_cocomix.evaluation import concepts

        if scorer.concept_logits is None:
            return {}
        options = self.options
        if self.cached is None or self.cached[0] != seq_length:
            windows = concepts.concept_windows(self.documents.docs, seq_length, options.concept_max_windows)
            if options.concept_labels:
                labels = concepts.read_eval_labels(options.concept_labels, self.documents, windows)
            else:
                labeler = concepts.online_labeler(options.teacher_model, options.teacher_layer, options.sae,
                                                  options.concept_num_labels, options.concept_attribution,
                                                  options.concept_label_masking, options.teacher_dtype)
                labels = concepts.label_windows(labeler, windows, options.batch_size, not options.no_progress)
            self.cached = (seq_length, windows, labels)
        _, windows, labels = self.cached
        return concepts.score_concepts(scorer.concept_logits, scorer.concept_topk, windows, labels,
                                       options.batch_size, scorer.name, not options.no_progress,
                                       scorer.data_parallel, scorer.all_reduce)


def _check_concept_flags(options) -> bool:
    """Whether concept prediction is evaluated; one error line for an incomplete or misplaced set of flags."""
    online = [f for f in ("teacher_model", "teacher_layer", "sae") if getattr(options, f) is not None]
    if online and len(online) < 3:
        missing = sorted({"teacher_model", "teacher_layer", "sae"} - set(online))
        raise ValueError(f"concept evaluation needs --teacher-model, --teacher-layer and --sae: missing "
                         f"{', '.join('--' + m.replace('_', '-') for m in missing)}")
    if online and options.concept_labels:
        raise ValueError("--concept-labels replaces --teacher-model / --teacher-layer / --sae: give one or the other")
    wanted = bool(online) or options.concept_labels is not None
    if wanted and options.data_path is None:
        raise ValueError("concept evaluation scores the --data-path held-out documents: give --data-path")
    for flag in ("teacher_model", "sae"):
        if getattr(options, flag) is not None and not os.path.exists(getattr(options, flag)):
            raise FileNotFoundError(f"--{flag.replace('_', '-')} {getattr(options, flag)}: no such file or directory")
    if options.concept_labels and not os.path.exists(options.concept_labels + ".json"):
        raise FileNotFoundError(f"--concept-labels {options.concept_labels}: no {options.concept_labels}.json "
                                f"(write it with tools/extract_concepts.py --eval-split)")
    return wanted


@cli_main
def main(argv: Optional[List[str]] = None) -> int:
    from megatron_cocomix.errors import BAD_INPUT, EXIT_BAD_INPUT
    from megatron_cocomix.evaluation import parallel

    try:
        return _main(argv)
    except BAD_INPUT:
        if parallel.launched() and parallel.rank() != 0:
            return EXIT_BAD_INPUT  # every rank checks the same inputs: rank 0 says it once
        raise


def _check_launch(options, tasks) -> bool:
    """Whether this is one rank of a launch; one error line for what a launch does not do."""
    from megatron_cocomix.evaluation import parallel

    layout = {"--tensor-model-parallel-size": options.tensor_model_parallel_size,
              "--pipeline-model-parallel-size": options.pipeline_model_parallel_size}
    if not parallel.launched():
        for flag, value in layout.items():
            if value not in (None, 1):
                raise ValueError(f"{flag} {value}: one process evaluates at TP1 / PP1; launch with torchrun "
                                 f"--nproc_per_node N tools/evaluate.py ... to split a model over ranks")
        return False
    if tasks is not None:
        raise ValueError("zero-shot tasks (--tasks) run in one process: run tools/evaluate.py without torchrun "
                         "for them")
    from megatron_cocomix.arguments import check_parallel_sizes

    # A checkpoint's saved layout (the default) is checked when it loads; explicit sizes before any model loads.
    tensor, pipeline = (1 if value is None else value for value in layout.values())
    check_parallel_sizes(int(os.environ["WORLD_SIZE"]), tensor, pipeline)
    return True


def _main(argv: Optional[List[str]]) -> int:
    options = build_parser().parse_args(argv)
    from megatron_cocomix.evaluation import concepts, lm, parallel, zero_shot

    models = options.models or []
    if not models:
        raise ValueError("give at least one model: --load CKPT_DIR and/or --hf-model HF_DIR")
    names = options.name or []
    if names and len(names) != len(models):
        raise ValueError(f"--name: {len(names)} names for {len(models)} models")
    if options.data_path is None and options.tasks is None:
        raise ValueError("give --data-path PREFIX (held-out perplexity) and/or --tasks with --task-data-dir "
                         "(zero-shot tasks)")
    if options.data_name is not None:
        if options.data_path is None:
            raise ValueError("--data-name names the --data-path corpus: give --data-path")
        if not options.data_name.strip() or "|" in options.data_name or "\n" in options.data_name:
            raise ValueError(f"--data-name {options.data_name!r}: expected a non-empty name without '|' or line "
                             f"breaks (it heads a markdown column)")
    if options.eval_split is not None and options.eval_split not in ("valid", "test"):
        raise ValueError(f"--eval-split {options.eval_split!r}: expected valid or test")
    # Every input is checked before the first model is loaded.
    concept_eval = _check_concept_flags(options)
    tasks = (zero_shot.check_tasks(options.tasks, options.task_data_dir, options.limit, options.bootstrap_iters)
             if options.tasks is not None else None)
    documents = (lm.read_documents(options.data_path, options.split, options.eval_split, options.max_documents)
                 if options.data_path is not None else None)
    if options.concept_labels:
        concepts.check_eval_labels(options.concept_labels, documents)
    for kind, path in models:
        if kind == "checkpoint":
            lm.check_checkpoint(path, options.iteration)
        else:
            lm.check_hf_dir(path)
    launched = _check_launch(options, tasks)
    if launched:
        parallel.init_world()

    rows = []
    concept_scores = ConceptEvaluation(options, documents) if concept_eval else None
    for index, (kind, path) in enumerate(models):
        name = names[index] if names else None
        row = {}
        if documents is not None:
            row = held_out_row(options, documents, kind, path, name, concept_scores)
        if tasks is not None:
            model = zero_shot.load_model(kind, path, options.iteration, name)
            numbers = zero_shot.evaluate(model, tasks, options.seq_length, options.batch_size, options.limit,
                                         options.bootstrap_iters, progress=not options.no_progress)
            row = {"name": model.name, "kind": kind, "path": model.path, "parameters": model.parameters,
                   "iteration": model.iteration, "tokens_seen": model.tokens_seen, **row, **numbers}
            del model
        rows.append(row)
    table = zero_shot.markdown_table(rows, tasks) if tasks is not None else lm.markdown_table(rows)
    if any("concept_loss" in row for row in rows):
        table += "\n" + concepts.markdown_table(rows)
    if launched and parallel.rank() != 0:
        return 0  # every rank holds the numbers; rank 0 reports them
    print(table, end="", flush=True)
    if options.output_md:
        with open(options.output_md, "w") as f:
            f.write(table)
    if options.output_json:
        settings = {k: getattr(options, k) for k in ("data_path", "data_name", "split", "eval_split", "seq_length",
                                                      "stride", "max_documents", "batch_size", "iteration")}
        if launched:
            settings["world_size"] = int(os.environ["WORLD_SIZE"])
        if concept_eval:
            settings["concepts"] = {k: getattr(options, k) for k in CONCEPT_SETTINGS}
        if tasks is not None:
            settings["zero_shot"] = zero_shot.settings(tasks, options.task_data_dir, options.limit,
                                                       options.bootstrap_iters)
        with open(options.output_json, "w") as f:
            json.dump({"settings": settings, "models": rows}, f, indent=2)
    return 0


def held_out_row(options, documents, kind: str, path: str, name: Optional[str],
                 concept_scores: Optional[ConceptEvaluation] = None) -> dict:
    """Held-out loss, perplexity and bits per byte of one model (and its concept prediction), with settings."""
    from megatron_cocomix.evaluation import lm, parallel

    if not parallel.launched():
        scorer = (lm.checkpoint_scorer(path, options.iteration, name) if kind == "checkpoint"
                  else lm.hf_scorer(path, name))
    elif kind == "checkpoint":
        scorer = parallel.checkpoint_scorer(path, options.iteration, name, options.tensor_model_parallel_size,
                                            options.pipeline_model_parallel_size, options.batch_size)
    else:
        scorer = parallel.hf_scorer(path, name)
    context, stride = lm.resolve_context(scorer, options.seq_length, options.stride)
    numbers = lm.score(scorer, documents.docs, context, stride, options.batch_size, progress=not options.no_progress)
    if concept_scores is not None:
        numbers.update(concept_scores(scorer, context))
    return {"name": scorer.name, "kind": kind, "path": scorer.path, "parameters": scorer.parameters,
            "vocab_size": scorer.vocab_size,
            **scorer.extra, **numbers, "data_path": documents.prefix, "data_name": options.data_name,
            "split": documents.split,
            "eval_split": documents.eval_split,
            # the split's sequences [begin, end) of the index, before --max-documents
            "document_range": [documents.begin, documents.end], "first_document": documents.begin,
            "documents_in_split": documents.end - documents.begin, "context": context, "stride": stride,
            "batch_size": options.batch_size}


if __name__ == "__main__":
    code = main()
    from megatron_cocomix.distributed import destroy_distributed

    destroy_distributed()
    sys.exit(code)
