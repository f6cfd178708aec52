"""Expected peak memory per device of an unlearning run (train.py), before renting the GPUs.

    python plan_memory.py --model_name_or_path allenai/OLMo-7B-0724-Instruct-hf --quantization 8bit \
        --lora_r 8 --gradient_checkpointing --per_device_train_batch_size 8 --max_length 512 --gpu_gb 40

Works offline: known models are in PRESETS; a local model dir or --config_json is read for its config.json; the
--hidden_size etc. flags override any of them. The estimate adds up what train.py keeps alive at its peak (the start
of the backward pass): frozen base weights, trainable weights + gradients + AdamW states (sharded by ZeRO), the
activations saved for backward (all layers, or one input per layer with gradient checkpointing plus one layer being
recomputed), the logits and loss (B x T x V, fp32 where the loss is computed: often the largest single item), and on
GPUs a fixed allowance for the CUDA context and allocator slack. benchmarks/plan_memory_rss.py compares the estimate
with the measured peak RSS of small models on CPU.
"""

import json
import os
from dataclasses import dataclass, field

from cli import InputError, check_choices, check_quantization, parse_config, run_main

GIB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# config.json fields of models we use, so planning needs no download
PRESETS = {
    "allenai/OLMo-7B-0724-Instruct-hf": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008,
                                             vocab_size=50304, num_attention_heads=32, num_key_value_heads=32,
                                             tie_word_embeddings=False),
    "allenai/OLMo-7B-0724-hf": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, vocab_size=50304,
                                    num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
    "allenai/OLMo-1B-0724-hf": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, vocab_size=50304,
                                    num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=True),
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(hidden_size=576, num_hidden_layers=30, intermediate_size=1536,
                                                vocab_size=49152, num_attention_heads=9, num_key_value_heads=3,
                                                tie_word_embeddings=True),
}
PRESETS["HuggingFaceTB/SmolLM2-135M"] = PRESETS["HuggingFaceTB/SmolLM2-135M-Instruct"]
DIMS = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "num_attention_heads",
        "num_key_value_heads")


