"""The results table of examples/pipeline.sh, from what its stages wrote under RUN_DIR.

    python examples/pipeline_report.py --run-dir runs/pipeline --teacher tiny --output runs/pipeline/results.md

Reads results.json (tools/evaluate.py), sae/eval_sae.json (tools/eval_sae.py), the students' tensorboard
'iteration-time' scalars, stages/*.done (each stage's wall time), latents.jsonl and steering.json (the concepts
stage: linked pages and the steering table), and adds two reference rows computed here on
the same held-out tokens as evaluate.py: a unigram model (add-one smoothed token counts of the training
documents) and the uniform distribution over the vocabulary (what an untrained model predicts, up to its small
initial logits). It ends with the tokens CoCoMix and KD save (or need in addition) to reach NTP's validation
perplexity, from the students' validation curves (megatron_cocomix/evaluation/curves.py). Writes the markdown to
--output and prints it.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_cocomix.errors import cli_main  # noqa: E402

STUDENTS = ("cocomix", "ntp", "kd")
STAGES = ("tokenise", "teacher", "sae", "labels", "cocomix", "ntp", "kd", "evaluate", "concepts")


def unigram_loss(data_path: str, split: str, scored: dict, vocab_size: int) -> float:
    """Mean NLL of the scored documents' tokens under add-one smoothed unigram counts of the training split."""
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_cocomix.evaluation.lm import split_range

    dataset = IndexedDataset(data_path)
    begin, end = split_range(len(dataset), split, "train")
    counts = numpy.ones(vocab_size, dtype=numpy.float64)
    for i in range(begin, end):
        counts += numpy.bincount(numpy.asarray(dataset[i], dtype=numpy.int64), minlength=vocab_size)[:vocab_size]
    log_p = numpy.log(counts / counts.sum())
    first = scored["first_document"]
    nll, tokens = 0.0, 0
    for i in range(first, first + scored["documents"]):
        doc = numpy.asarray(dataset[i], dtype=numpy.int64)
        nll -= float(log_p[doc].sum())
        tokens += len(doc)
    if tokens != scored["tokens"]:
        raise ValueError(f"unigram baseline scored {tokens} tokens, evaluate.py {scored['tokens']}: the documents "
                         f"differ")
    return nll / tokens


def mean_step_time(tensorboard_dir: str) -> Optional[float]:
    """Mean 'iteration-time' (seconds) after the first logged interval (start-up and warm-up)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    times = []
    for folder in sorted({os.path.dirname(p) for p in glob.glob(os.path.join(tensorboard_dir, "**", "events.*"),
                                                                  recursive=True)}):
        accumulator = EventAccumulator(folder, size_guidance={"scalars": 0})
        accumulator.Reload()
        if "iteration-time" in accumulator.Tags()["scalars"]:
            times += [(e.step, e.value) for e in accumulator.Scalars("iteration-time")]
    times = [v for _, v in sorted(dict(times).items())][1:]
    return sum(times) / len(times) if times else None


def tokens_saved_lines(run_dir: str) -> List[str]:
    """CoCoMix's and KD's tokens saved against NTP at equal validation perplexity; one line saying why not, when a
    student's curve is missing or too short."""
    from megatron_cocomix.evaluation import curves

    try:
        found = {name: curves.read_curve(os.path.join(run_dir, "students", name, "tensorboard"), name)
                 for name in ("ntp", "cocomix", "kd")}
    except (OSError, ValueError) as e:
        return [f"Tokens saved at equal validation perplexity: not computed ({e})."]
    return curves.summary_lines(curves.compare("ntp", found))


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found (run examples/pipeline.sh first)")
    with open(path) as f:
        return json.load(f)


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _count(n) -> str:
    from megatron_cocomix.evaluation.lm import format_count

    return "-" if n is None else format_count(n)


def _cell(text: str) -> str:
    """A continuation as one markdown table cell: quoted (newlines visible), pipes escaped."""
    return "`" + json.dumps(text, ensure_ascii=False).replace("|", "\\|").replace("`", "'") + "`"


