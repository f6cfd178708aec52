"""Unlearn a forget set from a causal LM while keeping a retain set (Sun & Li, SemEval-2025 Task 4).

    accelerate launch train.py configs/paper.yaml --model_name_or_path MODEL --data_dir DATA --output_dir OUT

Multi-task loop, one loss kind per optimizer step: retain batches use next-token loss L_ntp, forget batches use
gradient interference alpha / L_ntp (or a baseline objective), optional idk batches teach "I don't know" answers.
LoRA (peft) on all linear layers by default; runs unchanged on one CPU process or many GPUs (accelerate / DeepSpeed).
"""

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
import yaml

from cli import InputError, parse_config, run_main
from objectives import FORGET_LOSSES, NEEDS_REFERENCE, NLL_FLOOR, RETAIN_LOSSES, batch_loss, is_finite, zero_loss
from records import encode_example, load_records, pad_batch, resolve_data_files, find_split_file

ROOT = os.path.dirname(os.path.abspath(__file__))
DONE_MARKER = "train_config.yaml"  # written last: its presence means the run finished
CHECKPOINT_STATE = "trainer_state.json"  # step counters and data position, written last into a checkpoint
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: the sbatch scripts requeue the job on it
AUGMENT_MODES = ("none", "segments", "recombine", "both")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="", metadata={"help": "Model to unlearn from: a local dir or hub id."})
    torch_dtype: str = field(default="auto", metadata={"help": "Weight dtype: auto (from the model config), "
                                                       "bfloat16, float16 or float32."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank; 0 = full fine-tuning (no adapter)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha (paper: 32)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (paper: 0.05)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward to "
                                                                  "save memory (slower)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the frozen base in 8-bit (bitsandbytes); "
                                                        "needs LoRA."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the frozen base in 4-bit nf4 "
                                                        "(bitsandbytes, bf16 compute); needs LoRA."})
    merge_lora: bool = field(default=True, metadata={"help": "Also save the merged full model (base + adapter) "
                                                     "as safetensors in output_dir; --no_merge_lora saves only "
                                                     "the adapter."})


@dataclass
class DataArguments:
    data_dir: str = field(default="", metadata={"help": "Dir with forget.{jsonl,parquet} and "
                                                "retain.{jsonl,parquet} (the SemEval layout)."})
    forget_file: str = field(default="", metadata={"help": "Forget set file (.jsonl/.parquet); overrides "
                                                   "data_dir's."})
    retain_file: str = field(default="", metadata={"help": "Retain set file (.jsonl/.parquet); overrides "
                                                   "data_dir's."})
    max_length: int = field(default=512, metadata={"help": "Max tokens per example; long prompts lose tokens "
                                                   "from the left, never the answer's start."})
    loss_on: str = field(default="output", metadata={"help": "Tokens that carry loss: 'output' (the answer) or "
                                                     "'all' (prompt too)."})
    augment: str = field(default="none", metadata={"help": "Forget-set augmentation (paper §3.1): none, "
                                                   "segments (short-to-long answer prefixes), recombine, both."})
    augment_retain: bool = field(default=False, metadata={"help": "Apply --augment to the retain set too."})
    idk_responses: bool = field(default=False, metadata={"help": "Add idk batches: forget inputs answered with "
                                                         "a seeded 'I don't know'-style response (L_ntp)."})
    idk_file: str = field(default=os.path.join(ROOT, "data", "idk_responses.txt"),
                          metadata={"help": "Negative responses for --idk_responses, one per line."})


