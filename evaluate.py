"""Evaluate a model the SemEval-2025 Task 4 (LUME) way: regurgitation + knowledge on forget/retain, loss-based MIA,
MMLU, and the official aggregate. Reproduces the organizers' final scorer, only batched and sharded; beside it, the
other membership inference attacks of mia.py (Min-K%, Min-K%++, zlib, reference model).

    python evaluate.py --model_name_or_path MODEL --data_dir DATA --mia_data_dir MIA --mmlu_dir MMLU --output_dir OUT
    accelerate launch -q evaluate.py ...                      # rows sharded over processes, main process writes
    python evaluate.py --predictions_dir OUT --output_dir OUT2   # recompute every metric from saved CSVs, no model
    python evaluate.py ... --exact                         # batch-1 strings and losses in bf16 too (slower)

Writes ``OUT/evaluation_results.json`` (official keys + extras), per-row ``forget.csv``/``retain.csv``,
``mia_losses.csv``, ``mmlu_per_subject.csv`` and ``scores.png``; everything appears at once, the json last.
The metric code lives in scoring.py; generation.py, mia.py and mmlu.py run the model; this file shards the work
over processes and handles the command line and the files.
"""

import dataclasses
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

import cli
import generation
import mia
import mmlu
import records
import scoring
from artefacts import RESULTS_FILE, publish, pyplot, save_figure
from cli import InputError
from modeling import DTYPES, check_output_dir, load_for_inference

ROW_COLUMNS = ["id", "task", "input", "expected_output", "model_output", "rouge_l_recall", "exact_match"]
MIA_COLUMNS = ["set", "id", "loss"]
# Per-document statistics of the other attacks (mia.py); optional, so CSVs of older runs still rescore.
MIA_EXTRA_COLUMNS = ["min_k_fraction", "min_k", "min_k_plus_plus", "zlib", "reference_loss"]
MMLU_COLUMNS = ["subject", "category", "n", "correct", "accuracy"]
HELDOUT_COLUMNS = ["id", "loss"]