@dataclass
class PlanArguments:
    model_name_or_path: str = field(default="", metadata={"help": "A known model (" + ", ".join(PRESETS) + "), or a "
                                                          "local model dir whose config.json is read."})
    config_json: str = field(default="", metadata={"help": "Read the dimensions from this config.json instead."})
    hidden_size: int = field(default=0, metadata={"help": "Override: hidden size (0 = from the model)."})
    num_hidden_layers: int = field(default=0, metadata={"help": "Override: number of layers (0 = from the model)."})
    intermediate_size: int = field(default=0, metadata={"help": "Override: MLP size (0 = from the model)."})
    vocab_size: int = field(default=0, metadata={"help": "Override: vocabulary size, embedding rows (0 = from the "
                                                 "model)."})
    num_attention_heads: int = field(default=0, metadata={"help": "Override: attention heads (0 = from the model)."})
    num_key_value_heads: int = field(default=0, metadata={"help": "Override: key/value heads (0 = from the model)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank on all linear layers; 0 = full fine-tuning."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout: > 0 keeps a copy of every adapted "
                                                        "layer's input (and a mask) for backward."})
    quantization: str = field(default="none", metadata={
        "choices": ("none", "8bit", "4bit"),
        "help": "Frozen base weights: none, 8bit or 4bit (bitsandbytes; needs LoRA)."})
    torch_dtype: str = field(default="bfloat16", metadata={
        "choices": tuple(DTYPE_BYTES),
        "help": "Dtype the weights are loaded in: bfloat16, float16 or float32."})
    mixed_precision: str = field(default="bf16", metadata={
        "choices": ("bf16", "fp16", "no"),
        "help": "accelerate --mixed_precision: bf16, fp16 or no (then activations are in --torch_dtype)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Keep one input per layer and recompute "
                                                                  "the rest in backward."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Examples per micro-batch per device."})
    max_length: int = field(default=512, metadata={"help": "Tokens per example (the padded length of a batch)."})
    zero_stage: int = field(default=0, metadata={
        "choices": (0, 1, 2, 3),
        "help": "DeepSpeed ZeRO stage (0 = DDP / one device): 1 shards optimizer states, 2 also gradients, 3 also "
                "weights."})
    offload: bool = field(default=False, metadata={"help": "ZeRO offload (deepspeed_zero3_offload.yaml): optimizer "
                                                   "states and, with stage 3, weights live in CPU RAM."})
    world_size: int = field(default=1, metadata={"help": "Devices (processes) that ZeRO shards over."})
    device: str = field(default="cuda", metadata={
        "choices": ("cuda", "cpu"),
        "help": "cuda (adds the CUDA context allowance) or cpu."})
    overhead_gb: float = field(default=1.5, metadata={"help": "CUDA context + allocator slack per GPU, GiB."})
    gpu_gb: float = field(default=40.0, metadata={"help": "Memory of one device, GiB: says whether the plan fits."})


def model_dims(args):
    """The dimensions the estimate needs, from a preset, a config.json, or a local model dir; flags override."""
    config = {}
    path = args.config_json or (os.path.join(args.model_name_or_path, "config.json")
                                if os.path.isdir(args.model_name_or_path) else "")
    if path:
        if not os.path.isfile(path):
            raise InputError(f"{path}: config.json not found")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        config = config.get("text_config", config)  # multimodal configs nest the language model's
    elif args.model_name_or_path in PRESETS:
        config = PRESETS[args.model_name_or_path]
    elif args.model_name_or_path:
        raise InputError(f"--model_name_or_path {args.model_name_or_path}: not a known model ({', '.join(PRESETS)}) "
                         f"nor a local dir; pass --config_json or the dimension flags")
    dims = {name: getattr(args, name) or config.get(name, 0) for name in DIMS}
    dims["num_key_value_heads"] = dims["num_key_value_heads"] or dims["num_attention_heads"]
    missing = [name for name in DIMS if not dims[name]]
    if missing:
        raise InputError(f"model dimensions missing: {', '.join('--' + name for name in missing)}")
    dims["head_dim"] = config.get("head_dim") or dims["hidden_size"] // dims["num_attention_heads"]
    dims["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))
    return dims


def check_plan_arguments(args):
    check_choices(args)
    if args.quantization != "none":
        check_quantization(f"--quantization {args.quantization}", args.lora_r, args.zero_stage)  # train.py's rule
    if args.world_size < 1:
        raise InputError("--world_size must be >= 1")
    if args.per_device_train_batch_size < 1 or args.max_length < 1:
        raise InputError("--per_device_train_batch_size and --max_length must be >= 1")


def parameter_counts(dims, lora_r):
    """(linear weights of the layers, other weights, LoRA weights), counted as peft's all-linear LoRA sees them."""
    h, layers, mlp, vocab = (dims[name] for name in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                                      "vocab_size"))
    q = dims["num_attention_heads"] * dims["head_dim"]
    kv = dims["num_key_value_heads"] * dims["head_dim"]
    linear = layers * (h * q + 2 * h * kv + q * h + 3 * h * mlp)  # q, k, v, o; gate, up, down
    other = vocab * h * (1 if dims["tie_word_embeddings"] else 2) + (2 * layers + 1) * h  # embeddings, head, norms
    # LoRA adds r x (in + out) per adapted linear (lm_head is not adapted)
    lora = layers * lora_r * ((h + q) + 2 * (h + kv) + (q + h) + 3 * (h + mlp))
    return linear, other, lora


def plan(args, dims):
    """[(component, bytes per device, note)] at the peak of a training step."""
    h, layers, mlp, vocab = (dims[name] for name in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                                      "vocab_size"))
    q = dims["num_attention_heads"] * dims["head_dim"]
    kv = dims["num_key_value_heads"] * dims["head_dim"]
    tokens = args.per_device_train_batch_size * args.max_length
    world = args.world_size if args.zero_stage else 1
    deepspeed = args.zero_stage > 0
    mixed = args.mixed_precision != "no"
    # activations: autocast computes in 16 bit; otherwise in the weights' dtype (a quantized base computes next to
    # fp32 embeddings: peft's prepare_model_for_kbit_training upcasts every weight it does not quantize)
    act = 2 if mixed else (4 if args.quantization != "none" else DTYPE_BYTES[args.torch_dtype])
    # weights DeepSpeed trains: cast to the mixed-precision dtype, fp32 master copy in the optimizer
    weight = 2 if deepspeed and mixed else DTYPE_BYTES[args.torch_dtype]
    linear, other, lora = parameter_counts(dims, args.lora_r)
    rows = []

    # frozen base (LoRA) or the trainable model (full fine-tuning)
    if args.lora_r > 0:
        if args.quantization == "none":
            base, note = (linear + other) * weight, f"{(linear + other) / 1e9:.2f}B x {weight} bytes"
        else:
            per_weight = {"8bit": 1 + 4 / h, "4bit": 0.5 + 4 / 64}[args.quantization]  # + fp32 scales
            base = linear * per_weight + other * 4
            note = (f"{linear / 1e9:.2f}B x {args.quantization} + {other / 1e9:.2f}B fp32 (embeddings, head, norms: "
                    f"upcast by peft)")
        if args.zero_stage == 3:
            # sharded; the layer being computed (and the next, prefetched) gathered whole
            base = base / world + 2 * linear / layers * weight
            note += f", ZeRO-3 over {world}"
            if args.offload:
                base, note = 2 * linear / layers * weight, "offloaded to CPU; 2 gathered layers on the GPU"
        rows.append(("base weights (frozen)", base, note))
        trainable, trainable_bytes, name = lora, 4, "LoRA weights + grads + AdamW"
        if deepspeed and mixed:
            trainable_bytes = 2  # DeepSpeed casts the whole module, adapters too
    else:
        trainable, trainable_bytes, name = linear + other, weight, "weights + grads + AdamW"
    # per trainable weight: weight + gradient + AdamW's two moments (+ DeepSpeed's fp32 master copy under 16 bit)
    if deepspeed:
        master = 4 if trainable_bytes == 2 else 0
        optimizer_state = 0 if args.offload else (master + 8) / world
        gradient = trainable_bytes / (world if args.zero_stage >= 2 else 1)
        weights = trainable_bytes / (world if args.zero_stage == 3 else 1)
        if args.zero_stage == 3 and args.offload:
            weights = 0
        per = weights + gradient + optimizer_state
    else:
        per = 4 * trainable_bytes  # torch AdamW keeps its moments in the weights' dtype
    rows.append((name, trainable * per, f"{trainable / 1e6:.2f}M trainable x {per:.3g} bytes"
                 + (f" (ZeRO-{args.zero_stage} over {world}{', optimizer offloaded' if args.offload else ''})"
                    if deepspeed else "")))

    # the residual stream: fp32 next to a quantized base (its embeddings are upcast), else the activation dtype
    residual = 4 if args.quantization != "none" else act
    # activations saved for backward, per token and layer: the inputs (residual stream) and outputs of both norms,
    # q/k/v, the attention output (kept by attention and, reshaped, by o_proj), and in the MLP gate, up, act(gate),
    # their product
    layer_bytes = 2 * h * residual + (2 * h + q + 2 * kv + 2 * q + 4 * mlp) * act
    if args.lora_r > 0:
        adapted = 3 * h + q + 2 * h + mlp  # inputs of q, k, v, o, gate, up, down
        # with dropout, or when the fp32 adapter casts a 16-bit input, each adapter keeps its own copy of the input
        if args.lora_dropout > 0 or act != 4:
            layer_bytes += adapted * (act + (1 if args.lora_dropout > 0 else 0))
        layer_bytes += 7 * args.lora_r * 4
    # logits in the activation dtype; the loss takes fp32 log-softmax (kept for backward); its backward holds three
    # more B x T x V fp32 tensors (loss gradient, softmax, logits gradient)
    logits = tokens * vocab * (act + 16)
    if args.gradient_checkpointing:
        rows.append(("activations", tokens * layers * h * residual, f"{tokens} tokens; checkpointed: the input of "
                                                                    f"each of {layers} layers"))
    else:
        rows.append(("activations", tokens * layers * layer_bytes, f"{tokens} tokens x {layers} layers x "
                                                                   f"{layer_bytes / 1024:.0f} KiB"))
    rows.append(("logits + loss", logits, f"{args.per_device_train_batch_size} x {args.max_length} x {vocab}: "
                                          f"{act}-byte logits, fp32 log-softmax + backward"))
    if args.gradient_checkpointing:
        # backward recomputes one layer at a time and holds its gradients too, after the logits are freed
        recompute = 2 * tokens * layer_bytes
        rows.append(("recomputed layer (beyond logits)", max(0, recompute - logits),
                     f"one layer + its gradients: {recompute / GIB:.2f} GiB, in place of the logits"))
    if args.device == "cuda":
        rows.append(("CUDA context + allocator slack", args.overhead_gb * GIB, "fixed allowance (--overhead_gb)"))
    return rows


def describe(args, dims):
    linear, other, lora = parameter_counts(dims, args.lora_r)
    training = f"LoRA r={args.lora_r} (dropout {args.lora_dropout})" if args.lora_r else "full fine-tuning"
    parallel = (f"DeepSpeed ZeRO-{args.zero_stage}{' + offload' if args.offload else ''} over {args.world_size}"
                if args.zero_stage else "no ZeRO (one device, or DDP: every device the same)")
    return [f"{args.model_name_or_path or args.config_json or 'model'}: {(linear + other) / 1e9:.2f}B parameters "
            f"(hidden {dims['hidden_size']}, {dims['num_hidden_layers']} layers, MLP {dims['intermediate_size']}, "
            f"vocab {dims['vocab_size']}, {dims['num_attention_heads']}/{dims['num_key_value_heads']} heads)",
            f"{training}; base {args.quantization if args.quantization != 'none' else args.torch_dtype}; "
            f"mixed precision {args.mixed_precision}; gradient checkpointing "
            f"{'on' if args.gradient_checkpointing else 'off'}; {parallel}",
            f"micro-batch {args.per_device_train_batch_size} x {args.max_length} tokens per device"]


def report(args):
    dims = model_dims(args)
    rows = plan(args, dims)
    total = sum(size for _, size, _ in rows)
    lines = describe(args, dims) + [""]
    width = max(len(name) for name, _, _ in rows)
    lines += [f"{'component':<{width}}  {'GiB':>7}  detail"]
    lines += [f"{name:<{width}}  {size / GIB:7.2f}  {note}" for name, size, note in rows]
    lines += [f"{'total per device':<{width}}  {total / GIB:7.2f}"]
    spare = args.gpu_gb - total / GIB
    verdict = (f"fits on a {args.gpu_gb:g} GiB device: {'yes' if spare >= 0 else 'NO'} "
               f"({abs(spare):.1f} GiB {'to spare' if spare >= 0 else 'short'})")
    flipped = PlanArguments(**{**vars(args), "gradient_checkpointing": not args.gradient_checkpointing})
    other = sum(size for _, size, _ in plan(flipped, dims)) / GIB
    lines += ["", verdict, f"with gradient checkpointing {'off' if args.gradient_checkpointing else 'on'}: "
              f"{other:.2f} GiB"]
    return "\n".join(lines), total


def main(argv=None):
    (args,) = parse_config((PlanArguments,), argv, description=__doc__)
    check_plan_arguments(args)
    text, _ = report(args)
    print(text)


if __name__ == "__main__":
    run_main(main)
