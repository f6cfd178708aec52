"""Benchmark (not a test): train.py's training speed against a bare torch LoRA loop on the same rows.

    python benchmarks/bench_train.py                    # SmolLM2-135M-Instruct, fp32, the demo data, 16 steps, CPU
    python benchmarks/bench_train.py --steps 32 --threads 2 --variants padded,padding_free
    python benchmarks/bench_train.py --model OLMO7B_RANDOM --data_dir DATA/semeval25/train --dtype bfloat16 \
        --gradient_checkpointing --steps 60 --variants padded,padding_free,8bit --peak_tflops 989    # an H200

Both sides train the same model with the same LoRA (configs/paper.yaml: r 8, alpha 32, all linear layers), dtype,
micro-batch size and tokenised rows (train.py's own build_examples: segment augmentation included). The bare loop is
what a careful user would write by hand: all rows sorted by length, cut into batches, each padded to its longest
row, forward + backward + AdamW, nothing else (no accelerate, no scheduler, no stats). train.py runs as a subprocess
per variant (`padded`: as it trains by default; `padding_free`: with --padding_free; `8bit`: padded with the base in
8-bit, --load_in_8bit) and reports its non-pad tokens/s and padding share in train_config.yaml. On a GPU (a model
from make_random_model.py, e.g. OLMo-7B at its real size) each train.py row also gives seconds per step, peak memory,
MFU (4 x parameters FLOPs per non-pad token: forward and the backward to the inputs; a frozen base has no weight
gradients, LoRA's are negligible; recomputation under gradient checkpointing not counted) against --peak_tflops, and
the time of 5 epochs of its schedule (steps per epoch x seconds per step); MFU is also printed for the bare loop.
Printed: non-pad tokens/s of each, the ratios, the padding shares, and the pad-free limit (the bare loop's tokens/s /
(1 - its padding share): what the bare loop would reach if its padding cost nothing). Timings go to RESULTS.md by
hand, dated; this script only prints them.

First, without training: the padding share of train.py's schedule (one kind per step, rows sorted by length within
windows of train.LENGTH_GROUP_STEPS steps) over 5 epochs of each --schedule_data dir (default: the demo data and, when
../shared is there, the SemEval train split), against the same window of 8 steps and against all rows of all kinds
sorted together (the bare loop's batching).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import yaml  # noqa: E402

import train  # noqa: E402  (first: cli's log filters, before peft imports bitsandbytes)
from batches import pad_batch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

PRESET = os.path.join(ROOT, "configs", "paper.yaml")


def train_argv(args, output_dir, *extra):
    return [PRESET, "--model_name_or_path", args.model, "--data_dir", args.data_dir, "--output_dir", output_dir,
            "--max_steps", str(args.steps), "--per_device_train_batch_size", str(args.batch_size),
            "--report_to", "none", "--save_minutes", "0", "--torch_dtype", args.dtype, *extra]


VARIANT_FLAGS = {"padded": [], "padding_free": ["--padding_free"], "8bit": ["--load_in_8bit"]}


def run_train_py(args, extra):
    """train.py in a fresh process; returns its summary (tokens_per_second, padding_share, ...)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
        flags = ["--gradient_checkpointing", "true"] if args.gradient_checkpointing else []
        result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *train_argv(args, out, *extra),
                                 *flags, "--no_merge_lora"], env=env, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"train.py {' '.join(extra)} failed:\n{result.stderr[-3000:]}")
        with open(os.path.join(out, "train_config.yaml"), encoding="utf-8") as f:
            return yaml.safe_load(f)["result"]


def bare_loop(args, tokenizer):
    """The hand-written loop on train.py's rows; returns (non-pad tokens/s, padding share)."""
    torch.manual_seed(0)
    model_args, data_args, train_args = train.parse_arguments(train_argv(args, os.path.join(tempfile.gettempdir(),
                                                                                            "bench-unused")))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    examples = [e for rows in train.build_examples(tokenizer, data_args, train_args).values() for e in rows]
    examples.sort(key=lambda e: len(e["input_ids"]))
    batches = [examples[i:i + args.batch_size] for i in range(0, len(examples), args.batch_size)]
    # every batch in turn when the steps cover them, else steps spread evenly over the lengths (as train.py's are)
    picks = range(args.steps) if args.steps >= len(batches) else [i * len(batches) // args.steps
                                                                   for i in range(args.steps)]
    batches = [batches[i % len(batches)] for i in picks]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": torch.float32}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                                             lora_dropout=model_args.lora_dropout, target_modules="all-linear"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train_args.learning_rate,
                                  weight_decay=train_args.weight_decay)
    tokens = padded = 0
    start = time.perf_counter()
    for rows in batches:
        batch = {k: v.to(device) for k, v in pad_batch(rows, tokenizer.pad_token_id).items()}
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())  # a host sync per step, as a hand-written loop logs
        padded += batch["attention_mask"].numel()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - start), 1 - tokens / padded, \
        sum(p.numel() for p in model.parameters())


def padding_share(batches):
    """Pad tokens / all tokens of batches given as lists of row lengths, each padded to its longest."""
    return 1 - sum(map(sum, batches)) / sum(max(batch) * len(batch) for batch in batches)