@dataclass
class EvalArguments(records.DataSourceArguments):
    # the data_dir / forget_file / retain_file / dataset_* options (train.py's): records.DataSourceArguments
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "Model dir or hub id to evaluate."})
    adapter: Optional[str] = field(default=None, metadata={
        "help": "peft LoRA adapter dir applied on top of the model, unmerged."})
    mia_data_dir: Optional[str] = field(default=None, metadata={
        "help": "Dir with member.jsonl and nonmember.jsonl for the membership inference attacks (the official "
                "loss one, and Min-K%, Min-K%++, zlib and --reference_model beside it)."})
    heldout_file: Optional[str] = field(default=None, metadata={
        "help": "JSONL of never-trained documents ({id, document}, as the MIA files): their mean loss is reported as "
                "heldout_mean_loss, the utility on unseen text that the retain terms (trained on) cannot show; "
                "compare it with the model before unlearning."})
    mmlu_dir: Optional[str] = field(default=None, metadata={
        "help": "Hendrycks MMLU dir: test/<subject>_test.csv (and dev/<subject>_dev.csv, if there, for "
                "--mmlu_ntrain)."})
    mmlu_ntrain: int = field(default=0, metadata={
        "help": "Worked examples per MMLU prompt: 0 = zero-shot (the default), 5 = open-instruct's default. They "
                "are the first N of dev/<subject>_dev.csv; without dev/, the first N other questions of the "
                "subject's test CSV (a warning says so). The organisers' shot count is not recorded."})
    mmlu_limit: int = field(default=0, metadata={"help": "Only the first N MMLU questions per subject (0 = all)."})
    mia_min_k: float = field(default=mia.DEFAULT_MIN_K, metadata={
        "help": "Fraction k of the lowest-scoring tokens that Min-K% and Min-K%++ average (0 < k <= 1)."})
    reference_model: Optional[str] = field(default=None, metadata={
        "help": "The model before unlearning, for the reference MIA (loss minus this model's loss); "
                "run first, then freed, so only one model is in memory at a time."})
    max_new_tokens: int = field(default=256, metadata={"help": "Greedy generation length limit (official: 256)."})
    batch_size: int = field(default=16, metadata={
        "help": "Prompts/documents per forward pass (generation, MIA and MMLU)."})
    exact: bool = field(default=False, metadata={
        "help": "One row at a time, no padding, for generation, MIA and MMLU: the official scorer's batch-1 "
                "strings and losses in bfloat16 too, where batched kernels round differently (float32 batches "
                "already give them). Slower; the results JSON records mode exact/fast."})
    output_dir: Optional[str] = field(default=None, metadata={"help": "Where results are written (required)."})
    predictions_dir: Optional[str] = field(default=None, metadata={
        "help": "Recompute all metrics from a previous run's forget.csv/retain.csv (and mia_losses.csv, "
                "mmlu_per_subject.csv when present) without loading a model."})
    torch_dtype: str = field(default="bfloat16", metadata={
        "choices": tuple(DTYPES),
        "help": "auto, bfloat16 (the official scorer's dtype), float16 or float32."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Allow a hub model's own modelling code to run (transformers' trust_remote_code): only for models "
                "whose code you trust."})
    mmlu_threshold: float = field(default=0.371, metadata={
        "help": "Warn when MMLU accuracy is below this (0.371 = the 7B track's cut-off)."})
    length_threshold: int = field(default=0, metadata={
        "help": "Word count splitting sc expected outputs into short (<=) and long (>) for the by-length "
                "breakdown; 0 = the median over all evaluated sc rows."})
    limit: int = field(default=0, metadata={
        "help": "Only the first N rows of each split (quick checks; not the official score). 0 = all."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Replace a finished evaluation already in --output_dir."})

    def __post_init__(self):
        cli.check_choices(self)
        if not self.output_dir:
            raise ValueError("--output_dir is required")
        if bool(self.model_name_or_path) == bool(self.predictions_dir):
            raise ValueError("give exactly one of --model_name_or_path (run a model) or --predictions_dir "
                             "(rescore saved predictions)")
        for name in ("mmlu_ntrain", "mmlu_limit", "length_threshold", "limit"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("--batch_size and --max_new_tokens must be >= 1")
        if not 0 < self.mia_min_k <= 1:
            raise ValueError("--mia_min_k must be in (0, 1]")
        if self.reference_model and self.predictions_dir:
            raise ValueError("--reference_model needs a model run; --predictions_dir rescores saved "
                             "reference_loss columns")


# --- running work over processes ------------------------------------------------------------------------------------

def run_sharded(items, work, accelerator=None):
    """``work(items) -> results`` (same order), split over processes: rank r takes items r, r+W, r+2W, ...

    Results are gathered with their item index and de-duplicated by it, so every item counts exactly once (the
    official script padded shards and duplicated rows). Every process returns the full, ordered list.
    """
    if accelerator is None or accelerator.num_processes == 1:
        return work(items)
    indices = list(range(accelerator.process_index, len(items), accelerator.num_processes))
    results = work([items[i] for i in indices]) if indices else []
    by_index = dict(gather_object(list(zip(indices, results))))
    if sorted(by_index) != list(range(len(items))):
        raise RuntimeError("sharded evaluation lost rows while gathering")
    return [by_index[i] for i in range(len(items))]


# --- evaluation: generation.py, mia.py and mmlu.py run the model, sharded here ------------------------------------

def evaluate_model(model, tokenizer, forget_records=None, retain_records=None, member_documents=None,
                   nonmember_documents=None, mmlu_questions=None, max_new_tokens=256, batch_size=16,
                   accelerator=None, show_progress=False, length_threshold=0, mmlu_threshold=0.371,
                   exact=False, mia_min_k=mia.DEFAULT_MIN_K, reference_losses=None, heldout_documents=None):
    """Run the model on whatever data is given; returns (results, tables), identical on every process.

    ``*_records``: lists of records.Record; ``*_documents``: lists of (id, text) from records.load_documents;
    ``mmlu_questions``: from load_mmlu. ``tables`` holds the per-row data that write_outputs saves and
    compute_results scores (so rescoring saved CSVs reproduces the same numbers). ``exact``: batch size 1
    everywhere (see --exact). ``reference_losses``: the reference model's loss per MIA document, members first
    (as reference_document_losses returns them), for the reference attack.
    """
    # In bfloat16, batched kernels round differently from batch 1 (a padded row, a different matrix shape), which
    # flips some greedy tokens; one row at a time without padding is the official scorer's computation.
    batch_size = 1 if exact else batch_size
    was_training = model.training
    model.eval()  # train.py may hand over a model mid-training: no dropout while scoring, restored below
    try:
        tables, timings = _run_model(model, tokenizer, forget_records, retain_records, member_documents,
                                     nonmember_documents, mmlu_questions, max_new_tokens, batch_size, accelerator,
                                     show_progress, mia_min_k, reference_losses, heldout_documents)
    finally:
        model.train(was_training)
    results = compute_results(tables, length_threshold=length_threshold, mmlu_threshold=mmlu_threshold)
    results["timings"] = {**timings, **results["timings"]}
    results["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    results["batch_size"] = batch_size
    results["mode"] = "exact" if exact else "fast"
    return results, tables


def mia_documents(member_documents, nonmember_documents):
    """[(set, (id, text))], members first: the order of the MIA table and of reference losses."""
    return [("member", d) for d in member_documents] + [("nonmember", d) for d in nonmember_documents]


def reference_document_losses(model, tokenizer, member_documents, nonmember_documents, batch_size=16,
                              accelerator=None, show_progress=False):
    """The reference model's loss per MIA document (members first), for evaluate_model's ``reference_losses``."""
    texts = [text for _, (_, text) in mia_documents(member_documents, nonmember_documents)]
    model.eval()
    return run_sharded(texts, lambda chunk: mia.document_losses(model, tokenizer, chunk, batch_size, show_progress),
                       accelerator)


def _run_model(model, tokenizer, forget_records, retain_records, member_documents, nonmember_documents,
               mmlu_questions, max_new_tokens, batch_size, accelerator, show_progress, mia_min_k=mia.DEFAULT_MIN_K,
               reference_losses=None, heldout_documents=None):
    tables, timings = {}, {}
    start = time.perf_counter()
    splits = [(split, rows) for split, rows in (("forget", forget_records), ("retain", retain_records)) if rows]
    if splits:
        t0 = time.perf_counter()
        # Both splits in one queue, so the decoding batch stays full longer.
        outputs = run_sharded([r.input for _, rows in splits for r in rows], lambda prompts: generation.generate_outputs(
            model, tokenizer, prompts, max_new_tokens, batch_size, show_progress), accelerator)
        timings["generation_s"] = time.perf_counter() - t0
        for split, rows in splits:
            tables[split] = [{"id": r.id, "task": r.task, "input": r.input, "expected_output": r.output,
                              "model_output": output} for r, output in zip(rows, outputs)]
            outputs = outputs[len(rows):]
    if member_documents and nonmember_documents:
        t0 = time.perf_counter()
        documents = mia_documents(member_documents, nonmember_documents)
        stats = run_sharded([text for _, (_, text) in documents], lambda texts: mia.document_statistics(
            model, tokenizer, texts, batch_size, mia_min_k, show_progress), accelerator)
        tables["mia"] = [{"set": kind, "id": doc_id, "loss": row["loss"], "min_k_fraction": mia_min_k,
                          "min_k": row["min_k"], "min_k_plus_plus": row["min_k_plus_plus"], "zlib": row["zlib"]}
                         for (kind, (doc_id, _)), row in zip(documents, stats)]
        if reference_losses is not None:
            if len(reference_losses) != len(documents):
                raise ValueError(f"{len(reference_losses)} reference losses for {len(documents)} MIA documents")
            for row, reference_loss in zip(tables["mia"], reference_losses):
                row["reference_loss"] = reference_loss
        timings["mia_s"] = time.perf_counter() - t0
    if heldout_documents:
        losses = run_sharded([text for _, text in heldout_documents], lambda texts: mia.document_losses(
            model, tokenizer, texts, batch_size, show_progress), accelerator)
        tables["heldout"] = [{"id": doc_id, "loss": loss} for (doc_id, _), loss in zip(heldout_documents, losses)]
    if mmlu_questions:
        t0 = time.perf_counter()
        prompts = mmlu.mmlu_prompts(tokenizer, mmlu_questions)
        logits = run_sharded(prompts, lambda chunk: mmlu.choice_logits(model, tokenizer, chunk, batch_size,
                                                                       show_progress), accelerator)
        tables["mmlu"] = mmlu.mmlu_subject_rows(mmlu_questions, [scoring.mmlu_pick(row) for row in logits])
        timings["mmlu_s"] = time.perf_counter() - t0
    timings["model_s"] = time.perf_counter() - start
    return tables, timings


def compute_results(tables, length_threshold=0, mmlu_threshold=0.371):
    """evaluation_results.json content from per-row tables; scores the forget/retain rows in place."""
    t0 = time.perf_counter()
    for split in ("forget", "retain"):
        for row in tables.get(split, []):
            row["rouge_l_recall"], row["exact_match"] = scoring.score_row(row["id"], row["expected_output"],
                                                                          row["model_output"])
    results = scoring.task_results(tables.get("forget"), tables.get("retain"))
    if "mia" in tables:
        members = [row["loss"] for row in tables["mia"] if row["set"] == "member"]
        nonmembers = [row["loss"] for row in tables["mia"] if row["set"] == "nonmember"]
        try:
            results["mia_loss_acc"] = scoring.mia_auc(members, nonmembers)
        except ValueError as error:
            raise InputError(f"MIA: {error}") from None
        results["mia_final_score"] = scoring.mia_final_score(results["mia_loss_acc"])
        results["mia_documents"] = {"member": len(members), "nonmember": len(nonmembers)}
        # the nonmembers' mean loss is also a utility figure: how perplexed the model is by unseen text
        results["mia_mean_loss"] = {"member": sum(members) / len(members),
                                    "nonmember": sum(nonmembers) / len(nonmembers)}
        try:
            results.update(mia.attack_results(tables["mia"]))
        except ValueError as error:
            raise InputError(f"MIA: {error}") from None
        if "min_k_fraction" in tables["mia"][0]:
            results["mia_min_k_fraction"] = tables["mia"][0]["min_k_fraction"]
    if tables.get("heldout"):
        results["heldout_mean_loss"] = sum(row["loss"] for row in tables["heldout"]) / len(tables["heldout"])
        results["heldout_documents"] = len(tables["heldout"])
    if "mmlu" in tables:
        summary = scoring.mmlu_summary(tables["mmlu"])
        results["mmlu_average"] = summary["mmlu_average"]
        results["mmlu_questions"] = summary["mmlu_questions"]
        results["mmlu_per_category"] = summary["mmlu_per_category"]
        results["mmlu_below_threshold"] = summary["mmlu_average"] < mmlu_threshold
    results.update(scoring.final_score(results.get("harmonic-mean-task-aggregate"), results.get("mia_final_score"),
                                       results.get("mmlu_average")))
    results["by-length"] = by_length(tables, length_threshold)
    results["rows"] = {split: len(tables[split]) for split in ("forget", "retain") if split in tables}
    results["timings"] = {"scoring_s": time.perf_counter() - t0}
    return results


def by_length(tables, length_threshold=0):
    """Regurgitation of short vs long sc expected outputs per split; the default split point is the median."""
    counts = [len(row["expected_output"].split()) for split in ("forget", "retain") for row in tables.get(split, [])
              if records.record_kind(row["id"]) == "sc"]
    if not counts:
        return None
    threshold = length_threshold or statistics.median(counts)
    result = {"threshold_words": threshold, "threshold_source": "--length_threshold" if length_threshold else
              "median word count of the evaluated sc expected outputs"}
    for split in ("forget", "retain"):
        if split in tables:
            result[split] = scoring.length_breakdown(tables[split], threshold)
    return result


# --- files ----------------------------------------------------------------------------------------------------------

def _read_csv(path, columns):
    """A saved table as a list of dicts of strings: '' stays '' (keep_default_na=False), '007' stays '007'."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except Exception as error:  # pandas raises several parser error types
        raise InputError(f"{path}: cannot read CSV ({str(error).splitlines()[0]})") from None
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
    return frame.to_dict(orient="records")


def load_predictions(predictions_dir):
    """Tables from a previous run's output dir (forget.csv / retain.csv, optional mia_losses.csv,
    mmlu_per_subject.csv)."""
    if not os.path.isdir(predictions_dir):
        raise InputError(f"--predictions_dir {predictions_dir}: directory not found")
    tables = {}
    for split in ("forget", "retain"):
        path = os.path.join(predictions_dir, f"{split}.csv")
        if os.path.isfile(path):
            rows = _read_csv(path, ROW_COLUMNS[:5])
            for line, row in enumerate(rows, start=2):
                if records.record_kind(row["id"]) is None:
                    raise InputError(f"{path}:{line}: id {row['id']!r} does not end in sc<digit> or qa<digit>")
            tables[split] = [{key: row[key] for key in ROW_COLUMNS[:5]} for row in rows]
    if not tables:
        raise InputError(f"--predictions_dir {predictions_dir}: no forget.csv or retain.csv there")
    path = os.path.join(predictions_dir, "mia_losses.csv")
    if os.path.isfile(path):
        try:
            tables["mia"] = [{"set": r["set"], "id": r["id"], "loss": float(r["loss"]),
                              **{column: float(r[column]) for column in MIA_EXTRA_COLUMNS if column in r}}
                             for r in _read_csv(path, MIA_COLUMNS)]
        except ValueError:
            raise InputError(f"{path}: a loss or MIA statistic is not a number") from None
    path = os.path.join(predictions_dir, "heldout_losses.csv")
    if os.path.isfile(path):
        try:
            tables["heldout"] = [{"id": r["id"], "loss": float(r["loss"])} for r in _read_csv(path, HELDOUT_COLUMNS)]
        except ValueError:
            raise InputError(f"{path}: a loss is not a number") from None
    path = os.path.join(predictions_dir, "mmlu_per_subject.csv")
    if os.path.isfile(path):
        try:
            tables["mmlu"] = [{"subject": r["subject"], "category": scoring.mmlu_category(r["subject"]),
                               "n": int(r["n"]), "correct": int(r["correct"]),
                               "accuracy": int(r["correct"]) / int(r["n"])}
                              for r in _read_csv(path, MMLU_COLUMNS)]
        except (ValueError, ZeroDivisionError):
            raise InputError(f"{path}: n and correct must be integers, n > 0") from None
    return tables


def score_figure(results):
    """The figure of scores.png: bars of per-task regurgitation and knowledge (forget, retain) and of the final score's parts (task aggregate,
    MIA score, MMLU, final), each bar labelled with its value; a part that did not run is labelled so, not drawn
    as 0."""
    plt = pyplot()

    def labelled_bars(ax, positions, values, missing, **kwargs):
        bars = ax.bar(positions, [v if v is not None else 0 for v in values], **kwargs)
        ax.bar_label(bars, [f"{v:.2f}" if v is not None else missing for v in values], fontsize=7, padding=1)

    splits = [split for split in scoring.SPLITS if f"{split}-set" in results]
    fig, axes = plt.subplots(1, len(splits) + 1, figsize=(5 * len(splits) + 4, 3.8), squeeze=False,
                             gridspec_kw={"width_ratios": [5] * len(splits) + [4]})
    for ax, split in zip(axes[0], splits):
        for offset, kind in zip((-0.2, 0.2), scoring.KINDS):
            values = [scoring.result_score(results, split, kind.key, task) for task in records.TASKS]
            labelled_bars(ax, [i + offset for i in range(len(records.TASKS))], values, "no rows", width=0.4,
                          label=kind.label)
        ax.set_xticks(range(len(records.TASKS)), records.TASKS)
        ax.set_ylim(0, 1.3)
        ax.set_title(f"{split} set (lower is better)" if split == "forget" else f"{split} set (higher is better)")
        ax.legend(loc="upper center", ncol=2, fontsize=8)
    label, score = scoring.final_score_label(results)
    parts = [(name, results.get(key)) for key, name in scoring.FINAL_PARTS] + [(label.split(" (")[0], score)]
    ax = axes[0][-1]
    labelled_bars(ax, range(len(parts)), [value for _, value in parts], "not run",
                  color=[f"C{i + 2}" for i in range(len(parts))])
    ax.set_xticks(range(len(parts)), [name.replace("task aggregate", "task agg.") for name, _ in parts], fontsize=8)
    ax.set_ylim(0, 1.3)
    ax.set_title("final score's parts (higher is better)")
    note = scoring.partial_note(results)
    fig.suptitle(f"{label}: " + (f"{score:.3f}" if score is not None else "n/a") + (f"   ({note})" if note else ""),
                 fontsize=10)
    fig.tight_layout()
    return fig


def plot_scores(results, path):
    save_figure(score_figure(results), path)


def write_outputs(results, tables, output_dir):
    """Write everything to a staging dir beside output_dir, then publish it with the json last."""
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".eval-staging-", dir=parent)
    for split in ("forget", "retain"):
        if split in tables:
            pd.DataFrame(tables[split], columns=ROW_COLUMNS).to_csv(os.path.join(staging, f"{split}.csv"),
                                                                    index=False)
    if "mia" in tables:
        columns = MIA_COLUMNS + [c for c in MIA_EXTRA_COLUMNS if all(c in row for row in tables["mia"])]
        pd.DataFrame(tables["mia"], columns=columns).to_csv(os.path.join(staging, "mia_losses.csv"), index=False)
    if "heldout" in tables:
        pd.DataFrame(tables["heldout"], columns=HELDOUT_COLUMNS).to_csv(os.path.join(staging, "heldout_losses.csv"),
                                                                        index=False)
    if "mmlu" in tables:
        pd.DataFrame(tables["mmlu"], columns=MMLU_COLUMNS).to_csv(os.path.join(staging, "mmlu_per_subject.csv"),
                                                                  index=False)
    plot_scores(results, os.path.join(staging, "scores.png"))
    with open(os.path.join(staging, RESULTS_FILE), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=4)
    # A stale json must not sit beside new CSVs while they are moved in.
    stale = os.path.join(output_dir, RESULTS_FILE)
    if os.path.exists(stale):
        os.remove(stale)
    publish(staging, output_dir, last=RESULTS_FILE)


def summary_lines(results):
    lines = []
    for key in ("harmonic-mean-task-aggregate", "mia_loss_acc", "mia_final_score", "mmlu_average"):
        if results.get(key) is not None:
            note = scoring.task_aggregate_note(results) if key == "harmonic-mean-task-aggregate" else ""
            lines.append(f"{key:30s} {results[key]:.4f}" + (f"   ({note})" if note else ""))
    for name in mia.ATTACKS:
        auc_key, score_key = mia.result_keys(name)
        if results.get(auc_key) is not None:
            lines.append(f"{auc_key:30s} {results[auc_key]:.4f}   {score_key} {results[score_key]:.4f}")
    if results.get("heldout_mean_loss") is not None:
        lines.append(f"{'heldout_mean_loss':30s} {results['heldout_mean_loss']:.4f}   "
                     f"({results['heldout_documents']} never-trained documents)")
    label, score = scoring.final_score_label(results)
    if score is not None and label == "final score":
        lines.append(f"{'aggregate-score':30s} {score:.4f}")
    elif score is not None:
        lines.append(f"{'partial-aggregate-score':30s} {score:.4f}   ({scoring.partial_note(results)})")
    if results.get("skipped-terms"):
        lines.append(f"skipped terms (no rows): {', '.join(results['skipped-terms'])}")
    return lines


# --- entry point ----------------------------------------------------------------------------------------------------

def main(argv=None):
    (args,) = cli.parse_config([EvalArguments], argv, description=__doc__)
    config = {**dataclasses.asdict(args)}
    if args.predictions_dir:
        check_output_dir(args.output_dir, [args.predictions_dir], args.overwrite_output_dir, RESULTS_FILE,
                         inside_inputs_ok=True)
        tables = load_predictions(args.predictions_dir)
        results = compute_results(tables, args.length_threshold, args.mmlu_threshold)
        results["mode"] = "rescored"  # from saved CSVs: dtype and batch size are the original run's
        results["config"] = config
        write_outputs(results, tables, args.output_dir)
        finish(results, args)
        return results

    # Read and check every input before loading the model, so bad input fails in a second with nothing written.
    forget_file, retain_file = args.data_sources()
    forget_records = records.load_records(forget_file) if forget_file else None
    retain_records = records.load_records(retain_file) if retain_file else None
    if args.limit:
        forget_records = forget_records[:args.limit] if forget_records else None
        retain_records = retain_records[:args.limit] if retain_records else None
    for split_records in (forget_records or [], retain_records or []):
        for r in split_records:
            if not r.input:
                raise InputError(f"row {r.id!r} has an empty input: there is no prompt to generate from")
    members = nonmembers = None
    if args.mia_data_dir:
        if not os.path.isdir(args.mia_data_dir):
            raise InputError(f"--mia_data_dir {args.mia_data_dir}: directory not found")
        members = records.load_documents(os.path.join(args.mia_data_dir, "member.jsonl"))
        nonmembers = records.load_documents(os.path.join(args.mia_data_dir, "nonmember.jsonl"))
    heldout = records.load_documents(args.heldout_file) if args.heldout_file else None
    questions = mmlu.load_mmlu(args.mmlu_dir, args.mmlu_ntrain, args.mmlu_limit) if args.mmlu_dir else None
    if not (forget_records or retain_records or members or questions or heldout):
        raise InputError("nothing to evaluate: give --data_dir/--forget_file/--retain_file, --mia_data_dir "
                         "or --mmlu_dir")
    if args.reference_model and not (members and nonmembers):
        raise InputError("--reference_model needs --mia_data_dir (it only serves the reference MIA)")
    inputs = [args.model_name_or_path, args.adapter, args.data_dir, forget_file, retain_file, args.mia_data_dir,
              args.mmlu_dir, args.reference_model, args.heldout_file]
    check_output_dir(args.output_dir, inputs, args.overwrite_output_dir, RESULTS_FILE, inside_inputs_ok=True)

    accelerator = Accelerator()
    reference_losses, reference_s = None, None
    if args.reference_model:
        # The reference model runs first and is freed, so only one model is in memory at a time.
        t0 = time.perf_counter()
        reference, reference_tokenizer = load_for_inference(args.reference_model, None, args.torch_dtype,
                                                            args.trust_remote_code)
        reference.to(accelerator.device)
        reference_losses = reference_document_losses(
            reference, reference_tokenizer, members, nonmembers, 1 if args.exact else args.batch_size, accelerator,
            accelerator.is_main_process)
        del reference
        _free_accelerator_memory()
        reference_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model, tokenizer = load_for_inference(args.model_name_or_path, args.adapter, args.torch_dtype,
                                          args.trust_remote_code)
    model.to(accelerator.device)
    load_s = time.perf_counter() - t0
    results, tables = evaluate_model(
        model, tokenizer, forget_records, retain_records, members, nonmembers, questions,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, accelerator=accelerator,
        show_progress=accelerator.is_main_process, length_threshold=args.length_threshold,
        mmlu_threshold=args.mmlu_threshold, exact=args.exact, mia_min_k=args.mia_min_k,
        reference_losses=reference_losses, heldout_documents=heldout)
    results["timings"]["load_s"] = load_s
    if reference_s is not None:
        results["timings"]["reference_s"] = reference_s  # loading and running the reference model
    config["num_processes"] = accelerator.num_processes
    config["model_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    if questions:
        # Where the worked examples came from: "dev", "test" (other questions, no dev/ there) or "none" (0-shot).
        results["mmlu_shots"] = {"ntrain": args.mmlu_ntrain,
                                 "source": sorted({q["shots_from"] for q in questions})}
    results["config"] = config
    if accelerator.is_main_process:
        write_outputs(results, tables, args.output_dir)
        finish(results, args)
    accelerator.wait_for_everyone()
    return results


def _free_accelerator_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def finish(results, args):
    for line in summary_lines(results):
        print(line)
    if results.get("mmlu_average") is not None and results["mmlu_average"] < args.mmlu_threshold:
        print(f"[WARNING] MMLU average {results['mmlu_average']:.4f} is below --mmlu_threshold "
              f"{args.mmlu_threshold}; the challenge would not rank this checkpoint.", file=sys.stderr)
    print(f"results written to {os.path.join(args.output_dir, RESULTS_FILE)}")


if __name__ == "__main__":
    cli.run_main(main)
    cli.exit_process(0)
