"""Zero-shot downstream tasks through lm-evaluation-harness, read from local JSON-lines files: the tasks of the
CoCoMix paper's Table 1 (LAMBADA, WikiText, HellaSwag, PIQA, Social IQa, ARC-Easy, WinoGrande) under lm-eval's
names.

Tasks. Each task is lm-eval's own config from the installed package (lm_eval/tasks/<folder>/<file>.yaml, found by
lm-eval's TaskManager): its prompts (doc_to_text / doc_to_target / doc_to_choice, and the python helpers of
hellaswag and winogrande, by reference), metrics and filters are used as they are. Only the data source is
replaced, the way lm-eval's own group configs override a task: the `json` loader on DIR/<task>/<split>.jsonl,
where <split> is the split lm-eval evaluates (the config's test split when it has one, else validation) and each
line is one document in the schema of the Hugging Face dataset the config names (e.g. `datasets.load_dataset(
"baber/piqa", split="validation").to_json("DIR/piqa/validation.jsonl")`). Zero-shot: no training or few-shot split
is read. Every file is checked (present, one JSON object per line, the fields the prompts read) before any model
is loaded.

Models. lm-eval's HFLM wraps a transformers model already loaded in float32 from local files (remote code allowed:
CoCoMix exports) with its tokenizer. A checkpoint is first exported by megatron_cocomix.conversion (the model
tools/convert_to_hf.py writes) into a temporary directory and loaded from there as its export would be. The
longest input (lm-eval's max_length; longer contexts lose their first tokens) is the trained sequence length,
as for held-out perplexity, unless --seq-length sets it.

Offline. The hub and `datasets` are switched to offline mode in this process while lm-eval runs, and the datasets
cache is a temporary directory: nothing is downloaded and nothing is left in the user's cache.

WikiText is lm-eval's `wikitext` task: each document (a whole Wikipedia article, the `page` field of
EleutherAI/wikitext_document_level) is detokenised by lm-eval's `wikitext_detokenizer` and scored by rolling
log-likelihood (lm-eval's disjoint windows of the model's max_length, the first one after the tokenizer's BOS, or
EOS, token); word perplexity is exp(-sum of log-likelihoods / sum of words), the words of each document counted
in its raw text as lm-eval counts them (the pieces between runs of whitespace); byte perplexity and bits per byte
divide by the UTF-8 bytes instead. WikiText-2 and WikiText-103 share their test split, so its test.jsonl is the
paper's WikiText-103 column.

Reported: lm-eval's aggregated metrics per task under its names (acc, acc_norm, perplexity, word_perplexity,
byte_perplexity, bits_per_byte, their *_stderr; accuracies are fractions in [0, 1]) and the documents scored.
Table 1 shows each task's main metric as the paper does (LAMBADA perplexity and accuracy, WikiText word
perplexity, HellaSwag acc_norm, the others acc) and the average of those accuracies.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from megatron_cocomix.evaluation import lm


@dataclass(frozen=True)
class TaskSpec:
    folder: str                          # lm-eval's config folder under lm_eval/tasks
    title: str                           # the paper's name for the task
    fields: Tuple[str, ...]              # fields of a document that lm-eval's prompts read
    metrics: Tuple[str, ...]             # Table 1's metrics for the task: perplexities (PERPLEXITIES) or accuracies


# In the paper's column order.
TASKS: Dict[str, TaskSpec] = {
    "lambada_openai": TaskSpec("lambada", "LAMBADA", ("text",), ("perplexity", "acc")),
    "wikitext": TaskSpec("wikitext", "WikiText", ("page",), ("word_perplexity",)),
    "hellaswag": TaskSpec("hellaswag", "HellaSwag", ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
                          ("acc_norm",)),
    "piqa": TaskSpec("piqa", "PIQA", ("goal", "sol1", "sol2", "label"), ("acc",)),
    "social_iqa": TaskSpec("siqa", "SIQA", ("context", "question", "answerA", "answerB", "answerC", "label"),
                           ("acc",)),
    "arc_easy": TaskSpec("arc", "ARC-Easy", ("question", "choices", "answerKey"), ("acc",)),
    "winogrande": TaskSpec("winogrande", "WinoGrande", ("sentence", "option1", "option2", "answer"), ("acc",)),
}
PERPLEXITIES = ("perplexity", "word_perplexity")  # Table 1's metrics that are not accuracies
GROUP = "megatron_cocomix_zero_shot"  # the group that carries the data overrides (never reported)


@dataclass
class TaskData:
    name: str        # lm-eval's task name
    split: str       # the split lm-eval evaluates
    path: str        # DIR/<name>/<split>.jsonl
    documents: int   # lines of the file
    source: str      # the Hugging Face dataset lm-eval's config names
    config: str      # lm-eval's config file (yaml)


# ----------------------------------------------------------------------------------------------------- inputs
def add_arguments(parser) -> None:
    group = parser.add_argument_group("zero-shot tasks (lm-evaluation-harness, local files)")
    group.add_argument("--tasks", default=None,
                       help=f"Comma-separated lm-eval task names, of {','.join(TASKS)}: zero-shot accuracies "
                            f"(lambada_openai also perplexity; wikitext word and byte perplexity, bits per byte) "
                            f"of every model, from --task-data-dir.")
    group.add_argument("--task-data-dir", default=None,
                       help="Directory holding <task>/<split>.jsonl, one document per line in the schema of the "
                            "Hugging Face dataset lm-eval uses (piqa/validation.jsonl, hellaswag/validation.jsonl, "
                            "lambada_openai/test.jsonl, wikitext/test.jsonl, social_iqa/validation.jsonl, "
                            "arc_easy/test.jsonl, winogrande/validation.jsonl).")
    group.add_argument("--limit", type=int, default=None,
                       help="lm-eval's limit: score only the first N documents of each task (quick runs).")
    group.add_argument("--bootstrap-iters", type=int, default=1000,
                       help="lm-eval's bootstrap resamples for the perplexity stderr (default 1000; 0: no stderrs).")


def _lm_eval_tasks_root() -> str:
    import lm_eval

    return os.path.join(os.path.dirname(lm_eval.__file__), "tasks")


def _task_manager():
    from lm_eval.tasks import TaskManager

    # Only the folders of the shipped tasks are indexed: the whole package takes seconds to index.
    return TaskManager(include_path=[os.path.join(_lm_eval_tasks_root(), spec.folder) for spec in TASKS.values()],
                       include_defaults=False)


def task_index() -> Dict[str, Tuple[dict, str]]:
    """{task: (lm-eval's config as its yaml reads, python helpers unresolved; the yaml's path)} of the shipped
    tasks."""
    return {name: (entry.cfg, str(entry.yaml_path)) for name, entry in _task_manager().task_index.items()
            if name in TASKS}


def check_tasks(tasks: str, data_dir: Optional[str], limit: Optional[int] = None,
                bootstrap_iters: int = 0) -> List[TaskData]:
    """The requested tasks and their files, every file checked; raises a one-line ValueError / FileNotFoundError."""
    names = list(dict.fromkeys(t.strip() for t in tasks.split(",") if t.strip()))
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise ValueError(f"--tasks {tasks!r}: unknown task {', '.join(unknown) or '(none named)'}; supported: "
                         f"{', '.join(TASKS)}")
    if limit is not None and limit <= 0:
        raise ValueError(f"--limit must be positive, got {limit}")
    if bootstrap_iters < 0:
        raise ValueError(f"--bootstrap-iters must be >= 0, got {bootstrap_iters}")
    if data_dir is None:
        raise ValueError("--tasks needs --task-data-dir DIR holding DIR/<task>/<split>.jsonl")
    configs = task_index()
    found, missing = [], []
    for name in names:
        config, config_file = configs[name]
        split = config.get("test_split") or config["validation_split"]
        path = os.path.join(data_dir, name, f"{split}.jsonl")
        source = " ".join(str(x) for x in (config["dataset_path"], config.get("dataset_name")) if x)
        if os.path.isfile(path):
            found.append(TaskData(name, split, os.path.abspath(path), 0, source, config_file))
        else:
            missing.append(f"{name} needs {path} (not found; the {split} split of {source} as JSON lines)")
    if missing:
        raise FileNotFoundError(f"--task-data-dir: {', '.join(missing)}")
    for task in found:
        task.documents = _check_documents(task)
    return found


def _check_documents(task: TaskData) -> int:
    """Lines of the file; each must be a JSON object with the fields the task's prompts read."""
    fields = TASKS[task.name].fields
    count = 0
    with open(task.path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{task.path} line {number}: not JSON ({e.msg})") from None
            absent = [k for k in fields if not isinstance(doc, dict) or k not in doc]
            if absent:
                raise ValueError(f"{task.path} line {number}: no field {', '.join(absent)} ({task.name} documents "
                                 f"have {', '.join(fields)}, as {task.source})")
            count += 1
    if count == 0:
        raise ValueError(f"{task.path}: no document")
    return count


def settings(tasks: Sequence[TaskData], data_dir: str, limit: Optional[int], bootstrap_iters: int) -> dict:
    """The zero-shot settings for --output-json."""
    import lm_eval

    return {"task_data_dir": os.path.abspath(data_dir), "num_fewshot": 0, "limit": limit,
            "bootstrap_iters": bootstrap_iters, "lm_eval_version": lm_eval.__version__,
            "tasks": {t.name: {"data_file": t.path, "split": t.split, "documents": t.documents, "source": t.source,
                               "lm_eval_config": t.config, "table_metrics": list(TASKS[t.name].metrics)}
                      for t in tasks}}


# ----------------------------------------------------------------------------------------------------- models
@dataclass
class LoadedModel:
    name: str
    kind: str                # "checkpoint" or "hf"
    path: str
    parameters: int
    tokens_seen: Optional[int]
    iteration: Optional[int]
    model: torch.nn.Module
    tokenizer: object
    max_context: int
    default_context: int


def load_model(kind: str, path: str, iteration: Optional[int] = None, name: Optional[str] = None) -> LoadedModel:
    """An HF directory as it is; a checkpoint through its export (conversion), written to and read back from a
    temporary directory."""
    default_name = os.path.basename(os.path.normpath(path))
    if kind == "hf":
        model, tokenizer, _ = lm.load_hf(path)
        return _loaded(name or default_name, "hf", os.path.abspath(path), None, None, model, tokenizer)
    from megatron_cocomix.conversion.export import checkpoint_to_hf, write_export

    lm.check_checkpoint(path, iteration)
    hf, loaded = checkpoint_to_hf(path, iteration)
    checkpoint, step, state, seq_length = loaded.path, loaded.iteration, loaded.tokenizer, loaded.args.seq_length
    with tempfile.TemporaryDirectory(prefix="zero-shot-export-") as tmp:
        directory = os.path.join(tmp, "export")
        # Saving imports DeepSpeed (transformers looks for it), whose logger writes to stdout: the table's.
        with contextlib.redirect_stdout(sys.stderr):
            write_export(hf, state, directory, "2GB", seq_length)
        del hf, loaded  # one copy of the weights in memory at a time
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        model, tokenizer, _ = lm.load_hf(directory)
    return _loaded(name or default_name, "checkpoint", checkpoint, lm.tokens_seen(checkpoint), step, model, tokenizer)


def _loaded(name, kind, path, tokens, iteration, model, tokenizer) -> LoadedModel:
    max_context, default_context = lm.hf_contexts(model.config, tokenizer)
    return LoadedModel(name=name, kind=kind, path=path, parameters=sum(p.numel() for p in model.parameters()),
                       tokens_seen=tokens, iteration=iteration, model=model, tokenizer=tokenizer,
                       max_context=max_context, default_context=default_context)


# ---------------------------------------------------------------------------------------------------- running
@contextlib.contextmanager
def _offline_quiet(progress: bool) -> Iterator[str]:
    """Offline hub and datasets, a temporary datasets cache, lm-eval's prints on stderr (stdout carries the
    table); yields the cache directory. Everything is restored afterwards."""
    import datasets
    import datasets.config
    import huggingface_hub.constants

    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "DISABLE_MULTIPROC")}
    # The libraries read these variables when imported (transformers and datasets may already be): their
    # module-level switches are set as well.
    saved_flags = (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE,
                   datasets.config.HF_DATASETS_OFFLINE)
    bars = datasets.is_progress_bar_enabled()
    # DISABLE_MULTIPROC: the perplexity bootstrap runs in this process rather than forking it (model and all).
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DISABLE_MULTIPROC="1")
    huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    datasets.config.HF_DATASETS_OFFLINE = True
    if not progress:
        datasets.disable_progress_bars()
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    for logger in loggers:
        logger.addFilter(_expected_warnings)
    try:
        with tempfile.TemporaryDirectory(prefix="zero-shot-datasets-") as cache, \
                contextlib.redirect_stdout(sys.stderr):
            yield cache
    finally:
        for logger in loggers:
            logger.removeFilter(_expected_warnings)
        if bars:
            datasets.enable_progress_bars()
        (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE,
         datasets.config.HF_DATASETS_OFFLINE) = saved_flags
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_QUIET_LOGGERS = ("lm_eval.models.huggingface", "lm_eval.api.task", "transformers.tokenization_utils_base")
_EXPECTED = (
    # HFLM warns whenever it wraps an already-loaded model, which is how it is used here.
    "already-initialized model", "model kwarg is not of type `str`",
    # lm-eval's wikitext config leaves its metrics' aggregations to lm-eval's defaults, as intended.
    "is defined, but aggregation is not", "is defined, but higher_is_better is not",
    # A rolling log-likelihood tokenises a whole article before cutting it into windows of the context.
    "Token indices sequence length is longer than the specified maximum sequence length",
)


