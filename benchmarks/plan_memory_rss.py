"""plan_memory.py against reality: peak RSS of a few training steps of small random OLMo models on CPU (fp32).

    python benchmarks/plan_memory_rss.py            # all CPU cases, a table (a few minutes on 2 cores)
    python benchmarks/plan_memory_rss.py --cuda     # on a GPU: OLMo-7B and SmolLM2, bf16, peak CUDA allocation

Each case runs in a fresh process: import everything, reset the peak RSS (VmHWM) to the current RSS, build the model
(+ LoRA), then run train.py's step (forward, answer_nll, backward, AdamW step) a few times; the growth of the peak RSS
is compared with the planner's total for device=cpu (no CUDA allowance). The target is agreement within 30%.

The planner counts live tensors. glibc's malloc keeps freed mid-sized blocks (up to 32 MiB once its dynamic mmap
threshold has grown) in its heap, so plain RSS also measures fragmentation: up to 2.5x more than the live tensors in
LoRA runs, whose many same-sized activations interleave. The comparison therefore sets MALLOC_MMAP_THRESHOLD_=65536
(every tensor over 64 KiB gets its own mapping, returned on free); the table shows the glibc default too. On GPUs the
caching allocator's slack is the planner's --overhead_gb allowance.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name: OLMo dimensions (or a preset of plan_memory.py), LoRA rank (0 = full fine-tuning), LoRA dropout, gradient
# checkpointing, batch size, sequence length
CASES = {
    "lora": dict(hidden_size=512, num_hidden_layers=4, intermediate_size=1376, vocab_size=8192, num_attention_heads=8,
                 lora_r=8, lora_dropout=0.05, gradient_checkpointing=False, batch=4, length=256),
    "lora-nodropout": dict(hidden_size=512, num_hidden_layers=4, intermediate_size=1376, vocab_size=8192,
                           num_attention_heads=8, lora_r=8, lora_dropout=0.0, gradient_checkpointing=False, batch=4,
                           length=256),
    "full": dict(hidden_size=512, num_hidden_layers=4, intermediate_size=1376, vocab_size=8192, num_attention_heads=8,
                 lora_r=0, lora_dropout=0.0, gradient_checkpointing=False, batch=4, length=256),
    "lora-deep": dict(hidden_size=384, num_hidden_layers=12, intermediate_size=1024, vocab_size=4096,
                      num_attention_heads=6, lora_r=16, lora_dropout=0.05, gradient_checkpointing=False, batch=4,
                      length=512),
    "lora-deep-gc": dict(hidden_size=384, num_hidden_layers=12, intermediate_size=1024, vocab_size=4096,
                         num_attention_heads=6, lora_r=16, lora_dropout=0.05, gradient_checkpointing=True, batch=4,
                         length=512),
    "lora-bigvocab": dict(hidden_size=256, num_hidden_layers=2, intermediate_size=688, vocab_size=32000,
                          num_attention_heads=4, lora_r=8, lora_dropout=0.05, gradient_checkpointing=False, batch=8,
                          length=256),
    "full-wide": dict(hidden_size=1024, num_hidden_layers=4, intermediate_size=2752, vocab_size=16384,
                      num_attention_heads=16, lora_r=0, lora_dropout=0.0, gradient_checkpointing=False, batch=2,
                      length=256),
    # a real architecture (Llama: grouped-query attention, RMSNorm, tied embeddings) at its real size, random weights
    "smollm2-135m": dict(preset="HuggingFaceTB/SmolLM2-135M-Instruct", lora_r=8, lora_dropout=0.05,
                         gradient_checkpointing=False, batch=2, length=256),
    # small and quick (tests/test_plan_memory.py): many tokens through narrow layers, or wide weights and few tokens
    "tokens": dict(hidden_size=128, num_hidden_layers=8, intermediate_size=344, vocab_size=4096, num_attention_heads=4,
                   lora_r=8, lora_dropout=0.05, gradient_checkpointing=False, batch=8, length=512),
    "tokens-gc": dict(hidden_size=128, num_hidden_layers=8, intermediate_size=344, vocab_size=4096,
                      num_attention_heads=4, lora_r=8, lora_dropout=0.05, gradient_checkpointing=True, batch=8,
                      length=512),
    "weights": dict(hidden_size=1024, num_hidden_layers=2, intermediate_size=2752, vocab_size=8192,
                    num_attention_heads=16, lora_r=0, lora_dropout=0.0, gradient_checkpointing=False, batch=1,
                    length=64),
}
# --cuda: bf16 weights under bf16 autocast, as train.py runs on a GPU (accelerate --mixed_precision bf16); measured
# with torch.cuda.max_memory_allocated, so the planner's CUDA context + allocator slack allowance is left out
OLMO_7B, SMOLLM2 = "allenai/OLMo-7B-0724-Instruct-hf", "HuggingFaceTB/SmolLM2-135M-Instruct"
ON_GPU = dict(device="cuda", dtype="bfloat16", mixed=True, length=512)
CUDA_CASES = {
    # the project's target: OLMo-7B, paper LoRA (r8, dropout 0.05, all linear layers), batch 8 x 512
    "olmo7b-lora-gc": dict(ON_GPU, preset=OLMO_7B, lora_r=8, lora_dropout=0.05, gradient_checkpointing=True, batch=8),
    "olmo7b-lora": dict(ON_GPU, preset=OLMO_7B, lora_r=8, lora_dropout=0.05, gradient_checkpointing=False, batch=2),
    "smollm2-full": dict(ON_GPU, preset=SMOLLM2, lora_r=0, lora_dropout=0.0, gradient_checkpointing=False, batch=8),
    "smollm2-lora": dict(ON_GPU, preset=SMOLLM2, lora_r=8, lora_dropout=0.05, gradient_checkpointing=False, batch=8),
}
STEPS = 2  # AdamW creates its states in the first step: the second holds everything


def predicted_bytes(case):
    import plan_memory

    dims = {name: case[name] for name in plan_memory.DIMS if name in case}
    args = plan_memory.PlanArguments(
        model_name_or_path=case.get("preset", ""), **dims, lora_r=case["lora_r"], lora_dropout=case["lora_dropout"],
        gradient_checkpointing=case["gradient_checkpointing"], per_device_train_batch_size=case["batch"],
        max_length=case["length"], torch_dtype=case.get("dtype", "float32"),
        mixed_precision="bf16" if case.get("mixed") else "no", device="cpu")
    rows = plan_memory.plan(args, plan_memory.model_dims(args))
    return sum(size for _, size, _ in rows), rows


def status_bytes(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak_rss():
    """Current RSS, after resetting the peak to it: a transient peak during the imports must not hide the growth."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux >= 4.0: reset VmHWM to the current RSS
    return status_bytes("VmRSS")


