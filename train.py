"""Unlearn a forget set from a causal LM while keeping a retain set (Sun & Li, SemEval-2025 Task 4).

    accelerate launch -q train.py configs/paper.yaml --model_name_or_path MODEL --data_dir DATA --output_dir OUT

Multi-task loop, one loss kind per optimizer step: retain batches use next-token loss L_ntp, forget batches use
gradient interference alpha / L_ntp (or a baseline objective), optional idk batches teach "I don't know" answers.
LoRA (peft) on all linear layers by default; runs unchanged on one CPU process or many GPUs (accelerate / DeepSpeed).
"""

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from artefacts import CHECKPOINT_STATE, MODEL_CARD, TRAIN_RECORD, publish
from augment import augment_records, source_id
from batches import pad_batch
from cli import InputError, check_choices, check_quantization, exit_process, parse_config, preset_path, run_main
from evaluate import evaluate_model
from mmlu import load_mmlu
from model_card import build_card, push_to_hub, write_card
from modeling import (DTYPES, PACKED_SDPA, add_lora, check_output_dir, load_model, load_tokenizer, make_adamw,
                      merge_adapter)
from objectives import (FORGET_LOSSES, NLL_FLOOR, NLL_FORGET_LOSSES, RETAIN_LOSSES, answer_nll, batch_loss, describe,
                        needs_reference, per_sequence_nll, token_nll, zero_loss)
from records import DATA_OPTIONS, DataSourceArguments, encode_example, find_split_file, load_records, record_kind
from scoring import KINDS, SPLITS, result_score

ROOT = os.path.dirname(os.path.abspath(__file__))
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: the sbatch scripts requeue the job on it
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, the shell's code for Ctrl-C: a checkpoint was saved, nothing requeues it
AUGMENT_MODES = ("none", "segments", "recombine", "both")
SCHEDULES = ("kinds", "chunked")
# transformers.get_scheduler's schedules that need nothing but warmup and total steps
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")
# accelerate's trackers (accelerate.utils.LoggerType) -> the package each needs
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
            "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "all": None, "none": None}
CALIBRATION_ON = ("answer", "text")
BEST_METRICS = ("task_mia_mean", "final", "task_aggregate", "mia_score")
# Rows are sorted by length within windows of this many optimizer steps, so a micro-batch pads little, and the
# steps are then shuffled: transformers' LengthGroupedSampler sorts within megabatches of 50 batches too. On the
# SemEval train split it pads 0.03 of the tokens (8 steps: 0.16; RESULTS.md).
LENGTH_GROUP_STEPS = 50
# --schedule chunked keeps 8-step windows: recommended.yaml's benchmark (RESULTS.md) was measured with them, and wider
# windows sort a chunk's forget and retain rows into batches by length, which changes how they mix (unmeasured).
CHUNKED_LENGTH_GROUP_STEPS = 8
BEST_WEIGHTS = "best_trainable.safetensors"  # in a checkpoint: the best evaluated step's trainable weights


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="", metadata={"help": "Model to unlearn from: a local dir or hub id."})
    torch_dtype: str = field(default="auto", metadata={
        "choices": tuple(DTYPES),
        "help": "Weight dtype: auto (from the model config), bfloat16, float16 or float32."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank; 0 = full fine-tuning (no adapter)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha (paper: 32)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (paper: 0.05)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward to "
                                                                  "save memory (slower)."})
    attn_implementation: str = field(default="", metadata={
        "help": "transformers' attention kernel: sdpa, eager, flash_attention_2, ... (empty: transformers' "
                "default for the model)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the frozen base in 8-bit (bitsandbytes); "
                                                        "needs LoRA."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the frozen base in 4-bit nf4 "
                                                        "(bitsandbytes, bf16 compute); needs LoRA."})
    merge_lora: bool = field(default=True, metadata={"help": "Also save the merged full model (base + adapter) "
                                                     "as safetensors in output_dir; --no_merge_lora saves only "
                                                     "the adapter."})
    lora_target_modules: str = field(default="all-linear", metadata={
        "help": "Modules that get LoRA: all-linear (every linear layer but lm_head: the paper's setting) or "
                "comma-separated module names, e.g. q_proj,v_proj."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Allow a hub model's own modelling code to run (transformers' trust_remote_code): only for models "
                "whose code you trust."})

    def __post_init__(self):
        check_choices(self)
        if self.lora_r < 0:
            raise ValueError(f"--lora_r {self.lora_r}: must be >= 0 (0 = full fine-tuning)")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora_dropout {self.lora_dropout}: must be in [0, 1)")


@dataclass
class DataArguments(DataSourceArguments):
    # the data_dir / forget_file / retain_file / dataset_* options: records.DataSourceArguments
    max_length: int = field(default=512, metadata={"help": "Max tokens per example; long prompts lose tokens "
                                                   "from the left, never the answer's start."})
    loss_on: str = field(default="output", metadata={
        "choices": ("output", "all"),
        "help": "Tokens that carry loss: 'output' (the answer) or 'all' (prompt too)."})
    augment: str = field(default="none", metadata={
        "choices": AUGMENT_MODES,
        "help": "Forget-set augmentation (paper §3.1): none, segments (short-to-long answer prefixes), recombine, "
                "both."})
    augment_retain: bool = field(default=False, metadata={"help": "Apply --augment to the retain set too."})
    idk_responses: bool = field(default=False, metadata={"help": "Add idk batches: forget inputs answered with "
                                                         "a seeded 'I don't know'-style response (L_ntp)."})
    idk_file: str = field(default=os.path.join(ROOT, "data", "idk_responses.txt"),
                          metadata={"help": "Negative responses for --idk_responses, one per line."})

    def __post_init__(self):
        check_choices(self)
        if self.max_length < 8:
            raise ValueError(f"--max_length {self.max_length}: must be >= 8")


