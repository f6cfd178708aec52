"""demo.py without running the pipeline: the report from hand-made results, the plan and its resume logic, the
commands it would run (checked against train.py's and evaluate.py's parsers), the Makefile's install steps."""

import json
import os
import re

import pytest

import demo
from cli import InputError, parse_config
from conftest import ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_results(regurgitation, knowledge, mia_auc=None, mmlu=None, short_long=(0.5, 0.5), min_k_auc=None):
    """An evaluation_results.json as evaluate.py writes it; regurgitation/knowledge: {split: value} for every task."""
    results = {}
    for split in ("forget", "retain"):
        block = {"overall-regurgitation-score": regurgitation[split], "overall-knowledge-score": knowledge[split]}
        for task in ("Task1", "Task2", "Task3"):
            block[task] = {"regurgitation-score": regurgitation[split], "knowledge-score": knowledge[split]}
        results[f"{split}-set"] = block
    results["harmonic-mean-task-aggregate"] = 0.4321
    if mia_auc is not None:
        results["mia_loss_acc"] = mia_auc
        results["mia_final_score"] = 1 - 2 * abs(mia_auc - 0.5)
    if min_k_auc is not None:
        results["mia_min_k_auc"] = min_k_auc
        results["mia_min_k_score"] = 1 - 2 * abs(min_k_auc - 0.5)
    if mmlu is not None:
        results["mmlu_average"] = mmlu
    if mia_auc is not None and mmlu is not None:
        results["aggregate-score"] = 0.5555
    else:  # the official rule: no final score without all three parts, only a partial one
        results["aggregate-score"] = None
        results["partial-aggregate-score"] = 0.5555
    results["by-length"] = {"threshold_words": 12, "forget": {
        "short": {"n": 6, "regurgitation-score": short_long[0]}, "long": {"n": 6, "regurgitation-score": short_long[1]}}}
    return results


def write_results(run_dir, name, results):
    os.makedirs(run_dir / f"eval-{name}", exist_ok=True)
    with open(run_dir / f"eval-{name}" / "evaluation_results.json", "w") as f:
        json.dump(results, f)


def demo_args(*argv):
    (args,) = parse_config([demo.DemoArguments], list(argv))
    return args


# --- report -------------------------------------------------------------------------------------------------------

def test_report_from_hand_made_results(tmp_path):
    write_results(tmp_path, "target", fake_results({"forget": 0.912, "retain": 0.934}, {"forget": 0.871, "retain": 0.889},
                                                   mia_auc=0.96, short_long=(0.977, 0.944)))
    write_results(tmp_path, "paper", fake_results({"forget": 0.123, "retain": 0.801}, {"forget": 0.201, "retain": 0.702},
                                                  mia_auc=0.61, short_long=(0.111, 0.222)))
    path = demo.build_report(str(tmp_path), ["target", "paper"])
    report = open(path).read()
    for value in ("0.912", "0.123", "0.934", "0.801", "0.871", "0.201", "0.960", "0.610", "0.432", "0.555",
                  "0.977", "0.222"):
        assert value in report, value
    assert "| forget Task2 regurgitation | 0.912 | 0.123 |" in report
    assert "MMLU was not run" in report
    assert "| **partial score (no MMLU)** | 0.555 | 0.555 |" in report and "**final score**" not in report
    # the bar: forget dropped by more than half, retain kept 0.801 >= 0.8 * 0.934, AUC moved towards 0.5
    assert report.count("PASS") == 2 + 4 and "FAIL" not in report
    for name in ("scores.png", "by_length.png"):
        with open(tmp_path / name, "rb") as f:
            assert f.read(8) == PNG_MAGIC
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]  # atomic writes left no temp files


def test_report_with_mmlu_and_a_failed_bar(tmp_path):
    write_results(tmp_path, "target", fake_results({"forget": 0.9, "retain": 0.9}, {"forget": 0.9, "retain": 0.9},
                                                   mia_auc=0.9, mmlu=0.2713, min_k_auc=0.95))
    write_results(tmp_path, "demo", fake_results({"forget": 0.6, "retain": 0.5}, {"forget": 0.3, "retain": 0.9},
                                                 mia_auc=0.05, mmlu=0.2589, min_k_auc=0.75))
    report = open(demo.build_report(str(tmp_path), ["target", "demo", "missing"])).read()
    assert "MMLU was not run" not in report
    assert "| MMLU accuracy | 0.271 | 0.259 | – |" in report
    assert "| **final score** | 0.555 | 0.555 | – |" in report
    assert "| MIA Min-K% AUC | 0.950 | 0.750 | – |" in report
    assert "| MIA Min-K% score | 0.100 | 0.500 | – |" in report
    assert "MIA zlib" not in report  # only attacks that ran get rows
    assert "FAIL: forget regurgitation at most half of before (0.900 -> 0.600)" in report
    assert "FAIL: retain regurgitation at least 0.8x before" in report
    assert "FAIL: MIA AUC closer to 0.5 than before (0.900 -> 0.050)" in report


