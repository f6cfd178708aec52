"""Benchmark (not a test): does batching change evaluate.py's strings and scores in bfloat16? Batch 1 (the official
scorer's computation) against the default batch size in fast mode and with --exact, on SmolLM2-135M-Instruct, the
first rows of the SemEval validation split and the first MIA documents. Prints a markdown table.

    python benchmarks/bench_bf16_parity.py                   # 12 forget + 12 retain rows, 12 + 12 MIA documents
    python benchmarks/bench_bf16_parity.py --rows 4 --mia_docs 4 --max_new_tokens 64    # a quick look

In float32 batching changes nothing (bench_evaluate.py); bfloat16 rounds every matrix product to 8 mantissa bits,
and a batched or padded product is summed in another order than batch 1's, so some greedy choices flip.
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import evaluate  # noqa: E402
import mia  # noqa: E402
import records  # noqa: E402
import scoring  # noqa: E402
from modeling import load_for_inference  # noqa: E402

SHARED = os.path.join(ROOT, "..", "shared", "data")


def score_items(results):
    """(name, value) of every score the drift table compares."""
    items = []
    for split in ("forget", "retain"):
        block = results.get(f"{split}-set") or {}
        for key in ("overall-regurgitation-score", "overall-knowledge-score"):
            items.append((f"{split} {key.replace('overall-', '').replace('-score', '')}", block.get(key)))
    items.append(("task aggregate (harmonic mean)", results.get("harmonic-mean-task-aggregate")))
    for name in ("loss",) + tuple(mia.ATTACKS):
        auc_key, _ = mia.result_keys(name)
        if results.get(auc_key) is not None:
            items.append((f"MIA {mia.LABELS[name]} AUC", results[auc_key]))
    return items


def differing_strings(base_tables, tables):
    return sum(a["model_output"] != b["model_output"] for split in ("forget", "retain")
               for a, b in zip(base_tables.get(split, []), tables.get(split, [])))


def max_mia_delta(base_tables, tables, column):
    if "mia" not in base_tables:
        return None
    return max(abs(a[column] - b[column]) for a, b in zip(base_tables["mia"], tables["mia"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.path.join(ROOT, "models", "smollm2-135m-instruct"))
    parser.add_argument("--data_dir", default=os.path.join(SHARED, "semeval25", "validation"))
    parser.add_argument("--mia_data_dir", default=os.path.join(SHARED, "semeval25", "mia_data"))
    parser.add_argument("--rows", type=int, default=12, help="first N rows of each split")
    parser.add_argument("--mia_docs", type=int, default=12, help="first N member and nonmember documents (0 = none)")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="the official limit is 256")
    parser.add_argument("--batch_size", type=int, default=evaluate.EvalArguments.batch_size)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    scoring.rouge_scorer()  # build the stemmer once, outside the timings
    model, tokenizer = load_for_inference(args.model, dtype=args.dtype)
    forget_file, retain_file = records.resolve_data_files(args.data_dir)
    forget, retain = records.load_records(forget_file)[:args.rows], records.load_records(retain_file)[:args.rows]
    members = nonmembers = None
    if args.mia_docs:
        members = records.load_documents(os.path.join(args.mia_data_dir, "member.jsonl"))[:args.mia_docs]
        nonmembers = records.load_documents(os.path.join(args.mia_data_dir, "nonmember.jsonl"))[:args.mia_docs]
    device = next(model.parameters()).device
    print(f"model {args.model} ({args.dtype}, {device}, {torch.get_num_threads()} threads), {len(forget)} + "
          f"{len(retain)} rows, {args.mia_docs} + {args.mia_docs} MIA documents, max_new_tokens "
          f"{args.max_new_tokens}", flush=True)

    runs = {}
    for label, batch_size, exact in (("batch 1", 1, False), (f"batch {args.batch_size}", args.batch_size, False),
                                     (f"batch {args.batch_size} --exact", args.batch_size, True)):
        t0 = time.perf_counter()
        results, tables = evaluate.evaluate_model(model, tokenizer, forget, retain, members, nonmembers,
                                                  max_new_tokens=args.max_new_tokens, batch_size=batch_size,
                                                  exact=exact)
        runs[label] = (results, tables, time.perf_counter() - t0)
        print(f"{label}: {runs[label][2]:.1f}s (mode {results['mode']}, batch size {results['batch_size']})",
              flush=True)

    labels = list(runs)
    base_results, base_tables, _ = runs[labels[0]]
    n_rows = len(forget) + len(retain)
    header = [f"{args.dtype}, {n_rows} rows, {args.max_new_tokens} new tokens", f"{labels[0]} (value)"]
    header += [f"{label}: delta" for label in labels[1:]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    row = ["generated strings differing from batch 1", "–"]
    row += [f"{differing_strings(base_tables, runs[label][1])} of {n_rows}" for label in labels[1:]]
    lines.append("| " + " | ".join(row) + " |")
    for column in ("loss", "min_k", "min_k_plus_plus"):
        if max_mia_delta(base_tables, base_tables, column) is not None:
            row = [f"max abs delta of a document's MIA {column}", "–"]
            row += [f"{max_mia_delta(base_tables, runs[label][1], column):.2e}" for label in labels[1:]]
            lines.append("| " + " | ".join(row) + " |")
    base_items = score_items(base_results)
    for i, (name, value) in enumerate(base_items):
        row = [name, "n/a" if value is None else f"{value:.4f}"]
        for label in labels[1:]:
            other = score_items(runs[label][0])[i][1]
            row.append("n/a" if None in (value, other) else f"{other - value:+.4f}")
        lines.append("| " + " | ".join(row) + " |")
    row = ["wall time (s)", f"{runs[labels[0]][2]:.0f}"] + [f"{runs[label][2]:.0f}" for label in labels[1:]]
    lines.append("| " + " | ".join(row) + " |")
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
