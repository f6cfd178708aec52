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


def split_rows(n_forget=24, n_retain=24):
    """A synthetic split: per task n_forget forget and n_retain retain documents of two rows each."""
    forget = [r for task in ("Task1", "Task2", "Task3") for i in range(n_forget) for r in rows_of(f"f{task}{i}", task)]
    retain = [r for task in ("Task1", "Task2", "Task3") for i in range(n_retain) for r in rows_of(f"r{task}{i}", task)]
    return forget, retain


def bench_args(*flags):
    return cli.parse_config([bench.BenchArguments], list(flags))[0]


def test_draws_are_disjoint_and_reproducible_from_the_seed():
    forget, retain = split_rows()
    args = bench_args("--draws", "4")
    draws = bench.partition_documents(forget, retain, args)
    assert draws == bench.partition_documents(forget, retain, args)  # the seed alone decides
    assert draws != bench.partition_documents(forget, retain, bench_args("--draws", "4", "--seed", "1"))
    forget_docs = {bench.document_id(r.id) for r in forget}
    every = []
    for draw in draws:
        for task in ("Task1", "Task2", "Task3"):
            assert [len(draw[role][task]) for role in bench.ROLES] == [3, 3, 3, 3]
            assert set(draw["forget"][task]) <= forget_docs and not set(draw["retain"][task]) & forget_docs
            assert all(doc[1:6] == task for role in bench.ROLES for doc in draw[role][task])
        every += [doc for role in bench.ROLES for docs in draw[role].values() for doc in docs]
    assert len(every) == len(set(every)) == 4 * 3 * 12  # no document in two roles or two draws


def test_too_many_draws_is_one_line_and_writes_nothing(tmp_path, capsys):
    forget, retain = split_rows(n_forget=7, n_retain=7)  # 14 documents per task: one draw of 12 fits, two do not
    with pytest.raises(cli.InputError, match="Task1 has 7 forget and 7 retain documents; --draws 2 needs 6 of each"):
        bench.partition_documents(forget, retain, bench_args("--draws", "2", "--tuning_draws", "0",
                                                             "--confirmation_draws", "1"))
    data = shared_path("semeval25", "validation")
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as excinfo:
        cli.run_main(lambda: bench.main(["--data_dir", data, "--run_dir", str(run_dir), "--draws", "5"]))
    assert excinfo.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "--draws 5 needs" in lines[0] and "lower --draws" in lines[0]
    assert not run_dir.exists()


@pytest.mark.parametrize("flags, message", [
    (["--draws", "0"], "--draws 0: must be >= 1"),
    (["--tuning_draws", "0,1"], "--tuning_draws and --confirmation_draws share draw 1"),
    (["--confirmation_draws", "1,4"], "--confirmation_draws: draw 4 does not exist (--draws 4: 0 .. 3)"),
    (["--tuning_draws", "a"], "--tuning_draws 'a': expected comma-separated draw numbers"),
    (["--phase", "confirmation", "--confirmation_draws", ""], "--confirmation_draws is empty"),
])
def test_bad_draw_options_are_one_line_errors(flags, message, tmp_path, capsys):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as excinfo:
        cli.run_main(lambda: bench.main(["--run_dir", str(run_dir), *flags]))
    assert excinfo.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], lines
    assert not run_dir.exists()


def test_the_tuning_phase_never_reads_the_confirmation_draws(tmp_path, monkeypatch):
    """Planning and building the tuning phase touch draw 0 only; the data step refuses a confirmation draw."""
    data = shared_path("semeval25", "validation")
    args = bench_args("--data_dir", data, "--run_dir", str(tmp_path / "run"), "--presets", "recommended")
    steps, _ = bench.plan(args)
    assert {step["draw"] for step in steps} == {0}
    paths = [a for step in steps for a in (step["command"] or []) + [step["done"]] + step["needs"]]
    assert all("draw-0" in p for p in paths if str(tmp_path) in p or p.startswith(args.run_dir))
    for draw in (1, 2, 3):
        assert not any(f"draw-{draw}" in p for p in paths)
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    bench.write_data(args, str(tmp_path / "run" / "draw-0" / "data"), 0)
    assert sorted(os.listdir(tmp_path / "run")) == ["draw-0"]
    assert not any("draw-1" in p or "draw-2" in p or "draw-3" in p for p in opened)
    with pytest.raises(RuntimeError, match="draw 1 is not a tuning draw"):
        bench.write_data(args, str(tmp_path / "run" / "draw-1" / "data"), 1)


def test_real_split_roles_are_disjoint(tmp_path):
    data = shared_path("semeval25", "validation")
    args = bench_args("--data_dir", data, "--run_dir", str(tmp_path / "run"), "--mmlu_dir",
                      shared_path("mmlu"), "--phase", "confirmation")
    bench.write_data(args, str(tmp_path / "data"), 2)
    with open(tmp_path / "data" / "documents.json") as f:
        picked = json.load(f)
    assert picked.pop("draw") == 2 and picked.pop("seed") == 0
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
    # general text: the last 2 questions of each of the 57 subjects, none of them among the first (scored) one
    general = [json.loads(line) for line in open(tmp_path / "data" / "general.jsonl")]
    assert len(general) == 57 * 2 and all(not d["id"].endswith("-0") for d in general)
    first = open(os.path.join(shared_path("mmlu"), "test", "abstract_algebra_test.csv")).read()
    assert general[0]["document"].split(" ")[0] in first