def test_training_curves_from_tensorboard_events(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "unlearn-paper" / "runs" / "paper"))
    for step, (kind, value) in enumerate([("retain", 2.5), ("forget", 0.4), ("retain", 2.25), ("forget", 0.125)], 1):
        writer.add_scalar(f"loss/{kind}", value, step)
        writer.add_scalar(f"nll/{kind}", 1 / value if kind == "forget" else value, step)
    writer.close()
    writer = SummaryWriter(str(tmp_path / "unlearn-recommended" / "runs" / "recommended"))
    for step, value in enumerate([0.5, 0.25], 1):  # --schedule chunked: one 'mixed' kind
        writer.add_scalar("nll/mixed", value, step)
    writer.close()
    curves = demo.read_curves(str(tmp_path / "unlearn-paper"))
    assert curves["loss/forget"] == [(2, pytest.approx(0.4)), (4, pytest.approx(0.125))]
    assert curves["nll/forget"][-1] == (4, pytest.approx(8.0))
    write_results(tmp_path, "target", fake_results({"forget": 0.9, "retain": 0.9}, {"forget": 0.9, "retain": 0.9}))
    report = open(demo.build_report(str(tmp_path), ["target", "paper", "recommended"])).read()
    assert "| paper | nll/forget | 2 | 2.500 | 8.000 |" in report
    assert "| recommended | nll/mixed | 2 | 0.500 | 0.250 |" in report
    with open(tmp_path / "curves.png", "rb") as f:
        assert f.read(8) == PNG_MAGIC


def test_wall_time_table(tmp_path):
    write_results(tmp_path, "target", fake_results({"forget": 0.9, "retain": 0.9}, {"forget": 0.9, "retain": 0.9}))
    timings = {"target": {"wall_s": 300.0, "cpu_s": 290.0, "load": 1.2}, "eval-target": {"wall_s": 90.0}}
    report = open(demo.build_report(str(tmp_path), ["target"], timings=timings)).read()
    assert "| target | 5.0 | 4.8 | 1.2 |" in report and "| **total** | 6.5 |" in report


# --- plan and resume ----------------------------------------------------------------------------------------------

def names(steps):
    return [step["name"] for step in steps]


def test_fresh_run_plans_every_step(tmp_path, monkeypatch):
    import prepare_model

    monkeypatch.setattr(prepare_model, "is_converted", lambda path: False)
    steps = demo.plan(demo_args("--run_dir", str(tmp_path), "--also_configs", os.path.join(ROOT, "configs", "npo.yaml")))
    assert names(demo.pending(steps)) == ["prepare", "target", "eval-target", "unlearn-recommended",
                                          "eval-recommended", "unlearn-npo", "eval-npo"]
    by_name = {step["name"]: step["command"] for step in steps}
    assert by_name["prepare"][1].endswith("prepare_model.py")
    target = by_name["target"]
    assert target[1:3] == ["launch", "--num_processes"] and "--cpu" in target
    assert target[target.index("--output_dir") + 1] == str(tmp_path / "target")
    unlearn = by_name["unlearn-recommended"]
    assert unlearn[unlearn.index("--model_name_or_path") + 1] == str(tmp_path / "target")
    assert os.path.basename(unlearn[unlearn.index("--model_name_or_path") - 1]) == "recommended.yaml"
    # the default preset gets the demo's budget flags and its held-out rows; the compared preset runs as written
    assert unlearn[unlearn.index("--learning_rate") + 1] == "5e-4"
    assert unlearn[unlearn.index("--epochs_per_chunk") + 1] == "5"
    assert unlearn[unlearn.index("--calibration_file") + 1].endswith(os.path.join("demo", "calibration.jsonl"))
    assert "--learning_rate" not in by_name["unlearn-npo"] and "--calibration_file" not in by_name["unlearn-npo"]
    evaluation = by_name["eval-npo"]
    assert evaluation[evaluation.index("--model_name_or_path") + 1] == str(tmp_path / "unlearn-npo")
    assert "--mmlu_dir" not in evaluation and "--mia_data_dir" in evaluation


def test_default_run_compares_with_the_paper_preset(tmp_path):
    unlearned = [step["name"] for step in demo.plan(demo_args("--run_dir", str(tmp_path))) if step["kind"] == "train"]
    assert unlearned == ["target", "unlearn-recommended", "unlearn-paper"]
    alone = demo.plan(demo_args("--run_dir", str(tmp_path), "--also_configs", "none", "--unlearn_flags", ""))
    assert [step["name"] for step in alone if step["kind"] == "train"] == ["target", "unlearn-recommended"]
    unlearn = next(step["command"] for step in alone if step["name"] == "unlearn-recommended")
    assert "--learning_rate" not in unlearn


