"""Unlearning quality benchmark: every preset at one matched budget, on several disjoint draws of documents, each
with its own target built here and its own real MIA set; mean and spread over draws.

    python benchmarks/bench_quality.py --phase tuning                  # choose presets and options on these draws
    python benchmarks/bench_quality.py --phase confirmation            # then report from draws no choice looked at
    python benchmarks/bench_quality.py --presets paper,npo --docs_per_task 10 --draws 2 --tuning_draws 0 \
        --confirmation_draws 1 --mmlu_limit 5                          # a GPU, more data per draw

The public SemEval-2025 Task 4 validation split (documents = rows sharing an id prefix) is partitioned, from
--seed, into --draws disjoint draws; per task, each draw has
  forget / retain  N documents from the forget / retain split: trained into the draw's target
  nonmember        M never-trained documents: the MIA nonmembers (members = the forget documents, text = the sc
                   row's input + " " + output, like the organisers' files)
  calibration      K more never-trained documents: --calibration_file of the calibrated presets (disjoint from
                   the MIA nonmembers, so no preset is tuned on the documents it is scored on)
Draws are either tuning draws or confirmation draws (--tuning_draws / --confirmation_draws, disjoint); a run reads and
writes only the draws of its --phase, so the confirmation draws stay unseen while presets are chosen.

Per draw (RUN_DIR/draw-I/):
  target      train.py configs/target.yaml on forget + retain (as the organisers built theirs): the memorised model
  oracle      the target's recipe on the retain documents alone (exact unlearning; --oracle)
  PRESET      train.py configs/PRESET.yaml from the target at the matched budget (--learning_rate, --epochs);
              zjuklab = two runs merged with TIES (merge_adapters.py)
  eval-NAME   evaluate.py: the 12 terms, MIA (loss, Min-K%, Min-K%++, zlib), MMLU, and the mean loss of general text
              never trained (MMLU questions with their answers, --general_per_subject per subject) as a utility
              figure beside the MIA nonmembers' mean loss
Per phase (RUN_DIR/PHASE/): quality.md (per preset the mean and standard deviation over the phase's draws of every
figure: the 12 terms, task aggregate, each attack's AUC, MMLU, mean(task agg., MIA score), the never-trained
documents' and general text's loss as a ratio to the target's, training minutes), quality.json (each draw's
values, and which draws) and quality.png (error bars = standard deviation over draws).

Each step is skipped when its output exists, so an interrupted benchmark picks up where it stopped and presets can be
added later. Numbers go to RESULTS.md by hand, with the date, the machine and the draws.
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
PHASES = ("tuning", "confirmation")


def draw_list(text, option):
    """'0,2' -> [0, 2]; a one-line error naming the option otherwise."""
    try:
        draws = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--{option} {text!r}: expected comma-separated draw numbers, e.g. 0,1") from None
    if len(set(draws)) != len(draws):
        raise ValueError(f"--{option} {text!r}: a draw is named twice")
    return draws


@dataclass
class BenchArguments:
    data_dir: str = field(default=os.path.relpath(os.path.join(SHARED_DATA, "semeval25", "validation")), metadata={
        "help": "SemEval split with forget.jsonl and retain.jsonl (the validation split: tune on it, not on test)."})
    mmlu_dir: str = field(default=os.path.relpath(os.path.join(SHARED_DATA, "mmlu")), metadata={
        "help": "Hendrycks MMLU dir ('' = no MMLU and no general-text loss: the final score is then partial)."})
    mmlu_limit: int = field(default=1, metadata={"help": "MMLU questions per subject (57 subjects)."})
    general_per_subject: int = field(default=2, metadata={
        "help": "General text for the utility figure: the last N questions per MMLU subject with their correct "
                "answer (disjoint from the first --mmlu_limit that MMLU scores), never trained; 0 = off."})
    docs_per_task: int = field(default=3, metadata={"help": "Forget and retain documents per task (each), per draw."})
    nonmember_docs_per_task: int = field(default=3, metadata={"help": "Never-trained documents per task and draw: "
                                                              "the MIA nonmembers."})
    calibration_docs_per_task: int = field(default=3, metadata={"help": "Never-trained documents per task and draw, "
                                                                "disjoint from the MIA nonmembers: "
                                                                "--calibration_file of the calibrated presets."})
    draws: int = field(default=4, metadata={"help": "Disjoint document draws the split is partitioned into (each with "
                                            "its own target, MIA set and calibration documents)."})
    tuning_draws: str = field(default="0", metadata={"help": "Comma-separated draws (0 .. --draws - 1) that choices "
                                                     "of preset, budget or option are made on."})
    confirmation_draws: str = field(default="1,2,3", metadata={"help": "Comma-separated draws, disjoint from "
                                                               "--tuning_draws, that the reported numbers come from; "
                                                               "no choice may look at them."})
    phase: str = field(default="tuning", metadata={"choices": PHASES, "help": "Which draws this run builds, scores "
                                                   "and tabulates: the tuning or the confirmation draws."})
    seed: int = field(default=0, metadata={"help": "Seed of the partition into draws."})
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
    oracle: bool = field(default=False, metadata={"help": "Also build and score the oracle: the target's recipe on "
                                                  "the retain documents alone, a model that never saw the forget "
                                                  "documents (exact unlearning: the reference an unlearning method "
                                                  "is compared with on this data)."})
    headline: str = field(default="recommended", metadata={"help": "The preset whose means quality.md checks "
                                                           "against the quality goals."})
    dry_run: bool = field(default=False, metadata={"help": "Print the steps and stop."})

    def __post_init__(self):
        from cli import check_choices
        check_choices(self)
        for name in ("docs_per_task", "nonmember_docs_per_task", "calibration_docs_per_task", "epochs", "draws"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} {getattr(self, name)}: must be >= 1")
        if self.general_per_subject < 0 or self.mmlu_limit < 0:
            raise ValueError("--general_per_subject and --mmlu_limit must be >= 0")
        tuning, confirmation = self.draws_of("tuning"), self.draws_of("confirmation")
        for option, draws in (("tuning_draws", tuning), ("confirmation_draws", confirmation)):
            outside = [d for d in draws if not 0 <= d < self.draws]
            if outside:
                raise ValueError(f"--{option}: draw {outside[0]} does not exist (--draws {self.draws}: "
                                 f"0 .. {self.draws - 1})")
        shared = sorted(set(tuning) & set(confirmation))
        if shared:
            raise ValueError(f"--tuning_draws and --confirmation_draws share draw {shared[0]}: a number reported "
                             f"from a draw that a choice looked at confirms nothing; make them disjoint")
        if not self.draws_of(self.phase):
            raise ValueError(f"--{self.phase}_draws is empty: name the draws of --phase {self.phase}")

    def draws_of(self, phase):
        return draw_list(getattr(self, f"{phase}_draws"), f"{phase}_draws")


# --- data ---------------------------------------------------------------------------------------------------------

ROLES = ("forget", "retain", "nonmember", "calibration")


def document_id(record_id):
    return record_id[:-3]  # ids are <document id> + sc<digit> or qa<digit>


def partition_documents(forget_rows, retain_rows, args):
    """[{role: {task: [document ids]}}] for each of --draws disjoint draws, from --seed alone (the same partition
    whichever phase runs). Forget / retain documents come from their split; nonmember and calibration documents
    (never trained) from the documents of both splits that no draw trains."""
    rng = random.Random(args.seed)
    n, m, c, k = args.docs_per_task, args.nonmember_docs_per_task, args.calibration_docs_per_task, args.draws
    draws = [{role: {} for role in ROLES} for _ in range(k)]
    for task in TASKS:
        docs = {split: sorted({document_id(r.id) for r in rows if r.task == task})
                for split, rows in (("forget", forget_rows), ("retain", retain_rows))}
        for split in docs:
            rng.shuffle(docs[split])
        pool = docs["forget"][k * n:] + docs["retain"][k * n:]
        rng.shuffle(pool)
        if min(len(docs["forget"]), len(docs["retain"])) < k * n or len(pool) < k * (m + c):
            raise InputError(
                f"{args.data_dir}: {task} has {len(docs['forget'])} forget and {len(docs['retain'])} retain documents; "
                f"--draws {k} needs {k * n} of each plus {k * (m + c)} never-trained ones (--docs_per_task {n}, "
                f"--nonmember_docs_per_task {m}, --calibration_docs_per_task {c}): lower --draws or these counts")
        for i, draw in enumerate(draws):
            draw["forget"][task] = docs["forget"][i * n:(i + 1) * n]
            draw["retain"][task] = docs["retain"][i * n:(i + 1) * n]
            never_trained = pool[i * (m + c):(i + 1) * (m + c)]
            draw["nonmember"][task], draw["calibration"][task] = never_trained[:m], never_trained[m:]
    return draws


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


def load_split(args):
    forget_rows = load_records(os.path.join(args.data_dir, "forget.jsonl"))
    retain_rows = load_records(os.path.join(args.data_dir, "retain.jsonl"))
    return forget_rows, retain_rows


def general_documents(args):
    """The general-text documents: the last --general_per_subject questions of each MMLU subject with the text of
    their correct answer (MMLU scores the first --mmlu_limit, so the two never share a question)."""
    from mmlu import load_mmlu

    questions = load_mmlu(args.mmlu_dir)
    by_subject = {}
    for q in questions:
        by_subject.setdefault(q["subject"], []).append(q)
    documents = []
    for subject, subject_questions in sorted(by_subject.items()):
        keep = subject_questions[max(args.mmlu_limit, len(subject_questions) - args.general_per_subject):]
        for i, q in enumerate(keep):
            answer = q["choices"]["ABCD".index(q["answer"])]
            documents.append({"id": f"{subject}-{len(subject_questions) - len(keep) + i}",
                              "document": f"{q['question']} {answer}"})
    return documents


def write_data(args, data_dir, draw):
    """Draw number ``draw`` of the partition into data_dir: forget/retain/calibration JSONL, mia/, general.jsonl."""
    if draw not in args.draws_of(args.phase):
        raise RuntimeError(f"draw {draw} is not a {args.phase} draw")  # the confirmation draws stay unread
    forget_rows, retain_rows = load_split(args)
    picked = partition_documents(forget_rows, retain_rows, args)[draw]
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
    if args.mmlu_dir and args.general_per_subject:
        write_atomic(os.path.join(data_dir, "general.jsonl"), jsonl(general_documents(args)))
    write_atomic(os.path.join(data_dir, "documents.json"), json.dumps({"draw": draw, "seed": args.seed, **picked},
                                                                      indent=2))
    print(f"draw {draw}: {len(ids('forget'))} forget, {len(ids('retain'))} retain documents; MIA {len(members)} "
          f"members, {len(nonmembers)} nonmembers; {len(ids('calibration'))} calibration documents -> {data_dir}")


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


def preset_names(args):
    return [p.strip() for p in args.presets.split(",") if p.strip()]


def draw_dir(args, draw):
    return os.path.join(args.run_dir, f"draw-{draw}")


def plan_draw(args, draw, has_gpu=False):
    """One draw's steps in order, each model scored right after it is built: [{name, kind (data/train/merge/eval),
    command, done, needs, finished, draw}], and the model names in table order."""
    root = draw_dir(args, draw)
    data_dir = os.path.join(root, "data")
    target = os.path.join(root, "target")
    general = os.path.join(data_dir, "general.jsonl") if args.mmlu_dir and args.general_per_subject else ""

    def evaluation(name, model, needs):
        out = os.path.join(root, f"eval-{name}")
        command = eval_command(args, has_gpu, model, data_dir, os.path.join(data_dir, "mia"), out)
        if general:
            command += ["--heldout_file", general]
        return {"name": f"eval-{name}", "kind": "eval", "done": os.path.join(out, RESULTS_FILE), "needs": [needs],
                "command": command}

    data_done, target_done = os.path.join(data_dir, "documents.json"), os.path.join(target, TRAIN_RECORD)
    steps = [{"name": "data", "kind": "data", "command": None, "done": data_done, "needs": []},
             {"name": "target", "kind": "train", "done": target_done, "needs": [data_done],
              "command": train_command(args, has_gpu, here("configs", "target.yaml"), args.model_name_or_path,
                                       data_dir, target, "target")},
             evaluation("target", target, target_done)]
    names = ["target"]
    if args.oracle:
        oracle = os.path.join(root, "oracle")
        command = train_command(args, has_gpu, here("configs", "target.yaml"), args.model_name_or_path, data_dir,
                                oracle, "oracle")
        at = command.index("--data_dir")
        command[at:at + 2] = ["--retain_file", os.path.join(data_dir, "retain.jsonl")]  # no forget set at all
        steps += [{"name": "oracle", "kind": "train", "done": os.path.join(oracle, TRAIN_RECORD), "needs": [data_done],
                   "command": command},
                  evaluation("oracle", oracle, os.path.join(oracle, TRAIN_RECORD))]
        names.append("oracle")
    for name in preset_names(args):
        runs = preset_runs(name)
        for run_name, config in runs:
            if not os.path.isfile(config):
                raise InputError(f"--presets {name}: {config} not found")
            out = os.path.join(root, run_name)
            command = train_command(args, has_gpu, config, target, data_dir, out, run_name,
                                    os.path.join(data_dir, "calibration.jsonl")) + budget_flags(config, args)
            steps.append({"name": run_name, "kind": "train", "done": os.path.join(out, TRAIN_RECORD),
                          "needs": [target_done], "command": command})
        model, model_done = os.path.join(root, runs[0][0]), steps[-1]["done"]
        if len(runs) > 1:
            model = os.path.join(root, name)
            adapters = ",".join(os.path.join(root, run_name, "adapter") for run_name, _ in runs)
            model_done = os.path.join(model, "merge_config.yaml")
            steps.append({"name": f"merge-{name}", "kind": "merge", "done": model_done,
                          "needs": [step["done"] for step in steps[-len(runs):]],
                          "command": [sys.executable, here("merge_adapters.py"), "--base_model", target,
                                      "--adapters", adapters, "--output_dir", model]})
        steps.append(evaluation(name, model, model_done))
        names.append(name)
    for step in steps:
        step["finished"] = os.path.exists(step["done"])
        step["draw"] = draw
    return steps, names


def plan(args, has_gpu=False):
    """Every step of the phase's draws, draw by draw, and the model names in table order."""
    steps, names = [], []
    for draw in args.draws_of(args.phase):
        draw_steps, names = plan_draw(args, draw, has_gpu)
        steps += draw_steps
    return steps, names


