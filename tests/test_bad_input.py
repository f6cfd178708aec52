"""Bad-input catalogue for train.py (issue 6): every case fails fast with one line ``error: ...`` on stderr naming
the file (and line), what is wrong and what to do; exit code 2; no traceback; nothing written (the output dir is not
created, every input file and directory keeps its bytes).

Most cases run in-process through ``cli.run_main`` (the same wrapper as ``python train.py``); two run as real
subprocesses to show the real exit path.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

import cli
import train
from conftest import (ROOT, build_tiny_model, build_tiny_tokenizer, check_one_line_error, make_unlearning_data,
                      reset_accelerate, snapshot, write_jsonl)

GOOD_ROW = {"id": "doc1sc1", "input": "Who was born in Paris?", "output": "Marie was.", "task": "Task1"}


def row(**changes):
    return {**GOOD_ROW, **changes}


class Env:
    """One test's inputs: the session's tiny model (read-only), fresh data, a dir for bad files, an output path."""

    def __init__(self, tmp_path, model_dir):
        self.tmp = tmp_path
        self.model = model_dir
        self.data = make_unlearning_data(tmp_path / "data", n_docs=2)
        self.forget = os.path.join(self.data, "forget.jsonl")
        self.retain = os.path.join(self.data, "retain.jsonl")
        self.bad = tmp_path / "bad"
        self.bad.mkdir()
        self.out = str(tmp_path / "out")

    def argv(self, *extra, model=None, out=None, data=True):
        """Model + output dir (+ --data_dir unless data=False) + the case's flags."""
        argv = ["--model_name_or_path", model or self.model, "--output_dir", out or self.out]
        return argv + (["--data_dir", self.data] if data else []) + list(extra)

    def with_forget(self, path):
        """Train on a bad forget file (and the good retain file)."""
        return self.argv("--forget_file", str(path), "--retain_file", self.retain, data=False)

    def jsonl(self, name, rows):
        return write_jsonl(self.bad / name, rows)

    def write(self, name, content):
        path = self.bad / name
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        return str(path)


# Each case: env -> (argv, fragments the error line must contain). Fragments name the file/line and the problem.
CASES = {}


def case(function):
    CASES[function.__name__.replace("_", "-")] = function
    return function


# --- data files ---------------------------------------------------------------------------------------------------

HELD_OUT = [{"id": "held0sc1", "input": "A held-out story begins", "output": "and ends.", "task": "Task1"},
            {"id": "held0qa0", "input": "Who was held out?", "output": "Nobody.", "task": "Task1"},
            {"id": "held1sc1", "input": "Another one begins", "output": "and ends too.", "task": "Task2"},
            {"id": "held1qa0", "input": "Who else?", "output": "Somebody.", "task": "Task2"}]


@case
def calibration_overlaps_forget(env):
    forget_row = next(r for r in map(__import__("json").loads, open(env.forget)) if r["id"].endswith("sc1"))
    path = env.jsonl("calibration.jsonl", HELD_OUT + [forget_row])
    return env.argv("--calibration_file", path), [path, f"row {forget_row['id']} is (part of) a forget document"]


@case
def calibration_empty(env):
    path = env.write("calibration.jsonl", "")
    return env.argv("--calibration_file", path), [path, "no records (the file is empty)"]


@case
def calibration_lacks_a_task(env):
    path = env.jsonl("calibration.jsonl", HELD_OUT[:2])  # Task1 only; the forget set has Task1 and Task2
    return env.argv("--calibration_file", path), [path, "no rows for Task2 qa, Task2 sc", "which the forget set has"]


@case
def token_cap_needs_calibration(env):
    return env.argv("--calibration_token_quantile", "0.9"), ["--calibration_token_quantile", "give --calibration_file"]


@case
def token_cap_needs_an_nll_forget_loss(env):
    path = env.jsonl("calibration.jsonl", HELD_OUT)
    return env.argv("--calibration_file", path, "--calibration_token_quantile", "0.9", "--forget_loss", "npo",
                    "--lora_r", "4"), ["--forget_loss npo is not NLL-based"]


@case
def best_model_metric_needs_the_mia(env):
    return env.argv("--eval_steps", "2"), ["--metric_for_best_model task_mia_mean needs the MIA",
                                           "--calibration_file"]