def test_finished_steps_are_skipped(tmp_path, monkeypatch):
    import prepare_model

    monkeypatch.setattr(prepare_model, "is_converted", lambda path: True)
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "train_config.yaml").write_text("config: {}\n")
    write_results(tmp_path, "target", {})
    steps = demo.pending(demo.plan(demo_args("--run_dir", str(tmp_path))))
    assert names(steps) == ["unlearn-recommended", "eval-recommended", "unlearn-paper", "eval-paper"]
    (tmp_path / "unlearn-recommended" / "checkpoints" / "step-6").mkdir(parents=True)
    (tmp_path / "unlearn-recommended" / "checkpoints" / "step-6" / "trainer_state.json").write_text("{}")
    unlearn = demo.pending(demo.plan(demo_args("--run_dir", str(tmp_path))))[0]["command"]
    assert unlearn[-2:] == ["--resume_from_checkpoint", "latest"]  # an interrupted run continues


def test_rerun_of_a_finished_demo_only_rebuilds_the_report(tmp_path):
    args = demo_args("--run_dir", str(tmp_path), "--target_model", str(tmp_path / "given"), "--mmlu_dir", "m",
                     "--mmlu_limit", "5", "--also_configs", "none")
    steps = demo.plan(args)
    assert names(steps) == ["eval-target", "unlearn-recommended", "eval-recommended"]  # no prepare, no target: it was given
    assert steps[0]["command"][-4:] == ["--mmlu_dir", "m", "--mmlu_limit", "5"]
    (tmp_path / "unlearn-recommended").mkdir()
    (tmp_path / "unlearn-recommended" / "train_config.yaml").write_text("config: {}\n")
    for name in ("target", "recommended"):
        write_results(tmp_path, name, fake_results({"forget": 0.9, "retain": 0.9}, {"forget": 0.9, "retain": 0.9}))
    path = demo.run_pipeline(args)  # would fail on any command: none may run
    assert path == os.path.join(str(tmp_path), "report.md") and os.path.isfile(path)


def test_commands_parse_with_the_scripts_own_parsers(tmp_path):
    """Every flag demo.py passes is one train.py / evaluate.py accept, and the target preset loads."""
    import evaluate
    import train

    args = demo_args("--run_dir", str(tmp_path), "--mmlu_dir", "m", "--also_configs",
                     os.path.join(ROOT, "configs", "gi_only.yaml"))
    for step in demo.plan(args, has_gpu=True):
        command = step["command"]
        if step["kind"] == "train":
            assert "--cpu" not in command and command[command.index("--mixed_precision") + 1] == "bf16"
            script = next(i for i, part in enumerate(command) if part.endswith("train.py"))
            parsed = parse_config((train.ModelArguments, train.DataArguments, train.TrainArguments),
                                  command[script + 1:])
            assert parsed[2].output_dir.startswith(str(tmp_path))
        elif step["kind"] == "eval":
            (parsed,) = parse_config([evaluate.EvalArguments], command[2:])
            assert parsed.torch_dtype == "bfloat16" and parsed.mmlu_dir == "m"
    model_args, data_args, train_args = parse_config(
        (train.ModelArguments, train.DataArguments, train.TrainArguments),
        [os.path.join(ROOT, "configs", "target.yaml"), "--model_name_or_path", "m", "--output_dir", "o"])
    assert train_args.forget_loss == "ntp" and train_args.retain_loss == "ntp" and data_args.augment == "none"


def test_subset_keeps_whole_documents(tmp_path):
    args = demo_args("--run_dir", str(tmp_path), "--docs_per_task", "1", "--mia_docs", "2")
    steps = {step["name"]: step for step in demo.plan(args)}
    data_dir, mia_dir = demo.data_dirs(args)
    for name in ("subset-data", "subset-mia"):
        demo.write_subset(steps[name], args)
    from records import load_documents, load_records

    rows = load_records(os.path.join(data_dir, "forget.jsonl"))
    assert {r.task for r in rows} == {"Task1", "Task2", "Task3"}
    assert len({r.id[:-3] for r in rows}) == 3 and len(rows) == 3 + 6 + 3  # sc + its qa rows, per task
    assert len(load_documents(os.path.join(mia_dir, "member.jsonl"))) == 2
    target = steps["target"]["command"]
    assert target[target.index("--data_dir") + 1] == data_dir
    assert names(demo.pending(demo.plan(args)))[:2] != ["subset-data", "subset-mia"]


def test_bad_config_lists_fail_in_one_line(tmp_path):
    with pytest.raises(InputError, match="share a file name"):
        demo.plan(demo_args("--run_dir", str(tmp_path), "--also_configs", os.path.join(ROOT, "configs", "recommended.yaml")))
    with pytest.raises(InputError, match="config file not found"):
        demo.plan(demo_args("--run_dir", str(tmp_path), "--also_configs", "nope.yaml"))


def test_makefile_installs_like_ci():
    """make demo / make test build .venv with exactly the pip installs of .ci/run."""
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    installs = [re.sub(r"\s+#.*", "", line).strip() for line in ci.splitlines() if line.startswith("pip install")]
    assert len(installs) >= 4
    for line in installs:
        assert "$(VENV)/bin/" + line in makefile, line
    assert "$(VENV)/bin/python -m pytest -q tests" in makefile  # the README's test command