def concept_pages(run_dir: str) -> List[str]:
    """Links to the concepts stage's pages and its steering table (nothing before that stage has run)."""
    latents_path, steering_path = os.path.join(run_dir, "latents.jsonl"), os.path.join(run_dir, "steering.json")
    if not os.path.isfile(latents_path):
        return []
    with open(latents_path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    fired = sum(not r["dead"] for r in records)
    tokens = records[0]["tokens"] if records else 0
    lines = ["", f"Concepts: [latents.html](latents.html) describes what each SAE latent responds to on {tokens:,} "
                 f"test tokens ({fired} of {len(records)} latents fired; latents.jsonl); "
                 "[concepts.html](concepts.html) shows the CoCoMix student's top predicted concepts on a held-out "
                 "passage, with those descriptions, beside the teacher's labels."]
    if os.path.isfile(steering_path):
        steering = _read_json(steering_path)
        described = f": {steering['description']}" if steering.get("description") else ""
        chosen = ", the student's top predicted concept at the prompt's last token" if steering["chosen"] == "top" \
            else ""
        lines += ["", f"Steering (tools/steer.py; concept {steering['concept']}{described}{chosen}; the scale "
                      f"{'multiplies' if steering['mode'] == 'multiply' else 'is added to'} its logit; prompt "
                      f"{_cell(steering['prompt'])}, greedy):", "", "| scale | continuation |", "|---:|---|"]
        lines += [f"| {row['scale']:g} | {_cell(row['text'])} |" for row in steering["continuations"]]
    return lines


def build_report(run_dir: str, teacher: str) -> str:
    results = _read_json(os.path.join(run_dir, "results.json"))
    sae = _read_json(os.path.join(run_dir, "sae", "eval_sae.json"))
    models: List[Dict] = results["models"]
    first = models[0]
    vocab_size = int(results.get("vocab_size") or first.get("vocab_size") or 0)
    unigram = unigram_loss(first["data_path"], first["split"], first, vocab_size) if vocab_size else None
    step_times = {name: mean_step_time(os.path.join(run_dir, "students", name, "tensorboard")) for name in STUDENTS}
    ntp_time = step_times.get("ntp")

    lines = [f"**CoCoMix pipeline results (teacher: {teacher}; held-out: the {first['eval_split']} split, "
             f"{first['documents']} documents, {first['tokens']:,} tokens)**", "",
             "| model | parameters | tokens seen | held-out ppl | bits per byte | concept loss | concept top-1 acc "
             "| concept top-k acc | step time (s) | step time vs NTP |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in models:
        step = step_times.get(row["name"])
        ratio = step / ntp_time if step and ntp_time else None
        lines.append(f"| {row['name']} | {_count(row['parameters'])} | {_count(row.get('tokens_seen'))} | "
                     f"{row['ppl']:.2f} | {row['bits_per_byte']:.4f} | {_fmt(row.get('concept_loss'))} | "
                     f"{_fmt(row.get('concept_top1_acc'))} | {_fmt(row.get('concept_topk_acc'))} | "
                     f"{_fmt(step, 3)} | {_fmt(ratio, 2)} |")
    if unigram is not None:
        lines.append(f"| unigram (training counts) | - | - | {math.exp(unigram):.2f} | - | - | - | - "
                     f"| - | - |")
        lines.append(f"| uniform (untrained) | - | 0 | {vocab_size:.2f} | - | - | - | - | - | - |")
    concept_row = next((r for r in models if "concept_loss" in r), None)
    if concept_row:
        lines += ["", f"Concept accuracy chance levels (C = {round(1 / concept_row['concept_chance_top1'])}, "
                      f"k = {concept_row['concept_topk']}): top-1 {concept_row['concept_chance_top1']:.4f}, "
                      f"top-k {concept_row['concept_chance_topk']:.4f}."]
    lines += ["", f"SAE (held-out windows): FVU {sae['fvu']:.4f}, L0 {sae['l0']:.1f}, dead fraction "
                  f"{sae['dead_fraction']:.4f}, delta LM loss {sae['delta_lm_loss']:.4f} "
                  f"(clean {sae['clean_loss']:.4f}, spliced {sae['spliced_loss']:.4f})."]
    stage_times = []
    for stage in STAGES:
        path = os.path.join(run_dir, "stages", f"{stage}.done")
        if os.path.isfile(path):
            with open(path) as f:
                stage_times.append(f"{stage} {f.read().strip()}")
    if stage_times:
        lines += ["", "Stage wall times: " + ", ".join(stage_times) + "."]
    lines += concept_pages(run_dir)
    by_name = {r["name"]: r for r in models}
    if all(n in by_name for n in STUDENTS):
        order = sorted(STUDENTS, key=lambda n: by_name[n]["ppl"])
        ranking = ", ".join(f"{n} {by_name[n]['ppl']:.2f}" for n in order)
        lines += ["", f"Held-out perplexity, best first: {ranking}. "
                      "The paper's gains were measured at 69M+ parameters and 20B tokens; at this size and a few "
                      "hundred thousand tokens the order may differ, and this table reports what was measured."]
    lines += [""] + tokens_saved_lines(run_dir)
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--run-dir", required=True, help="The pipeline's RUN_DIR.")
    parser.add_argument("--teacher", default="tiny", help="Teacher name shown in the title.")
    parser.add_argument("--output", default=None, help="Write the markdown here too.")
    return parser


@cli_main
def main(argv: Optional[List[str]] = None) -> int:
    options = build_parser().parse_args(argv)
    report = build_report(options.run_dir, options.teacher)
    if options.output:
        with open(options.output, "w") as f:
            f.write(report)
    print(report, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