def peak_rss():
    return status_bytes("VmHWM")


def worker(case):
    """In a fresh process: peak RSS growth of STEPS training steps, in bytes, printed as JSON."""
    import contextlib

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, OlmoConfig, OlmoForCausalLM

    import plan_memory

    from modeling import add_lora, make_adamw
    from objectives import answer_nll

    torch.manual_seed(0)
    torch.set_num_threads(1)
    cuda = case.get("device", "cpu") == "cuda"
    dtype = getattr(torch, case.get("dtype", "float32"))
    before = torch.cuda.memory_allocated() if cuda else reset_peak_rss()
    kinds = {"olmo": (OlmoConfig, OlmoForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
    if "preset" in case:
        config_class, model_class = kinds["olmo" if "OLMo" in case["preset"] else "llama"]
        dims = plan_memory.PRESETS[case["preset"]]
    else:
        config_class, model_class = kinds["olmo"]
        dims = {name: case[name] for name in plan_memory.DIMS if name in case}
    config = config_class(**dims, max_position_embeddings=case["length"], pad_token_id=0, bos_token_id=None,
                          eos_token_id=1)
    with torch.device("cuda" if cuda else "cpu"):
        model = model_class._from_config(config, dtype=dtype)
    model.config.use_cache = False
    if case["lora_r"]:
        model = add_lora(model, case["lora_r"], 32, case["lora_dropout"], case["gradient_checkpointing"])
    elif case["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = make_adamw([p for p in model.parameters() if p.requires_grad], 1e-4, 0.01)  # as train.py does
    generator = torch.Generator().manual_seed(0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if case.get("mixed") else contextlib.nullcontext()
    for _ in range(STEPS):
        ids = torch.randint(2, config.vocab_size, (case["batch"], case["length"]), generator=generator)
        ids = ids.to(model.device)
        with autocast:
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            loss = answer_nll(logits, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
    print(json.dumps({"measured": peak - before}))


def measured_bytes(case, fixed_mmap_threshold=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if case.get("device", "cpu") == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU case must not touch a GPU that happens to be there
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if fixed_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(case)],
                            capture_output=True, text=True, env=env, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])["measured"]


def main():
    cuda = "--cuda" in sys.argv[1:]
    cases = CUDA_CASES if cuda else CASES
    print(f"{'case':<15} {'predicted':>9} {'measured':>8} {'ratio':>5} "
          f"{'' if cuda else 'glibc default':>13}   predicted parts (MiB)")
    for name, case in cases.items():
        predicted, rows = predicted_bytes(case)
        measured = measured_bytes(case)
        default = measured if cuda else measured_bytes(case, fixed_mmap_threshold=False)
        parts = ", ".join(f"{row[0].split(' ')[0]} {row[1] / 2 ** 20:.0f}" for row in rows)
        print(f"{name:<15} {predicted / 2 ** 20:9.0f} {measured / 2 ** 20:8.0f} {predicted / measured:5.2f} "
              f"{'' if cuda else f'{default / 2 ** 20:.0f}':>13}   {parts}", flush=True)
    print("MiB of peak torch.cuda.max_memory_allocated (CUDA context and allocator slack excluded); ratio = "
          "predicted / measured" if cuda else
          "MiB of peak RSS growth; ratio = predicted / measured (MALLOC_MMAP_THRESHOLD_=65536)")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]))
    else:
        main()