@case
def early_stopping_needs_evaluations(env):
    return env.argv("--early_stopping_patience", "2"), ["--early_stopping_patience counts dev evaluations",
                                                        "give --eval_steps"]


@case
def missing_file(env):
    path = str(env.bad / "forget.jsonl")
    return env.with_forget(path), [path, "file not found"]


@case
def empty_file(env):
    path = env.write("forget.jsonl", "")
    return env.with_forget(path), [path, "no records (the file is empty)"]


@case
def line_not_json(env):
    path = env.write("forget.jsonl", '{"id": "doc1sc1", "input": "a", "output": "b", "task": "Task1"}\n'
                                     '{"id": "doc2sc1", "input": "a", "output": "b"\n')
    return env.with_forget(path), [f"{path}:2:", "not valid JSON"]


@case
def line_not_object(env):
    path = env.write("forget.jsonl", '["doc1sc1", "a", "b", "Task1"]\n')
    return env.with_forget(path), [f"{path}:1:", "expected a JSON object"]


@case
def missing_output_field(env):
    bad = {k: v for k, v in row(id="doc3sc1").items() if k != "output"}
    path = env.jsonl("forget.jsonl", [row(), row(id="doc2sc1"), bad])
    return env.with_forget(path), [f"{path}:3:", "missing field 'output'"]


@case
def non_string_field(env):
    path = env.jsonl("forget.jsonl", [row(output=42)])
    return env.with_forget(path), [f"{path}:1:", "field 'output' must be a string, got a number"]


@case
def null_field(env):
    path = env.jsonl("retain.jsonl", [row(), row(id="doc2qa0", input=None)])
    return env.argv("--retain_file", path, "--forget_file", env.forget, data=False), \
        [f"{path}:2:", "field 'input' must be a string, got null"]


@case
def id_without_kind(env):
    path = env.jsonl("forget.jsonl", [row(id="doc7")])
    return env.with_forget(path), [f"{path}:1:", "id 'doc7' does not end in sc<digit> or qa<digit>"]


@case
def unknown_task(env):
    path = env.jsonl("forget.jsonl", [row(task="Task9")])
    return env.with_forget(path), [f"{path}:1:", "unknown task 'Task9'", "Task1, Task2, Task3"]


@case
def duplicate_ids(env):
    path = env.jsonl("forget.jsonl", [row(), row(input="Another question?")])
    return env.with_forget(path), [f"{path}:2:", "duplicate id 'doc1sc1' (first on line 1)"]


@case
def not_utf8(env):
    path = env.write("forget.jsonl", b'{"id": "doc1sc1", "input": "a", "output": "b", "task": "Task1"}\n'
                                     b'{"id": "doc2sc1", "input": "caf\xe9", "output": "b", "task": "Task1"}\n')
    return env.with_forget(path), [f"{path}:2:", "not UTF-8 text", "re-encode"]


@case
def one_megabyte_answer(env):
    path = env.jsonl("forget.jsonl", [row(), row(id="doc2sc1", output="x" * 1_000_000)])
    return env.with_forget(path), [f"{path}:2:", "field 'output' has 1000000 characters (limit 100000)"]


@case
def unknown_extension(env):
    path = env.write("forget.csv", "id,input,output,task\ndoc1sc1,a,b,Task1\n")
    return env.with_forget(path), [path, "unknown extension '.csv' (use .jsonl or .parquet)"]


@case
def data_file_is_a_directory(env):
    return env.with_forget(env.data), [env.data, "is a directory"]


@case
def data_dir_missing(env):
    missing = str(env.tmp / "no-such-data")
    return env.argv("--data_dir", missing, data=False), [f"--data_dir {missing}: directory not found"]


@case
def data_dir_without_retain(env):
    os.makedirs(env.bad / "only-forget")
    shutil.copy(env.forget, env.bad / "only-forget" / "forget.jsonl")
    directory = str(env.bad / "only-forget")
    return env.argv("--data_dir", directory, data=False), [directory, "no retain.jsonl or retain.parquet"]


@case
def parquet_missing_column(env):
    import pandas as pd

    path = str(env.bad / "forget.parquet")
    pd.DataFrame([{k: v for k, v in row(id=f"doc{i}sc1").items() if k != "output"} for i in range(2)]) \
        .to_parquet(path)
    return env.with_forget(path), [f"{path}:1:", "missing field 'output'"]


