"""Training curves of several runs in one figure, from their tensorboard event files, plus the numbers as CSV.

    python tools/plot_runs.py runs/cocomix runs/ntp runs/kd --output curves.png   # writes curves.png + curves.csv
    python tools/plot_runs.py runs/cocomix runs/ntp runs/kd --reference ntp      # + tokens saved against ntp

A RUN_DIR is a run's --tensorboard-dir or any folder above it: event files are found recursively, and each folder
holding event files is one run, labelled by its path below RUN_DIR (or by RUN_DIR's name, or its --name). Panels,
against tokens seen (the 'tokens' scalar the trainer writes; without it, against iterations): training lm loss,
validation perplexity ('lm loss validation ppl'), and the concept loss where a run has one (training and
validation).

With --reference NAME (a run's label), every other run is compared with it at equal validation perplexity
(megatron_cocomix/evaluation/curves.py, docs/tokens_saved.md): the tokens it saves, or needs in addition, to reach
the same perplexity, printed one line per run (and written to --output-md), marked on the perplexity panel (a
marker where each curve reaches the compared perplexity, the figure in the legend) and added to the CSV as
'tokens saved vs NAME' rows (x: the candidate's tokens at that perplexity, value: the saving as a fraction).
Headless (matplotlib's Agg backend); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_cocomix.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # before megatron-core and transformers are imported

from megatron_cocomix.errors import cli_main  # noqa: E402
from megatron_cocomix.evaluation import curves as tokens_curves  # noqa: E402

PANELS = [  # (title, y label, [(tag, curve label)])
    ("training lm loss", "lm loss", [("lm loss", "train")]),
    ("validation perplexity", "ppl", [("lm loss validation ppl", "valid")]),
    ("concept loss", "concept loss", [("concept loss", "train"), ("concept loss validation", "valid")]),
]
TOKENS_TAG = tokens_curves.TOKENS_TAG
read_scalars = tokens_curves.read_scalars


def find_runs(run_dirs: Sequence[str], names: Optional[Sequence[str]] = None) -> List[Tuple[str, str]]:
    """[(label, folder holding event files)] for every RUN_DIR, in the given order, sub-runs sorted; a RUN_DIR's
    label is its name in `names`, else its directory name."""
    if names and len(names) != len(run_dirs):
        raise ValueError(f"--name: {len(names)} names for {len(run_dirs)} run directories")
    runs = []
    for index, root in enumerate(run_dirs):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{root}: no such directory")
        found = sorted({d for d, _, files in os.walk(root) if any(f.startswith("events.out.tfevents") for f in files)})
        if not found:
            raise ValueError(f"{root}: no tensorboard event files (events.out.tfevents.*) below it")
        name = names[index] if names else os.path.basename(os.path.normpath(root))
        for folder in found:
            relative = os.path.relpath(folder, root)
            runs.append((name if relative == "." else f"{name}/{relative}", folder))
    return runs


def curves(scalars: Dict[str, Dict[int, float]]) -> Tuple[str, Dict[str, List[Tuple[float, float]]]]:
    """(x-axis name, {tag: [(x, value)]}) with x = tokens seen at that iteration, or the iteration itself."""
    tokens = scalars.get(TOKENS_TAG)
    out = {}
    for _, _, series in PANELS:
        for tag, _ in series:
            if tag in scalars:
                points = sorted(scalars[tag].items())
                if tokens:
                    points = [(tokens[step], value) for step, value in points if step in tokens]
                out[tag] = [(float(x), float(y)) for x, y in points]
    return ("tokens" if tokens else "iteration"), out


def plot(runs: List[Tuple[str, Dict]], output: str,
         comparisons: Sequence[tokens_curves.TokensSaved] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in PANELS if any(tag in data for _, (_, data) in runs for tag, _ in p[2])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (title, ylabel, series) in zip(axes[0], panels):
        x_names, colours = set(), {}
        for label, (x_name, data) in runs:
            for tag, kind in series:
                if tag in data and data[tag]:
                    xs, ys = zip(*data[tag])
                    style = "-" if kind == "train" else "--o"
                    line, = ax.plot(xs, ys, style, markersize=3,
                                    label=f"{label} ({kind})" if len(series) > 1 else label)
                    colours[label] = line.get_color()
                    x_names.add(x_name)
        if series[0][0] == tokens_curves.VALID_PPL_TAG and comparisons:
            # Log tokens: the straight segments are the interpolation the comparison uses.
            ax.set_xscale("log")
            mark_tokens_saved(ax, comparisons, colours)
        ax.set_title(title)
        ax.set_xlabel(" / ".join(sorted(x_names)) + (" seen" if x_names == {"tokens"} else ""))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)


def mark_tokens_saved(ax, comparisons: Sequence[tokens_curves.TokensSaved], colours: Dict[str, str]) -> None:
    """For each comparison: where the reference and the candidate reach the compared perplexity (a dotted line
    between two markers on their curves), the figure in the legend."""
    for c in comparisons:
        colour = colours.get(c.candidate, "black")
        ax.plot([c.reference_tokens, c.candidate_tokens], [c.target_ppl] * 2, ":", color=colour, linewidth=1)
        ax.plot([c.reference_tokens], [c.target_ppl], "s", color=colours.get(c.reference, "black"), markersize=6,
                fillstyle="none")
        more = c.saving < 0
        ax.plot([c.candidate_tokens], [c.target_ppl], "*", color=colour, markersize=10,
                label=f"{c.candidate}: {100 * abs(c.saving):.1f}% {'more' if more else 'fewer'} tokens than "
                      f"{c.reference} at ppl {c.target_ppl:.2f}")


def write_csv(runs: List[Tuple[str, Dict]], path: str,
              comparisons: Sequence[tokens_curves.TokensSaved] = ()) -> int:
    rows = 0
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "metric", "x", "x_name", "value"])
        for label, (x_name, data) in runs:
            for tag, points in data.items():
                for x, value in points:
                    writer.writerow([label, tag, x, x_name, value])
                    rows += 1
        for c in comparisons:
            writer.writerow([c.candidate, f"tokens saved vs {c.reference}", c.candidate_tokens, "tokens", c.saving])
            rows += 1
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Plot lm loss, validation perplexity and concept loss of several runs "
                                            "against tokens seen, from tensorboard event files.", allow_abbrev=False)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="A run's --tensorboard-dir or a folder above it.")
    p.add_argument("--name", nargs="+", default=None,
                   help="A label per RUN_DIR, in order (default: the directory's name).")
    p.add_argument("--output", default="curves.png", help="The figure (PNG).")
    p.add_argument("--csv", default=None, help="The numbers (default: the figure's path with .csv).")
    p.add_argument("--reference", default=None, metavar="NAME",
                   help="A run's label (e.g. the NTP run's): every other run's tokens saved at equal validation "
                        "perplexity against it, printed, marked on the figure and added to the CSV. Each run needs "
                        f"{tokens_curves.MIN_EVALUATIONS} or more validations.")
    p.add_argument("--output-md", default=None,
                   help="With --reference: write its lines here too (markdown, for a results file).")
    return p


@cli_main
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"--output {args.output}: directory {out_dir} does not exist")
    if args.output_md and not args.reference:
        raise ValueError("--output-md holds the tokens-saved lines: give --reference NAME")
    scalars = [(label, read_scalars(folder)) for label, folder in find_runs(args.run_dirs, args.name)]
    runs = [(label, curves(values)) for label, values in scalars]
    if not any(data for _, (_, data) in runs):
        raise ValueError(f"{', '.join(args.run_dirs)}: no lm loss, validation or concept loss scalars to plot")
    comparisons = []
    if args.reference:
        labels = [label for label, _ in scalars]
        if len(set(labels)) < len(labels):
            raise ValueError(f"--reference: the runs' labels ({', '.join(labels)}) must differ (see --name)")
        if args.reference not in labels:
            raise ValueError(f"--reference {args.reference}: not one of the runs ({', '.join(labels)})")
        if len(labels) < 2:
            raise ValueError(f"--reference {args.reference}: no other run to compare with it")
        comparisons = tokens_curves.compare(args.reference, {label: tokens_curves.validation_curve(values, label)
                                                             for label, values in scalars})
    csv_path = args.csv or os.path.splitext(args.output)[0] + ".csv"
    plot(runs, args.output, comparisons)
    rows = write_csv(runs, csv_path, comparisons)
    if comparisons:
        lines = tokens_curves.summary_lines(comparisons)
        print("\n".join(lines))
        if args.output_md:
            with open(args.output_md, "w") as f:
                f.write("\n".join(lines) + "\n")
    print(f"wrote {args.output} ({len(runs)} runs) and {csv_path} ({rows} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
