"""Load, adapt and save causal LMs: a local dir or hub id, LoRA via peft, optional 8/4-bit base, atomic saving."""

import os
import socket
from urllib.parse import urlparse

import torch
from huggingface_hub import constants, try_to_load_from_cache
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from cli import InputError

DTYPES = {"auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PACKED_SDPA = "sdpa_packed"  # the attention implementation train.py --padding_free gives an sdpa model


def packed_sdpa_attention(module, query, key, value, attention_mask, packed_segments=None, **kwargs):
    """transformers' sdpa attention, except for a packed row given with ``packed_segments`` ([(start, end), ...] of
    the rows laid end to end, as train.pack_batch packs them): then causal sdpa within each segment, at the cost of
    each row's T^2 instead of the packed row's N^2 through a block-diagonal mask. What a varlen flash kernel does, for
    devices without one (CPUs). Every other call (padded rows, generation) is plain sdpa with its mask."""
    if packed_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    parts = [sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], None,
                                    is_causal=True, **kwargs)[0] for start, end in packed_segments]
    return torch.cat(parts, dim=1), None  # (1, N, heads, head_dim), as sdpa_attention_forward returns


# registered under its own name, with sdpa's mask builder: transformers' documented extension point (AttentionInterface)
AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)


def check_hub_reachable(name_or_path):
    """For a hub id that is not cached: fail at once, with what to do, when the hub cannot be reached (instead of a
    minute of download retries). A local dir, HF_HUB_OFFLINE=1 or a cached model skip the check."""
    if os.path.isdir(name_or_path) or constants.HF_HUB_OFFLINE:
        return
    try:
        if isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
            return
    except ValueError:  # not a valid repo id: from_pretrained gives the clearer error
        return
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=5).close()
    except OSError as error:
        raise InputError(f"{name_or_path}: not a local dir, not in the Hugging Face cache, and {endpoint.hostname} "
                         f"is unreachable ({error}); download it where there is network (hf download "
                         f"{name_or_path}) and set HF_HUB_OFFLINE=1, or pass a local model dir (python "
                         f"prepare_model.py makes the demo's)") from None


def load_tokenizer(name_or_path, trust_remote_code=False):
    """The model's tokenizer; a missing pad token becomes eos (padding is always masked out)."""
    check_hub_reachable(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as error:
        if not os.path.isdir(name_or_path):
            raise InputError(f"{name_or_path}: no such model directory, and not loadable as a hub model id "
                             f"({str(error).splitlines()[0][:200]}); check the path") from None
        raise InputError(f"{name_or_path}: cannot load a tokenizer ({str(error).splitlines()[0][:200]}); "
                         f"save one next to the model with tokenizer.save_pretrained") from None
    if len(tokenizer.get_vocab()) <= len(set(tokenizer.all_special_ids)):
        # transformers 5 builds an empty tokenizer from config.json alone when the tokenizer files are missing
        raise InputError(f"{name_or_path}: no tokenizer files (loading gave an empty vocabulary); "
                         f"save one next to the model with tokenizer.save_pretrained")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise InputError(f"{name_or_path}: the tokenizer has no eos token; set eos_token in tokenizer_config.json")
    return tokenizer


def quantization_config(load_in_8bit=False, load_in_4bit=False):
    if not (load_in_8bit or load_in_4bit):
        return None
    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


def load_model(name_or_path, dtype="auto", load_in_8bit=False, load_in_4bit=False, device_map=None,
               trust_remote_code=False, attn_implementation=""):
    """``AutoModelForCausalLM`` from a local dir or hub id; a clear error when it cannot be loaded."""
    if dtype not in DTYPES:
        raise InputError(f"--torch_dtype {dtype}: expected one of {', '.join(DTYPES)}")
    kwargs = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    quant = quantization_config(load_in_8bit, load_in_4bit)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as error:  # ValueError: no config.json / no model_type in it
        raise InputError(f"{name_or_path}: cannot load a causal LM ({str(error).splitlines()[0][:200]}); "
                         f"expected a model saved with save_pretrained (config.json + weights)") from None


def add_lora(model, r=8, alpha=32, dropout=0.05, gradient_checkpointing=False, quantized=False,
             target_modules="all-linear"):
    """Wrap the model with a LoRA adapter: on all linear layers except lm_head by default (the paper's setting), or
    on the comma-separated module names of ``target_modules`` (e.g. q_proj,v_proj)."""
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if target_modules != "all-linear":
        target_modules = [name.strip() for name in target_modules.split(",") if name.strip()]
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [name for name in target_modules if name not in present]
        if missing or not target_modules:
            raise InputError(f"--lora_target_modules: {', '.join(missing) or '(empty)'} not a module name of this "
                             f"model; its linear layers are e.g. " + ", ".join(sorted(
                                 {name.rsplit('.', 1)[-1] for name, module in model.named_modules()
                                  if isinstance(module, torch.nn.Linear)})) + " (or all-linear)")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def make_adamw(trainable, learning_rate, weight_decay):
    """AdamW over the trainable parameters: weight decay on matrices, none on 1-d weights (norms, biases)."""
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    # empty groups left out (LoRA has no 1-d weights): DeepSpeed drops them, and the scheduler must match its groups
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate)


def load_for_inference(name_or_path, adapter=None, dtype="auto", trust_remote_code=False):
    """Model (+ optional LoRA adapter, unmerged) and tokenizer, in eval mode."""
    tokenizer = load_tokenizer(name_or_path, trust_remote_code)
    model = load_model(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
    if adapter:
        if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
            raise InputError(f"--adapter {adapter}: no adapter_config.json there (expected a peft adapter dir)")
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model, tokenizer


def merge_adapter(base_name_or_path, adapter_dir, dtype="auto", trust_remote_code=False):
    """Merge a saved LoRA adapter into a fresh full-precision copy of the base.

    Reloading the base (rather than merging the trained model in place) works the same after 8/4-bit training
    (merging into quantized weights would lose precision) and after ZeRO-3 (whose live weights are sharded).
    """
    base = load_model(base_name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def check_output_dir(output_dir, input_paths, overwrite=False, done_marker=None, inside_inputs_ok=False):
    """Refuse an output dir that is (or holds) an input, or that already holds a finished run.

    ``inside_inputs_ok``: a new subdirectory of an input dir is allowed (evaluate.py's MODEL/eval layout): the
    reader loads named files from the input, and writing only adds that subdirectory. An existing one is allowed
    only when it holds nothing but an earlier output (``done_marker``) or nothing at all, so no input file is
    ever replaced."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise InputError(f"--output_dir {output_dir}: exists and is not a directory; choose a directory path")
    out = os.path.realpath(output_dir)
    for path in input_paths:
        if path and os.path.exists(path):
            src = os.path.realpath(path)
            nested = out.startswith(src + os.sep)
            if nested and inside_inputs_ok and os.path.isdir(src) and (
                    not os.path.exists(out) or not os.listdir(out)
                    or (done_marker and os.path.exists(os.path.join(out, done_marker)))):
                continue
            if out == src or src.startswith(out + os.sep) or nested:
                raise InputError(f"--output_dir {output_dir}: overlaps the input {path}; "
                                 f"choose a separate output directory (inputs are never modified)")
    if done_marker and os.path.exists(os.path.join(output_dir, done_marker)) and not overwrite:
        raise InputError(f"--output_dir {output_dir}: already holds a finished run ({done_marker}); "
                         f"pass --overwrite_output_dir or choose another directory")
