"""A model dir with a real architecture at its real size and random weights: for timing and memory benchmarks of
train.py / evaluate.py where the real weights cannot be downloaded (no hub). Not for scores.

    python benchmarks/make_random_model.py --preset allenai/OLMo-7B-0724-Instruct-hf \
        --tokenizer models/smollm2-135m-instruct --output_dir /tmp/olmo7b-random --device cuda

The dimensions come from plan_memory.PRESETS; the tokenizer is copied from --tokenizer (its ids must fit the
preset's vocabulary). Weights are initialised on --device in --dtype and saved as safetensors.
"""

import os
import sys
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cli import InputError, parse_config, run_main  # noqa: E402
from plan_memory import PRESETS  # noqa: E402


@dataclass
class RandomModelArguments:
    preset: str = field(default="allenai/OLMo-7B-0724-Instruct-hf", metadata={
        "help": "Architecture and size: one of " + ", ".join(PRESETS) + "."})
    tokenizer: str = field(default="", metadata={"help": "Local model or tokenizer dir whose tokenizer is saved "
                                                 "with the model."})
    output_dir: str = field(default="", metadata={"help": "Where the model dir is written (must not exist)."})
    device: str = field(default="cpu", metadata={"help": "Where the weights are initialised: cpu or cuda (a 7B "
                                                 "model initialises in seconds on a GPU, minutes on a CPU)."})
    dtype: str = field(default="bfloat16", metadata={"help": "Saved weight dtype: bfloat16 or float32."})
    seed: int = field(default=0, metadata={"help": "Seed of the random weights."})


def main(argv=None):
    (args,) = parse_config((RandomModelArguments,), argv)
    if args.preset not in PRESETS:
        raise InputError(f"--preset {args.preset}: expected one of {', '.join(PRESETS)}")
    if not args.tokenizer or not args.output_dir:
        raise InputError("--tokenizer and --output_dir are required")
    if os.path.exists(args.output_dir):
        raise InputError(f"--output_dir {args.output_dir}: already exists; choose a new dir")
    if args.dtype not in ("bfloat16", "float32"):
        raise InputError(f"--dtype {args.dtype}: expected bfloat16 or float32")

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    dims = dict(PRESETS[args.preset])
    if len(tokenizer) > dims["vocab_size"]:
        raise InputError(f"--tokenizer {args.tokenizer}: {len(tokenizer)} tokens do not fit the preset's "
                         f"vocabulary of {dims['vocab_size']}")
    model_type = "olmo" if "OLMo" in args.preset else "llama"
    config = AutoConfig.for_model(model_type, **dims, max_position_embeddings=4096,
                                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id)
    start = time.time()
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"{args.preset}: {params / 1e9:.2f}B random parameters ({args.dtype}) -> {args.output_dir} "
          f"in {time.time() - start:.0f} s")


if __name__ == "__main__":
    run_main(main)
