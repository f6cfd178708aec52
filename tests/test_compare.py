"""compare.py: the side-by-side table and chart from evaluate.py outputs."""

import json
import os
import subprocess
import sys

from conftest import ROOT

import compare


def results(forget_regurg, retain_know, mmlu=None):
    task = lambda regurg, know: {"regurgitation-score": regurg, "knowledge-score": know}  # noqa: E731
    out = {"forget-set": {"Task1": task(forget_regurg, 0.5), "Task2": task(0.25, 0.0), "Task3": task(0.125, 1.0),
                          "overall-regurgitation-score": forget_regurg, "overall-knowledge-score": 0.5},
           "retain-set": {"Task1": task(0.9, retain_know), "Task2": task(0.8, retain_know),
                          "Task3": task(0.7, retain_know), "overall-regurgitation-score": 0.8,
                          "overall-knowledge-score": retain_know},
           "harmonic-mean-task-aggregate": 0.4321, "mia_loss_acc": 0.75, "mia_final_score": 0.5,
           "aggregate-score": 0.46605}
    if mmlu is not None:
        out["mmlu_average"] = mmlu
    return out


def write_run(directory, data):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "evaluation_results.json"), "w") as f:
        json.dump(data, f)
    return str(directory)


def test_table_rows_and_values():
    table = compare.comparison_table([("target", results(0.96, 0.9)), ("paper", results(0.3, 0.85, mmlu=0.41))])
    lines = table.splitlines()
    assert lines[0].startswith("| run | forget 1 regurg | forget 1 know | forget 2 regurg |")
    assert lines[0].endswith("| task agg. | MIA AUC | MIA score | MMLU | final |")
    assert all(line.count("|") == lines[0].count("|") for line in lines[:4])
    # the partial run is named under the table, the full one is not
    assert lines[4:] == ["", "No official final score (a part did not run; the mean of fewer parts is on another "
                         "scale, so do not rank these beside full runs): target (no MMLU)"]
    target = lines[2].split(" | ")
    assert target[0] == "| target" and target[1] == "0.960" and target[3] == "0.250" and target[6] == "1.000"
    # No MMLU for this run: no official final score, the partial mean marked as such (0.46605 rounds to 0.466).
    assert target[-2] == "n/a" and target[-1] == "0.466 (partial, no MMLU) |"
    assert lines[3].split(" | ")[-2:] == ["0.410", "0.466 |"]  # all three parts: the final score, unmarked


def test_attack_table_when_attacks_ran():
    with_attacks = {**results(0.3, 0.85, mmlu=0.41), "mia_min_k_auc": 0.8, "mia_min_k_score": 0.4,
                    "mia_reference_auc": 0.55, "mia_reference_score": 0.9}
    table = compare.comparison_table([("target", results(0.96, 0.9)), ("paper", with_attacks)])
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| run | loss (official) AUC"))
    assert header == "| run | loss (official) AUC | loss (official) score | Min-K% AUC | Min-K% score | " \
                     "reference AUC | reference score |"
    assert lines[-2] == "| target | 0.750 | 0.500 | n/a | n/a | n/a | n/a |"
    assert lines[-1] == "| paper | 0.750 | 0.500 | 0.800 | 0.400 | 0.550 | 0.900 |"


def test_cli_writes_table_and_chart(tmp_path):
    a = write_run(tmp_path / "target" / "eval", results(0.96, 0.9))
    b = write_run(tmp_path / "paper" / "eval", results(0.3, 0.85))
    out = tmp_path / "cmp"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "compare.py"), a, b, "--output_dir", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    table = (out / "comparison.md").read_text()
    assert "| target |" in table and "| paper |" in table  # names from .../NAME/eval
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_missing_results_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "compare.py"), str(tmp_path / "nope"),
                             "--output_dir", str(tmp_path / "cmp")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no evaluation_results.json" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "cmp").exists()
