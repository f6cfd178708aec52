"""Benchmark (not a test): evaluate.py's batched generation + scoring and MMLU against batch size 1, on
SmolLM2-135M-Instruct and the SemEval validation split, on CPU. Prints a table; fails if batching changes a score.

    python benchmarks/bench_evaluate.py                      # 24 rows per split, 64 new tokens, MMLU 10/subject
    python benchmarks/bench_evaluate.py --rows 0 --max_new_tokens 256   # the full official setting (slow on CPU)

Rows are taken evenly spaced over each split, so every task and kind is represented; at batch size 1 the default
subset takes a few minutes on 2 cores.
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import evaluate  # noqa: E402
import records  # noqa: E402
import scoring  # noqa: E402
from modeling import load_for_inference  # noqa: E402

SHARED = os.path.join(ROOT, "..", "shared", "data")


def evenly_spaced(rows, n):
    if not n or n >= len(rows):
        return rows
    return [rows[i * len(rows) // n] for i in range(n)]


def run_generation(model, tokenizer, splits, max_new_tokens, batch_size):
    """Generate for every split, then score; returns ((wall, cpu) seconds generating, (wall, cpu) seconds scoring,
    results, tables)."""
    t0, c0 = time.perf_counter(), time.process_time()
    tables = {}
    for split, rows in splits.items():
        outputs = evaluate.generate_outputs(model, tokenizer, [r.input for r in rows], max_new_tokens, batch_size)
        tables[split] = [{"id": r.id, "task": r.task, "input": r.input, "expected_output": r.output,
                          "model_output": output} for r, output in zip(rows, outputs)]
    generation_s = (time.perf_counter() - t0, time.process_time() - c0)
    t0, c0 = time.perf_counter(), time.process_time()
    results = evaluate.compute_results(tables)
    return generation_s, (time.perf_counter() - t0, time.process_time() - c0), results, tables


def run_mmlu(model, tokenizer, questions, batch_size):
    t0, c0 = time.perf_counter(), time.process_time()
    logits = evaluate.choice_logits(model, tokenizer, evaluate.mmlu_prompts(tokenizer, questions), batch_size)
    picks = [scoring.mmlu_pick(row) for row in logits]
    summary = scoring.mmlu_summary(evaluate.mmlu_subject_rows(questions, picks))
    return (time.perf_counter() - t0, time.process_time() - c0), summary["mmlu_average"], picks


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.path.join(ROOT, "models", "smollm2-135m-instruct"))
    parser.add_argument("--data_dir", default=os.path.join(SHARED, "semeval25", "validation"))
    parser.add_argument("--mmlu_dir", default=os.path.join(SHARED, "mmlu"))
    parser.add_argument("--rows", type=int, default=24, help="rows per split, evenly spaced (0 = all)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--mmlu_limit", type=int, default=10, help="questions per subject (0 = all, -1 = skip MMLU)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args()

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

    table = []
    generation = {}
    for batch_size in (1, args.batch_size):
        generation[batch_size] = run_generation(model, tokenizer, splits, args.max_new_tokens, batch_size)
        print(f"generation batch {batch_size}: {generation[batch_size][0][0]:.1f}s", flush=True)
    (g1, s1, r1, t1), (gn, sn, rn, tn) = generation[1], generation[args.batch_size]
    differing = sum(a["model_output"] != b["model_output"] for split in t1 for a, b in zip(t1[split], tn[split]))
    for key, name in (("harmonic-mean-task-aggregate", "generation (hmean)"),):
        table.append((name, g1, gn, r1[key], rn[key]))
    for split in ("forget", "retain"):
        for key in ("overall-regurgitation-score", "overall-knowledge-score"):
            short = f"  {split} {key.split('-')[1][:5]}"
            table.append((short, None, None, r1[f"{split}-set"][key], rn[f"{split}-set"][key]))
    table.append(("scoring", s1, sn, None, None))

    mmlu = None
    if args.mmlu_limit >= 0:
        questions = evaluate.load_mmlu(args.mmlu_dir, limit=args.mmlu_limit)
        mmlu = {batch_size: run_mmlu(model, tokenizer, questions, batch_size) for batch_size in (1, args.batch_size)}
        table.append((f"mmlu ({len(questions)} q)", mmlu[1][0], mmlu[args.batch_size][0], mmlu[1][1],
                      mmlu[args.batch_size][1]))

    # Wall time depends on what else runs on the machine; CPU time (all threads) is the work done.
    b = args.batch_size
    print(f"\n{'stage':20s} {'wall b1':>8s} {f'wall b{b}':>8s} {'speedup':>7s} {'cpu b1':>8s} {f'cpu b{b}':>8s} "
          f"{'speedup':>7s} {'score b1':>9s} {f'score b{b}':>9s}")
    for stage, t_one, t_batched, score_one, score_batched in table:
        times = (f"{t_one[0]:8.1f} {t_batched[0]:8.1f} {t_one[0] / t_batched[0]:6.1f}x "
                 f"{t_one[1]:8.1f} {t_batched[1]:8.1f} {t_one[1] / t_batched[1]:6.1f}x") if t_one else " " * 52
        scores = f"{score_one:9.4f} {score_batched:9.4f}" if score_one is not None else ""
        print(f"{stage:20s} {times} {scores}")
    print(f"generated strings differing between batch sizes: {differing} of {n_rows}")

    for key in ("forget-set", "retain-set", "aggregated-terms", "harmonic-mean-task-aggregate", "by-length"):
        assert r1[key] == rn[key], f"batching changed {key}"
    if mmlu:
        assert mmlu[1][2] == mmlu[args.batch_size][2], "batching changed an MMLU answer"
    print("scores identical across batch sizes")


if __name__ == "__main__":
    main()
