"""Benchmark (not a test): evaluate.py's batched generation + scoring and MMLU against batch size 1, on
SmolLM2-135M-Instruct and the SemEval validation split, on CPU. Prints a table; fails if batching changes a score.

    python benchmarks/bench_evaluate.py                      # 32 rows per split, 256 new tokens, MMLU 10/subject
    python benchmarks/bench_evaluate.py --rows 0 --batch_sizes 1,16,32   # every row (slow on CPU at batch 1)

Rows are taken evenly spaced over each split, so every task and kind is represented.
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import evaluate  # noqa: E402
import mmlu  # noqa: E402
import records  # noqa: E402
import scoring  # noqa: E402
from modeling import load_for_inference  # noqa: E402

SHARED = os.path.join(ROOT, "..", "shared", "data")


def evenly_spaced(rows, n):
    if not n or n >= len(rows):
        return rows
    return [rows[i * len(rows) // n] for i in range(n)]


def run_generation(model, tokenizer, splits, max_new_tokens, batch_size):
    """evaluate.py's generation + scoring of both splits; returns ((wall, cpu) seconds, results, tables)."""
    t0, c0 = time.perf_counter(), time.process_time()
    results, tables = evaluate.evaluate_model(model, tokenizer, splits["forget"], splits["retain"],
                                              max_new_tokens=max_new_tokens, batch_size=batch_size)
    return (time.perf_counter() - t0, time.process_time() - c0), results, tables


def run_mmlu(model, tokenizer, questions, batch_size):
    t0, c0 = time.perf_counter(), time.process_time()
    logits = mmlu.choice_logits(model, tokenizer, mmlu.mmlu_prompts(tokenizer, questions), batch_size)
    picks = [scoring.mmlu_pick(row) for row in logits]
    summary = scoring.mmlu_summary(mmlu.mmlu_subject_rows(questions, picks))
    return (time.perf_counter() - t0, time.process_time() - c0), summary["mmlu_average"], picks


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.path.join(ROOT, "models", "smollm2-135m-instruct"))
    parser.add_argument("--data_dir", default=os.path.join(SHARED, "semeval25", "validation"))
    parser.add_argument("--mmlu_dir", default=os.path.join(SHARED, "mmlu"))
    parser.add_argument("--rows", type=int, default=32, help="rows per split, evenly spaced (0 = all)")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="the official limit is 256")
    parser.add_argument("--batch_sizes", default=f"1,{evaluate.EvalArguments.batch_size}",
                        help="comma-separated; the first is the baseline the others are compared with")
    parser.add_argument("--mmlu_limit", type=int, default=10, help="questions per subject (0 = all, -1 = skip MMLU)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args()
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    scoring.rouge_scorer()  # build the stemmer once, outside the timings

    model, tokenizer = load_for_inference(args.model, dtype="float32")
    forget_file, retain_file = records.resolve_data_files(args.data_dir)
    splits = {"forget": evenly_spaced(records.load_records(forget_file), args.rows),
              "retain": evenly_spaced(records.load_records(retain_file), args.rows)}
    n_rows = sum(len(rows) for rows in splits.values())
    print(f"model {args.model} (float32, {torch.get_num_threads()} threads), {n_rows} rows, "
          f"max_new_tokens {args.max_new_tokens}", flush=True)

    runs = {}
    for batch_size in batch_sizes:
        runs[batch_size] = run_generation(model, tokenizer, splits, args.max_new_tokens, batch_size)
        print(f"generation batch {batch_size}: {runs[batch_size][0][0]:.1f}s", flush=True)
    mmlu = {}
    if args.mmlu_limit >= 0:
        questions = mmlu.load_mmlu(args.mmlu_dir, limit=args.mmlu_limit)
        for batch_size in batch_sizes:
            mmlu[batch_size] = run_mmlu(model, tokenizer, questions, batch_size)
            print(f"mmlu batch {batch_size} ({len(questions)} questions): {mmlu[batch_size][0][0]:.1f}s", flush=True)
    generated_tokens = sum(len(tokenizer(row["model_output"])["input_ids"])
                           for table in runs[batch_sizes[0]][2].values() for row in table)
    print(f"generated tokens (batch {batch_sizes[0]}): {generated_tokens}")

    # Wall time depends on what else runs on the machine; CPU time (all threads) is the work done.
    base = batch_sizes[0]
    table = []
    for batch_size in batch_sizes:
        (seconds, results, _), (seconds_base, _, _) = runs[batch_size], runs[base]
        table.append(("generation + scoring", batch_size, seconds, seconds_base,
                      f"hmean {results['harmonic-mean-task-aggregate']:.4f}"))
    for batch_size in mmlu:
        table.append(("mmlu", batch_size, mmlu[batch_size][0], mmlu[base][0], f"mmlu {mmlu[batch_size][1]:.4f}"))
    print(f"\n{'stage':22s} {'batch':>5s} {'wall s':>8s} {'speedup':>7s} {'cpu s':>8s} {'speedup':>7s}  score")
    for stage, batch_size, t, t_base, score in table:
        print(f"{stage:22s} {batch_size:5d} {t[0]:8.1f} {t_base[0] / t[0]:6.1f}x {t[1]:8.1f} "
              f"{t_base[1] / t[1]:6.1f}x  {score}")

    t_base = runs[base][2]
    for batch_size in batch_sizes[1:]:
        differing = sum(a["model_output"] != b["model_output"] for split in t_base
                        for a, b in zip(t_base[split], runs[batch_size][2][split]))
        print(f"generated strings differing between batch {base} and {batch_size}: {differing} of {n_rows}")
        for key in ("forget-set", "retain-set", "aggregated-terms", "harmonic-mean-task-aggregate", "by-length"):
            assert runs[base][1][key] == runs[batch_size][1][key], f"batch {batch_size} changed {key}"
        if mmlu:
            assert mmlu[base][2] == mmlu[batch_size][2], f"batch {batch_size} changed an MMLU answer"
    print("scores identical across batch sizes")


if __name__ == "__main__":
    main()
