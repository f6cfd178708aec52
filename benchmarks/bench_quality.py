"""Unlearning quality benchmark: every preset at one matched budget on a target we built, scored with a real MIA.

    python benchmarks/bench_quality.py                                 # CPU default (about an hour on 2 cores)
    python benchmarks/bench_quality.py --presets paper,npo --docs_per_task 10 --mmlu_limit 5   # a GPU, more data

On the public SemEval-2025 Task 4 validation split (documents = rows sharing an id prefix), seeded:
  data        per task, N forget documents (from the forget split) and N retain documents (from the retain split) to
              train the target on; M other documents per task, never trained, as the MIA nonmembers; K more, never
              trained either, as the calibration / dev nonmembers of the calibrated presets (disjoint from the MIA
              nonmembers, so no preset is tuned on the documents it is scored on)
  target      train.py configs/target.yaml on forget + retain (as the organisers built theirs): the memorised model
  eval-target evaluate.py: MIA members = the forget documents trained into the target (text = the sc row's input +
              " " + output, like the organisers' files), nonmembers as above; MMLU with a per-subject limit
  oracle      the target's recipe on the retain documents alone (never the forget documents): exact unlearning,
              the reference a method is compared with on this data; scored like every model
  PRESET      train.py configs/PRESET.yaml from the target, at the matched budget (--learning_rate, --epochs), then
              evaluate.py; zjuklab = two runs merged with TIES (merge_adapters.py)
  table       RUN_DIR/quality.md + quality.png (compare.py) with the 12 terms, task aggregate, MIA AUC and score, MMLU,
              final, and mean(task aggregate, MIA score)

Each step is skipped when its output exists, so an interrupted benchmark picks up where it stopped and presets can be
added later. Numbers go to RESULTS.md by hand, with the date and the machine.
"""

import contextlib
import json
import os
import random
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import yaml  # noqa: E402

from cli import InputError, parse_config, run_main  # noqa: E402
from artefacts import RESULTS_FILE, TRAIN_RECORD, write_atomic  # noqa: E402
from demo import DEFAULT_MODEL, eval_command, here, run_command, train_command  # noqa: E402
from records import TASKS, load_records  # noqa: E402

SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")
DEFAULT_PRESETS = "paper,paper_authors,grad_diff,npo,ails_ntua,zjuklab,calibrated,recommended"