@dataclass
class TrainArguments:
    output_dir: str = field(default="", metadata={"help": "Where the adapter, merged model, config and "
                                                  "TensorBoard runs/ go; never the model dir."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow an output_dir that already "
                                                                "holds a finished run."})
    forget_loss: str = field(default="gi", metadata={
        "choices": FORGET_LOSSES,
        "help": f"Forget objective. {describe('forget')}; none: no forget batches."})
    retain_loss: str = field(default="ntp", metadata={
        "choices": RETAIN_LOSSES,
        "help": f"Retain objective. {describe('retain')}; none: no retain batches."})
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
    warmup_ratio: float = field(default=0.1, metadata={"help": "Fraction of steps with linear warmup before "
                                                       "--lr_scheduler_type's decay."})
    warmup_steps: int = field(default=0, metadata={"help": "Warmup optimizer steps; > 0 overrides "
                                                   "--warmup_ratio."})
    lr_scheduler_type: str = field(default="linear", metadata={
        "choices": LR_SCHEDULERS,
        "help": "Learning-rate schedule after warmup (transformers.get_scheduler): linear (to 0, the paper's), "
                "cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup, inverse_sqrt."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Examples per micro-batch on each "
                                                                  "process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step "
                                                                  "on each process."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables)."})
    seed: int = field(default=42, metadata={"help": "Seed for data order, idk responses, LoRA init."})
    report_to: str = field(default="tensorboard", metadata={
        "help": "Experiment trackers (accelerate's), comma-separated: tensorboard (scalars under output_dir/runs), "
                "wandb, mlflow, comet_ml, aim, clearml, dvclive, all (every installed one) or none."})
    logging_steps: int = field(default=1, metadata={"help": "Log to the trackers every N optimizer steps (each "
                                                    "scalar the mean over those steps; evaluations always)."})
    run_name: str = field(default="", metadata={"help": "Tracker run name (default: a timestamp)."})
    save_steps: int = field(default=0, metadata={"help": "Checkpoint (adapter, optimizer, scheduler, RNG, data "
                                                 "position) every N optimizer steps; 0 = off."})
    save_minutes: float = field(default=30.0, metadata={"help": "Also checkpoint every M minutes of training, so "
                                                        "a crash loses at most M minutes (--resume_from_checkpoint "
                                                        "latest); 0 = off."})
    save_total_limit: int = field(default=2, metadata={"help": "Keep only the newest N checkpoints."})
    resume_from_checkpoint: str = field(default="", metadata={"help": "'latest' (newest under output_dir/"
                                                              "checkpoints) or a checkpoint dir: continue exactly "
                                                              "where that run stopped."})
    max_train_minutes: float = field(default=0.0, metadata={"help": "Time budget for this invocation (load, train, "
                                                            "save): stop early enough to save the final model "
                                                            "in time; 0 = none."})
    push_to_hub: bool = field(default=False, metadata={"help": "When the run finishes, upload output_dir (model, "
                                                       "adapter, model card, train_config.yaml; no checkpoints) to "
                                                       "the Hub as --hub_model_id (needs `hf auth login` or "
                                                       "HF_TOKEN)."})
    hub_model_id: str = field(default="", metadata={"help": "Hub repo id (USER/NAME) for --push_to_hub; default: "
                                                    "output_dir's name under your account."})
    hub_private_repo: bool = field(default=False, metadata={"help": "--push_to_hub: create the repo as private."})
    padding_free: bool = field(default=False, metadata={
        "help": "Pack each micro-batch's rows into one row with per-row position ids, no pad tokens (what "
                "transformers' DataCollatorWithFlattening does), and compute logits only at the tokens a loss "
                "scores (logits_to_keep); every loss is the one of padded rows. An sdpa model attends within each "
                "packed row's segment (modeling.PACKED_SDPA, on any device); --attn_implementation flash_attention_2 "
                "does the same with a varlen kernel on GPUs; eager attends through a block-diagonal mask over all "
                "the packed tokens. Dropout (--lora_dropout) draws other masks for the packed shape. Refused for a "
                "model whose attention ignores packed position ids."})
    batch_log: bool = field(default=False, metadata={"help": "Write every micro-batch's step, kind and record ids "
                                                     "to output_dir/batch_log/rank<N>.jsonl (audits the schedule)."})
    # calibrated forgetting
    calibration_file: str = field(default="", metadata={"help": "Held-out rows in the forget-set format (.jsonl/"
                                                        ".parquet; documents of the same tasks never trained into "
                                                        "the model). At the start, their mean NLL per task "
                                                        "and row kind (sc/qa; over --calibration_on's tokens) is the "
                                                        "level a forget row is driven "
                                                        "to and no further: the forget term is off for rows at or "
                                                        "above it and back on if they fall below. Their sc rows are "
                                                        "also the MIA nonmembers of --eval_steps. '' = off."})
    calibration_margin: float = field(default=1.0, metadata={"help": "Target NLL = margin x the calibration level "
                                                             "(1.0: exactly as likely as unseen text)."})
    calibration_on: str = field(default="answer", metadata={
        "choices": CALIBRATION_ON,
        "help": "What the calibration level and a forget row's NLL are measured on: 'answer' (the answer tokens, what"
                " the forget term pushes) or 'text' (every token of prompt + answer, what the MIA's loss attack "
                "scores: a memorised prompt then has to be offset by the answer)."})
    calibration_token_quantile: float = field(default=0.0, metadata={
        "help": "A per-token limit beside the row-level target: a forget token whose NLL is at or above this "
                "quantile of the calibration rows' token NLLs (per task and kind, under the model before "
                "unlearning, over --calibration_on's tokens) passes no forget gradient, so no token is driven far "
                "below the least likely tokens of unseen text (what Min-K% and Min-K%++ read). 0 = off; needs "
                "--calibration_file and an NLL-based forget loss (gi, gi2, ga) or --schedule chunked."})
    # AILS-NTUA's schedule
    schedule: str = field(default="kinds", metadata={
        "choices": SCHEDULES,
        "help": "kinds: one loss kind per optimizer step (the paper's multi-task loop); chunked: AILS-NTUA's data "
                "chunking, the forget set in disjoint chunks of --forget_chunk_size rows, each mixed with "
                "--retain_per_forget retain rows per forget row (cycling through the retain set) and trained "
                "--epochs_per_chunk epochs before the next; a batch mixes forget and retain rows with per-row weights"
                " --forget_weight / --retain_weight on their NLL."})
    forget_chunk_size: int = field(default=0, metadata={"help": "--schedule chunked: forget rows per chunk (the last "
                                                        "may be smaller); 0 = one chunk of every forget row."})
    retain_per_forget: int = field(default=7, metadata={"help": "--schedule chunked: retain rows per forget row in a "
                                                        "chunk."})
    epochs_per_chunk: int = field(default=1, metadata={"help": "--schedule chunked: passes over a chunk before the "
                                                       "next one."})
    forget_weight: float = field(default=-1.0, metadata={"help": "--schedule chunked: weight on a forget row's NLL "
                                                         "(-1: gradient ascent)."})
    retain_weight: float = field(default=0.5, metadata={"help": "--schedule chunked: weight on a retain row's NLL."})
    # evaluation during training and best-checkpoint selection
    eval_steps: int = field(default=0, metadata={"help": "Score a dev slice every N optimizer steps and at the end "
                                                 "with the official SemEval metric (forget/retain rows, MIA with "
                                                 "the forget sc documents as members and --calibration_file's sc "
                                                 "documents as nonmembers, optional MMLU); the best step's model is "
                                                 "the one published. 0 = off (the last step's model)."})
    eval_rows: int = field(default=0, metadata={"help": "--eval_steps: the first N forget and N retain rows (before "
                                                "augmentation) form the dev slice; 0 = all."})
    eval_max_new_tokens: int = field(default=256, metadata={"help": "--eval_steps: greedy generation limit "
                                                            "(official: 256)."})
    eval_batch_size: int = field(default=16, metadata={"help": "--eval_steps: generation / MIA batch size."})
    eval_mmlu_dir: str = field(default="", metadata={"help": "--eval_steps: Hendrycks MMLU dir to include MMLU "
                                                     "('' = none)."})
    eval_mmlu_limit: int = field(default=1, metadata={"help": "--eval_steps: MMLU questions per subject."})
    metric_for_best_model: str = field(default="task_mia_mean", metadata={
        "choices": BEST_METRICS,
        "help": "--eval_steps: what 'best' maximises: task_mia_mean (mean of the task aggregate and the MIA score), "
                "final (mean of those and MMLU; needs --eval_mmlu_dir), task_aggregate or mia_score."})
    early_stopping_patience: int = field(default=0, metadata={
        "help": "--eval_steps: stop once this many dev evaluations in a row have not beaten the best one, and publish "
                "the best (as transformers' EarlyStoppingCallback): a generous step budget then ends where the dev "
                "metric stops improving. 0 = off (train every planned step)."})

    def __post_init__(self):
        check_choices(self)
        if not self.learning_rate > 0:
            raise ValueError(f"--learning_rate {self.learning_rate}: must be > 0")
        if self.num_train_epochs < 1:
            raise ValueError(f"--num_train_epochs {self.num_train_epochs}: must be >= 1")
        if self.per_device_train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("--per_device_train_batch_size and --gradient_accumulation_steps must be >= 1")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup_ratio {self.warmup_ratio}: must be in [0, 1)")
        if self.warmup_steps < 0 or self.logging_steps < 1:
            raise ValueError("--warmup_steps must be >= 0 and --logging_steps >= 1")
        trackers = [name.strip() for name in self.report_to.split(",")]
        unknown = [name for name in trackers if name not in TRACKERS]
        if unknown or (len(trackers) > 1 and {"all", "none"} & set(trackers)):
            raise ValueError(f"--report_to {self.report_to}: expected none, all, or comma-separated names from "
                             f"{', '.join(t for t in TRACKERS if t not in ('all', 'none'))}")
        if self.save_steps < 0 or self.save_minutes < 0 or self.max_train_minutes < 0:
            raise ValueError("--save_steps, --save_minutes and --max_train_minutes must be >= 0")
        if self.save_total_limit < 1:
            raise ValueError(f"--save_total_limit {self.save_total_limit}: must be >= 1")
        if (self.hub_model_id or self.hub_private_repo) and not self.push_to_hub:
            raise ValueError("--hub_model_id / --hub_private_repo: add --push_to_hub (they only name its repo)")
        if min(self.retain_per_forget, self.epochs_per_chunk) < 1 or self.forget_chunk_size < 0:
            raise ValueError("--retain_per_forget and --epochs_per_chunk must be >= 1, --forget_chunk_size >= 0")
        if not self.calibration_margin > 0:
            raise ValueError(f"--calibration_margin {self.calibration_margin}: must be > 0")
        if not 0 <= self.calibration_token_quantile < 1:
            raise ValueError(f"--calibration_token_quantile {self.calibration_token_quantile}: must be in [0, 1) "
                             f"(0 = off)")
        if self.eval_steps < 0 or self.eval_rows < 0 or self.eval_mmlu_limit < 0 or self.early_stopping_patience < 0:
            raise ValueError("--eval_steps, --eval_rows, --eval_mmlu_limit and --early_stopping_patience must be >= 0")
        if self.early_stopping_patience and not self.eval_steps:
            raise ValueError("--early_stopping_patience counts dev evaluations: give --eval_steps too")
        if self.eval_max_new_tokens < 1 or self.eval_batch_size < 1:
            raise ValueError("--eval_max_new_tokens and --eval_batch_size must be >= 1")


def check_arguments(model_args, data_args, train_args):
    """Fail before anything loads on combinations that cannot work, each with the fix."""
    if not model_args.model_name_or_path:
        raise InputError("--model_name_or_path is required (a local model dir or hub id)")
    if not train_args.output_dir:
        raise InputError("--output_dir is required")
    if model_args.load_in_8bit and model_args.load_in_4bit:
        raise InputError("--load_in_8bit and --load_in_4bit: choose one")
    quantized = model_args.load_in_8bit or model_args.load_in_4bit
    if train_args.schedule == "chunked" and (train_args.forget_loss != "ga" or train_args.retain_loss != "ntp"
                                             or data_args.idk_responses):
        raise InputError("--schedule chunked trains each row on --forget_weight/--retain_weight x its NLL (gradient "
                         "ascent on forget rows, descent on retain rows): set --forget_loss ga --retain_loss ntp, "
                         "without --idk_responses")
    for name in train_args.report_to.split(","):
        package = TRACKERS[name.strip()]
        if package and importlib.util.find_spec(package) is None:
            raise InputError(f"--report_to {name.strip()}: the {package} package is not installed; pip install "
                             f"{package}, or choose another tracker (tensorboard is in requirements.txt)")
    if train_args.metric_for_best_model == "final" and train_args.eval_steps and not train_args.eval_mmlu_dir:
        raise InputError("--metric_for_best_model final averages MMLU too: give --eval_mmlu_dir, or choose "
                         "task_mia_mean")
    if train_args.metric_for_best_model in ("task_mia_mean", "final", "mia_score") and train_args.eval_steps \
            and not train_args.calibration_file:
        raise InputError(f"--metric_for_best_model {train_args.metric_for_best_model} needs the MIA, whose "
                         f"nonmembers are --calibration_file's documents: give one, or choose task_aggregate")
    if train_args.eval_steps and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise InputError("--eval_steps under DeepSpeed is not supported (its master weights live in the engine); "
                         "use accelerate_configs/multi_gpu.yaml (DDP) or evaluate.py on the saved checkpoints")
    if train_args.calibration_token_quantile and not train_args.calibration_file:
        raise InputError("--calibration_token_quantile caps forget tokens at a quantile of the calibration rows' "
                         "token NLLs: give --calibration_file")
    if train_args.calibration_token_quantile and train_args.schedule != "chunked" \
            and train_args.forget_loss not in NLL_FORGET_LOSSES:
        raise InputError(f"--calibration_token_quantile acts on the answer NLL's tokens: --forget_loss "
                         f"{train_args.forget_loss} is not NLL-based; use {', '.join(NLL_FORGET_LOSSES[:3])} or "
                         f"--schedule chunked")
    for flag in ("calibration_file", "eval_mmlu_dir"):
        path = getattr(train_args, flag)
        if path and not os.path.exists(path):
            raise InputError(f"--{flag} {path}: not found")
    if needs_reference_model(train_args) and model_args.lora_r == 0:
        raise InputError(f"--forget_loss {train_args.forget_loss} / --retain_loss {train_args.retain_loss} compare "
                         f"with the frozen base, read by disabling the LoRA adapter: set --lora_r > 0")
    zero_stage = launch_zero_stage()
    if quantized:
        check_quantization("--load_in_8bit" if model_args.load_in_8bit else "--load_in_4bit", model_args.lora_r,
                           zero_stage)


def launch_zero_stage():
    """The ZeRO stage ``accelerate launch`` asked for (None without DeepSpeed), from its environment or the JSON
    that holds it. accelerate_configs/deepspeed_*.yaml name that JSON relative to the repo root: the path is
    resolved here, once, and written back, so accelerate finds it from any working directory."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")
    ds_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if ds_file:
        if not os.path.isabs(ds_file) and not os.path.isfile(ds_file):
            ds_file = os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = os.path.join(ROOT, ds_file)
        try:
            with open(ds_file, encoding="utf-8") as f:
                stage = str(json.load(f).get("zero_optimization", {}).get("stage", ""))
        except (OSError, ValueError) as error:
            raise InputError(f"DeepSpeed config {ds_file}: cannot read it ({error})") from None
    return int(stage) if stage.isdigit() else None


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

    Each example is {input_ids, labels, id, task}; idk examples are ids idk0, idk1, ... (one per distinct forget
    input). With --schedule chunked, forget and retain rows become one 'mixed' kind (see chunk_examples).
    """
    forget_path, retain_path = data_args.data_sources()
    records = {}
    if forget_path and (train_args.forget_loss != "none" or data_args.idk_responses):
        forget = load_records(forget_path)
        if train_args.forget_loss != "none":
            records["forget"] = forget if data_args.augment == "none" else augment_records(forget, data_args.augment)
        if data_args.idk_responses:
            responses = load_idk_responses(data_args.idk_file)
            rng = random.Random(train_args.seed)
            prompts = list(dict.fromkeys(record.input for record in forget))  # each forget input once
            records["idk"] = [(f"idk{i}", prompt, rng.choice(responses), "") for i, prompt in enumerate(prompts)]
    if retain_path and train_args.retain_loss != "none":
        retain = load_records(retain_path)
        records["retain"] = (augment_records(retain, data_args.augment)
                             if data_args.augment_retain and data_args.augment != "none" else retain)
    if not records:
        raise InputError("nothing to train on: give a forget set (--forget_file/--data_dir) with a forget loss "
                         "or --idk_responses, and/or a retain set")
    examples = {}
    for kind, rows in records.items():
        rows = rows if kind == "idk" else [(r.id, r.input, r.output, r.task) for r in rows]
        examples[kind] = [dict(encode_example(tokenizer, prompt, answer, data_args.max_length, data_args.loss_on),
                               id=record_id, task=task) for record_id, prompt, answer, task in rows]
    return examples


def steps_of(indices, lengths, micro_batch_size, micro_batches_per_step, rng, length_group_steps=LENGTH_GROUP_STEPS):
    """Cut example indices into optimizer steps of micro_batches_per_step micro-batches: shuffled, wrapped around to
    fill the last step (every process always has a full micro-batch), sorted by length within windows of
    length_group_steps steps so a micro-batch pads little."""
    per_step = micro_batch_size * micro_batches_per_step
    order = list(indices)
    rng.shuffle(order)
    n_steps = math.ceil(len(order) / per_step)
    order = [order[i % len(order)] for i in range(n_steps * per_step)]
    window = per_step * length_group_steps
    for start in range(0, len(order), window):
        order[start:start + window] = sorted(order[start:start + window], key=lambda i: -lengths[i])
    steps = []
    for step in range(n_steps):
        chunk = order[step * per_step:(step + 1) * per_step]
        steps.append([chunk[m * micro_batch_size:(m + 1) * micro_batch_size] for m in range(micro_batches_per_step)])
    return steps


def epoch_schedule(lengths_by_kind, micro_batch_size, micro_batches_per_step, seed, epoch,
                   length_group_steps=LENGTH_GROUP_STEPS):
    """The optimizer steps of one epoch: a list of (kind, [micro_batch, ...]) with micro_batches_per_step
    micro-batches of micro_batch_size example indices each, all of one kind.

    Deterministic in (seed, epoch), so every process builds the same list and takes its own micro-batches
    (disjoint samples, same kind at the same step); the steps of all kinds are shuffled together. The list is
    independent of the number of processes for a fixed micro_batches_per_step (= processes x accumulation):
    1 process x 4 accumulation steps computes the same micro-batches as 4 processes x 1.
    """
    steps = []
    for kind in sorted(lengths_by_kind):
        lengths = lengths_by_kind[kind]
        rng = random.Random(f"{seed}-{epoch}-{kind}")
        steps += [(kind, mbs) for mbs in steps_of(range(len(lengths)), lengths, micro_batch_size,
                                                  micro_batches_per_step, rng, length_group_steps)]
    random.Random(f"{seed}-{epoch}-order").shuffle(steps)
    return steps


def chunk_examples(examples, train_args):
    """AILS-NTUA's data chunking: (mixed examples, [(start, end) of each chunk in them]).

    The shuffled forget rows are cut into disjoint chunks of --forget_chunk_size; each chunk's forget rows (weight
    --forget_weight) are joined by --retain_per_forget retain rows per forget row (weight --retain_weight), taken
    in turn from a shuffled cycle over the retain set, so every retain row is used before any repeats."""
    rng = random.Random(f"{train_args.seed}-chunks")
    forget = list(range(len(examples["forget"])))
    retain = list(range(len(examples["retain"])))
    rng.shuffle(forget)
    rng.shuffle(retain)
    mixed, bounds, next_retain = [], [], 0
    size = train_args.forget_chunk_size or len(forget)
    for start in range(0, len(forget), size):
        begin = len(mixed)
        for i in forget[start:start + size]:
            mixed.append(dict(examples["forget"][i], weight=train_args.forget_weight, source="forget", index=i))
        for _ in range(train_args.retain_per_forget * len(forget[start:start + size])):
            i = retain[next_retain % len(retain)]
            next_retain += 1
            mixed.append(dict(examples["retain"][i], weight=train_args.retain_weight, source="retain", index=i))
        bounds.append((begin, len(mixed)))
    return mixed, bounds


def chunked_schedule(lengths, bounds, micro_batch_size, micro_batches_per_step, epochs_per_chunk, seed, epoch,
                     length_group_steps=CHUNKED_LENGTH_GROUP_STEPS):
    """The steps of one pass of --schedule chunked: each chunk in turn, --epochs_per_chunk passes over it, as
    ('mixed', [micro_batch, ...]); deterministic in (seed, epoch) like epoch_schedule."""
    steps = []
    for c, (begin, end) in enumerate(bounds):
        for e in range(epochs_per_chunk):
            rng = random.Random(f"{seed}-{epoch}-chunk{c}-{e}")
            steps += [("mixed", mbs) for mbs in steps_of(range(begin, end), lengths, micro_batch_size,
                                                          micro_batches_per_step, rng, length_group_steps)]
    return steps


def needs_reference_model(train_args):
    return any(needs_reference(kind, train_args.forget_loss, train_args.retain_loss) for kind in ("forget", "retain"))


def micro_batch_for(micro_batches, accumulation_index, process_index, num_processes):
    """Which micro-batch of a step this process computes at this accumulation sub-step."""
    return micro_batches[accumulation_index * num_processes + process_index]


# --- calibrated forgetting ----------------------------------------------------------------------------------------

def document_of(record_id):
    """The document a row belongs to: its id without the sc<digit>/qa<digit> tag (and any augmentation suffix)."""
    return source_id(record_id)[:-3]


def row_key(example_id, task):
    """(task, sc|qa) of a row, augmented rows by their source row: the calibration level it is driven to."""
    return task, record_kind(source_id(example_id))


def load_calibration(path, forget_records):
    """The calibration rows, checked against the forget set: non-empty, no shared document or prompt, and every
    (task, kind) the forget set has present. Each problem is a one-line error naming the file."""
    if not os.path.isfile(path):
        raise InputError(f"--calibration_file {path}: not found")
    rows = load_records(path)
    forget_docs = {document_of(r.id) for r in forget_records}
    forget_inputs = {r.input for r in forget_records}
    for r in rows:
        if document_of(r.id) in forget_docs or r.input in forget_inputs:
            raise InputError(f"--calibration_file {path}: row {r.id} is (part of) a forget document; calibration "
                             f"rows must be text the model never trained on, disjoint from the forget set")
    missing = sorted({row_key(r.id, r.task) for r in forget_records} - {row_key(r.id, r.task) for r in rows})
    if missing:
        raise InputError(f"--calibration_file {path}: no rows for {', '.join(f'{t} {k}' for t, k in missing)}, "
                         f"which the forget set has; add held-out rows of each task and kind")
    return rows


def calibration_labels(batch, calibration_on):
    """The labels a row's calibrated NLL is measured on: the answer's (the batch labels), or every real token's."""
    if calibration_on == "answer":
        return batch["labels"]
    if "token_labels" in batch:  # --padding_free: pack_batch's compact layout
        return batch["token_labels"]
    return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)