# --- tables -------------------------------------------------------------------------------------------------------

def figures(results, target, minutes):
    """{figure name: value or None} of one evaluated model on one draw; ratios are to the draw's target."""
    from scoring import KINDS, SPLITS, result_score
    import mia

    values = {}
    for split in SPLITS:
        for task in TASKS:
            for kind in KINDS:
                values[f"{split} {task[-1]} {kind.short}"] = result_score(results, split, kind.key, task)
    for split in SPLITS:
        for kind in KINDS:
            values[f"{split} {kind.short}"] = result_score(results, split, kind.key)
    values["task agg."] = results.get("harmonic-mean-task-aggregate")
    values["MIA score"] = results.get("mia_final_score")
    values["task_mia_mean"] = task_mia_mean(results)
    for name in ("loss", "min_k", "min_k_plus_plus", "zlib"):
        values[f"{mia.LABELS[name].split(' ')[0]} AUC"] = results.get(mia.result_keys(name)[0])
    values["MMLU"] = results.get("mmlu_average")
    for label, get in (("nonmember NLL", lambda r: (r.get("mia_mean_loss") or {}).get("nonmember")),
                       ("general NLL", lambda r: r.get("heldout_mean_loss"))):
        mine, theirs = get(results), get(target) if target else None
        values[f"{label} x target"] = mine / theirs if mine is not None and theirs else None
    for split in SPLITS[1:]:
        for kind in KINDS:
            mine, theirs = result_score(results, split, kind.key), result_score(target or {}, split, kind.key)
            values[f"{split} {kind.short} x target"] = mine / theirs if mine is not None and theirs else None
    values["MMLU x target"] = (values["MMLU"] / target["mmlu_average"]
                               if values["MMLU"] is not None and target and target.get("mmlu_average") else None)
    values["train min"] = minutes
    return values