def test_summary_is_mean_and_std_over_draws_with_goals(tmp_path):
    """quality.md / quality.json from two draws' results written by hand: means, sample deviations, ratios to each
    draw's target, and a goal missed by its distance."""
    args = bench_args("--run_dir", str(tmp_path), "--tuning_draws", "0,1", "--confirmation_draws", "2,3",
                      "--presets", "recommended")

    def results(agg, auc, nonmember_loss, retain):
        return {"harmonic-mean-task-aggregate": agg, "mia_loss_acc": auc, "mia_final_score": 1 - 2 * abs(auc - 0.5),
                "mia_mean_loss": {"member": 1.0, "nonmember": nonmember_loss}, "mmlu_average": 0.3,
                "retain-set": {"overall-regurgitation-score": retain, "overall-knowledge-score": retain}}

    for draw, (recommended, target) in enumerate([(results(0.8, 0.45, 3.0, 0.9), results(0.0, 0.7, 2.0, 1.0)),
                                                  (results(0.9, 0.55, 4.0, 0.8), results(0.0, 0.7, 2.0, 1.0))]):
        for name, r in (("recommended", recommended), ("target", target)):
            path = tmp_path / f"draw-{draw}" / f"eval-{name}"
            path.mkdir(parents=True)
            (path / "evaluation_results.json").write_text(json.dumps(r))
        (tmp_path / f"draw-{draw}" / "timings").mkdir()
        (tmp_path / f"draw-{draw}" / "timings" / "recommended.json").write_text(json.dumps({"wall_s": 60 * (draw + 1)}))
    path = bench.write_table(args, ["target", "recommended"])
    summary = json.load(open(tmp_path / "tuning" / "quality.json"))
    assert summary["draws"] == [0, 1] and summary["phase"] == "tuning"
    by_draw = summary["runs"]["recommended"]
    assert by_draw["0"]["nonmember NLL x target"] == pytest.approx(1.5)
    assert by_draw["1"]["retain regurg x target"] == pytest.approx(0.8)
    assert by_draw["1"]["train min"] == pytest.approx(2.0)
    # task_mia_mean per draw: (0.8 + 0.9) / 2 = 0.85 and (0.9 + 0.9) / 2 = 0.9 -> mean 0.875, sample std 0.0354
    text = open(path).read()
    assert "| recommended | 2 | 0.875 ± 0.035 |" in text
    assert "| nonmember NLL x target <= 1.15 | 1.750 | no, by 0.600 |" in text
    assert "| loss AUC in [0.45, 0.55] | 0.500 | yes |" in text
    assert "| retain regurg x target >= 0.9 | 0.850 | no, by 0.050 |" in text
    assert (tmp_path / "tuning" / "quality.png").stat().st_size > 0


def test_matched_budget_flags():
    (args,) = cli.parse_config([bench.BenchArguments], ["--learning_rate", "3e-4", "--epochs", "4"])
    paper = bench.budget_flags(os.path.join(ROOT, "configs", "paper.yaml"), args)
    assert paper == ["--learning_rate", "0.0003", "--num_train_epochs", "4"]
    chunked = bench.budget_flags(os.path.join(ROOT, "configs", "ails_ntua.yaml"), args)
    assert chunked[:6] == ["--learning_rate", "0.0003", "--epochs_per_chunk", "4", "--num_train_epochs", "1"]



def test_plan_scores_each_model_after_building_it():
    (args,) = cli.parse_config([bench.BenchArguments], ["--presets", "npo,zjuklab", "--oracle", "false"])
    steps, names = bench.plan(args)
    root = os.path.join(args.run_dir, "draw-0")
    order = [step["name"] for step in steps]
    assert order == ["data", "target", "eval-target", "npo", "eval-npo", "zjuklab_a", "zjuklab_b", "merge-zjuklab",
                     "eval-zjuklab"]
    assert names == ["target", "npo", "zjuklab"]
    calibrated = bench.plan(cli.parse_config([bench.BenchArguments], ["--presets", "calibrated", "--oracle",
                                                                      "false"])[0])[0][3]
    flag = calibrated["command"].index("--calibration_file")
    assert calibrated["command"][flag + 1] == os.path.join(root, "data", "calibration.jsonl")
    merge = steps[order.index("merge-zjuklab")]["command"]
    assert merge[merge.index("--base_model") + 1] == os.path.join(root, "target")


def test_oracle_is_the_target_recipe_without_the_forget_set():
    (args,) = cli.parse_config([bench.BenchArguments], ["--presets", "npo", "--oracle", "true"])
    steps, names = bench.plan(args)
    assert names == ["target", "oracle", "npo"]
    root = os.path.join(args.run_dir, "draw-0")
    by_name = {step["name"]: step for step in steps}
    target, oracle = by_name["target"]["command"], by_name["oracle"]["command"]
    data_dir = os.path.join(root, "data")
    assert "--data_dir" not in oracle and "--forget_file" not in oracle
    assert oracle[oracle.index("--retain_file") + 1] == os.path.join(data_dir, "retain.jsonl")
    # the same preset and base model as the target
    for offset in (-1, 1):
        assert oracle[oracle.index("--model_name_or_path") + offset] == \
            target[target.index("--model_name_or_path") + offset]
    # scored exactly as the target is (same forget/retain, MIA and MMLU sets), only the model and output differ
    rename = {os.path.join(root, "oracle"): "MODEL", os.path.join(root, "eval-oracle"): "OUT",
              os.path.join(root, "target"): "MODEL", os.path.join(root, "eval-target"): "OUT"}
    assert [rename.get(a, a) for a in by_name["eval-oracle"]["command"]] == \
        [rename.get(a, a) for a in by_name["eval-target"]["command"]]