def calibration_levels(model, tokenizer, rows, data_args, device, batch_size=8, calibration_on="answer",
                       token_quantile=0.0):
    """Mean NLL (over calibration_labels) per (task, kind) of the calibration rows under the model as it is (before
    unlearning), and with ``token_quantile`` > 0 also that quantile of their token NLLs per (task, kind) (else
    {}). Every process computes all rows in the same order (identical levels; also in step under ZeRO-3)."""
    encoded = [encode_example(tokenizer, r.input, r.output, data_args.max_length, data_args.loss_on) for r in rows]
    values, tokens = {}, {}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in pad_batch(encoded[start:start + batch_size],
                                                            tokenizer.pad_token_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = calibration_labels(batch, calibration_on)
            nlls = per_sequence_nll(logits, labels).tolist()
            token_values, token_mask = token_nll(logits, labels)
            for i, (r, nll) in enumerate(zip(rows[start:start + batch_size], nlls)):
                values.setdefault(row_key(r.id, r.task), []).append(nll)
                tokens.setdefault(row_key(r.id, r.task), []).append(token_values[i][token_mask[i] > 0])
    model.train(was_training)
    caps = {key: torch.quantile(torch.cat(v).double(), token_quantile).item() for key, v in tokens.items()} \
        if token_quantile else {}
    return {key: sum(v) / len(v) for key, v in values.items()}, caps


def calibrated_rows(row_nll, targets):
    """Rows whose NLL is still below their target: the ones the forget term acts on this step."""
    return row_nll.detach() < targets


# --- evaluation during training -----------------------------------------------------------------------------------

def load_dev_slice(data_args, train_args, calibration_rows):
    """(forget rows, retain rows, member documents, nonmember documents, MMLU questions) for --eval_steps."""
    forget_path, retain_path = data_args.data_sources()
    limit = train_args.eval_rows or None
    forget = load_records(forget_path)[:limit] if forget_path else []
    retain = load_records(retain_path)[:limit] if retain_path else []
    members = [(r.id, r.input + " " + r.output) for r in forget if r.kind == "sc"]
    nonmembers = [(r.id, r.input + " " + r.output) for r in calibration_rows or [] if r.kind == "sc"]
    mmlu = load_mmlu(train_args.eval_mmlu_dir, limit=train_args.eval_mmlu_limit) if train_args.eval_mmlu_dir else None
    return forget, retain, members, nonmembers, mmlu


def best_metric(scores, name):
    """The number --metric_for_best_model maximises, from a dev evaluation's scores."""
    parts = {"task_aggregate": scores["task_aggregate"], "mia_score": scores.get("mia_score")}
    if name == "task_mia_mean":
        return (parts["task_aggregate"] + parts["mia_score"]) / 2
    if name == "final":
        return (parts["task_aggregate"] + parts["mia_score"] + scores["mmlu"]) / 3
    return parts[name]


def evaluate_dev(accelerator, model, tokenizer, dev, train_args):
    """The official scores of the model on the dev slice, rows sharded over processes (evaluate.evaluate_model):
    the same dict on every process."""
    forget, retain, members, nonmembers, mmlu = dev
    results, _ = evaluate_model(accelerator.unwrap_model(model), tokenizer, forget, retain,
                                members if nonmembers else None, nonmembers or None, mmlu,
                                train_args.eval_max_new_tokens, train_args.eval_batch_size, accelerator)
    scores = {"task_aggregate": results["harmonic-mean-task-aggregate"]}
    if nonmembers:
        scores.update(mia_auc=results["mia_loss_acc"], mia_score=results["mia_final_score"])
    if mmlu:
        scores["mmlu"] = results["mmlu_average"]
    for split in SPLITS:
        for kind in KINDS:  # forget_regurgitation, forget_knowledge, ...
            value = result_score(results, split, kind.key)
            if value is not None:
                scores[f"{split}_{kind.label}"] = value
    scores["metric"] = best_metric(scores, train_args.metric_for_best_model)
    return scores


def trainable_state(model):
    """A CPU copy of the trainable weights (the LoRA adapter, or every weight when fully fine-tuning)."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in state:
                p.copy_(state[name].to(p.device, p.dtype))


# --- one optimizer step -------------------------------------------------------------------------------------------

@dataclass
class StepStats:
    """What one optimizer step did, over every process: the mean loss and NLL of its micro-batches, non-pad tokens
    and all token positions (padding included), the clipped-gradient norm (None without clipping or when skipped),
    whether the step was dropped, the forget rows already at their calibration target (at_target of rows), and the
    caller's flags summed over processes."""
    loss: float = 0.0
    nll: float = 0.0
    tokens: int = 0
    positions: int = 0
    grad_norm: float | None = None
    skipped: bool = False
    at_target: int = 0
    rows: int = 0
    flags: dict = field(default_factory=dict)


@contextlib.contextmanager
def learning_rate_zero(optimizer, active):
    """DeepSpeed steps the optimizer inside backward: at learning rate 0 that step leaves every weight as it was
    (AdamW's update and its decay both scale with the rate)."""
    saved = [group["lr"] for group in optimizer.param_groups] if active else None
    if active:
        for group in optimizer.param_groups:
            group["lr"] = 0.0
    try:
        yield
    finally:
        if saved is not None:
            for group, lr in zip(optimizer.param_groups, saved):
                group["lr"] = lr


STEP_SUMS = ("non_finite", "loss", "nll", "tokens", "positions", "at_target", "rows")  # one reduce per step
DEVICE_SUMS = 4  # the first four are tensors on the device; positions, at_target and rows are host integers


def optimizer_step(accelerator, model, optimizer, trainable, micro_batches, loss_fn, max_grad_norm, flags=None):
    """Accumulate this process's micro-batches and take one optimizer step; returns StepStats.

    ``loss_fn(batch) -> (loss, nll, at_target, rows)``; ``flags() -> {name: number}`` (e.g. a stop request) is
    summed over processes with the step's statistics. The statistics stay on the device until one collective after
    the last micro-batch's forward pass (its one host sync, besides the gradient norm's finiteness check): a
    non-finite loss on any process then drops the whole step on every process, and so does a non-finite gradient
    norm; the step is counted as skipped and the weights stay as they were. Under DeepSpeed, whose optimizer steps
    inside the last backward, a non-finite loss is also replaced by an exact zero on its own process before its
    backward (so no NaN reaches DeepSpeed's optimizer state) and the dropped step runs at learning rate 0."""
    deepspeed = accelerator.state.deepspeed_plugin is not None
    device, count = accelerator.device, len(micro_batches)
    sums = torch.zeros(DEVICE_SUMS, dtype=torch.float64, device=device)
    host_sums = [0] * (len(STEP_SUMS) - DEVICE_SUMS)
    stats, bad, extra = StepStats(), False, {}
    for index, batch in enumerate(micro_batches):
        with accelerator.accumulate(model):
            loss, nll, at_target, rows = loss_fn(batch)
            finite = torch.isfinite(loss.detach())
            if deepspeed and not finite:  # a host sync per micro-batch, under DeepSpeed only
                loss = zero_loss(model)
            mask = batch["attention_mask"]
            sums += torch.stack([(~finite).double(), torch.where(finite, loss.detach(), 0).double() / count,
                                 nll.detach().double() / count, mask.sum().double()])
            host_sums = [a + b for a, b in zip(host_sums, (mask.numel(), at_target, rows))]
            if index == count - 1:
                extra = flags() if flags else {}
                values = torch.cat([sums, torch.tensor([float(v) for v in host_sums + list(extra.values())],
                                                       dtype=torch.float64, device=device)])
                totals = accelerator.reduce(values, "sum").tolist()
                bad = totals[0] > 0
            with learning_rate_zero(optimizer, deepspeed and bad and accelerator.sync_gradients):
                accelerator.backward(loss)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(trainable, max_grad_norm) if max_grad_norm > 0 else None
                # DeepSpeed returns the norm as a float, DDP as a tensor
                bad = bad or (grad_norm is not None and not math.isfinite(float(grad_norm)))
                if not bad:
                    optimizer.step()
                    stats.grad_norm = None if grad_norm is None else float(grad_norm)
                optimizer.zero_grad(set_to_none=True)
    world = accelerator.num_processes
    named = dict(zip(STEP_SUMS, totals))
    stats.loss, stats.nll = named["loss"] / world, named["nll"] / world
    stats.tokens, stats.positions = int(named["tokens"]), int(named["positions"])
    stats.at_target, stats.rows = int(named["at_target"]), int(named["rows"])
    stats.flags = dict(zip(extra, totals[len(STEP_SUMS):]))
    stats.skipped = bad
    return stats


# --- training -----------------------------------------------------------------------------------------------------

def make_accelerator(train_args):
    launch_zero_stage()  # resolves the DeepSpeed JSON's path (check_arguments has, unless called on its own)
    project = ProjectConfiguration(project_dir=train_args.output_dir,
                                   logging_dir=os.path.join(train_args.output_dir, "runs"))
    # gloo for CPU runs (also needed by DeepSpeed on CPU); NCCL is accelerate's default on GPUs
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if distributed and not torch.cuda.is_available() else []
    accelerator = Accelerator(gradient_accumulation_steps=train_args.gradient_accumulation_steps,
                              log_with=None if train_args.report_to == "none" else
                              [name.strip() for name in train_args.report_to.split(",")],
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


@dataclass
class RunState:
    """What a checkpoint holds besides weights, optimizer and RNG: counters, the schedule's shape (checked on
    resume), and the best evaluated step so far (its weights are in the checkpoint's BEST_WEIGHTS)."""
    step: int = 0
    skipped_steps: int = 0
    train_seconds: float = 0.0
    micro_batches_per_step: int = 1
    steps_per_epoch: int = 1
    length_group_steps: int = 8  # the schedule's sort window (8: checkpoints written before it was recorded)
    run_name: str = ""
    best_step: int | None = None
    best_scores: dict | None = None


@dataclass
class StopRequest:
    """Set by SIGTERM / SIGUSR1 / SIGINT (preemption_signals): ``signal_name`` of the first one received;
    ``start``: when this invocation began (--max_train_minutes)."""
    received: bool = False
    signal_name: str = ""
    start: float = field(default_factory=time.time)


@dataclass
class Run:
    """Everything the loop works with, built by setup_run."""
    accelerator: object
    model: object
    tokenizer: object
    optimizer: object
    scheduler: object
    trainable: list
    examples: dict
    schedule: object  # epoch -> [(kind, [micro_batch, ...]), ...]
    steps_per_epoch: int
    total_steps: int
    state: RunState
    load_seconds: float
    counts: dict
    calibration: dict | None = None  # {"task kind": target NLL}
    dev: tuple | None = None
    best_weights: dict | None = None
    batch_log: object = None
    provenance: dict = field(default_factory=dict)  # see provenance()
    last_losses: dict = field(default_factory=dict)  # kind -> the loss and NLL of its last step
    padding_free: bool = False  # --padding_free: micro-batches packed into one row (pack_batch)
    packed_segments: bool = False  # and the model attends one packed row at a time (modeling.PACKED_SDPA)
    calibration_on: str = "answer"  # --calibration_on: which tokens a calibrated row's NLL is measured on


def train(model_args, data_args, train_args, preset=""):
    """Run one unlearning job; returns its summary (also written to train_config.yaml). ``preset``: the YAML file
    the options came from, recorded with them."""
    with preemption_signals() as stop_request:
        return run_training(model_args, data_args, train_args, stop_request, preset)


def run_training(model_args, data_args, train_args, stop_request, preset=""):
    """lr -> step -> log -> evaluate/keep best -> checkpoint -> stop, then publish the best (or last) model."""
    run = setup_run(model_args, data_args, train_args)
    run.provenance = provenance(preset, stop_request.start)
    accelerator, state, world = run.accelerator, run.state, run.accelerator.num_processes
    first_step, loop_start, start_time, last_save = state.step, time.time(), time.time(), time.time()
    save_reserve = 2 * run.load_seconds + 10  # the final save reloads the base to merge (~ a load) and writes it
    progress = tqdm(total=run.total_steps, initial=state.step, disable=not accelerator.is_local_main_process,
                    desc="fine-tuning" if "forget" not in run.counts or train_args.forget_loss == "ntp"
                    else "unlearning")
    stopped_early = preempted = plateaued = False
    tokens_total = positions_total = 0  # non-pad tokens and all token positions trained on, every process
    log_window = {}  # tag -> values of the steps since the last tracker log (--logging_steps)
    for epoch, kind, micro_batches in remaining_steps(run, train_args):
        step_start = time.time()
        batches = [make_batch(run, kind, micro_batch_for(micro_batches, a, accelerator.process_index, world),
                              state.step, a) for a in range(train_args.gradient_accumulation_steps)]
        lr = run.scheduler.get_last_lr()[0]  # the rate this step trains at (the scheduler then moves on)
        stats = optimizer_step(accelerator, run.model, run.optimizer, run.trainable, batches,
                               make_loss_fn(run, kind, train_args), train_args.max_grad_norm,
                               stop_flags(train_args, stop_request, state, first_step, loop_start, save_reserve))
        run.scheduler.step()
        state.step += 1
        state.skipped_steps += stats.skipped
        progress.update(1)
        tokens_total += stats.tokens
        positions_total += stats.positions
        stopped_early = stats.flags["out_of_time"] > 0 and state.step < run.total_steps
        preempted = stats.flags["stop"] > 0 and state.step < run.total_steps
        progress.set_postfix(kind=kind, loss=f"{stats.loss:.4g}", nll=f"{stats.nll:.3f}")
        run.last_losses[kind] = {"loss": round(stats.loss, 4), "nll": round(stats.nll, 4), "step": state.step}
        for tag, value in step_scalars(stats, kind, epoch, lr, state.skipped_steps, time.time() - step_start).items():
            log_window.setdefault(tag, []).append(value)
        logs = {}
        if train_args.eval_steps and not (stopped_early or preempted) and (
                state.step % train_args.eval_steps == 0 or state.step == run.total_steps):
            logs.update({f"eval/{k}": v for k, v in evaluate_and_keep_best(run, train_args).items()})
            plateaued = dev_plateaued(state, train_args) and state.step < run.total_steps
        ending = stopped_early or preempted or plateaued  # this is the loop's last step
        if state.step % train_args.logging_steps == 0 or state.step == run.total_steps or ending:
            logs.update(window_means(log_window))
            log_window = {}
        if train_args.report_to != "none" and logs:
            accelerator.log(logs, step=state.step)
        periodic = ((train_args.save_steps and state.step % train_args.save_steps == 0) or
                    (train_args.save_minutes and time.time() - last_save >= train_args.save_minutes * 60))
        if ((periodic and not plateaued) or preempted) and state.step < run.total_steps:
            state.train_seconds += time.time() - start_time
            start_time = last_save = time.time()
            save_checkpoint(accelerator, train_args.output_dir, state, train_args.save_total_limit, run.best_weights)
        if ending:
            break
    progress.close()
    state.train_seconds += time.time() - start_time
    throughput = {"tokens_per_second": round(tokens_total / max(time.time() - loop_start, 1e-9), 1),
                  "padding_share": round(1 - tokens_total / max(positions_total, 1), 4)}
    return finish_run(run, model_args, data_args, train_args, stopped_early, preempted, plateaued, first_step,
                      throughput, stop_request.signal_name)


def stop_flags(train_args, stop_request, state, first_step, loop_start, save_reserve):
    """The flags optimizer_step sums over processes with its stats, so that a stop on any process stops all:
    out of --max_train_minutes (another step and the final save would not fit), and a stop signal received."""
    def flags():
        steps_done = state.step - first_step + 1  # this one included: it is nearly done when flags are read
        out_of_time = train_args.max_train_minutes > 0 and (time.time() - stop_request.start + save_reserve + (
            time.time() - loop_start) / steps_done > train_args.max_train_minutes * 60)
        return {"out_of_time": out_of_time, "stop": stop_request.received}
    return flags


def step_scalars(stats, kind, epoch, lr, skipped_steps, seconds):
    """The tracker scalars of one optimizer step."""
    scalars = {f"loss/{kind}": stats.loss, f"nll/{kind}": stats.nll, "epoch": epoch, "lr": lr,
               "skipped_steps": skipped_steps, "tokens_per_s": stats.tokens / seconds,
               "padding_share": 1 - stats.tokens / max(stats.positions, 1)}
    if stats.grad_norm is not None:
        scalars["grad_norm"] = stats.grad_norm
    if stats.rows:
        scalars["calibration/forget_rows_at_target"] = stats.at_target / stats.rows
    return scalars


def window_means(window):
    """--logging_steps: counters as they stand at this step, every other scalar the mean over the steps since the
    last log."""
    return {tag: values[-1] if tag in ("epoch", "skipped_steps") else sum(values) / len(values)
            for tag, values in window.items()}


def setup_run(model_args, data_args, train_args):
    """Check every input, load the model, build examples, schedule, optimizer; resume if asked. Nothing is written
    before every input has been read and checked."""
    # transformers' optimization module imports bitsandbytes: here, after cli has installed its log filters
    from transformers import get_scheduler, set_seed

    check_arguments(model_args, data_args, train_args)
    forget_path, retain_path = data_args.data_sources()
    check_output_dir(train_args.output_dir, [model_args.model_name_or_path, data_args.data_dir, forget_path,
                                             retain_path, train_args.calibration_file], train_args.overwrite_output_dir,
                     TRAIN_RECORD)
    checkpoint = find_checkpoint(train_args.output_dir, train_args.resume_from_checkpoint)
    if checkpoint is None and list_checkpoints(train_args.output_dir) and not train_args.overwrite_output_dir:
        raise InputError(f"--output_dir {train_args.output_dir}: holds checkpoints of an unfinished run; pass "
                         f"--resume_from_checkpoint latest to continue it, or --overwrite_output_dir to start over")
    tokenizer = load_tokenizer(model_args.model_name_or_path, model_args.trust_remote_code)
    examples = build_examples(tokenizer, data_args, train_args)
    calibration_rows = None
    if train_args.calibration_file:
        if not forget_path:
            raise InputError("--calibration_file: calibrates the forget set, but no forget set was given")
        calibration_rows = load_calibration(train_args.calibration_file, load_records(forget_path))
    dev = load_dev_slice(data_args, train_args, calibration_rows) if train_args.eval_steps else None
    accelerator = make_accelerator(train_args)
    set_seed(train_args.seed)

    load_start = time.time()
    quantized = model_args.load_in_8bit or model_args.load_in_4bit
    model = load_model(model_args.model_name_or_path, model_args.torch_dtype, model_args.load_in_8bit,
                       model_args.load_in_4bit, device_map={"": accelerator.device} if quantized else None,
                       trust_remote_code=model_args.trust_remote_code,
                       attn_implementation=model_args.attn_implementation)
    model.config.use_cache = False
    if train_args.padding_free:
        check_padding_free(model, model_args.model_name_or_path)
        if model.config._attn_implementation == "sdpa" and not getattr(model.config, "sliding_window", None):
            model.set_attn_implementation(PACKED_SDPA)  # a packed row attends one row at a time (modeling.py)
    packed_segments = model.config._attn_implementation == PACKED_SDPA
    calibration = None
    if calibration_rows is not None and "forget" in examples:
        if not quantized:  # quantized weights were loaded onto the device already
            model.to(accelerator.device)
        levels, caps = calibration_levels(model, tokenizer, calibration_rows, data_args, accelerator.device,
                                          calibration_on=train_args.calibration_on,
                                          token_quantile=train_args.calibration_token_quantile)
        for example in examples["forget"]:
            example["target"] = train_args.calibration_margin * levels[row_key(example["id"], example["task"])]
            if caps:
                example["token_cap"] = caps[row_key(example["id"], example["task"])]
        calibration = {f"{task} {kind}": round(train_args.calibration_margin * level, 4)
                       for (task, kind), level in sorted(levels.items())}
        if caps:
            calibration["token caps"] = {f"{task} {kind}": round(cap, 4) for (task, kind), cap in sorted(caps.items())}
    if model_args.lora_r > 0:
        model = add_lora(model, model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout,
                         model_args.gradient_checkpointing, quantized, model_args.lora_target_modules)
    elif model_args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    load_seconds = time.time() - load_start
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_adamw(trainable, train_args.learning_rate, train_args.weight_decay)

    counts = {kind: len(rows) for kind, rows in examples.items()}
    sources = {kind: len({source_id(e["id"]) for e in rows}) for kind, rows in examples.items()}
    micro_per_step = accelerator.num_processes * train_args.gradient_accumulation_steps
    size = train_args.per_device_train_batch_size
    if train_args.schedule == "chunked":
        mixed, bounds = chunk_examples(examples, train_args)
        examples = {"mixed": mixed}
        lengths = [len(e["input_ids"]) for e in mixed]
        window = CHUNKED_LENGTH_GROUP_STEPS
        schedule = lambda epoch: chunked_schedule(lengths, bounds, size, micro_per_step,  # noqa: E731
                                                  train_args.epochs_per_chunk, train_args.seed, epoch, window)
    else:
        lengths = {kind: [len(e["input_ids"]) for e in rows] for kind, rows in examples.items()}
        window = LENGTH_GROUP_STEPS
        schedule = lambda epoch: epoch_schedule(lengths, size, micro_per_step, train_args.seed, epoch,  # noqa: E731
                                                window)
    steps_per_epoch = len(schedule(0))
    total_steps = steps_per_epoch * train_args.num_train_epochs
    if train_args.max_steps > 0:
        total_steps = min(total_steps, train_args.max_steps)
    warmup = train_args.warmup_steps or int(train_args.warmup_ratio * total_steps)
    scheduler = get_scheduler(train_args.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                              num_training_steps=total_steps)

    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    keep_trainable_only_in_checkpoints(accelerator)
    model.train()
    state = RunState(micro_batches_per_step=micro_per_step, steps_per_epoch=steps_per_epoch,
                     length_group_steps=window,
                     run_name=train_args.run_name or time.strftime("%Y%m%d-%H%M%S"))
    run = Run(accelerator, model, tokenizer, optimizer, scheduler, trainable, examples, schedule, steps_per_epoch,
              total_steps, state, load_seconds, counts, calibration, dev, padding_free=train_args.padding_free,
              packed_segments=packed_segments,
              calibration_on=train_args.calibration_on)
    if checkpoint is not None:
        run.state, run.best_weights = load_checkpoint(accelerator, checkpoint, state)
    if accelerator.is_main_process and train_args.report_to != "none":
        hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                   for k, v in flat_config(model_args, data_args, train_args).items()}
        accelerator.init_trackers(run.state.run_name, config=hparams)
    if train_args.batch_log:
        os.makedirs(os.path.join(train_args.output_dir, "batch_log"), exist_ok=True)
        run.batch_log = open(os.path.join(train_args.output_dir, "batch_log",
                                          f"rank{accelerator.process_index}.jsonl"), "a", encoding="utf-8")
    accelerator.print(f"examples: {describe_counts(counts, sources, data_args)}; {steps_per_epoch} steps/epoch x "
                      f"{train_args.num_train_epochs} epochs = {steps_per_epoch * train_args.num_train_epochs} "
                      f"optimizer steps"
                      f"{f' (--max_steps: stopping after {total_steps})' if train_args.max_steps > 0 else ''}; "
                      f"{accelerator.num_processes} process(es), "
                      f"{size} x {train_args.gradient_accumulation_steps} examples per process per step")
    if calibration:
        accelerator.print(f"calibrated forgetting: target {train_args.calibration_on} NLL per task and kind "
                          f"{calibration}")
    return run


def describe_counts(counts, sources, data_args):
    """'forget 16 rows -> 24 examples (augment segments), retain 16 rows' for the run header."""
    parts = []
    for kind, n in counts.items():
        if kind == "idk":
            parts.append(f"idk {n} (one per forget prompt)")
        elif sources[kind] != n:
            parts.append(f"{kind} {sources[kind]} rows -> {n} examples (--augment {data_args.augment})")
        else:
            parts.append(f"{kind} {n} rows")
    return ", ".join(parts)


def remaining_steps(run, train_args):
    """(epoch, kind, micro_batches) of every step after run.state.step: a resumed run continues where it stopped."""
    for epoch in range(run.state.step // run.steps_per_epoch, train_args.num_train_epochs):
        for index, (kind, micro_batches) in enumerate(run.schedule(epoch)):
            if epoch * run.steps_per_epoch + index < run.state.step:
                continue  # done before the checkpoint this run resumed from
            if run.state.step >= run.total_steps:
                return
            yield epoch, kind, micro_batches


def make_batch(run, kind, indices, step, accumulation_index):
    """The padded micro-batch on this process's device, with per-row weights (mixed) and calibration targets."""
    rows = [run.examples[kind][i] for i in indices]
    if run.batch_log is not None:
        run.batch_log.write(json.dumps({"step": step, "accumulation": accumulation_index, "kind": kind,
                                        "ids": [r["id"] for r in rows]}) + "\n")
    if run.padding_free:
        batch = pack_batch(rows, every_token=run.calibration is not None and run.calibration_on == "text",
                           segments=run.packed_segments)
    else:
        batch = pad_batch(rows, run.tokenizer.pad_token_id)
    if kind == "mixed":
        batch["weights"] = torch.tensor([r["weight"] for r in rows])
        batch["is_forget"] = torch.tensor([r["source"] == "forget" for r in rows])
    if run.calibration is not None and kind in ("forget", "mixed"):
        batch["targets"] = torch.tensor([r.get("target", math.inf) for r in rows])
        if any("token_cap" in r for r in rows):  # retain rows of a mixed batch: no cap
            batch["token_caps"] = torch.tensor([r.get("token_cap", math.inf) for r in rows])
    return {k: v.to(run.accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}


def pack_batch(rows, every_token=False, segments=False):
    """--padding_free: the micro-batch as one packed row the model reads, and a compact row per example for the loss.

    The packed row: the rows' input ids end to end, position ids restarting at 0 for each (how transformers' mask
    builder and flash kernels tell them apart), no padding. The model computes logits only where a loss reads them
    (``logits_index``: the position before each scored token; scored = labelled, or every token but the first with
    ``every_token``, for --calibration_on text), and they go to a compact (rows x (1 + most scored tokens)) layout
    whose labels sit one column right of their logits, as in a padded batch: every loss of objectives.py reads it
    unchanged. ``attention_mask`` is the packed row's (all ones): what optimizer_step counts as tokens. With
    ``segments``, ``packed_segments`` lists each row's (start, end) in the packed row, for modeling.PACKED_SDPA."""
    scored = [[j for j in range(1, len(r["input_ids"])) if every_token or r["labels"][j] != -100] for r in rows]
    width = 1 + max(len(s) for s in scored)
    labels, tokens, logits_index, compact_index, bounds, offset = [], [], [], [], [], 0
    for i, (row, positions) in enumerate(zip(rows, scored)):
        padding = [-100] * (width - 1 - len(positions))
        labels.append([-100] + [row["labels"][j] for j in positions] + padding)
        tokens.append([-100] + [row["input_ids"][j] for j in positions] + padding)
        logits_index += [offset + j - 1 for j in positions]
        compact_index += [i * width + k for k in range(len(positions))]
        bounds.append((offset, offset + len(row["input_ids"])))
        offset += len(row["input_ids"])
    packed = [token for r in rows for token in r["input_ids"]]
    extra = {"packed_segments": tuple(bounds)} if segments else {}
    return {**extra, "packed_input_ids": torch.tensor([packed]),
            "position_ids": torch.tensor([[p for r in rows for p in range(len(r["input_ids"]))]]),
            "attention_mask": torch.ones(1, len(packed), dtype=torch.long), "labels": torch.tensor(labels),
            "token_labels": torch.tensor(tokens), "logits_index": torch.tensor(logits_index),
            "compact_index": torch.tensor(compact_index)}


def forward_logits(model, batch):
    """Logits of a micro-batch for the loss: (rows, longest, vocab) of padded rows, or (--padding_free) the packed
    row's logits at the scored positions only, in pack_batch's compact layout (0 elsewhere; labels -100 there)."""
    if "packed_input_ids" not in batch:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # no cache: transformers detects packed rows from position ids only without one
    segments = {"packed_segments": batch["packed_segments"]} if "packed_segments" in batch else {}
    kept = model(input_ids=batch["packed_input_ids"], position_ids=batch["position_ids"], use_cache=False,
                 logits_to_keep=batch["logits_index"], **segments).logits[0]
    rows, width = batch["labels"].shape
    return kept.new_zeros(rows * width, kept.size(-1)).index_copy(0, batch["compact_index"], kept).view(
        rows, width, -1)


def check_padding_free(model, name):
    """--padding_free needs attention that keeps packed rows apart by their position ids (transformers' mask
    builder, masking_utils.create_causal_mask, which sdpa, eager and flex attention follow, or a flash kernel) and a
    forward that computes logits at given positions only (logits_to_keep)."""
    implementation = getattr(model.config, "_attn_implementation", "") or ""
    source = inspect.getsource(sys.modules[type(model).__module__])
    if not (implementation.startswith("flash_attention") or "create_causal_mask" in source):
        raise InputError(f"--padding_free: {name} ({type(model).__name__}, attention {implementation or 'unknown'}) "
                         f"does not build its mask with transformers' create_causal_mask, so packed rows could "
                         f"attend to each other; drop --padding_free")
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        raise InputError(f"--padding_free: {name} ({type(model).__name__}) has no logits_to_keep in its forward; "
                         f"drop --padding_free")


def make_loss_fn(run, kind, train_args):
    """batch -> (loss, nll, forget rows at target, forget rows) for optimizer_step. With calibration the forget term
    acts only on rows still below their target NLL (forget batches: the loss of those rows; mixed batches: forget
    rows at target get weight 0); a forget batch with every row at target contributes an exact zero."""
    model = run.model
    use_reference = needs_reference(kind, train_args.forget_loss, train_args.retain_loss)

    def loss_fn(batch):
        reference_logits = None
        if use_reference:
            # the frozen base = the same model with its adapter off: no second copy in memory
            with torch.no_grad(), run.accelerator.unwrap_model(model).disable_adapter():
                reference_logits = forward_logits(model, batch)
        logits, labels, weights = forward_logits(model, batch), batch["labels"], batch.get("weights")
        at_target = rows = 0
        if "targets" in batch:
            measured = calibration_labels(batch, train_args.calibration_on)
            active = calibrated_rows(per_sequence_nll(logits.detach(), measured), batch["targets"])
            forget_rows = batch["is_forget"] if kind == "mixed" else torch.ones_like(active)
            rows, at_target = int(forget_rows.sum()), int((forget_rows & ~active).sum())
            if kind == "mixed":
                weights = torch.where(forget_rows & ~active, torch.zeros_like(weights), weights)
            elif not active.any():
                return zero_loss(model), answer_nll(logits, labels), at_target, rows
            else:
                full_nll = answer_nll(logits, labels)
                logits, labels = logits[active], labels[active]
                reference_logits = None if reference_logits is None else reference_logits[active]
                caps = batch["token_caps"][active] if "token_caps" in batch else None
                loss, _ = batch_loss(kind, logits, labels, train_args.forget_loss, train_args.retain_loss,
                                     train_args.alpha, train_args.nll_floor, reference_logits, train_args.npo_beta,
                                     token_caps=caps)
                return loss, full_nll, at_target, rows
        loss, nll = batch_loss(kind, logits, labels, train_args.forget_loss, train_args.retain_loss, train_args.alpha,
                               train_args.nll_floor, reference_logits, train_args.npo_beta, weights,
                               batch.get("token_caps"))
        return loss, nll, at_target, rows

    return loss_fn


def evaluate_and_keep_best(run, train_args):
    """Score the dev slice; if this step beats the best so far, keep a copy of its trainable weights."""
    scores = evaluate_dev(run.accelerator, run.model, run.tokenizer, run.dev, train_args)
    state = run.state
    if state.best_scores is None or scores["metric"] > state.best_scores["metric"]:
        state.best_step, state.best_scores = state.step, scores
        run.best_weights = trainable_state(run.accelerator.unwrap_model(run.model))
    run.accelerator.print(f"step {state.step}: dev {train_args.metric_for_best_model} {scores['metric']:.4f} "
                          f"(best: step {state.best_step}, {state.best_scores['metric']:.4f})")
    return scores


def dev_plateaued(state, train_args):
    """--early_stopping_patience: that many evaluations since the best one, none better. Evaluations fall on the
    multiples of --eval_steps, so the count follows from the steps and survives a resume without a counter."""
    return bool(train_args.early_stopping_patience) and state.best_step is not None and (
        state.step - state.best_step) // train_args.eval_steps >= train_args.early_stopping_patience


def finish_run(run, model_args, data_args, train_args, stopped_early, preempted, plateaued, first_step, throughput,
               stop_signal=""):
    """The summary; unless preempted, the best evaluated step's weights (or the last) saved as the run's output."""
    accelerator, state = run.accelerator, run.state
    if run.batch_log is not None:
        run.batch_log.close()
    if state.skipped_steps:
        accelerator.print(f"warning: {state.skipped_steps} step(s) skipped on a non-finite loss or gradient")
    summary = {"optimizer_steps": state.step, "planned_steps": run.total_steps,
               "steps_per_epoch": run.steps_per_epoch, "skipped_steps": state.skipped_steps,
               "train_seconds": round(state.train_seconds, 1), "examples_per_kind": run.counts,
               "num_processes": accelerator.num_processes, "stopped_early": stopped_early, "preempted": preempted,
               "stopped_on_plateau": plateaued,
               "resumed_from_step": first_step or None, **throughput,
               "stop_signal": (stop_signal or None) if preempted else None, "last_losses": run.last_losses}
    if run.calibration is not None:
        summary["calibration_target_nll"] = run.calibration
    if accelerator.device.type == "cuda":
        # what --per_device_train_batch_size and --max_length cost: compare with plan_memory.py
        peak = accelerator.gather(torch.tensor([float(torch.cuda.max_memory_allocated(accelerator.device))],
                                               device=accelerator.device))
        summary["peak_gpu_memory_gib"] = round(peak.max().item() / 2 ** 30, 2)
        accelerator.print(f"peak GPU memory: {summary['peak_gpu_memory_gib']} GiB allocated (the busiest process)")
    if preempted:
        code = INTERRUPTED_EXIT_CODE if stop_signal == "SIGINT" else PREEMPTED_EXIT_CODE
        how = "interrupted" if code == INTERRUPTED_EXIT_CODE else "preempted"
        accelerator.print(f"{how} ({stop_signal or 'a signal to another process'}): checkpoint saved at step "
                          f"{state.step} of {run.total_steps}; to continue, rerun the same command with "
                          f"--resume_from_checkpoint latest (exit code {code})")
        accelerator.end_training()
        return summary
    if stopped_early:
        accelerator.print(f"time budget: stopped early after step {state.step} of {run.total_steps} to save in time")
    if plateaued:
        accelerator.print(f"early stopping: {train_args.early_stopping_patience} dev evaluation(s) since step "
                          f"{state.best_step} without a better {train_args.metric_for_best_model}; stopped after step "
                          f"{state.step} of {run.total_steps}")
    if state.best_step is not None:
        summary.update(best_step=state.best_step, best_scores=state.best_scores,
                       metric_for_best_model=train_args.metric_for_best_model)
        if state.best_step != state.step:
            load_trainable_state(accelerator.unwrap_model(run.model), run.best_weights)
        accelerator.print(f"publishing step {state.best_step} (best dev {train_args.metric_for_best_model} "
                          f"{state.best_scores['metric']:.4f}): " + ", ".join(
                              f"{k} {v:.3f}" for k, v in state.best_scores.items() if k != "metric"))
    save_outputs(accelerator, run.model, run.tokenizer, model_args, data_args, train_args, summary,
                 dict(run.provenance, run_name=state.run_name))
    accelerator.end_training()
    return summary


# --- checkpoints, resume, preemption ------------------------------------------------------------------------------

@contextlib.contextmanager
def preemption_signals():
    """While training, SIGTERM / SIGUSR1 (what SLURM sends before it kills a job) and a first Ctrl-C (SIGINT) ask
    the loop to finish its step, checkpoint and exit; a second Ctrl-C aborts at once (KeyboardInterrupt). The
    previous handlers come back afterwards (train() may be called from a larger program)."""
    request = StopRequest()

    def request_stop(signum, frame):
        request.received = True
        request.signal_name = request.signal_name or signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            print("\nCtrl-C: finishing this step, then saving a checkpoint (Ctrl-C again aborts without one)",
                  file=sys.stderr, flush=True)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        yield request
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


def save_checkpoint(accelerator, output_dir, state, save_total_limit, best_weights=None):
    """accelerator.save_state into checkpoints/.tmp-step-N, then rename: a kill mid-save keeps the last one. The
    best evaluated step's weights (if any) and the RunState go in too, the state last."""
    root = os.path.join(output_dir, "checkpoints")
    final = os.path.join(root, f"step-{state.step}")
    tmp = os.path.join(root, f".tmp-step-{state.step}")
    if accelerator.is_main_process and os.path.isdir(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if best_weights is not None:
            save_file({k: v.contiguous() for k, v in best_weights.items()}, os.path.join(tmp, BEST_WEIGHTS))
        with open(os.path.join(tmp, CHECKPOINT_STATE), "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(state), f, indent=2)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-save_total_limit]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, checkpoint, state):
    """(RunState, best weights or None) from a checkpoint, after checking it was written with the same schedule."""
    with open(os.path.join(checkpoint, CHECKPOINT_STATE), encoding="utf-8") as f:
        saved = RunState(**json.load(f))
    for key in ("micro_batches_per_step", "steps_per_epoch", "length_group_steps"):
        if getattr(saved, key) != getattr(state, key):
            fix = "the train.py version that wrote it" if key == "length_group_steps" else \
                "the same data, batch size, processes x accumulation"
            raise InputError(f"--resume_from_checkpoint {checkpoint}: written with {key}={getattr(saved, key)}, now "
                             f"{getattr(state, key)}; resume with {fix}")
    accelerator.load_state(checkpoint, strict=False)  # strict=False: checkpoints hold trainable weights only
    accelerator.print(f"resumed from {checkpoint} at step {saved.step}")
    best = os.path.join(checkpoint, BEST_WEIGHTS)
    return saved, (load_file(best) if os.path.isfile(best) else None)


def save_outputs(accelerator, model, tokenizer, model_args, data_args, train_args, summary, provenance_record=None):
    """adapter/ (peft), the merged model + tokenizer (safetensors) and train_config.yaml, published atomically."""
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
                merged = merge_adapter(model_args.model_name_or_path, adapter_dir, model_args.torch_dtype,
                                       model_args.trust_remote_code)
                merged.save_pretrained(staging)
                tokenizer.save_pretrained(staging)
        else:
            unwrapped.save_pretrained(staging, state_dict=state_dict)
            tokenizer.save_pretrained(staging)
        record = dict(provenance_record or {}, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        config = dict(flat_config(model_args, data_args, train_args), run_name=record.pop("run_name", "")
                      or train_args.run_name)
        # how it ran, from the accelerate config file chosen at launch (the code is the same at every scale)
        plugin = accelerator.state.deepspeed_plugin
        zero_stage = plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0) if plugin else None
        launch = {"distributed_type": accelerator.distributed_type.value, "num_processes": accelerator.num_processes,
                  "mixed_precision": accelerator.mixed_precision, "zero_stage": zero_stage}
        run_record = {"config": config, "result": summary, "launch": launch, "provenance": record}
        write_card(build_card(run_record), staging)
        with open(os.path.join(staging, TRAIN_RECORD), "w", encoding="utf-8") as f:
            yaml.safe_dump(run_record, f, sort_keys=False)
        publish(staging, train_args.output_dir, last=TRAIN_RECORD)
        accelerator.print(closing_block(model_args, data_args, train_args, summary, config["run_name"]))
    accelerator.wait_for_everyone()
    if train_args.push_to_hub and accelerator.is_main_process:  # after the barrier: a failed upload hangs no one
        repo_id = train_args.hub_model_id or os.path.basename(os.path.normpath(train_args.output_dir))
        accelerator.print(f"uploaded to {push_to_hub(train_args.output_dir, repo_id, train_args.hub_private_repo)}")


def closing_block(model_args, data_args, train_args, summary, run_name):
    """What the run wrote, how it ended, and the command that scores it."""
    out = train_args.output_dir
    lines = [f"saved to {out}:"]
    if model_args.lora_r > 0:
        lines.append(f"  {os.path.join(out, 'adapter')}: the LoRA adapter (peft)")
    if model_args.lora_r == 0 or model_args.merge_lora:
        lines.append(f"  {out}: the {'merged ' if model_args.lora_r > 0 else ''}model and tokenizer "
                     f"(from_pretrained('{out}'))")
    lines.append(f"  {os.path.join(out, TRAIN_RECORD)}: options, result and provenance "
                 f"(train.py {os.path.join(out, TRAIN_RECORD)} --output_dir NEW reruns it)")
    lines.append(f"  {os.path.join(out, MODEL_CARD)}: the model card (the Hub shows it)")
    if {"tensorboard", "all"} & {name.strip() for name in train_args.report_to.split(",")}:
        lines.append(f"  {os.path.join(out, 'runs', run_name)}: TensorBoard logs "
                     f"(tensorboard --logdir {os.path.join(out, 'runs')})")
    losses = ", ".join(f"{kind} loss {v['loss']:.4g} (NLL {v['nll']:.3f}, step {v['step']})"
                       for kind, v in summary.get("last_losses", {}).items())
    if losses:
        lines.append(f"last steps: {losses}")
    model = out if model_args.lora_r == 0 or model_args.merge_lora else \
        f"{model_args.model_name_or_path} --adapter {os.path.join(out, 'adapter')}"
    # the same data, as evaluate.py's flags (it takes the same data options)
    data = " ".join(f"--{name} {getattr(data_args, name)}" for name in DATA_OPTIONS
                    if getattr(data_args, name) and (data_args.dataset_name or not name.endswith("_split")))
    lines.append(f"next: python evaluate.py --model_name_or_path {model} {data} --mia_data_dir MIA "
                 f"--output_dir {os.path.join(out, 'eval')}   (MIA: member.jsonl + nonmember.jsonl; omit to skip)")
    lines.append(f"then: python model_card.py {out} --eval_dir {os.path.join(out, 'eval')}   (the scores into the "
                 f"card; --push_to_hub --hub_model_id USER/NAME uploads it)")
    return "\n".join(lines)


def provenance(preset, started):
    """Where a run came from: the preset file, the command, package versions, the git commit of this code."""
    versions = {}
    for package in ("torch", "transformers", "peft", "accelerate", "deepspeed", "bitsandbytes", "datasets"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip()) if commit else None
    except (OSError, subprocess.SubprocessError):
        commit = dirty = None
    return {"preset": preset or None, "command": [os.path.basename(sys.argv[0])] + sys.argv[1:],
            "versions": versions, "git_commit": commit, "git_uncommitted_changes": dirty,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started))}


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
    return train(*parse_arguments(argv))


# --help shows the options in these groups (every option in exactly one)
HELP_GROUPS = {
    "model": ["model_name_or_path", "torch_dtype", "trust_remote_code", "attn_implementation",
              "gradient_checkpointing", "load_in_8bit", "load_in_4bit"],
    "LoRA": ["lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "merge_lora"],
    "data": [*DATA_OPTIONS, "max_length", "loss_on", "augment", "augment_retain",
             "idk_responses", "idk_file"],
    "objective": ["forget_loss", "retain_loss", "alpha", "nll_floor", "npo_beta"],
    "calibrated forgetting": ["calibration_file", "calibration_margin", "calibration_on",
                              "calibration_token_quantile"],
    "AILS-NTUA's chunked schedule": ["schedule", "forget_chunk_size", "retain_per_forget", "epochs_per_chunk",
                                     "forget_weight", "retain_weight"],
    "optimisation": ["learning_rate", "lr_scheduler_type", "warmup_ratio", "warmup_steps", "weight_decay",
                     "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                     "max_grad_norm", "seed", "padding_free"],
    "evaluation during training and best checkpoint": ["eval_steps", "eval_rows", "eval_max_new_tokens",
                                                       "eval_batch_size", "eval_mmlu_dir", "eval_mmlu_limit",
                                                       "metric_for_best_model", "early_stopping_patience"],
    "runs: output, checkpoints, resume": ["output_dir", "overwrite_output_dir", "save_steps", "save_minutes",
                                          "save_total_limit", "resume_from_checkpoint", "max_train_minutes",
                                          "push_to_hub", "hub_model_id", "hub_private_repo"],
    "logging": ["report_to", "logging_steps", "run_name", "batch_log"],
}


def parse_arguments(argv):
    return parse_config((ModelArguments, DataArguments, TrainArguments), argv, description=__doc__,
                        groups=HELP_GROUPS)


def main(argv=None):
    """Returns the process exit code: 0, or after a stop checkpoint INTERRUPTED_EXIT_CODE (Ctrl-C) or
    PREEMPTED_EXIT_CODE (SIGTERM / SIGUSR1)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, train_args = parse_arguments(argv)
    summary = train(model_args, data_args, train_args, preset=preset_path(argv))
    if not summary["preempted"]:
        return 0
    return INTERRUPTED_EXIT_CODE if summary["stop_signal"] == "SIGINT" else PREEMPTED_EXIT_CODE


if __name__ == "__main__":
    exit_process(run_main(main))