# The quality goals the headline preset is checked against, on the means over draws: (figure, low, high).
GOALS = (("task_mia_mean", 0.93, None), ("loss AUC", 0.45, 0.55), ("Min-K% AUC", 0.40, 0.60),
         ("Min-K%++ AUC", 0.40, 0.60), ("zlib AUC", 0.40, 0.60), ("retain regurg x target", 0.9, None),
         ("retain know x target", 0.9, None), ("MMLU x target", 0.95, None), ("nonmember NLL x target", None, 1.15))
TABLE_FIGURES = ("task_mia_mean", "task agg.", "MIA score", "loss AUC", "Min-K% AUC", "Min-K%++ AUC", "zlib AUC",
                 "forget regurg", "forget know", "retain regurg", "retain know", "MMLU", "nonmember NLL x target",
                 "general NLL x target", "train min")


def train_minutes(root, name):
    """Minutes of the train and merge steps of a preset on one draw (timings/STEP.json), None if not recorded."""
    steps = [run_name for run_name, _ in preset_runs(name)] + ([f"merge-{name}"] if name == "zjuklab" else [])
    total = 0.0
    for step in steps:
        path = os.path.join(root, "timings", f"{step}.json")
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            total += json.load(f)["wall_s"] / 60
    return total


def collect(args, names):
    """{name: {draw: figures}} for every evaluated model of the phase's draws."""
    from artefacts import read_results

    table = {}
    for draw in args.draws_of(args.phase):
        root = draw_dir(args, draw)
        path = os.path.join(root, "eval-target")
        target = read_results(path) if os.path.isfile(os.path.join(path, RESULTS_FILE)) else None
        for name in names:
            path = os.path.join(root, f"eval-{name}")
            if os.path.isfile(os.path.join(path, RESULTS_FILE)):
                table.setdefault(name, {})[draw] = figures(read_results(path), target, train_minutes(root, name))
    return table


