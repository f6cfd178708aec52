#!/usr/bin/env bash
# The project's checks that need a GPU, as run on one H200 (results in the README and the issues' closing notes).
#
#   bash benchmarks/gpu_check.sh olmo7b  DATA TOKENIZER OUT   # OLMo-7B (random weights, real size): bench_train.py
#                                                             # on SemEval train: tokens/s, MFU, memory, 5-epoch time
#   bash benchmarks/gpu_check.sh smollm2 DATA GGUF OUT        # SmolLM2-135M: the demo, the preset grid and the
#                                                             # pipeline on SemEval validation; planner vs CUDA peak
#
# DATA holds the SemEval layout (train/, validation/, mia_data/) and mmlu/ (e.g. ../shared/data); TOKENIZER is a local
# tokenizer dir (e.g. models/smollm2-135m-instruct: OLMo's own is on the hub); GGUF is SmolLM2-135M-Instruct.Q4_1.gguf.
# Everything writes under OUT; OUT/results-PART.tgz holds the reports, scores and logs (no weights).
# Smaller runs of the same script (e.g. on a CPU, to check it): PRESET (a plan_memory.py preset), STEPS, INIT_DEVICE;
# DEMO_FLAGS is added to every demo.py call (e.g. --dry_run).
set -uo pipefail
cd "$(dirname "$0")/.."
part=$1 data=$2 source=$3 out=$4
mkdir -p "$out/logs"
python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu',
'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
demo_flags=${DEMO_FLAGS:-}

if [ "$part" = olmo7b ]; then
  model=$out/olmo7b-random
  python3 benchmarks/make_random_model.py --preset "${PRESET:-allenai/OLMo-7B-0724-Instruct-hf}" \
    --tokenizer "$source" --output_dir "$model" --device "${INIT_DEVICE:-cuda}" 2>&1 | tail -1
  # the paper's recipe (LoRA r8, GI + retain + segments, batch 8 x up to 512 tokens) with gradient checkpointing in
  # bf16, STEPS of its steps: a bare loop, train.py padded, --padding_free and --load_in_8bit, with tokens/s, padding,
  # s/step, peak memory, MFU (PEAK_TFLOPS: the device's dense bf16 peak, 989 for an H200) and the 5-epoch time
  python3 benchmarks/bench_train.py --model "$model" --data_dir "$data/semeval25/train" --dtype bfloat16 \
    --gradient_checkpointing --steps "${STEPS:-60}" --variants padded,padding_free,8bit \
    --peak_tflops "${PEAK_TFLOPS:-989}" --schedule_data "$data/semeval25/train" > "$out/logs/olmo7b-bench.log" 2>&1
  echo "bench_train exit $?"; grep "|\|limit\|steps, batch" "$out/logs/olmo7b-bench.log"
  rm -rf "$model"
fi

if [ "$part" = smollm2 ]; then
  python3 prepare_model.py --gguf_file "$source" 2>&1 | tail -1
  runs=$out/runs
  # planner against the CUDA allocator, one process per case, beside the rest
  (python3 benchmarks/plan_memory_rss.py --cuda > "$out/logs/plan_memory_cuda.txt" 2>&1) &
  # SemEval validation: target, before, paper unlearning, after (official 256 new tokens; MMLU 10 per subject)
  (timeout 560 python3 demo.py $demo_flags --data_dir "$data/semeval25/validation" --mia_data_dir "$data/semeval25/mia_data" \
    --mmlu_dir "$data/mmlu" --mmlu_limit 10 --max_new_tokens 256 --batch_size 64 --num_threads 2 \
    --run_dir "$runs/semeval-validation" > "$out/logs/semeval-validation.log" 2>&1; echo "validation exit $?") &
  # the demo (target, before, paper, after, report), then every other preset from the same target
  timeout 240 python3 demo.py $demo_flags --batch_size 64 --num_threads 2 --mmlu_dir "$data/mmlu" --mmlu_limit 10 \
    --run_dir "$runs/demo" > "$out/logs/demo.log" 2>&1; echo "demo exit $?"
  for config in configs/*.yaml; do
    name=$(basename "$config" .yaml)
    if [ "$name" != target ] && [ "$name" != paper ]; then
      mkdir -p "$runs/grid/$name" && cp -r "$runs/demo/eval-target" "$runs/grid/$name/"
      echo "$name"
    fi
  done | timeout 270 xargs -P 5 -I{} sh -c "python3 demo.py $demo_flags --batch_size 64 --num_threads 2 --mmlu_dir '$data/mmlu' \
    --mmlu_limit 10 --target_model '$runs/demo/target' --unlearn_config configs/{}.yaml --run_dir '$runs/grid/{}' \
    > '$out/logs/grid-{}.log' 2>&1; echo 'grid {} exit' \$?"
  wait
  names=target,paper evals="$runs/demo/eval-target $runs/demo/eval-paper"
  for dir in "$runs"/grid/*/; do
    name=$(basename "$dir")
    if [ -f "$dir/eval-$name/evaluation_results.json" ]; then names=$names,$name evals="$evals $dir/eval-$name"; fi
  done
  python3 compare.py $evals --names "$names" --output_dir "$runs/grid" 2>&1 | tail -2
  cat "$runs/grid/comparison.md" "$out/logs/plan_memory_cuda.txt"
  grep -h "^| \|wall" "$runs/demo/report.md" "$runs/semeval-validation/report.md" 2>/dev/null | head -60
fi

# reports, scores, logs and TensorBoard events; no weights
tar czf /tmp/results.tgz --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' --exclude='*.pth' \
  --exclude='tokenizer.json' -C "$out" . && mv /tmp/results.tgz "$out/results-$part.tgz"
ls -la "$out/results-$part.tgz"
