"""benchmarks/bench_quality.py: the MIA set is real (members trained, nonmembers never), the data roles are disjoint,
and each preset runs at the matched budget."""

import importlib.util
import json
import os

import pytest

import cli
from conftest import ROOT, shared_path
from records import Record

spec = importlib.util.spec_from_file_location("bench_quality", os.path.join(ROOT, "benchmarks", "bench_quality.py"))
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def rows_of(doc, task="Task1"):
    return [Record(f"{doc}sc1", f"{doc} begins", f"{doc} ends.", task, "forget"),
            Record(f"{doc}qa0", f"who is {doc}?", doc, task, "forget")]


def test_mia_set_members_trained_nonmembers_not():
    by_document = {doc: rows_of(doc) for doc in ("a", "b", "c", "d")}
    members, nonmembers = bench.build_mia_set(by_document, ["a"], ["c", "d"], trained_ids=["a", "b"])
    assert members == [{"id": "a", "document": "a begins a ends."}]  # the sc row's input + " " + output
    assert [d["id"] for d in nonmembers] == ["c", "d"]


def test_mia_set_refuses_a_trained_nonmember(capsys):
    by_document = {doc: rows_of(doc) for doc in ("a", "b", "c")}
    with pytest.raises(SystemExit) as excinfo:
        cli.run_main(lambda: bench.build_mia_set(by_document, ["a"], ["b", "c"], trained_ids=["a", "b"]))
    assert excinfo.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: MIA nonmembers include trained documents (b)")
    with pytest.raises(cli.InputError, match="were not trained"):
        bench.build_mia_set(by_document, ["c"], [], trained_ids=["a", "b"])


def test_real_split_roles_are_disjoint(tmp_path):
    data = shared_path("semeval25", "validation")
    (args,) = cli.parse_config([bench.BenchArguments], ["--data_dir", data, "--run_dir", str(tmp_path / "run")])
    bench.write_data(args, str(tmp_path / "data"))
    with open(tmp_path / "data" / "documents.json") as f:
        picked = json.load(f)
    roles = {role: {doc for docs in by_task.values() for doc in docs} for role, by_task in picked.items()}
    for task in ("Task1", "Task2", "Task3"):
        assert len(picked["forget"][task]) == len(picked["retain"][task]) == args.docs_per_task
        assert len(picked["nonmember"][task]) == args.nonmember_docs_per_task
    names = list(roles)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not roles[a] & roles[b], (a, b)
    members = [json.loads(line)["id"] for line in open(tmp_path / "data" / "mia" / "member.jsonl")]
    nonmembers = [json.loads(line)["id"] for line in open(tmp_path / "data" / "mia" / "nonmember.jsonl")]
    trained = {json.loads(line)["id"][:-3] for split in ("forget", "retain")
               for line in open(tmp_path / "data" / f"{split}.jsonl")}
    assert set(members) == roles["forget"] and set(members) <= trained
    assert set(nonmembers) == roles["nonmember"] and not set(nonmembers) & trained
    calibration = {json.loads(line)["id"][:-3] for line in open(tmp_path / "data" / "calibration.jsonl")}
    assert calibration == roles["calibration"] and not calibration & (trained | set(nonmembers))


def test_matched_budget_flags():
    (args,) = cli.parse_config([bench.BenchArguments], ["--learning_rate", "3e-4", "--epochs", "4"])
    paper = bench.budget_flags(os.path.join(ROOT, "configs", "paper.yaml"), args)
    assert paper == ["--learning_rate", "0.0003", "--num_train_epochs", "4"]
    chunked = bench.budget_flags(os.path.join(ROOT, "configs", "ails_ntua.yaml"), args)
    assert chunked[:6] == ["--learning_rate", "0.0003", "--epochs_per_chunk", "4", "--num_train_epochs", "1"]



def test_plan_scores_each_model_after_building_it():
    (args,) = cli.parse_config([bench.BenchArguments], ["--presets", "npo,zjuklab", "--oracle", "false"])
    steps, names = bench.plan(args)
    order = [step["name"] for step in steps]
    assert order == ["data", "target", "eval-target", "npo", "eval-npo", "zjuklab_a", "zjuklab_b", "merge-zjuklab",
                     "eval-zjuklab"]
    assert names == ["target", "npo", "zjuklab"]
    calibrated = bench.plan(cli.parse_config([bench.BenchArguments], ["--presets", "calibrated", "--oracle",
                                                                      "false"])[0])[0][3]
    flag = calibrated["command"].index("--calibration_file")
    assert calibrated["command"][flag + 1] == os.path.join(args.run_dir, "data", "calibration.jsonl")
    merge = steps[order.index("merge-zjuklab")]["command"]
    assert merge[merge.index("--base_model") + 1] == os.path.join(args.run_dir, "target")


def test_oracle_is_the_target_recipe_without_the_forget_set():
    (args,) = cli.parse_config([bench.BenchArguments], ["--presets", "npo"])
    steps, names = bench.plan(args)
    assert names == ["target", "oracle", "npo"]
    by_name = {step["name"]: step for step in steps}
    target, oracle = by_name["target"]["command"], by_name["oracle"]["command"]
    data_dir = os.path.join(args.run_dir, "data")
    assert "--data_dir" not in oracle and "--forget_file" not in oracle
    assert oracle[oracle.index("--retain_file") + 1] == os.path.join(data_dir, "retain.jsonl")
    # the same preset and base model as the target
    for offset in (-1, 1):
        assert oracle[oracle.index("--model_name_or_path") + offset] == \
            target[target.index("--model_name_or_path") + offset]
    # scored exactly as the target is (same forget/retain, MIA and MMLU sets), only the model and output differ
    rename = {os.path.join(args.run_dir, "oracle"): "MODEL", os.path.join(args.run_dir, "eval-oracle"): "OUT",
              os.path.join(args.run_dir, "target"): "MODEL", os.path.join(args.run_dir, "eval-target"): "OUT"}
    assert [rename.get(a, a) for a in by_name["eval-oracle"]["command"]] == \
        [rename.get(a, a) for a in by_name["eval-target"]["command"]]