def _expected_warnings(record: logging.LogRecord) -> bool:
    """False for the warnings that say nothing about this run (each is explained in _EXPECTED)."""
    message = record.getMessage()
    return not any(text in message for text in _EXPECTED)


def group_config(tasks: Sequence[TaskData], cache_dir: str) -> dict:
    """One lm-eval group whose members are the official tasks with only their data source (and zero shots)
    overridden."""
    members = []
    for task in tasks:
        members.append({
            "task": task.name, "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": {task.split: task.path}, "cache_dir": cache_dir},
            "training_split": None, "fewshot_split": None, "num_fewshot": 0,
            "validation_split": task.split if task.split == "validation" else None,
            "test_split": task.split if task.split == "test" else None,
        })
    return {"group": GROUP, "task": members}


def evaluate(model: LoadedModel, tasks: Sequence[TaskData], seq_length: Optional[int] = None, batch_size: int = 8,
             limit: Optional[int] = None, bootstrap_iters: int = 1000, progress: bool = True,
             log_likelihoods: bool = False) -> dict:
    """{max_length, tasks: {task: {metric: value, documents}}, average_acc} of one model (lm-eval's numbers);
    with `log_likelihoods` also {task: [[log-likelihood of each choice / target / whole document] of each
    document, in order]}."""
    context = seq_length or model.default_context
    if context <= 0 or context > model.max_context:
        raise ValueError(f"--seq-length {context}: {model.name} takes 1 to {model.max_context} positions")
    if batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    with _offline_quiet(progress) as cache:
        wrapped = HFLM(pretrained=model.model, tokenizer=model.tokenizer, backend="causal", batch_size=batch_size,
                       max_length=context)
        results = simple_evaluate(model=wrapped, tasks=[group_config(tasks, cache)], task_manager=_task_manager(),
                                  limit=limit, bootstrap_iters=bootstrap_iters, log_samples=log_likelihoods)
    out = {}
    for task in tasks:
        numbers = {}
        for key, value in results["results"][task.name].items():
            metric, _, filter_name = key.partition(",")
            if not filter_name:  # name, alias, sample_len
                continue
            # The shipped tasks have lm-eval's single "none" filter; another would keep its name.
            metric = metric if filter_name == "none" else key
            numbers[metric] = None if value == "N/A" else float(value)
        numbers["documents"] = int(results["n-samples"][task.name]["effective"])
        out[task.name] = numbers
    report = {"max_length": context, "tasks": out, "average_acc": average_accuracy(out)}
    if log_likelihoods:
        report["log_likelihoods"] = {
            # (log-likelihood, is greedy) per choice; a rolling log-likelihood (wikitext) is the number alone.
            task.name: [[float(r[0] if isinstance(r, (list, tuple)) else r) for r in sample["filtered_resps"]]
                        for sample in sorted(results["samples"][task.name], key=lambda x: x["doc_id"])]
            for task in tasks}
    return report


