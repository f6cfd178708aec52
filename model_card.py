"""Model card (README.md) of a train.py run, and its upload to the Hugging Face Hub.

    python model_card.py runs/unlearn --eval_dir runs/unlearn/eval                      # README.md with the scores
    python model_card.py runs/unlearn --eval_dir runs/unlearn/eval --push_to_hub --hub_model_id me/olmo-unlearned

train.py writes the card when it saves (base model, method, data, configuration, the dev-slice scores of the best
step when --eval_steps ran) and uploads the run with --push_to_hub. This script rewrites the card once evaluate.py
has scored the model (evaluate.py never writes into the model dir it reads) and uploads it too. The card is the
YAML metadata the Hub reads (base_model, library_name, tags, datasets) and a markdown body, built with
huggingface_hub's ModelCard.
"""

import os
import re
import sys
from dataclasses import dataclass, field

import yaml

import scoring
from artefacts import CHECKPOINTS_DIR, MODEL_CARD, TRAIN_RECORD, read_results, write_atomic
from cli import InputError, parse_config, run_main
from objectives import OBJECTIVES
from records import TASKS

# what never goes to the Hub: resumable checkpoints, half-written dirs
UPLOAD_IGNORE = [f"{CHECKPOINTS_DIR}/*", ".incomplete-*", ".tmp*", "*.tmp"]



def _fmt(value):
    return "n/a" if value is None else f"{value:.3f}"


def _scores_section(results):
    """Markdown lines of evaluate.py's scores: the final score's parts, then the 12 terms."""
    label, score = scoring.final_score_label(results)
    lines = ["## Scores (evaluate.py, SemEval-2025 Task 4 metric)", "",
             "| task aggregate | MIA AUC | MIA score | MMLU | " + label + " |", "|---|---|---|---|---|",
             f"| {_fmt(results.get('harmonic-mean-task-aggregate'))} | {_fmt(results.get('mia_loss_acc'))} | "
             f"{_fmt(results.get('mia_final_score'))} | {_fmt(results.get('mmlu_average'))} | {_fmt(score)} |", ""]
    note = scoring.partial_note(results)
    if note:
        lines += [f"({note}.)", ""]
    lines += ["Regurgitation (ROUGE-L recall) / knowledge (exact match); forget: lower is better, retain: higher.", "",
              "| split | Task1 | Task2 | Task3 |", "|---|---|---|---|"]
    for split in scoring.SPLITS:
        cells = [" / ".join(_fmt(scoring.result_score(results, split, kind.key, task)) for kind in scoring.KINDS)
                 for task in TASKS]
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    aggregate_note = scoring.task_aggregate_note(results)
    return lines + (["", f"Task aggregate: {aggregate_note}."] if aggregate_note else []) + [""]