def schedule_padding(tokenizer, data_dir, batch_size, epochs=5):
    """Padding share of train.py's schedule at its window, at 8 steps, and of one sort over all rows; row counts."""
    _, data_args, train_args = train.parse_arguments([PRESET, "--model_name_or_path", "unused", "--data_dir", data_dir,
                                                      "--output_dir", "unused"])
    examples = train.build_examples(tokenizer, data_args, train_args)
    lengths = {kind: [len(e["input_ids"]) for e in rows] for kind, rows in examples.items()}
    shares = {}
    for window in (train.LENGTH_GROUP_STEPS, 8):
        shares[window] = padding_share([[lengths[kind][i] for i in micro_batch] for epoch in range(epochs)
                                        for kind, micro_batches in train.epoch_schedule(lengths, batch_size, 1,
                                                                                        train_args.seed, epoch, window)
                                        for micro_batch in micro_batches])
    everything = sorted(length for rows in lengths.values() for length in rows)
    shares["one sort"] = padding_share([everything[i:i + batch_size] for i in range(0, len(everything), batch_size)])
    return shares, {kind: len(ls) for kind, ls in lengths.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.path.join(ROOT, "models", "smollm2-135m-instruct"))
    parser.add_argument("--data_dir", default=os.path.join(ROOT, "data", "demo"))
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps of each side")
    parser.add_argument("--batch_size", type=int, default=8, help="rows per step (one micro-batch)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of each side (run alone)")
    parser.add_argument("--variants", default="padded,padding_free", help="train.py runs, comma-separated: "
                        f"{', '.join(VARIANT_FLAGS)} ('' = none: only the schedule's padding)")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="both sides (train.py's flag)")
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="the device's dense peak for --dtype, for "
                        "MFU (H200 / H100 SXM bf16: 989; A100 bf16: 312); 0 = no MFU")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of the time estimate (paper: 5)")
    semeval = os.path.join(ROOT, "..", "shared", "data", "semeval25", "train")
    parser.add_argument("--schedule_data", default=",".join([os.path.join(ROOT, "data", "demo")]
                                                            + ([semeval] if os.path.isdir(semeval) else [])),
                        help="comma-separated data dirs whose schedule padding is printed")
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        sys.exit(f"{args.model}: no model; run python prepare_model.py first (or pass --model)")
    torch.set_num_threads(args.threads)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    schedule_data = [path for path in args.schedule_data.split(",") if path]
    if schedule_data:
        print(f"padding share of the schedule, 5 epochs, batch {args.batch_size}:")
        print(f"| data | rows per kind | window {train.LENGTH_GROUP_STEPS} steps (train.py) | window 8 steps | "
              f"all rows in one sort |\n|---|---|---|---|---|")
        for data_dir in schedule_data:
            shares, counts = schedule_padding(tokenizer, data_dir, args.batch_size)
            print(f"| {os.path.relpath(data_dir, ROOT)} | {', '.join(f'{k} {n}' for k, n in counts.items())} | "
                  f"{shares[train.LENGTH_GROUP_STEPS]:.3f} | {shares[8]:.3f} | {shares['one sort']:.3f} |")
    if not args.variants:
        return

    unknown = [v for v in args.variants.split(",") if v not in VARIANT_FLAGS]
    if unknown:
        sys.exit(f"--variants {args.variants}: unknown {', '.join(unknown)}; expected {', '.join(VARIANT_FLAGS)}")
    bare_tps, bare_padding, parameters = bare_loop(args, tokenizer)
    limit = bare_tps / (1 - bare_padding)
    rows = [("bare loop (sorted, padded per batch)", bare_tps, bare_padding, {})]
    for variant in args.variants.split(","):
        summary = run_train_py(args, VARIANT_FLAGS[variant])
        rows.append((f"train.py {variant}", summary["tokens_per_second"], summary["padding_share"], summary))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu, {args.threads} thread(s)"
    print(f"{args.steps} steps, batch {args.batch_size}, {args.dtype}, "
          f"{'gradient checkpointing, ' if args.gradient_checkpointing else ''}{device}, model "
          f"{os.path.basename(os.path.normpath(args.model))} ({parameters / 1e9:.2f}B parameters with LoRA)")
    print("| run | non-pad tokens/s | x bare loop | padding share | s/step | peak GiB | MFU | "
          f"{args.epochs} epochs |\n|---|---|---|---|---|---|---|---|")
    for name, tps, padding, summary in rows:
        per_step = summary["train_seconds"] / summary["optimizer_steps"] if summary.get("optimizer_steps") else None
        cells = [f"{per_step:.2f}" if per_step else "-",
                 str(summary["peak_gpu_memory_gib"]) if "peak_gpu_memory_gib" in summary else "-",
                 f"{4 * parameters * tps / (args.peak_tflops * 1e12):.1%}" if args.peak_tflops else "-",
                 f"{per_step * summary['steps_per_epoch'] * args.epochs / 60:.1f} min "
                 f"({summary['steps_per_epoch']} steps/epoch)" if per_step else "-"]
        print(f"| {name} | {tps:.1f} | {tps / bare_tps:.2f} | {padding:.3f} | " + " | ".join(cells) + " |")
    print(f"pad-free limit (bare / (1 - its padding share)): {limit:.1f} tokens/s")
    for name, tps, _, _ in rows[1:]:
        print(f"{name}: {tps / limit:.2f} of the pad-free limit")


if __name__ == "__main__":
    main()