@dataclass
class BenchArguments:
    data_dir: str = field(default=os.path.relpath(os.path.join(SHARED_DATA, "semeval25", "validation")), metadata={
        "help": "SemEval split with forget.jsonl and retain.jsonl (the validation split: tune on it, not on test)."})
    mmlu_dir: str = field(default=os.path.relpath(os.path.join(SHARED_DATA, "mmlu")), metadata={
        "help": "Hendrycks MMLU dir ('' = no MMLU: the final score is then partial)."})
    mmlu_limit: int = field(default=1, metadata={"help": "MMLU questions per subject (57 subjects)."})
    docs_per_task: int = field(default=3, metadata={"help": "Forget and retain documents per task (each)."})
    nonmember_docs_per_task: int = field(default=5, metadata={"help": "Never-trained documents per task: the MIA "
                                                              "nonmembers."})
    calibration_docs_per_task: int = field(default=3, metadata={"help": "Never-trained documents per task, disjoint "
                                                                "from the MIA nonmembers: --calibration_file of the "
                                                                "calibrated presets."})
    seed: int = field(default=0, metadata={"help": "Seed for picking the documents."})
    presets: str = field(default=DEFAULT_PRESETS, metadata={"help": "Comma-separated configs/NAME.yaml to run "
                                                            "(zjuklab: configs/zjuklab.yaml + zjuklab_b.yaml merged)."})
    learning_rate: float = field(default=5e-4, metadata={"help": "The matched budget: every preset's learning rate."})
    epochs: int = field(default=5, metadata={"help": "The matched budget: passes over the forget set for every "
                                             "preset (chunked presets: --epochs_per_chunk, one pass over the "
                                             "chunks)."})
    model_name_or_path: str = field(default=DEFAULT_MODEL, metadata={
        "help": "Pretrained model the target is fine-tuned from (default: SmolLM2-135M-Instruct, prepare_model.py)."})
    run_dir: str = field(default=here("runs", "bench_quality"), metadata={"help": "Where every step writes."})
    max_new_tokens: int = field(default=256, metadata={"help": "Greedy generation limit when scoring (official)."})
    batch_size: int = field(default=16, metadata={"help": "Evaluation batch size."})
    eval_dtype: str = field(default="auto", metadata={"help": "evaluate.py --torch_dtype (auto: bf16 on GPU, fp32 "
                                                      "on CPU)."})
    mixed_precision: str = field(default="auto", metadata={"help": "accelerate --mixed_precision for training."})
    oracle: bool = field(default=True, metadata={"help": "Also build and score the oracle: the target's recipe on "
                                                 "the retain documents alone, a model that never saw the forget "
                                                 "documents (exact unlearning: the reference an unlearning method is "
                                                 "compared with on this data)."})
    dry_run: bool = field(default=False, metadata={"help": "Print the steps and stop."})

    def __post_init__(self):
        for name in ("docs_per_task", "nonmember_docs_per_task", "calibration_docs_per_task", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1")


# --- data ---------------------------------------------------------------------------------------------------------

def document_id(record_id):
    return record_id[:-3]  # ids are <document id> + sc<digit> or qa<digit>


def pick_documents(forget_rows, retain_rows, args):
    """{role: {task: [document ids]}} for forget, retain (trained), nonmember and calibration (never trained)."""
    rng = random.Random(args.seed)
    picked = {role: {} for role in ("forget", "retain", "nonmember", "calibration")}
    for task in TASKS:
        docs = {split: sorted({document_id(r.id) for r in rows if r.task == task})
                for split, rows in (("forget", forget_rows), ("retain", retain_rows))}
        for split in docs:
            rng.shuffle(docs[split])
        rest = docs["forget"][args.docs_per_task:] + docs["retain"][args.docs_per_task:]
        rng.shuffle(rest)
        need = args.docs_per_task, args.nonmember_docs_per_task, args.calibration_docs_per_task
        if min(len(docs["forget"]), len(docs["retain"])) < need[0] or len(rest) < need[1] + need[2]:
            raise InputError(f"{args.data_dir}: {task} has too few documents for --docs_per_task {need[0]}, "
                             f"--nonmember_docs_per_task {need[1]}, --calibration_docs_per_task {need[2]}")
        picked["forget"][task] = docs["forget"][:need[0]]
        picked["retain"][task] = docs["retain"][:need[0]]
        picked["nonmember"][task] = rest[:need[1]]
        picked["calibration"][task] = rest[need[1]:need[1] + need[2]]
    return picked


def sc_document(row):
    """The MIA text of a document: its sc row's input + " " + output, as in the organisers' member/nonmember files."""
    return {"id": document_id(row.id), "document": row.input + " " + row.output}


def build_mia_set(rows_by_document, member_ids, nonmember_ids, trained_ids):
    """(members, nonmembers) as MIA document dicts. A nonmember that was trained would make the attack measure
    nothing, so any overlap with the trained documents is refused."""
    overlap = sorted(set(nonmember_ids) & set(trained_ids))
    if overlap:
        raise InputError(f"MIA nonmembers include trained documents ({', '.join(overlap[:3])}"
                         f"{', ...' if len(overlap) > 3 else ''}); nonmembers must never be trained into the target")
    missing = sorted(set(member_ids) - set(trained_ids))
    if missing:
        raise InputError(f"MIA members {', '.join(missing[:3])} were not trained into the target")

    def documents(ids):
        return [sc_document(r) for doc in ids for r in rows_by_document[doc] if r.kind == "sc"]

    return documents(member_ids), documents(nonmember_ids)


def write_data(args, data_dir):
    forget_rows = load_records(os.path.join(args.data_dir, "forget.jsonl"))
    retain_rows = load_records(os.path.join(args.data_dir, "retain.jsonl"))
    picked = pick_documents(forget_rows, retain_rows, args)
    by_document = {}
    for r in forget_rows + retain_rows:
        by_document.setdefault(document_id(r.id), []).append(r)

    def ids(role):
        return [doc for task in TASKS for doc in picked[role][task]]

    def jsonl(rows):
        return "".join(json.dumps(row) + "\n" for row in rows)

    def row_dict(r):
        return {"id": r.id, "input": r.input, "output": r.output, "task": r.task, "split": r.split}

    members, nonmembers = build_mia_set(by_document, ids("forget"), ids("nonmember"), ids("forget") + ids("retain"))
    for role in ("forget", "retain"):
        write_atomic(os.path.join(data_dir, f"{role}.jsonl"), jsonl(row_dict(r) for doc in ids(role)
                                                                    for r in by_document[doc]))
    write_atomic(os.path.join(data_dir, "calibration.jsonl"), jsonl(row_dict(r) for doc in ids("calibration")
                                                                    for r in by_document[doc]))
    write_atomic(os.path.join(data_dir, "mia", "member.jsonl"), jsonl(members))
    write_atomic(os.path.join(data_dir, "mia", "nonmember.jsonl"), jsonl(nonmembers))
    write_atomic(os.path.join(data_dir, "documents.json"), json.dumps(picked, indent=2))
    print(f"data: {len(ids('forget'))} forget, {len(ids('retain'))} retain documents; MIA {len(members)} members, "
          f"{len(nonmembers)} nonmembers; {len(ids('calibration'))} calibration documents -> {data_dir}")


# --- plan ---------------------------------------------------------------------------------------------------------

def budget_flags(config, args):
    """The matched budget for a preset: the same learning rate and passes over the forget set."""
    with open(config, encoding="utf-8") as f:
        preset = yaml.safe_load(f) or {}
    flags = ["--learning_rate", str(args.learning_rate)]
    if preset.get("schedule") == "chunked":
        flags += ["--epochs_per_chunk", str(args.epochs), "--num_train_epochs", "1"]
    else:
        flags += ["--num_train_epochs", str(args.epochs)]
    return flags


def preset_runs(name):
    """The train.py runs a preset consists of: [(run name, config)]; zjuklab merges two."""
    if name == "zjuklab":
        return [("zjuklab_a", here("configs", "zjuklab.yaml")), ("zjuklab_b", here("configs", "zjuklab_b.yaml"))]
    return [(name, here("configs", f"{name}.yaml"))]


def plan(args, has_gpu=False):
    """Steps in order, each model scored right after it is built: [{name, kind (data/train/merge/eval), command,
    done, finished}], and the model names in table order."""
    data_dir = os.path.join(args.run_dir, "data")
    target = os.path.join(args.run_dir, "target")

    def evaluation(name, model, needs):
        out = os.path.join(args.run_dir, f"eval-{name}")
        return {"name": f"eval-{name}", "kind": "eval", "done": os.path.join(out, RESULTS_FILE), "needs": [needs],
                "command": eval_command(args, has_gpu, model, data_dir, os.path.join(data_dir, "mia"), out)}

    data_done, target_done = os.path.join(data_dir, "documents.json"), os.path.join(target, TRAIN_RECORD)
    steps = [{"name": "data", "kind": "data", "command": None, "done": data_done, "needs": []},
             {"name": "target", "kind": "train", "done": target_done, "needs": [data_done],
              "command": train_command(args, has_gpu, here("configs", "target.yaml"), args.model_name_or_path,
                                       data_dir, target, "target")},
             evaluation("target", target, target_done)]
    names = ["target"]
    if args.oracle:
        oracle = os.path.join(args.run_dir, "oracle")
        command = train_command(args, has_gpu, here("configs", "target.yaml"), args.model_name_or_path, data_dir,
                                oracle, "oracle")
        at = command.index("--data_dir")
        command[at:at + 2] = ["--retain_file", os.path.join(data_dir, "retain.jsonl")]  # no forget set at all
        steps += [{"name": "oracle", "kind": "train", "done": os.path.join(oracle, TRAIN_RECORD), "needs": [data_done],
                   "command": command},
                  evaluation("oracle", oracle, os.path.join(oracle, TRAIN_RECORD))]
        names.append("oracle")
    for name in [p.strip() for p in args.presets.split(",") if p.strip()]:
        runs = preset_runs(name)
        for run_name, config in runs:
            if not os.path.isfile(config):
                raise InputError(f"--presets {name}: {config} not found")
            out = os.path.join(args.run_dir, run_name)
            steps.append({"name": run_name, "kind": "train", "done": os.path.join(out, TRAIN_RECORD),
                          "needs": [target_done], "command": train_command(args, has_gpu, config, target, data_dir, out, run_name,
                                                   os.path.join(data_dir, "calibration.jsonl"))
                          + budget_flags(config, args)})
        model, model_done = os.path.join(args.run_dir, runs[0][0]), steps[-1]["done"]
        if len(runs) > 1:
            model = os.path.join(args.run_dir, name)
            adapters = ",".join(os.path.join(args.run_dir, run_name, "adapter") for run_name, _ in runs)
            model_done = os.path.join(model, "merge_config.yaml")
            steps.append({"name": f"merge-{name}", "kind": "merge", "done": model_done,
                          "needs": [step["done"] for step in steps[-len(runs):]],
                          "command": [sys.executable, here("merge_adapters.py"), "--base_model", target,
                                      "--adapters", adapters, "--output_dir", model]})
        steps.append(evaluation(name, model, model_done))
        names.append(name)
    for step in steps:
        step["finished"] = os.path.exists(step["done"])
    return steps, names


def write_table(args, names):
    """quality.md + quality.png: compare.py's table and chart, plus mean(task aggregate, MIA score) ranked."""
    from artefacts import read_results
    from compare import comparison_table, plot_comparison

    named = [(name, read_results(os.path.join(args.run_dir, f"eval-{name}"))) for name in names
             if os.path.isfile(os.path.join(args.run_dir, f"eval-{name}", RESULTS_FILE))]
    plot = os.path.join(args.run_dir, "quality.png")
    plot_comparison(named, plot)
    ranked = sorted(((task_mia_mean(r), name, r) for name, r in named), key=lambda t: -(t[0] or -1))
    lines = [f"# Quality benchmark ({time.strftime('%Y-%m-%d')})", "",
             f"{args.docs_per_task} forget + {args.docs_per_task} retain documents per task of `{args.data_dir}`, "
             f"seed {args.seed}; MIA nonmembers {args.nonmember_docs_per_task} never-trained documents per task; "
             f"matched budget lr {args.learning_rate}, {args.epochs} passes over the forget set; MMLU "
             f"{args.mmlu_limit or 'all'} per subject.", "", comparison_table(named), "",
             "Ranked by mean(task aggregate, MIA score):", "", "| run | task aggregate | MIA AUC | MIA score | "
             "mean(task agg., MIA score) |", "|---|---|---|---|---|"]
    for mean, name, r in ranked:
        lines.append(f"| {name} | {fmt(r.get('harmonic-mean-task-aggregate'))} | {fmt(r.get('mia_loss_acc'))} | "
                     f"{fmt(r.get('mia_final_score'))} | {fmt(mean)} |")
    lines += ["", f"![quality]({os.path.basename(plot)})", ""]
    path = os.path.join(args.run_dir, "quality.md")
    write_atomic(path, "\n".join(lines))
    return path


def task_mia_mean(results):
    task, mia = results.get("harmonic-mean-task-aggregate"), results.get("mia_final_score")
    return None if task is None or mia is None else (task + mia) / 2


def fmt(value):
    return "n/a" if value is None else f"{value:.3f}"


@contextlib.contextmanager
def step_lock(output_dir):
    """Several bench_quality processes may share a run dir (one per core or GPU, with different --presets): a step
    runs in the one that holds OUTPUT_DIR.lock; yields None to the holder, the other live holder's pid otherwise."""
    lock = output_dir.rstrip(os.sep) + ".lock"
    os.makedirs(os.path.dirname(lock) or ".", exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            with open(lock, encoding="utf-8") as f:
                owner = int(f.read().strip() or 0)
            try:
                os.kill(owner, 0)
                yield owner
                return
            except (ProcessLookupError, ValueError):
                os.remove(lock)  # left by a process that died
                continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        try:
            yield None
        finally:
            os.remove(lock)
        return


def run_step(step, args):
    print(f"\n=== {step['name']} ===", flush=True)
    start = time.time()
    if step["kind"] == "data":
        write_data(args, os.path.join(args.run_dir, "data"))
    else:
        output_dir = os.path.dirname(step["done"])
        if step["kind"] != "eval" and os.path.isdir(output_dir) and "--resume_from_checkpoint" not in \
                step["command"]:
            print(f"removing {output_dir}: an unfinished run without checkpoints starts over")
            shutil.rmtree(output_dir)
        print("$ " + shlex.join(step["command"]), flush=True)
        run_command(step["command"], dict(os.environ))
    # one file per step: several bench_quality processes may finish steps at the same time
    write_atomic(os.path.join(args.run_dir, "timings", f"{step['name']}.json"),
                 json.dumps({"wall_s": round(time.time() - start, 1)}))
    print(f"--- {step['name']} finished in {(time.time() - start) / 60:.1f} min", flush=True)


def main(argv=None):
    import torch

    (args,) = parse_config([BenchArguments], argv)
    has_gpu = torch.cuda.is_available()
    steps, names = plan(args, has_gpu)
    for step in steps:
        print(f"  {step['name']:<24s} {'done, skipped' if step['finished'] else 'to run'}")
    if args.dry_run:
        for step in steps:
            if not step["finished"] and step["command"]:
                print("$ " + shlex.join(step["command"]))
        return
    for step in steps:
        if step["finished"] or os.path.exists(step["done"]):  # done meanwhile by another bench_quality process
            continue
        missing = [path for path in step["needs"] if not os.path.exists(path)]
        if missing:
            print(f"\n=== {step['name']}: skipped, {missing[0]} is not there yet (its step runs elsewhere) ===")
            continue
        with step_lock(os.path.dirname(step["done"])) as owner:
            if owner is not None:
                print(f"\n=== {step['name']}: skipped, process {owner} is running it ===")
                continue
            run_step(step, args)
    path = write_table(args, names)
    print(f"\n{open(path, encoding='utf-8').read()}\ntable: {path}")


if __name__ == "__main__":
    run_main(main)