def is_hub_id(name):
    """'org/name' that is not a local dir: what the Hub's base_model field accepts."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name or "")) and not os.path.isdir(name)


def build_card(record, results=None):
    """A huggingface_hub ModelCard from a train_config.yaml record (and evaluate.py's results, if any)."""
    from huggingface_hub import ModelCard, ModelCardData

    config, summary = record.get("config", {}), record.get("result", {})
    provenance, launch = record.get("provenance", {}), record.get("launch", {})
    base = config.get("model_name_or_path", "")
    merged = config.get("lora_r", 0) == 0 or config.get("merge_lora", False)
    unlearning = config.get("forget_loss") not in ("ntp", "none")
    data = config.get("dataset_name") or config.get("data_dir") or \
        ", ".join(filter(None, (config.get("forget_file"), config.get("retain_file"))))
    metadata = ModelCardData(
        base_model=base if is_hub_id(base) else None, library_name="transformers" if merged else "peft",
        tags=["unlearning", "semeval-2025-task-4"] + (["lora"] if config.get("lora_r") else []),
        datasets=[config["dataset_name"]] if config.get("dataset_name") else None)
    name = config.get("run_name") or os.path.basename(os.path.normpath(config.get("output_dir", "model")))
    counts = summary.get("examples_per_kind") or {}
    lines = [f"# {name}", "",
             f"`{base}` after {'unlearning' if unlearning else 'fine-tuning'} with train.py of the `unlearn` toolkit"
             + (f", preset `{provenance['preset']}`" if provenance.get("preset") else "") + ".", "",
             "## Method", ""]
    for kind in ("forget", "retain"):
        name = config.get(f"{kind}_loss")
        objective = OBJECTIVES[kind].get(name)
        lines.append(f"- {kind} objective: {name}" + (f" ({objective.description})" if objective else "")
                     + (f", alpha {config.get('alpha')}" if kind == "forget" and name in ("gi", "gi2") else ""))
    if config.get("schedule"):
        lines.append(f"- schedule: {config['schedule']}")
    if config.get("augment") not in (None, "none"):
        lines.append(f"- forget answers augmented: {config['augment']}")
    if config.get("calibration_file"):
        lines.append(f"- calibrated forgetting: each forget row's NLL driven to held-out rows' level "
                     f"(`{config['calibration_file']}`, margin {config.get('calibration_margin')}); no further")
    lines.append("- weights: " + (f"LoRA r {config.get('lora_r')}, alpha {config.get('lora_alpha')}, modules "
                                   f"{config.get('lora_target_modules')}" + (", merged" if merged else ", adapter in "
                                                                             "adapter/")
                                   if config.get("lora_r") else "full fine-tuning"))
    lines += ["", "## Data", "", f"- source: `{data}`"
              + (f" (splits {config.get('forget_split')} / {config.get('retain_split')})"
                 if config.get("dataset_name") else "")]
    if counts:
        lines.append("- rows per batch kind after augmentation: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    lines += ["", "## Training", "",
              f"- {summary.get('optimizer_steps')} optimizer steps of {summary.get('planned_steps')}"
              + (f" (early stopping: {config.get('early_stopping_patience')} dev evaluations without a better one)"
                 if summary.get("stopped_on_plateau") else "") + ", learning rate "
              f"{config.get('learning_rate')} ({config.get('lr_scheduler_type', 'constant')}), "
              f"{launch.get('num_processes', 1)} process(es), "
              + ("fp32 (no mixed precision)" if launch.get("mixed_precision", "no") == "no"
                 else f"{launch['mixed_precision']} mixed precision")
              + (f", DeepSpeed ZeRO-{launch['zero_stage']}" if launch.get("zero_stage") else ""),
              f"- {summary.get('train_seconds')} s of training; finished {provenance.get('finished', 'n/a')}"]
    if summary.get("best_step") is not None:
        best = summary.get("best_scores") or {}
        lines.append(f"- published: step {summary['best_step']}, the best by dev `{summary.get('metric_for_best_model')}`"
                     f" ({', '.join(f'{k} {v:.3f}' for k, v in best.items())})")
    versions = provenance.get("versions") or {}
    if versions:
        lines.append("- " + ", ".join(f"{k} {v}" for k, v in versions.items() if v)
                     + (f"; code at commit {provenance['git_commit'][:12]}" if provenance.get("git_commit") else ""))
    lines.append("")
    lines += _scores_section(results) if results else \
        ["## Scores", "", "Not evaluated yet: `python evaluate.py --model_name_or_path MODEL ... --output_dir "
         "MODEL/eval`, then `python model_card.py MODEL --eval_dir MODEL/eval`.", ""]
    lines += ["## Reproduce", "", "```bash",
              "python train.py train_config.yaml --output_dir NEW_DIR   # this run's configuration (train.py of the "
              "toolkit)", "```", ""]
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(lines))


def read_record(model_dir):
    path = os.path.join(model_dir, TRAIN_RECORD)
    if not os.path.isfile(path):
        raise InputError(f"{model_dir}: no {TRAIN_RECORD}; give the output dir of a finished train.py run")
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def write_card(card, directory):
    """README.md (the card) in directory, atomically."""
    path = os.path.join(directory, MODEL_CARD)
    write_atomic(path, str(card))
    return path


def push_to_hub(folder, repo_id, private=False, token=None):
    """Create the model repo if needed and upload folder (checkpoints left out); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, ignore_patterns=UPLOAD_IGNORE,
                                   commit_message=f"Upload {os.path.basename(os.path.normpath(folder))} (unlearn "
                                                  f"toolkit)")
    except Exception as error:  # the hub client raises many types (network, auth, name); the message is what helps
        raise InputError(f"--push_to_hub {repo_id}: {str(error).splitlines()[0][:200]} (log in with `hf auth login` "
                         f"or set HF_TOKEN; the run itself is saved in {folder})") from None
    return getattr(commit, "commit_url", str(commit))


@dataclass
class CardArguments:
    eval_dir: str = field(default="", metadata={"help": "evaluate.py's output dir for this model (its scores go "
                                                "into the card); empty: the card without test scores."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the run (model, adapter, card; no "
                                                       "checkpoints) to the Hub as --hub_model_id."})
    hub_model_id: str = field(default="", metadata={"help": "Hub repo id (USER/NAME) for --push_to_hub; default: the "
                                                    "run dir's name under your account."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    model_dir = argv.pop(0) if argv and not argv[0].startswith("-") else ""
    (args,) = parse_config((CardArguments,), argv, description=__doc__,
                           usage="%(prog)s MODEL_DIR [--eval_dir DIR] [--push_to_hub --hub_model_id USER/NAME]")
    if not model_dir:
        raise InputError("give the output dir of a train.py run first, e.g. python model_card.py runs/unlearn")
    record = read_record(model_dir)
    results = read_results(args.eval_dir, "--eval_dir") if args.eval_dir else None
    path = write_card(build_card(record, results), model_dir)
    print(f"wrote {path}")
    if args.push_to_hub:
        repo_id = args.hub_model_id or os.path.basename(os.path.normpath(model_dir))
        print(f"uploaded to {push_to_hub(model_dir, repo_id, args.hub_private_repo)}")


if __name__ == "__main__":
    run_main(main)
