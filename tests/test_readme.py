"""Every command in the README's bash blocks works as written: each script invocation parses with that script's own
parser (options, choices, the presets and config files it names), and the preset grid's loop (train -> evaluate into
OUT/eval -> compare) runs as written on the tiny model, with placeholders replaced by real paths."""

import os
import re
import shlex
import subprocess
import sys

import pytest

import cli
import compare
import demo
import evaluate
import merge_adapters
import model_card
import plan_memory
import prepare_model
import train
from conftest import ROOT, make_unlearning_data, write_jsonl

README = os.path.join(ROOT, "README.md")
# what each script parses its options with (positionals first where it takes them)
PARSERS = {
    "train.py": train.parse_arguments,
    "evaluate.py": lambda argv: cli.parse_config([evaluate.EvalArguments], argv),
    "demo.py": lambda argv: cli.parse_config([demo.DemoArguments], argv),
    "merge_adapters.py": lambda argv: cli.parse_config([merge_adapters.MergeArguments], argv),
    "prepare_model.py": lambda argv: cli.parse_config([prepare_model.PrepareArguments], argv),
    "plan_memory.py": lambda argv: cli.parse_config([plan_memory.PlanArguments], argv),
    "compare.py": lambda argv: cli.parse_config([compare.CompareArguments],
                                                [a for i, a in enumerate(argv) if any(
                                                    b.startswith("-") for b in argv[:i + 1])]),
    "model_card.py": lambda argv: cli.parse_config([model_card.CardArguments], argv[1:]),
}
ACCELERATE_OPTIONS_WITH_VALUE = {"--config_file", "--mixed_precision", "--num_processes"}


def bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def expand(block):
    """The block's commands, one string each: continuations joined, comments dropped, `for V in ...; do ... done`
    unrolled and an `sbatch --wrap` array job expanded to one command per array element."""
    text = re.sub(r"\\\n\s*", " ", block)
    lines = []
    for line in (line for line in text.splitlines() if line.strip()):
        if lines and lines[-1].count("'") % 2:  # inside a quoted string (sbatch --wrap '...')
            lines[-1] += " " + line.strip()
        else:
            lines.append(line)
    commands, i = [], 0
    while i < len(lines):
        loop = re.match(r"\s*for (\w+) in ([^;]+); do\s*$", lines[i])
        if loop:
            body = []
            i += 1
            while lines[i].strip() != "done":
                body.append(lines[i])
                i += 1
            for value in loop.group(2).split():
                commands += [line.replace(f"${loop.group(1)}", value) for line in body]
        else:
            commands.append(lines[i])
        i += 1
    result = []
    for command in commands:
        words = shlex.split(command, comments=True)
        if "--wrap" in words:  # sbatch --array ... --wrap 'p=(a b); n=${p[$SLURM_ARRAY_TASK_ID]}; cmd $n && cmd'
            wrap = words[words.index("--wrap") + 1]
            names = re.search(r"p=\(([^)]*)\)", wrap).group(1).split()
            body = wrap.split("n=${p[$SLURM_ARRAY_TASK_ID]};", 1)[1]
            result += [part.replace("$n", name) for name in names for part in body.split("&&")]
        else:
            result += [part for part in " ".join(shlex.quote(w) for w in words).split(" '&&' ")]
    return [shlex.split(c) for c in result if c.strip()]


def readme_commands():
    return [words for block in bash_blocks(open(README, encoding="utf-8").read()) for words in expand(block)]