@case
def parquet_corrupt(env):
    path = env.write("forget.parquet", b"PAR1 this is not really parquet")
    return env.with_forget(path), [path, "cannot read parquet"]


@case
def idk_file_missing(env):
    path = str(env.bad / "idk.txt")
    return env.argv("--idk_responses", "--idk_file", path), [f"--idk_file {path}: file not found"]


# --- model and output dirs ----------------------------------------------------------------------------------------

@case
def model_dir_missing(env):
    path = str(env.tmp / "no-such-model")
    return env.argv(model=path), [path, "no such model directory"]


@case
def model_dir_without_tokenizer(env):
    path = str(env.bad / "model")
    build_tiny_model(build_tiny_tokenizer()).save_pretrained(path)  # weights + config.json only
    return env.argv(model=path), [path, "no tokenizer files", "tokenizer.save_pretrained"]


@case
def model_dir_without_weights(env):
    path = str(env.bad / "model")
    build_tiny_tokenizer().save_pretrained(path)  # tokenizer only: fails after the data load, at the model load
    return env.argv(model=path), [path, "cannot load a causal LM"]


@case
def output_dir_is_model_dir(env):
    return env.argv(out=env.model), [f"--output_dir {env.model}: overlaps the input {env.model}"]


@case
def output_dir_inside_data_dir(env):
    out = os.path.join(env.data, "out")
    return env.argv(out=out), [f"--output_dir {out}: overlaps the input {env.data}"]


@case
def output_dir_is_a_file(env):
    path = env.write("out.txt", "not a directory\n")
    return env.argv(out=path), [f"--output_dir {path}: exists and is not a directory"]


def make_finished_run(out):
    os.makedirs(out)
    with open(os.path.join(out, train.TRAIN_RECORD), "w") as f:
        f.write("result: {optimizer_steps: 7}\n")
    with open(os.path.join(out, "model.safetensors"), "wb") as f:
        f.write(b"earlier run")


@case
def output_dir_holds_finished_run(env):
    make_finished_run(env.out)
    return env.argv(), [f"--output_dir {env.out}: already holds a finished run", "--overwrite_output_dir"]


@case
def output_dir_holds_unfinished_run(env):
    checkpoint = os.path.join(env.out, "checkpoints", "step-3")
    os.makedirs(checkpoint)
    with open(os.path.join(checkpoint, train.CHECKPOINT_STATE), "w") as f:
        f.write('{"step": 3}\n')
    return env.argv(), [f"--output_dir {env.out}: holds checkpoints of an unfinished run",
                        "--resume_from_checkpoint latest"]


@case
def resume_latest_without_checkpoint(env):
    return env.argv("--resume_from_checkpoint", "latest"), \
        ["--resume_from_checkpoint latest: no finished checkpoint under", "run without it"]


@case
def resume_from_non_checkpoint(env):
    return env.argv("--resume_from_checkpoint", env.data), \
        [f"--resume_from_checkpoint {env.data}: not a finished checkpoint"]


# --- options and config files -------------------------------------------------------------------------------------

@case
def yaml_unknown_key(env):
    path = env.write("config.yaml", "learning_rate: 1.0e-4\nlearnign_rate: 2.0e-4\n")
    return [path, *env.argv()], [path, "unknown option 'learnign_rate'"]


@case
def yaml_list_value(env):
    path = env.write("config.yaml", "num_train_epochs: [1, 2]\n")
    return [path, *env.argv()], [path, "option 'num_train_epochs' must be a single value"]


@case
def yaml_wrong_type(env):
    path = env.write("config.yaml", "num_train_epochs: 2.5\n")
    return [path, *env.argv()], [path, "option 'num_train_epochs' must be an integer, got 2.5"]


@case
def yaml_not_valid(env):
    path = env.write("config.yaml", "learning_rate: [1.0e-4\n")
    return [path, *env.argv()], [f"{path}:2: not valid YAML"]


@case
def yaml_missing(env):
    path = str(env.bad / "paper.yaml")
    return [path, *env.argv()], [path, "config file not found"]


@case
def negative_learning_rate(env):
    return env.argv("--learning_rate=-1e-4"), ["--learning_rate -0.0001: must be > 0"]