def average_accuracy(results: Dict[str, Dict[str, float]]) -> Optional[float]:
    """Mean of Table 1's accuracies (every metric of TASKS but the perplexities) over the tasks run."""
    values = [results[name][metric] for name, spec in TASKS.items() if name in results
              for metric in spec.metrics if metric not in PERPLEXITIES]
    return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------------------------------- report
def markdown_table(rows: Sequence[dict], tasks: Sequence[TaskData]) -> str:
    """The paper's Table 1: model, parameters, tokens seen, held-out perplexity (rows that have one, headed by
    the --data-path corpus's name), each task's main metric (perplexities as they are, accuracies in %), the
    average accuracy (%)."""
    names = [name for name in TASKS if name in {t.name for t in tasks}]
    columns = [(name, metric) for name in names for metric in TASKS[name].metrics]
    held_out = next((row for row in rows if "ppl" in row), None)
    head = ["model", "parameters", "tokens seen"] + ([f"{lm.data_label(held_out)} ppl"] if held_out else [])
    head += [f"{TASKS[name].title} {'ppl' if metric in PERPLEXITIES else metric + ' %'}" for name, metric in columns]
    head.append("average acc %")
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for row in rows:
        cells = [row["name"], lm.format_count(row["parameters"]),
                 lm.format_count(row["tokens_seen"]) if row.get("tokens_seen") is not None else "-"]
        if held_out:
            cells.append(_number(row.get("ppl")))
        for name, metric in columns:
            value = row["tasks"][name].get(metric)
            cells.append(_number(value) if metric in PERPLEXITIES else _number(value, 100.0))
        cells.append(_number(row.get("average_acc"), 100.0))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _number(value: Optional[float], scale: float = 1.0) -> str:
    if value is None or not math.isfinite(value):
        return "-" if value is None else str(value)
    return f"{value * scale:.2f}"