def mean_std(values):
    """(mean, sample standard deviation or None for one value, count) of the non-None values."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else None
    return mean, std, len(values)


def cell(values):
    mean, std, _ = mean_std(values)
    if mean is None:
        return "n/a"
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def goal_lines(summary, name):
    """The goals table for the headline preset: each goal, its mean, met or the distance by which it is missed."""
    by_draw = summary.get(name)
    if not by_draw:
        return [f"(no {name} results in these draws: goals not checked)"]
    lines = ["| goal | mean over draws | met |", "|---|---|---|"]
    for figure, low, high in GOALS:
        mean, _, _ = mean_std([draw[figure] for draw in by_draw.values()])
        bound = (f">= {low}" if high is None else f"<= {high}" if low is None else f"in [{low}, {high}]")
        if mean is None:
            verdict = "not measured"
        elif (low is None or mean >= low) and (high is None or mean <= high):
            verdict = "yes"
        else:
            verdict = f"no, by {max(low - mean if low is not None else 0, mean - high if high is not None else 0):.3f}"
        lines.append(f"| {figure} {bound} | {fmt(mean)} | {verdict} |")
    return lines


def write_table(args, names):
    """PHASE/quality.md, quality.json and quality.png: every figure's mean ± standard deviation over the draws."""
    summary = collect(args, names)
    out = os.path.join(args.run_dir, args.phase)
    draws = args.draws_of(args.phase)
    present = [name for name in names if name in summary]
    lines = [f"# Quality benchmark, {args.phase} draws {', '.join(map(str, draws))} ({time.strftime('%Y-%m-%d')})",
             "", f"Draws {', '.join(map(str, draws))} of {args.draws} (seed {args.seed}) of `{args.data_dir}`; per "
             f"task and draw {args.docs_per_task} forget + {args.docs_per_task} retain documents, "
             f"{args.nonmember_docs_per_task} never-trained MIA nonmembers, {args.calibration_docs_per_task} "
             f"calibration documents; matched budget lr {args.learning_rate}, {args.epochs} passes over the forget "
             f"set; MMLU {args.mmlu_limit or 'all'} per subject. Cells: mean ± standard deviation over draws "
             f"(n = draws that have the run). Ratios (x target) are to each draw's target.", "",
             "| run | n | " + " | ".join(TABLE_FIGURES) + " |", "|---|---|" + "---|" * len(TABLE_FIGURES)]
    for name in sorted(present, key=lambda n: -(mean_std([d["task_mia_mean"] for d in summary[n].values()])[0]
                                                or -1)):
        by_draw = summary[name]
        lines.append(f"| {name} | {len(by_draw)} | " + " | ".join(
            cell([d[f] for d in by_draw.values()]) for f in TABLE_FIGURES) + " |")
    per_task = [f for f in next(iter(summary.values()), {}).get(draws[0], {}) if f[-2:] in ("rg", "ow")
                and f.split(" ")[1][:1].isdigit()] if summary else []
    if per_task:
        lines += ["", "The 12 terms (regurgitation / knowledge per split and task):", "",
                  "| run | " + " | ".join(per_task) + " |", "|---|" + "---|" * len(per_task)]
        for name in present:
            by_draw = summary[name]
            lines.append(f"| {name} | " + " | ".join(cell([d.get(f) for d in by_draw.values()]) for f in per_task)
                         + " |")
    lines += ["", f"Goals for `{args.headline}` (means over these draws):", ""] + goal_lines(summary, args.headline)
    plot = os.path.join(out, "quality.png")
    lines += ["", f"![quality]({os.path.basename(plot)})", ""]
    plot_summary(summary, present, plot)
    write_atomic(os.path.join(out, "quality.json"), json.dumps(
        {"phase": args.phase, "draws": draws, "seed": args.seed, "runs": {n: summary[n] for n in present}},
        indent=2, default=str))
    path = os.path.join(out, "quality.md")
    write_atomic(path, "\n".join(lines))
    return path