@case
def negative_lora_rank(env):
    return env.argv("--lora_r=-2"), ["--lora_r -2: must be >= 0"]


@case
def zero_epochs(env):
    return env.argv("--num_train_epochs", "0"), ["--num_train_epochs 0: must be >= 1"]


@case
def option_not_a_number(env):
    return env.argv("--learning_rate", "abc"), ["--learning_rate", "invalid float value: 'abc'", "--help"]


@case
def unknown_option(env):
    return env.argv("--learnin_rate", "1e-4"), ["unknown option", "--learnin_rate 1e-4", "--help"]


@case
def unknown_torch_dtype(env):  # checked at the model load, after the accelerator exists
    return env.argv("--torch_dtype", "fp8"), ["--torch_dtype fp8: expected one of auto, bfloat16"]


# --- the checks ---------------------------------------------------------------------------------------------------

def run_in_process(argv, capsys):
    """``python train.py ARGV`` in this process: (exit code, stderr)."""
    reset_accelerate()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as excinfo:
            cli.run_main(lambda: train.main(argv))
    finally:  # train() installs preemption handlers; give pytest its own back
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return excinfo.value.code, capsys.readouterr().err


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path, tiny_model_dir, capsys):
    env = Env(tmp_path, tiny_model_dir)
    argv, fragments = CASES[name](env)
    out_existed = os.path.exists(env.out)
    before = snapshot(tmp_path, tiny_model_dir)
    code, stderr = run_in_process(argv, capsys)
    check_one_line_error(code, stderr, fragments)
    assert snapshot(tmp_path, tiny_model_dir) == before  # nothing written, nothing changed
    assert os.path.exists(env.out) == out_existed


def test_a_bom_crlf_jsonl_with_blank_lines_reads_like_the_plain_file(tmp_path):
    """What a Windows editor writes (a UTF-8 byte-order mark, CRLF line ends, a trailing blank line) is valid input."""
    from records import load_records

    rows = [row(id="doc1sc1"), row(id="doc1qa0", input="Who?", output="Ann.")]
    plain = write_jsonl(tmp_path / "plain.jsonl", rows)
    windows = tmp_path / "windows.jsonl"
    windows.write_bytes(b"\xef\xbb\xbf" + b"\r\n\r\n".join(json.dumps(r).encode() for r in rows) + b"\r\n\r\n")
    assert load_records(str(windows)) == load_records(plain)
    assert [r.id for r in load_records(str(windows))] == ["doc1sc1", "doc1qa0"]


def test_catalogue_size():
    assert len(CASES) >= 15


def test_yaml_values_parse_like_flags(tmp_path):
    """The YAML type check (cli._yaml_value) keeps valid configs as they were: each value parses as its flag."""
    config = tmp_path / "config.yaml"
    config.write_text("merge_lora: false\nlearning_rate: 1e-4\nalpha: 2\nrun_name: 2024\nnum_train_epochs: 3\n"
                      "data_dir:\n")
    model_args, data_args, train_args = cli.parse_config(
        (train.ModelArguments, train.DataArguments, train.TrainArguments), [str(config)])
    assert model_args.merge_lora is False and data_args.data_dir is None
    assert (train_args.learning_rate, train_args.alpha, train_args.run_name, train_args.num_train_epochs) == \
        (1e-4, 2.0, "2024", 3)
    model_args, _, _ = cli.parse_config((train.ModelArguments, train.DataArguments, train.TrainArguments),
                                        [str(config), "--merge_lora"])
    assert model_args.merge_lora is True  # a flag still overrides the file


def test_overwrite_output_dir_replaces_a_finished_run(tmp_path, tiny_model_dir, capsys):
    env = Env(tmp_path, tiny_model_dir)
    make_finished_run(env.out)
    argv = env.argv("--lora_r", "0", "--max_steps", "1", "--per_device_train_batch_size", "2",
                    "--report_to", "none")
    code, stderr = run_in_process(argv, capsys)
    check_one_line_error(code, stderr, ["already holds a finished run"])

    inputs = snapshot(env.data, tiny_model_dir)
    reset_accelerate()
    assert train.main(argv + ["--overwrite_output_dir"]) == 0
    import yaml

    with open(os.path.join(env.out, train.TRAIN_RECORD)) as f:
        result = yaml.safe_load(f)["result"]
    assert result["optimizer_steps"] == 1
    with open(os.path.join(env.out, "model.safetensors"), "rb") as f:
        assert f.read() != b"earlier run"
    assert snapshot(env.data, tiny_model_dir) == inputs