@dataclass
class TrainArguments:
    output_dir: str = field(default="", metadata={"help": "Where the adapter, merged model, config and "
                                                  "TensorBoard runs/ go; never the model dir."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow an output_dir that already "
                                                                "holds a finished run."})
    forget_loss: str = field(default="gi", metadata={"help": "Forget objective: gi (alpha/L_ntp, paper eq. 2), "
                                                     "gi2 ((alpha/L_ntp)^2), ga (-L_ntp), ntp (fine-tune on "
                                                     "forget: builds a memorised target), npo (Negative "
                                                     "Preference Optimization vs the frozen base), none."})
    retain_loss: str = field(default="ntp", metadata={"help": "Retain objective: ntp (next-token loss), kl (KL "
                                                      "from the frozen base), ntp_kl (both), none (no retain "
                                                      "batches)."})
    npo_beta: float = field(default=0.1, metadata={"help": "Inverse temperature beta of the npo loss."})
    alpha: float = field(default=1.0, metadata={"help": "Numerator alpha of the gi/gi2 forget loss."})
    nll_floor: float = field(default=NLL_FLOOR, metadata={"help": "Floor on L_ntp inside gi/gi2 so alpha/L "
                                                          "stays finite (value only; gradient still flows)."})
    num_train_epochs: int = field(default=5, metadata={"help": "Passes over all batches of every kind "
                                                       "(paper: 5)."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps (-1: run all "
                                                 "epochs)."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak AdamW learning rate (paper: 1e-4)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Fraction of steps with linear warmup; then "
                                                       "linear decay to 0."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Examples per micro-batch on each "
                                                                  "process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step "
                                                                  "on each process."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables)."})
    seed: int = field(default=42, metadata={"help": "Seed for data order, idk responses, LoRA init."})
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard (scalars under "
                                                            "output_dir/runs) or none."})
    run_name: str = field(default="", metadata={"help": "TensorBoard run name (default: a timestamp)."})
    save_steps: int = field(default=0, metadata={"help": "Checkpoint (adapter, optimizer, scheduler, RNG, data "
                                                 "position) every N optimizer steps; 0 = off."})
    save_minutes: float = field(default=0.0, metadata={"help": "Also checkpoint every M minutes of training; "
                                                       "0 = off."})
    save_total_limit: int = field(default=2, metadata={"help": "Keep only the newest N checkpoints."})
    resume_from_checkpoint: str = field(default="", metadata={"help": "'latest' (newest under output_dir/"
                                                              "checkpoints) or a checkpoint dir: continue exactly "
                                                              "where that run stopped."})
    max_train_minutes: float = field(default=0.0, metadata={"help": "Time budget for this invocation (load, train, "
                                                            "save): stop early enough to save the final model "
                                                            "in time; 0 = none."})
    batch_log: bool = field(default=False, metadata={"help": "Write every micro-batch's step, kind and record ids "
                                                     "to output_dir/batch_log/rank<N>.jsonl (audits the schedule)."})

    def __post_init__(self):
        if self.forget_loss not in FORGET_LOSSES:
            raise ValueError(f"--forget_loss {self.forget_loss}: expected one of {', '.join(FORGET_LOSSES)}")
        if self.retain_loss not in RETAIN_LOSSES:
            raise ValueError(f"--retain_loss {self.retain_loss}: expected one of {', '.join(RETAIN_LOSSES)}")
        if not self.learning_rate > 0:
            raise ValueError(f"--learning_rate {self.learning_rate}: must be > 0")
        if self.num_train_epochs < 1:
            raise ValueError(f"--num_train_epochs {self.num_train_epochs}: must be >= 1")
        if self.per_device_train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("--per_device_train_batch_size and --gradient_accumulation_steps must be >= 1")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup_ratio {self.warmup_ratio}: must be in [0, 1)")
        if self.save_steps < 0 or self.save_minutes < 0 or self.max_train_minutes < 0:
            raise ValueError("--save_steps, --save_minutes and --max_train_minutes must be >= 0")
        if self.save_total_limit < 1:
            raise ValueError(f"--save_total_limit {self.save_total_limit}: must be >= 1")
        if self.report_to not in ("tensorboard", "none"):
            raise ValueError(f"--report_to {self.report_to}: expected tensorboard or none")


def check_arguments(model_args, data_args, train_args):
    """Fail before anything loads on combinations that cannot work, each with the fix."""
    if not model_args.model_name_or_path:
        raise InputError("--model_name_or_path is required (a local model dir or hub id)")
    if not train_args.output_dir:
        raise InputError("--output_dir is required")
    if data_args.augment not in AUGMENT_MODES:
        raise InputError(f"--augment {data_args.augment}: expected one of {', '.join(AUGMENT_MODES)}")
    from modeling import DTYPES

    if model_args.torch_dtype not in DTYPES:
        raise InputError(f"--torch_dtype {model_args.torch_dtype}: expected one of {', '.join(DTYPES)}")
    if data_args.loss_on not in ("output", "all"):
        raise InputError(f"--loss_on {data_args.loss_on}: expected 'output' or 'all'")
    if data_args.max_length < 8:
        raise InputError(f"--max_length {data_args.max_length}: must be >= 8")
    if model_args.load_in_8bit and model_args.load_in_4bit:
        raise InputError("--load_in_8bit and --load_in_4bit: choose one")
    quantized = model_args.load_in_8bit or model_args.load_in_4bit
    if {train_args.forget_loss, train_args.retain_loss} & NEEDS_REFERENCE and model_args.lora_r == 0:
        raise InputError(f"--forget_loss {train_args.forget_loss} / --retain_loss {train_args.retain_loss} compare "
                         f"with the frozen base, read by disabling the LoRA adapter: set --lora_r > 0")
    if quantized and model_args.lora_r == 0:
        raise InputError("--load_in_8bit/--load_in_4bit need LoRA (quantized weights cannot be trained): "
                         "set --lora_r > 0 or drop the quantization flag")
    if quantized and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        # accelerate launch passes the ZeRO stage, or the JSON that holds it (ds_configs/, relative to the repo root)
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")
        ds_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
        if ds_file:
            ds_file = ds_file if os.path.isfile(ds_file) else os.path.join(ROOT, ds_file)
            try:
                with open(ds_file, encoding="utf-8") as f:
                    stage = str(json.load(f).get("zero_optimization", {}).get("stage", ""))
            except (OSError, ValueError) as error:
                raise InputError(f"DeepSpeed config {ds_file}: cannot read it ({error})") from None
        if stage == "3":
            raise InputError("--load_in_8bit/--load_in_4bit with DeepSpeed ZeRO-3: ZeRO-3 shards every weight and "
                             "cannot shard bitsandbytes' quantized ones; use accelerate_configs/deepspeed_zero2.yaml "
                             "or multi_gpu.yaml, or drop the quantization flag")


# --- data ---------------------------------------------------------------------------------------------------------

def load_idk_responses(path):
    if not os.path.isfile(path):
        raise InputError(f"--idk_file {path}: file not found")
    with open(path, encoding="utf-8") as f:
        responses = [line.strip() for line in f if line.strip()]
    if not responses:
        raise InputError(f"--idk_file {path}: no responses in the file")
    return responses


def build_examples(tokenizer, data_args, train_args):
    """Tokenised examples per batch kind: {'retain': [...], 'forget': [...], 'idk': [...]} (kinds in use only).

    Each example is {input_ids, labels, id}; idk examples are ids idk0, idk1, ... (one per distinct forget input).
    """
    from augment import augment_records

    forget_path, retain_path = resolve_data_files(data_args.data_dir, data_args.forget_file, data_args.retain_file)
    records = {}
    if forget_path and (train_args.forget_loss != "none" or data_args.idk_responses):
        forget = load_records(forget_path)
        if train_args.forget_loss != "none":
            records["forget"] = forget if data_args.augment == "none" else augment_records(forget, data_args.augment)
        if data_args.idk_responses:
            responses = load_idk_responses(data_args.idk_file)
            rng = random.Random(train_args.seed)
            prompts = list(dict.fromkeys(record.input for record in forget))  # each forget input once
            records["idk"] = [(f"idk{i}", prompt, rng.choice(responses)) for i, prompt in enumerate(prompts)]
    if retain_path and train_args.retain_loss != "none":
        retain = load_records(retain_path)
        records["retain"] = (augment_records(retain, data_args.augment)
                             if data_args.augment_retain and data_args.augment != "none" else retain)
    if not records:
        raise InputError("nothing to train on: give a forget set (--forget_file/--data_dir) with a forget loss "
                         "or --idk_responses, and/or a retain set")
    examples = {}
    for kind, rows in records.items():
        triples = rows if kind == "idk" else [(record.id, record.input, record.output) for record in rows]
        examples[kind] = [dict(encode_example(tokenizer, prompt, answer, data_args.max_length, data_args.loss_on),
                               id=record_id) for record_id, prompt, answer in triples]
    return examples


def epoch_schedule(lengths_by_kind, micro_batch_size, micro_batches_per_step, seed, epoch):
    """The optimizer steps of one epoch: a list of (kind, [micro_batch, ...]) with micro_batches_per_step
    micro-batches of micro_batch_size example indices each, all of one kind.

    Deterministic in (seed, epoch), so every process builds the same list and takes its own micro-batches
    (disjoint samples, same kind at the same step). Inside a kind, indices are shuffled, then sorted by length
    within windows of 8 steps so a micro-batch pads little. The last step of a kind is filled by wrapping around
    the shuffled indices, so every process always has a full micro-batch. The list is independent of the number
    of processes for a fixed micro_batches_per_step (= processes x accumulation): 1 process x 4 accumulation
    steps computes the same micro-batches as 4 processes x 1.
    """
    steps = []
    per_step = micro_batch_size * micro_batches_per_step
    for kind in sorted(lengths_by_kind):
        lengths = lengths_by_kind[kind]
        rng = random.Random(f"{seed}-{epoch}-{kind}")
        order = list(range(len(lengths)))
        rng.shuffle(order)
        n_steps = math.ceil(len(order) / per_step)
        order = [order[i % len(order)] for i in range(n_steps * per_step)]  # wrap around to fill the last step
        window = per_step * 8
        for start in range(0, len(order), window):
            order[start:start + window] = sorted(order[start:start + window], key=lambda i: -lengths[i])
        for step in range(n_steps):
            chunk = order[step * per_step:(step + 1) * per_step]
            micro_batches = [chunk[m * micro_batch_size:(m + 1) * micro_batch_size]
                             for m in range(micro_batches_per_step)]
            steps.append((kind, micro_batches))
    random.Random(f"{seed}-{epoch}-order").shuffle(steps)
    return steps


def needs_reference(kind, train_args):
    return ((kind == "forget" and train_args.forget_loss == "npo") or
            (kind == "retain" and train_args.retain_loss in ("kl", "ntp_kl")))


def micro_batch_for(micro_batches, accumulation_index, process_index, num_processes):
    """Which micro-batch of a step this process computes at this accumulation sub-step."""
    return micro_batches[accumulation_index * num_processes + process_index]


# --- training -----------------------------------------------------------------------------------------------------

def make_accelerator(train_args):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    # accelerate_configs/deepspeed_*.yaml name their JSON relative to the repo root: find it from elsewhere too
    ds_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if ds_file and not os.path.isabs(ds_file) and not os.path.isfile(ds_file):
        os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = os.path.join(ROOT, ds_file)
    project = ProjectConfiguration(project_dir=train_args.output_dir,
                                   logging_dir=os.path.join(train_args.output_dir, "runs"))
    # gloo for CPU runs (also needed by DeepSpeed on CPU); NCCL is accelerate's default on GPUs
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if distributed and not torch.cuda.is_available() else []
    accelerator = Accelerator(gradient_accumulation_steps=train_args.gradient_accumulation_steps,
                              log_with=None if train_args.report_to == "none" else train_args.report_to,
                              project_config=project, kwargs_handlers=handlers)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        # ds_configs/ leave these "auto": the flags decide, as they do for the loop. accelerate would take the
        # micro-batch from a DataLoader (we pass none) and clip at 1.0 whatever --max_grad_norm says (DeepSpeed
        # clips inside its own step); it fills train_batch_size and bf16/fp16 (from --mixed_precision) itself.
        flags = {"train_micro_batch_size_per_gpu": ("per_device_train_batch_size",
                                                    train_args.per_device_train_batch_size),
                 "gradient_accumulation_steps": ("gradient_accumulation_steps", train_args.gradient_accumulation_steps),
                 "gradient_clipping": ("max_grad_norm", train_args.max_grad_norm)}
        for key, (flag, value) in flags.items():
            if plugin.deepspeed_config.get(key, "auto") == "auto":
                plugin.deepspeed_config[key] = value
            elif plugin.deepspeed_config[key] != value:
                raise InputError(f"the DeepSpeed config sets {key}={plugin.deepspeed_config[key]} but --{flag} is "
                                 f"{value}: set it to \"auto\" in the JSON (the flag decides) or pass --{flag} "
                                 f"{plugin.deepspeed_config[key]}")
    return accelerator


def flat_config(*argument_objects):
    return {k: v for args in argument_objects for k, v in dataclasses.asdict(args).items()}


def train(model_args, data_args, train_args):
    """Run one unlearning job; returns its summary (also written to train_config.yaml)."""
    with preemption_signals() as stop_signal:
        return run_training(model_args, data_args, train_args, stop_signal)


def run_training(model_args, data_args, train_args, stop_signal):
    from modeling import add_lora, check_output_dir, load_model, load_tokenizer, make_adamw
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup, set_seed

    check_arguments(model_args, data_args, train_args)
    forget_path, retain_path = resolve_data_files(data_args.data_dir, data_args.forget_file, data_args.retain_file)
    check_output_dir(train_args.output_dir, [model_args.model_name_or_path, data_args.data_dir, forget_path,
                                             retain_path], train_args.overwrite_output_dir, DONE_MARKER)
    checkpoint = find_checkpoint(train_args.output_dir, train_args.resume_from_checkpoint)
    if checkpoint is None and list_checkpoints(train_args.output_dir) and not train_args.overwrite_output_dir:
        raise InputError(f"--output_dir {train_args.output_dir}: holds checkpoints of an unfinished run; pass "
                         f"--resume_from_checkpoint latest to continue it, or --overwrite_output_dir to start over")
    # all input is read and checked before anything is created on disk
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    examples = build_examples(tokenizer, data_args, train_args)
    accelerator = make_accelerator(train_args)
    set_seed(train_args.seed)

    load_start = time.time()
    quantized = model_args.load_in_8bit or model_args.load_in_4bit
    model = load_model(model_args.model_name_or_path, model_args.torch_dtype, model_args.load_in_8bit,
                       model_args.load_in_4bit, device_map={"": accelerator.device} if quantized else None)
    model.config.use_cache = False
    if model_args.lora_r > 0:
        model = add_lora(model, model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout,
                         model_args.gradient_checkpointing, quantized)
    elif model_args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    load_seconds = time.time() - load_start
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_adamw(trainable, train_args.learning_rate, train_args.weight_decay)

    world, rank, accum = accelerator.num_processes, accelerator.process_index, train_args.gradient_accumulation_steps
    micro_per_step = world * accum
    lengths = {kind: [len(e["input_ids"]) for e in rows] for kind, rows in examples.items()}
    steps_per_epoch = len(epoch_schedule(lengths, train_args.per_device_train_batch_size, micro_per_step,
                                         train_args.seed, 0))
    total_steps = steps_per_epoch * train_args.num_train_epochs
    if train_args.max_steps > 0:
        total_steps = min(total_steps, train_args.max_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(train_args.warmup_ratio * total_steps), total_steps)

    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    keep_trainable_only_in_checkpoints(accelerator)
    model.train()
    run_state = {"step": 0, "skipped_steps": 0, "train_seconds": 0.0, "micro_batches_per_step": micro_per_step,
                 "steps_per_epoch": steps_per_epoch, "run_name": train_args.run_name or time.strftime("%Y%m%d-%H%M%S")}
    if checkpoint is not None:
        run_state = load_checkpoint(accelerator, checkpoint, run_state)
    run_name = run_state["run_name"]
    if accelerator.is_main_process and train_args.report_to != "none":
        hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                   for k, v in flat_config(model_args, data_args, train_args).items()}
        accelerator.init_trackers(run_name, config=hparams)
    counts = {kind: len(rows) for kind, rows in examples.items()}
    accelerator.print(f"examples per kind: {counts}; {steps_per_epoch} steps/epoch x {train_args.num_train_epochs} "
                      f"epochs = {steps_per_epoch * train_args.num_train_epochs} optimizer steps"
                      f"{f' (--max_steps: stopping after {total_steps})' if train_args.max_steps > 0 else ''}; "
                      f"{world} process(es), "
                      f"{train_args.per_device_train_batch_size} x {accum} examples per process per step")

    device = accelerator.device
    batch_log = None
    if train_args.batch_log:
        os.makedirs(os.path.join(train_args.output_dir, "batch_log"), exist_ok=True)
        batch_log = open(os.path.join(train_args.output_dir, "batch_log", f"rank{rank}.jsonl"), "a", encoding="utf-8")
    step, skipped_steps = run_state["step"], run_state["skipped_steps"]
    first_step = step
    progress = tqdm(total=total_steps, initial=step, disable=not accelerator.is_local_main_process, desc="unlearning")
    start_time = last_save = time.time()
    # the final save reloads the base to merge (about one model load) and writes it (about another)
    save_reserve = 2 * load_seconds + 10
    stopped_early = preempted = False
    deepspeed = accelerator.state.deepspeed_plugin is not None
    tokens_total, loop_start = 0.0, time.time()  # all processes, this invocation (checkpoint time included)
    for epoch in range(step // steps_per_epoch, train_args.num_train_epochs):
        schedule = epoch_schedule(lengths, train_args.per_device_train_batch_size, micro_per_step, train_args.seed,
                                  epoch)
        for index, (kind, micro_batches) in enumerate(schedule):
            if epoch * steps_per_epoch + index < step:
                continue  # done before the checkpoint this run resumed from
            if step >= total_steps or stopped_early or preempted:
                break
            step_start, step_loss, step_nll, step_tokens, window_bad = time.time(), 0.0, 0.0, 0, False
            for a in range(accum):
                indices = micro_batch_for(micro_batches, a, rank, world)
                batch = pad_batch([examples[kind][i] for i in indices], tokenizer.pad_token_id)
                if batch_log is not None:
                    batch_log.write(json.dumps({"step": step, "accumulation": a, "kind": kind,
                                                "ids": [examples[kind][i]["id"] for i in indices]}) + "\n")
                batch = {k: v.to(device) for k, v in batch.items()}
                reference_logits = None
                if needs_reference(kind, train_args):
                    # the frozen base = the same model with its adapter off: no second copy in memory
                    with torch.no_grad(), accelerator.unwrap_model(model).disable_adapter():
                        reference_logits = model(input_ids=batch["input_ids"],
                                                 attention_mask=batch["attention_mask"]).logits
                with accelerator.accumulate(model):
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    loss, nll = batch_loss(kind, logits, batch["labels"], train_args.forget_loss,
                                           train_args.retain_loss, train_args.alpha, train_args.nll_floor,
                                           reference_logits, train_args.npo_beta)
                    # a non-finite loss on any process drops the whole step on every process
                    bad = accelerator.reduce(torch.tensor(0.0 if is_finite(loss) else 1.0, device=device), "sum")
                    if bad.item() > 0:
                        window_bad = True
                        loss = zero_loss(model)
                    saved_lrs = None
                    if deepspeed and window_bad and accelerator.sync_gradients:
                        # DeepSpeed steps the optimizer inside backward: at learning rate 0 that step leaves every
                        # weight as it was (AdamW's update and its decay both scale with the rate)
                        saved_lrs = [group["lr"] for group in optimizer.param_groups]
                        for group in optimizer.param_groups:
                            group["lr"] = 0.0
                    accelerator.backward(loss)
                    if saved_lrs is not None:
                        for group, lr in zip(optimizer.param_groups, saved_lrs):
                            group["lr"] = lr
                    if accelerator.sync_gradients:
                        grad_norm = None
                        if train_args.max_grad_norm > 0:
                            grad_norm = accelerator.clip_grad_norm_(trainable, train_args.max_grad_norm)
                        # DeepSpeed returns the norm as a float, DDP as a tensor
                        if window_bad or (grad_norm is not None and not math.isfinite(float(grad_norm))):
                            skipped_steps += 1
                            window_bad = True
                        else:
                            optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                step_loss += loss.detach().float().item() / accum
                step_nll += nll.detach().float().item() / accum
                step_tokens += int(batch["attention_mask"].sum())
            scheduler.step()
            step += 1
            progress.update(1)
            # metrics averaged over processes, tokens summed; stop requests from any process stop all of them
            elapsed = time.time() - start_time
            out_of_time = (train_args.max_train_minutes > 0 and time.time() - stop_signal["start"]
                           + elapsed / (step - first_step) + save_reserve > train_args.max_train_minutes * 60)
            stats = accelerator.reduce(torch.tensor([step_loss, step_nll, float(step_tokens), float(out_of_time),
                                                     float(stop_signal["received"])], device=device), "sum")
            loss_value, nll_value, tokens = stats[0].item() / world, stats[1].item() / world, stats[2].item()
            tokens_total += tokens
            stopped_early = stats[3].item() > 0 and step < total_steps
            preempted = stats[4].item() > 0 and step < total_steps
            progress.set_postfix(kind=kind, loss=f"{loss_value:.4g}", nll=f"{nll_value:.3f}")
            if train_args.report_to != "none":
                logs = {f"loss/{kind}": loss_value, f"nll/{kind}": nll_value, "lr": scheduler.get_last_lr()[0],
                        "tokens_per_s": tokens / max(time.time() - step_start, 1e-9), "epoch": epoch,
                        "skipped_steps": skipped_steps}
                if grad_norm is not None and not window_bad:
                    logs["grad_norm"] = float(grad_norm)
                accelerator.log(logs, step=step)
            periodic = ((train_args.save_steps and step % train_args.save_steps == 0) or
                        (train_args.save_minutes and time.time() - last_save >= train_args.save_minutes * 60))
            if (periodic or preempted) and step < total_steps:
                run_state.update(step=step, skipped_steps=skipped_steps,
                                 train_seconds=run_state["train_seconds"] + time.time() - start_time)
                start_time = last_save = time.time()
                save_checkpoint(accelerator, train_args.output_dir, run_state, train_args.save_total_limit)
    progress.close()
    if batch_log is not None:
        batch_log.close()
    train_seconds = run_state["train_seconds"] + time.time() - start_time
    if skipped_steps:
        accelerator.print(f"warning: {skipped_steps} step(s) skipped on a non-finite loss or gradient")
    summary = {"optimizer_steps": step, "planned_steps": total_steps, "steps_per_epoch": steps_per_epoch,
               "skipped_steps": skipped_steps,
               "train_seconds": round(train_seconds, 1), "examples_per_kind": counts, "num_processes": world,
               "stopped_early": stopped_early, "preempted": preempted, "resumed_from_step": first_step or None,
               "tokens_per_second": round(tokens_total / max(time.time() - loop_start, 1e-9), 1)}
    if device.type == "cuda":
        # what --per_device_train_batch_size and --max_length cost: compare with plan_memory.py
        peak = accelerator.gather(torch.tensor([float(torch.cuda.max_memory_allocated(device))], device=device))
        summary["peak_gpu_memory_gib"] = round(peak.max().item() / 2 ** 30, 2)
        accelerator.print(f"peak GPU memory: {summary['peak_gpu_memory_gib']} GiB allocated (the busiest process)")
    if preempted:
        accelerator.print(f"preempted: checkpoint saved at step {step}; rerun with --resume_from_checkpoint latest "
                          f"(exit code {PREEMPTED_EXIT_CODE})")
        accelerator.end_training()
        return summary
    if stopped_early:
        accelerator.print(f"time budget: stopped early after step {step} of {total_steps} to save in time")
    save_outputs(accelerator, model, tokenizer, model_args, data_args, train_args, summary)
    accelerator.end_training()
    return summary


# --- checkpoints, resume, preemption ------------------------------------------------------------------------------

@contextlib.contextmanager
def preemption_signals():
    """While training, SIGTERM / SIGUSR1 (what SLURM sends before it kills a job) ask the loop to checkpoint and
    exit; the previous handlers come back afterwards (train() may be called from a larger program)."""
    state = {"received": False, "start": time.time()}

    def request_stop(signum, frame):
        state["received"] = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield state
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def list_checkpoints(output_dir):
    """Finished checkpoints under output_dir/checkpoints, oldest first (unfinished .tmp-* dirs are ignored)."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    steps = [int(name[len("step-"):]) for name in os.listdir(root)
             if name.startswith("step-") and name[len("step-"):].isdigit()
             and os.path.isfile(os.path.join(root, name, CHECKPOINT_STATE))]
    return [os.path.join(root, f"step-{n}") for n in sorted(steps)]


def find_checkpoint(output_dir, spec):
    if not spec:
        return None
    if spec == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise InputError(f"--resume_from_checkpoint latest: no finished checkpoint under "
                             f"{os.path.join(output_dir, 'checkpoints')}; run without it to start fresh")
        return checkpoints[-1]
    if not os.path.isfile(os.path.join(spec, CHECKPOINT_STATE)):
        raise InputError(f"--resume_from_checkpoint {spec}: not a finished checkpoint (no {CHECKPOINT_STATE})")
    return spec


def keep_trainable_only_in_checkpoints(accelerator):
    """Checkpoints hold the trainable weights only (the LoRA adapter, not 7B frozen base weights)."""
    def drop_frozen(models, weights, output_dir):
        for i, model in enumerate(models):
            if i < len(weights):
                trainable = {name for name, p in model.named_parameters() if p.requires_grad}
                weights[i] = {k: v for k, v in weights[i].items() if k in trainable}

    accelerator.register_save_state_pre_hook(drop_frozen)


def save_checkpoint(accelerator, output_dir, run_state, save_total_limit):
    """accelerator.save_state into checkpoints/.tmp-step-N, then rename: a kill mid-save keeps the last one."""
    root = os.path.join(output_dir, "checkpoints")
    final = os.path.join(root, f"step-{run_state['step']}")
    tmp = os.path.join(root, f".tmp-step-{run_state['step']}")
    if accelerator.is_main_process and os.path.isdir(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, CHECKPOINT_STATE), "w", encoding="utf-8") as f:
            json.dump(run_state, f, indent=2)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-save_total_limit]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, checkpoint, run_state):
    with open(os.path.join(checkpoint, CHECKPOINT_STATE), encoding="utf-8") as f:
        saved = json.load(f)
    for key in ("micro_batches_per_step", "steps_per_epoch"):
        if saved[key] != run_state[key]:
            raise InputError(f"--resume_from_checkpoint {checkpoint}: written with {key}={saved[key]}, now "
                             f"{run_state[key]}; resume with the same data, batch size, processes x accumulation")
    accelerator.load_state(checkpoint, strict=False)  # strict=False: checkpoints hold trainable weights only
    accelerator.print(f"resumed from {checkpoint} at step {saved['step']}")
    return saved


def save_outputs(accelerator, model, tokenizer, model_args, data_args, train_args, summary):
    """adapter/ (peft), the merged model + tokenizer (safetensors) and train_config.yaml, published atomically."""
    from modeling import merge_adapter, publish

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if model_args.lora_r > 0 and accelerator.state.deepspeed_plugin is not None:
        # the adapter from DeepSpeed's fp32 master weights (what DDP saves, whatever the ZeRO stage or bf16),
        # gathered one tensor at a time: a collective, so every process runs it
        from deepspeed.utils import safe_get_full_fp32_param

        state_dict = {name: safe_get_full_fp32_param(p).cpu() for name, p in unwrapped.named_parameters()
                      if p.requires_grad}
    else:
        state_dict = accelerator.get_state_dict(model)  # a collective under ZeRO-3: every process must call it
    if accelerator.is_main_process:
        staging = os.path.join(train_args.output_dir, f".incomplete-{os.getpid()}")
        os.makedirs(staging, exist_ok=True)
        if model_args.lora_r > 0:
            adapter_dir = os.path.join(staging, "adapter")
            unwrapped.save_pretrained(adapter_dir, state_dict=state_dict)
            tokenizer.save_pretrained(adapter_dir)
            if model_args.merge_lora:
                # training is over: reload the base as a plain model. Under ZeRO-3 transformers would partition it,
                # with collectives that the other processes (waiting below) never join.
                from transformers.integrations import unset_hf_deepspeed_config

                unset_hf_deepspeed_config()
                merged = merge_adapter(model_args.model_name_or_path, adapter_dir, model_args.torch_dtype)
                merged.save_pretrained(staging)
                tokenizer.save_pretrained(staging)
        else:
            unwrapped.save_pretrained(staging, state_dict=state_dict)
            tokenizer.save_pretrained(staging)
        config = flat_config(model_args, data_args, train_args)
        # how it ran, from the accelerate config file chosen at launch (the code is the same at every scale)
        plugin = accelerator.state.deepspeed_plugin
        zero_stage = plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0) if plugin else None
        launch = {"distributed_type": accelerator.distributed_type.value, "num_processes": accelerator.num_processes,
                  "mixed_precision": accelerator.mixed_precision, "zero_stage": zero_stage}
        with open(os.path.join(staging, DONE_MARKER), "w", encoding="utf-8") as f:
            yaml.safe_dump({"config": config, "result": summary, "launch": launch}, f, sort_keys=False)
        publish(staging, train_args.output_dir, last=DONE_MARKER)
        accelerator.print(f"saved to {train_args.output_dir}")
    accelerator.wait_for_everyone()


def unlearn(input_model_dir, output_dir, forget_dir, retain_dir, config=os.path.join(ROOT, "configs", "paper.yaml"),
            **overrides):
    """SemEval-2025 Task 4 submission entry point: the paper's best system (configs/paper.yaml) on the given sets.

    forget_dir / retain_dir are directories holding forget.{jsonl,parquet} / retain.{jsonl,parquet}, or files.
    Keyword overrides are option names, e.g. ``unlearn(..., learning_rate=5e-5)``; returns the run summary.
    """
    def data_file(path, split):
        return path if os.path.isfile(path) else find_split_file(path, split)

    argv = [config, "--model_name_or_path", input_model_dir, "--output_dir", output_dir,
            "--forget_file", data_file(forget_dir, "forget"), "--retain_file", data_file(retain_dir, "retain")]
    for name, value in overrides.items():
        argv += [f"--{name}", str(value)]
    return train(*parse_config((ModelArguments, DataArguments, TrainArguments), argv))


def main(argv=None):
    """Returns the process exit code: 0, or PREEMPTED_EXIT_CODE after a preemption checkpoint."""
    model_args, data_args, train_args = parse_config((ModelArguments, DataArguments, TrainArguments), argv)
    summary = train(model_args, data_args, train_args)
    return PREEMPTED_EXIT_CODE if summary["preempted"] else 0


if __name__ == "__main__":
    exit_code = run_main(main)
    sys.stdout.flush()
    sys.stderr.flush()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os._exit(exit_code)  # torch 2.13's gloo sometimes aborts at interpreter exit after a multi-process run
    sys.exit(exit_code)