PLOT_FIGURES = ("task_mia_mean", "task agg.", "MIA score", "loss AUC", "Min-K% AUC", "Min-K%++ AUC", "zlib AUC",
                "MMLU")


def plot_summary(summary, names, path):
    """Grouped bars per figure, one per run, with the standard deviation over draws as error bars."""
    from artefacts import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(PLOT_FIGURES) * max(1, len(names) / 4)), 4))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        stats = [mean_std([d[f] for d in summary[name].values()]) for f in PLOT_FIGURES]
        positions = [m + (i - (len(names) - 1) / 2) * width for m in range(len(PLOT_FIGURES))]
        ax.bar(positions, [s[0] or 0 for s in stats], width=width, yerr=[s[1] or 0 for s in stats], capsize=2,
               label=f"{name} (n={max(s[2] for s in stats)})")
    ax.axhline(0.5, color="grey", linewidth=0.6, linestyle=":")
    ax.set_xticks(range(len(PLOT_FIGURES)), PLOT_FIGURES, rotation=20, fontsize=8)
    ax.set_ylim(0, 1.15)
    ax.set_title("mean over draws, error bars = standard deviation; AUCs: 0.5 is best")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)


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
    print(f"\n=== draw {step['draw']}: {step['name']} ===", flush=True)
    start = time.time()
    root = draw_dir(args, step["draw"])
    if step["kind"] == "data":
        write_data(args, os.path.join(root, "data"), step["draw"])
    else:
        output_dir = os.path.dirname(step["done"])
        if step["kind"] != "eval" and os.path.isdir(output_dir) and "--resume_from_checkpoint" not in \
                step["command"]:
            print(f"removing {output_dir}: an unfinished run without checkpoints starts over")
            shutil.rmtree(output_dir)
        print("$ " + shlex.join(step["command"]), flush=True)
        run_command(step["command"], dict(os.environ))
    # one file per step: several bench_quality processes may finish steps at the same time
    write_atomic(os.path.join(root, "timings", f"{step['name']}.json"),
                 json.dumps({"wall_s": round(time.time() - start, 1)}))
    print(f"--- {step['name']} finished in {(time.time() - start) / 60:.1f} min", flush=True)


def main(argv=None):
    import torch

    (args,) = parse_config([BenchArguments], argv)
    partition_documents(*load_split(args), args)  # enough documents for every draw, before anything is written
    has_gpu = torch.cuda.is_available()
    steps, names = plan(args, has_gpu)
    for step in steps:
        print(f"  draw {step['draw']} {step['name']:<24s} {'done, skipped' if step['finished'] else 'to run'}")
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
