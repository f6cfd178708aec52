"""Put several evaluated runs side by side: a markdown table and a bar chart of the SemEval-2025 Task 4 scores.

    python compare.py runs/target/eval runs/paper/eval runs/npo/eval --output_dir runs/comparison

Each argument is an evaluate.py output dir (or its evaluation_results.json). The table shows, per run, the raw
per-task scores (forget: lower is better; retain: higher is better), the harmonic-mean task aggregate, the MIA AUC
and score, MMLU and the final score; a run missing MIA or MMLU has no official final score, and its cell shows the
partial mean marked "(partial, no ...)". A second table shows every MIA attack's AUC and score (mia.py).
"""

import os
import sys
from dataclasses import dataclass, field

import mia
import scoring
from artefacts import RESULTS_FILE, pyplot, read_results, save_figure, write_atomic
from cli import InputError, parse_config, run_main
from records import TASKS

SUMMARY_KEYS = (("task agg.", "harmonic-mean-task-aggregate"), ("MIA AUC", "mia_loss_acc"),
                ("MIA score", "mia_final_score"), ("MMLU", "mmlu_average"))


@dataclass
class CompareArguments:
    output_dir: str = field(default="", metadata={"help": "Where comparison.md and comparison.png go."})
    names: str = field(default="", metadata={"help": "Comma-separated row names (default: each run's dir name; "
                                              "for .../NAME/eval, NAME)."})


def run_name(path):
    path = os.path.normpath(path[:-len(RESULTS_FILE)] if path.endswith(RESULTS_FILE) else path)
    name = os.path.basename(path)
    return os.path.basename(os.path.dirname(path)) if name in ("eval", "evaluation") else name


def score_columns(results):
    """(column name, value or None) for one run, in table order."""
    columns = []
    for split in ("forget", "retain"):
        for task in TASKS:
            for kind in scoring.KINDS:
                columns.append((f"{split} {task[-1]} {kind.short}", scoring.result_score(results, split, kind.key,
                                                                                         task)))
    for label, key in SUMMARY_KEYS:
        columns.append((label, results.get(key)))
    columns.append(("final", final_cell(results)))
    return columns


def final_cell(results):
    """The final score, or the partial mean as text marked '(partial, no MMLU)' when a part did not run (the
    official rule gives no final score then); None when nothing ran."""
    label, value = scoring.final_score_label(results)
    if value is None or label == "final score":
        return value
    return f"{value:.3f} (partial, no {', no '.join(scoring.missing_final_parts(results))})"


def cell(value):
    return "n/a" if value is None else value if isinstance(value, str) else f"{value:.3f}"


def attack_table(named_results):
    """Markdown table of every MIA attack's AUC and 1 - 2|AUC - 0.5| score per run ('' when only the official
    loss attack ran everywhere)."""
    names = [name for name in ("loss",) + tuple(mia.ATTACKS)
             if any(results.get(mia.result_keys(name)[0]) is not None for _, results in named_results)]
    if names == ["loss"] or not names:
        return ""
    header = ["run"] + [f"{mia.LABELS[name]} {kind}" for name in names for kind in ("AUC", "score")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run, results in named_results:
        cells = [run] + [cell(results.get(key)) for name in names for key in mia.result_keys(name)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_table(named_results):
    """Markdown table: one row per (name, results); n/a where a score was not computed."""
    if not named_results:
        return ""
    header = ["run"] + [name for name, _ in score_columns(named_results[0][1])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, results in named_results:
        cells = [name] + [cell(value) for _, value in score_columns(results)]
        lines.append("| " + " | ".join(cells) + " |")
    partial = [(name, scoring.missing_final_parts(results)) for name, results in named_results
               if scoring.is_partial(results)]
    if partial:
        lines += ["", "No official final score (a part did not run; the mean of fewer parts is on another scale, "
                  "so do not rank these beside full runs): " +
                  "; ".join(f"{name} (no {', no '.join(missing)})" for name, missing in partial)]
    attacks = attack_table(named_results)
    if attacks:
        lines += ["", "MIA attacks (AUC: members positive, 0.5 = members look like nonmembers; score = "
                  "1 - 2|AUC - 0.5|; the official one is the loss attack):", "", attacks]
    return "\n".join(lines)


def plot_comparison(named_results, path):
    """Grouped bars: forget/retain overall scores, task aggregate, MIA score, MMLU and final, per run."""
    plt = pyplot()

    metrics = [(f"{split} {kind.short}.", lambda r, split=split, kind=kind: scoring.result_score(r, split, kind.key))
               for split in scoring.SPLITS for kind in scoring.KINDS]
    metrics += [(label, lambda r, key=key: r.get(key)) for label, key in SUMMARY_KEYS if key != "mia_loss_acc"]
    metrics.append(("final (or partial)", lambda r: scoring.final_score_label(r)[1]))
    width = 0.8 / len(named_results)
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(metrics) * max(1, len(named_results) / 3)), 4))
    for i, (name, results) in enumerate(named_results):
        values = [getter(results) for _, getter in metrics]
        bars = ax.bar([m + (i - (len(named_results) - 1) / 2) * width for m in range(len(metrics))],
                      [v if v is not None else 0 for v in values], width=width, label=name)
        ax.bar_label(bars, [f"{v:.2f}" if v is not None else "n/a" for v in values], fontsize=6, padding=1)
    ax.set_xticks(range(len(metrics)), [label for label, _ in metrics], rotation=20, fontsize=8)
    ax.set_ylim(0, 1.15)
    ax.set_title("forget: lower is better; everything else: higher is better")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)


def write_comparison(named_results, output_dir):
    """comparison.md and comparison.png in output_dir, each written atomically."""
    table_path, plot_path = os.path.join(output_dir, "comparison.md"), os.path.join(output_dir, "comparison.png")
    write_atomic(table_path, comparison_table(named_results) + "\n")
    plot_comparison(named_results, plot_path)
    return table_path, plot_path


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    runs = []
    while argv and not argv[0].startswith("-"):
        runs.append(argv.pop(0))
    (args,) = parse_config((CompareArguments,), argv, description=__doc__,
                           usage="%(prog)s EVAL_DIR [EVAL_DIR ...] --output_dir OUT [--option value ...]")
    if not runs:
        raise InputError("give one or more evaluate.py output dirs before the options")
    if not args.output_dir:
        raise InputError("--output_dir is required")
    names = [n.strip() for n in args.names.split(",")] if args.names else [run_name(path) for path in runs]
    if len(names) != len(runs):
        raise InputError(f"--names has {len(names)} names for {len(runs)} runs")
    named_results = [(name, read_results(path)) for name, path in zip(names, runs)]
    table_path, plot_path = write_comparison(named_results, args.output_dir)
    print(comparison_table(named_results))
    print(f"wrote {table_path} and {plot_path}")


if __name__ == "__main__":
    run_main(main)