SUBPROCESS_CASES = ["output-dir-holds-finished-run", "option-not-a-number"]
# On PYTHONPATH, tests/force_avx512bf16/sitecustomize.py makes bitsandbytes take the import path of CPUs with
# AVX512-BF16, which logs a warning unless cli.py filters it: the one-line errors must not depend on the CPU model.
FORCE_AVX512_BF16 = os.path.join(ROOT, "tests", "force_avx512bf16")


def cpu_env(cpu):
    env = dict(os.environ)
    if cpu == "avx512_bf16":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [FORCE_AVX512_BF16, env.get("PYTHONPATH")]))
    return env


@pytest.mark.slow
def test_avx512_bf16_branch_is_forced():
    """Without cli's filter, importing bitsandbytes on the forced branch prints the warning: the test below can fail."""
    code = "import peft"  # what train.py's model loading imports; peft imports bitsandbytes
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cpu_env("as-is"))
    forced = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cpu_env("avx512_bf16"))
    filtered = subprocess.run([sys.executable, "-c", "import cli; " + code], cwd=ROOT, capture_output=True,
                              text=True, env=cpu_env("avx512_bf16"))
    assert forced.returncode == plain.returncode == filtered.returncode == 0
    assert "gemm_4bit_forward" in forced.stderr
    assert "gemm_4bit_forward" not in filtered.stderr


@pytest.mark.slow
@pytest.mark.parametrize("cpu", ["as-is", "avx512_bf16"])
def test_real_exit_path(tmp_path, tiny_model_dir, cpu):
    """Two cases through ``python train.py`` (run concurrently to keep CI fast): the real stderr and exit code, on
    this CPU and with bitsandbytes' AVX512-BF16 import path forced."""
    runs = []
    for name in SUBPROCESS_CASES:
        env = Env(tmp_path / name, tiny_model_dir)
        argv, fragments = CASES[name](env)
        process = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *argv], cwd=ROOT, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cpu_env(cpu))
        runs.append((env, fragments, process, snapshot(env.tmp, tiny_model_dir), os.path.exists(env.out)))
    for env, fragments, process, before, out_existed in runs:
        stdout, stderr = process.communicate(timeout=300)
        check_one_line_error(process.returncode, stderr, fragments)
        assert stdout == ""
        assert snapshot(env.tmp, tiny_model_dir) == before  # the earlier run's output dir included
        assert os.path.exists(env.out) == out_existed


@pytest.mark.parametrize("options, required", [
    ("train.ModelArguments", {}), ("train.DataArguments", {}), ("train.TrainArguments", {"output_dir": "o"}),
    ("evaluate.EvalArguments", {"output_dir": "o", "model_name_or_path": "m"}),
    ("augment.AugmentArguments", {"input": "i.jsonl", "output": "o.jsonl"}), ("demo.DemoArguments", {}),
])
def test_every_declared_choice_is_checked_in_python_too(options, required):
    """Options built in Python (not parsed) get the one choices check (cli.check_choices) on every enumerated field:
    a value outside its choices fails naming the flag, the first choice passes."""
    import dataclasses
    import importlib

    module, name = options.split(".")
    cls = getattr(importlib.import_module(module), name)
    enumerated = [f for f in dataclasses.fields(cls) if "choices" in f.metadata]
    assert enumerated, f"{options} declares no choices"
    for option in enumerated:
        with pytest.raises(ValueError, match=f"^--{option.name} bogus: expected one of "
                                             f"{', '.join(map(str, option.metadata['choices']))}$"):
            cls(**required, **{option.name: "bogus"})
        assert getattr(cls(**required, **{option.name: option.metadata["choices"][0]}), option.name) == \
            option.metadata["choices"][0]


def test_plan_memory_checks_its_choices():
    import plan_memory

    args = plan_memory.PlanArguments(model_name_or_path="allenai/OLMo-7B-0724-hf", zero_stage=4)
    with pytest.raises(ValueError, match=r"^--zero_stage 4: expected one of 0, 1, 2, 3$"):
        plan_memory.check_plan_arguments(args)
