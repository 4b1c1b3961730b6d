"""The results table of examples/pipeline.sh, from what its stages wrote under RUN_DIR.

    python examples/pipeline_report.py --run-dir runs/pipeline --teacher smollm2 --seeds 1234,4321 \
        --output runs/pipeline/results.md

Reads, per student seed, seed<N>/results.json (tools/evaluate.py) and the students' tensorboard 'iteration-time'
scalars; sae/eval.json (tools/train_sae.py's held-out evaluation), stages/*.done (each stage's wall time), latents.jsonl and
steering.json (the concepts stage: linked pages and the steering table); and adds two reference rows computed
here on the same held-out tokens as evaluate.py: a unigram model (add-one smoothed token counts of the training
documents) and the uniform distribution over the vocabulary (what an untrained model predicts, up to its small
initial logits). It ends with the tokens CoCoMix and KD save (or need in addition) to reach NTP's validation
perplexity, from the students' validation curves (megatron_cocomix/evaluation/curves.py).

With several seeds every student number is the mean over the seeds, perplexity and bits per byte with their
sample standard deviation (n - 1); a per-seed table and the per-seed orders show whether a gap between models is
larger than the seeds' spread. --output-json writes the same summary for scripts. Writes the markdown to --output
and prints it.
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
from megatron_cocomix.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # before megatron-core is imported

STUDENTS = ("cocomix", "ntp", "kd")
SHARED_STAGES = ("tokenise", "teacher", "sae")
SEED_STAGES = ("labels", "cocomix", "ntp", "kd", "evaluate")
# The numbers a model's row averages over the seeds: (results.json key, digits).
AVERAGED = (("ppl", 2), ("bits_per_byte", 4), ("concept_loss", 4), ("concept_top1_acc", 4), ("concept_topk_acc", 4))


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


def tokens_saved(seed_dir: str):
    """CoCoMix's and KD's comparisons against NTP at equal validation perplexity (curves.TokensSaved), or the
    reason they cannot be computed (a student's curve missing or too short)."""
    from megatron_cocomix.evaluation import curves

    try:
        found = {name: curves.read_curve(os.path.join(seed_dir, "students", name, "tensorboard"), name)
                 for name in ("ntp", "cocomix", "kd")}
        return curves.compare("ntp", found)
    except (OSError, ValueError) as e:
        return str(e)


def tokens_saved_lines(run_dir: str, seeds: List[int]) -> List[str]:
    """One seed: the comparisons' lines. Several: each seed's lines, then the mean saving per candidate."""
    from megatron_cocomix.evaluation import curves

    per_seed = {seed: tokens_saved(seed_dir(run_dir, seed)) for seed in seeds}
    lines = []
    for seed, found in per_seed.items():
        if isinstance(found, str):
            text = f"Tokens saved at equal validation perplexity: not computed ({found})."
            lines += [text if len(seeds) == 1 else f"Seed {seed}: {text[0].lower()}{text[1:]}"]
        elif len(seeds) == 1:
            lines += curves.summary_lines(found)
        else:
            heading, *items = curves.summary_lines(found)
            lines += [f"Seed {seed}, {heading[0].lower()}{heading[1:]}", *items]
    complete = [found for found in per_seed.values() if not isinstance(found, str)]
    if len(seeds) > 1 and len(complete) == len(seeds):
        means = []
        for i, first in enumerate(complete[0]):
            savings = [100 * found[i].saving for found in complete]
            mean, sd = mean_sd(savings)
            bound = " (a bound on some seed)" if any(found[i].bound for found in complete) else ""
            means.append(f"{first.candidate} {mean:+.1f}% (sd {sd:.1f}){bound}")
        lines += [f"Tokens saved against ntp, mean over {len(seeds)} seeds (negative: more tokens needed): "
                  + ", ".join(means) + "."]
    return lines


def seed_dir(run_dir: str, seed: int) -> str:
    return os.path.join(run_dir, f"seed{seed}")


def mean_sd(values: List[float]):
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


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


def summarize(run_dir: str, seeds: List[int]) -> Dict:
    """Per model: every seed's results.json row and step time, and the mean / standard deviation of each number."""
    per_seed = {}
    for seed in seeds:
        results = _read_json(os.path.join(seed_dir(run_dir, seed), "results.json"))
        for row in results["models"]:
            row = dict(row)
            if row["name"] in STUDENTS:
                row["step_time"] = mean_step_time(os.path.join(seed_dir(run_dir, seed), "students", row["name"],
                                                               "tensorboard"))
            per_seed.setdefault(row["name"], {})[seed] = row
    models = {}
    for name, rows in per_seed.items():
        if len(rows) != len(seeds):
            raise ValueError(f"{name}: results for seeds {sorted(rows)} only, expected {seeds}")
        summary = {"per_seed": rows}
        for key, _ in AVERAGED + (("step_time", 3),):
            values = [row.get(key) for row in rows.values()]
            if all(v is not None for v in values):
                summary[key], summary[f"{key}_sd"] = mean_sd(values)
        models[name] = summary
    return {"seeds": seeds, "models": models}


def _mean_cell(summary: Dict, key: str, digits: int, with_sd: bool) -> str:
    if key not in summary:
        return "-"
    cell = _fmt(summary[key], digits)
    return f"{cell} ± {_fmt(summary[key + '_sd'], digits)}" if with_sd else cell


def student_table(summary: Dict, several: bool) -> List[str]:
    ntp_time = summary["models"].get("ntp", {}).get("step_time")
    lines = ["| model | parameters | tokens seen | held-out ppl | bits per byte | concept loss | concept top-1 acc "
             "| concept top-k acc | step time (s) | step time vs NTP |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, model in summary["models"].items():
        first = next(iter(model["per_seed"].values()))
        step = model.get("step_time")
        ratio = step / ntp_time if step and ntp_time else None
        spread = several and name in STUDENTS  # the teacher is the same model at every seed
        cells = [_mean_cell(model, key, digits, spread and key in ("ppl", "bits_per_byte")) for key, digits in AVERAGED]
        lines.append(f"| {name} | {_count(first['parameters'])} | {_count(first.get('tokens_seen'))} | "
                     + " | ".join(cells) + f" | {_fmt(step, 3)} | {_fmt(ratio, 2)} |")
    return lines


def seeds_table(summary: Dict) -> List[str]:
    seeds = summary["seeds"]
    lines = ["", f"Held-out perplexity per seed (mean and sample standard deviation over {len(seeds)} seeds):", "",
             "| model | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | sd |",
             "|---|" + "---:|" * (len(seeds) + 2)]
    for name, model in summary["models"].items():
        if name not in STUDENTS:
            continue
        lines.append(f"| {name} | " + " | ".join(f"{model['per_seed'][s]['ppl']:.2f}" for s in seeds)
                     + f" | {model['ppl']:.2f} | {model['ppl_sd']:.2f} |")
    return lines


def ranking_lines(summary: Dict) -> List[str]:
    models, seeds = summary["models"], summary["seeds"]
    if not all(n in models for n in STUDENTS):
        return []
    order = sorted(STUDENTS, key=lambda n: models[n]["ppl"])
    if len(seeds) == 1:
        ranking = ", ".join(f"{n} {models[n]['ppl']:.2f}" for n in order)
        head = f"Held-out perplexity, best first: {ranking}."
    else:
        ranking = ", ".join(f"{n} {models[n]['ppl']:.2f} ± {models[n]['ppl_sd']:.2f}" for n in order)
        orders = {s: sorted(STUDENTS, key=lambda n: models[n]["per_seed"][s]["ppl"]) for s in seeds}
        if all(o == order for o in orders.values()):
            agree = "the same order on every seed"
        else:
            agree = "the order differs between seeds (" + "; ".join(
                f"seed {s}: {' < '.join(o)}" for s, o in orders.items()) + ")"
        head = (f"Held-out perplexity, best first (mean ± sample standard deviation over {len(seeds)} seeds): "
                f"{ranking}; {agree}.")
    return ["", head + " The paper's gains were measured at 69M+ parameters and 20B tokens; at this size and a "
                "few hundred thousand tokens the order may differ, and this table reports what was measured."]


def stage_times(run_dir: str, seeds: List[int]) -> List[str]:
    names = list(SHARED_STAGES) + [f"{stage}.seed{seed}" for seed in seeds for stage in SEED_STAGES] + ["concepts"]
    times = []
    for stage in names:
        path = os.path.join(run_dir, "stages", f"{stage}.done")
        if os.path.isfile(path):
            with open(path) as f:
                times.append(f"{stage if len(seeds) > 1 else stage.split('.seed')[0]} {f.readline().strip()}")
    return ["", "Stage wall times: " + ", ".join(times) + "."] if times else []


def build_report(run_dir: str, teacher: str, seeds: List[int], summary: Optional[Dict] = None) -> str:
    summary = summary or summarize(run_dir, seeds)
    sae = _read_json(os.path.join(run_dir, "sae", "eval.json"))
    first = next(iter(next(iter(summary["models"].values()))["per_seed"].values()))
    vocab_size = int(first.get("vocab_size") or 0)
    unigram = unigram_loss(first["data_path"], first["split"], first, vocab_size) if vocab_size else None
    several = len(seeds) > 1
    student_seeds = f"; student seed{'s' if several else ''} {', '.join(map(str, seeds))}"
    lines = [f"**CoCoMix pipeline results (teacher: {teacher}; held-out: the {first['eval_split']} split, "
             f"{first['documents']} documents, {first['tokens']:,} tokens{student_seeds})**", ""]
    lines += student_table(summary, several)
    if unigram is not None:
        lines.append(f"| unigram (training counts) | - | - | {math.exp(unigram):.2f} | - | - | - | - "
                     f"| - | - |")
        lines.append(f"| uniform (untrained) | - | 0 | {vocab_size:.2f} | - | - | - | - | - | - |")
    if several:
        lines += seeds_table(summary)
    concept_row = next((r for m in summary["models"].values() for r in m["per_seed"].values()
                        if "concept_loss" in r), None)
    if concept_row:
        lines += ["", f"Concept accuracy chance levels (C = {round(1 / concept_row['concept_chance_top1'])}, "
                      f"k = {concept_row['concept_topk']}): top-1 {concept_row['concept_chance_top1']:.4f}, "
                      f"top-k {concept_row['concept_chance_topk']:.4f}."]
    lines += ["", f"SAE (held-out windows): FVU {sae['fvu']:.4f}, L0 {sae['l0']:.1f}, dead fraction "
                  f"{sae['dead_fraction']:.4f}, delta LM loss {sae['delta_lm_loss']:.4f} "
                  f"(clean {sae['clean_loss']:.4f}, spliced {sae['spliced_loss']:.4f})."]
    lines += stage_times(run_dir, seeds)
    lines += concept_pages(run_dir)
    lines += ranking_lines(summary)
    lines += [""] + tokens_saved_lines(run_dir, seeds)
    return "\n".join(lines) + "\n"


def _seeds(text: str) -> List[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: a seed twice")
    return seeds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--run-dir", required=True, help="The pipeline's RUN_DIR.")
    parser.add_argument("--teacher", default="smollm2", help="Teacher name shown in the title.")
    parser.add_argument("--seeds", default="1234", type=_seeds,
                        help="The student seeds to report, comma-separated (RUN_DIR/seed<N>/ each).")
    parser.add_argument("--output", default=None, help="Write the markdown here too.")
    parser.add_argument("--output-json", default=None,
                        help="Write the summary (per model: per-seed rows, means, standard deviations) as JSON.")
    return parser


@cli_main
def main(argv: Optional[List[str]] = None) -> int:
    options = build_parser().parse_args(argv)
    summary = summarize(options.run_dir, options.seeds)
    report = build_report(options.run_dir, options.teacher, options.seeds, summary)
    if options.output_json:
        with open(options.output_json, "w") as f:
            json.dump(summary, f, indent=1)
    if options.output:
        with open(options.output, "w") as f:
            f.write(report)
    print(report, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