def check_command(words):
    """Assert one README command is valid here; returns what it checked, e.g. 'train.py'."""
    if words[:2] == ["accelerate", "launch"]:
        words = words[2:]
        assert words[0] in ("-q", "--quiet"), f"accelerate launch without -q: {words}"
        while words[0].startswith("-"):
            option = words.pop(0)
            if option in ACCELERATE_OPTIONS_WITH_VALUE:
                value = words.pop(0)
                if option == "--config_file":
                    assert os.path.isfile(os.path.join(ROOT, value)), value
        words = ["python"] + words
    if words[0] == "sbatch":
        script = next(w for w in words if w.endswith(".sbatch"))
        assert os.path.isfile(os.path.join(ROOT, script)), script
        words = ["python", "train.py"] + words[words.index(script) + 1:]  # the sbatch scripts pass these to train.py
    if words[0] in ("python", "python3") and words[1].endswith(".py"):
        script, argv = words[1], words[2:]
        elided = "..." in argv  # "the rest as above": the options shown must parse; a required one may be elided
        argv = argv[:argv.index("...")] if elided else argv
        assert os.path.isfile(os.path.join(ROOT, script)), script
        try:
            PARSERS[script](argv)  # raises InputError on an unknown option, a bad choice, a missing preset
        except cli.InputError as error:
            if not (elided and str(error).endswith("is required")):
                raise
        for word in argv:
            if word.startswith("configs/") or word.startswith("accelerate_configs/"):
                assert os.path.isfile(os.path.join(ROOT, word)), word
        return script
    if words[0] == "make":
        targets = re.findall(r"^([\w-]+):", open(os.path.join(ROOT, "Makefile")).read(), re.M)
        assert words[1] in targets, words
        return "make"
    if words[:2] == ["pip", "install"]:
        pins = dict(line.strip().split("==") for line in open(os.path.join(ROOT, "requirements.txt"))
                    if "==" in line and not line.startswith("#"))
        for word in words[2:]:
            if word == "-r":
                continue
            if word.endswith(".txt"):
                assert os.path.isfile(os.path.join(ROOT, word)), word
            elif "==" in word and word.split("==")[0] in pins:
                assert pins[word.split("==")[0]] == word.split("==")[1], f"{word} vs requirements.txt"
        return "pip"
    if words[:4] == ["python", "-m", "pytest", "-q"]:
        assert words[4:] in (["tests"], ["-m", "not slow", "tests"]), words  # the full suite or the fast lane
        assert "python -m pytest -q tests" in open(os.path.join(ROOT, ".ci", "run")).read()  # CI runs the full one
        return "pytest"
    assert words[0] in ("python3", ".", "tensorboard"), f"a README command this test does not know: {words}"
    return words[0]


def test_readme_commands_parse_with_the_scripts_own_parsers():
    commands = readme_commands()
    checked = [check_command(words) for words in commands]
    # the README's main entry points are all there, so the extraction itself cannot silently find nothing
    assert {"train.py", "evaluate.py", "compare.py", "demo.py", "merge_adapters.py", "make", "pip"} <= set(checked)
    assert checked.count("train.py") >= 10  # the grid loop and the SLURM array alone unroll to 9 each


def test_a_readme_command_with_a_typo_is_caught():
    """The checker fails on what a user would hit: an unknown option, a missing preset, accelerate without -q."""
    bad = ["python train.py configs/paper.yaml --learnig_rate 1e-4", "python train.py configs/nope.yaml",
           "accelerate launch train.py configs/paper.yaml", "python evaluate.py --mia_dir X"]
    for command in bad:
        with pytest.raises((cli.InputError, AssertionError)):
            check_command(shlex.split(command))


@pytest.mark.slow
def test_the_preset_grid_runs_as_written(tmp_path, tiny_model_dir):
    """The README's grid loop (its first preset) and compare.py, run by bash as written: the evaluate layout
    OUT/eval inside the model dir works, compare.py finds every eval dir."""
    block = next(b for b in bash_blocks(open(README, encoding="utf-8").read()) if b.startswith("for preset in"))
    block = re.sub(r"for preset in [^;]+;", "for preset in paper;", block)
    data = make_unlearning_data(tmp_path / "data", n_docs=2)
    mia = tmp_path / "mia"
    mia.mkdir()
    write_jsonl(mia / "member.jsonl", [{"id": f"m{i}", "document": f"Fox dog {i} city magic."} for i in range(2)])
    write_jsonl(mia / "nonmember.jsonl", [{"id": f"n{i}", "document": f"Light {i} dark house."} for i in range(2)])
    for placeholder, path in (("TARGET", tiny_model_dir), ("DATA", data), ("MIA", str(mia))):
        block = re.sub(rf"\b{placeholder}\b", path, block)
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               OMP_NUM_THREADS="1")
    result = subprocess.run(["bash", "-euc", f"cd {shlex.quote(str(tmp_path))} && ln -s {ROOT}/configs configs && "
                             f"ln -s {ROOT}/*.py . && {block}"], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    grid = tmp_path / "runs" / "grid"
    assert (grid / "paper" / "train_config.yaml").is_file()
    assert (grid / "paper" / "eval" / "evaluation_results.json").is_file()
    table = (grid / "comparison" / "comparison.md").read_text()
    assert table.splitlines()[2].startswith("| paper |")
