"""Merge LoRA adapters trained from the same base into one full model, with TIES (or another peft combination).

ZJUKLAB's SemEval-2025 Task 4 system (Xu et al. 2025; configs/zjuklab.yaml) trains two LoRA runs, one that forgets
too much and one that forgets too little, and merges them with TIES. This script is that merge step, done with peft's
``add_weighted_adapter`` exactly as their semeval25/unlearn-merging.py does it (weights 1, 1; density 0.8; ties):

    python merge_adapters.py --base_model TARGET --adapters runs/zjuklab_a/adapter,runs/zjuklab_b/adapter \\
        --weights 1,1 --density 0.8 --combination_type ties --torch_dtype float32 --output_dir runs/zjuklab_merged

``--output_dir`` then holds the merged full model + tokenizer (safetensors, ``AutoModelForCausalLM.from_pretrained``)
and ``merge_config.yaml`` (the inputs), written last: its presence means the merge finished. Everything is written to
a staging dir beside it and moved in at the end, so a failed run leaves nothing behind.

What peft 0.21 computes (peft/tuners/lora/model.py add_weighted_adapter, peft/utils/merge_utils.py):

* TIES on a list of tensors (merge_utils.ties): keep each tensor's int(density * numel) largest-magnitude entries;
  elect each entry's sign from the sum of the kept entries (unweighted; a zero sum counts as +); then for each entry
  average the weighted kept values whose sign agrees: their sum divided by how many agree (not by their weights).
* ``ties`` (the default, and what ZJUKLAB called) merges the LoRA *factors*, not the weight deltas: TIES over the
  adapters' lora_A matrices and, separately, over their lora_B matrices, each adapter weighted by
  sqrt(weight * lora_alpha / r); the merged delta is B_ties @ A_ties (its scaling is 1). All adapters need the same
  r. Factors of different runs line up only because LoRA's A starts from the same seeded init, hence the same
  ``--seed`` for every run.
* ``ties_svd`` applies TIES to the full deltas weight_i * B_i @ A_i * lora_alpha_i / r_i and re-factorises the result
  with an SVD truncated to ``--svd_rank`` (default: the largest input rank): a low-rank approximation, exact only when
  svd_rank reaches each layer's smaller dimension.
"""

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field

import torch
import yaml
from safetensors import safe_open

from cli import InputError, parse_config, run_main
from artefacts import publish
from modeling import DTYPES, check_output_dir, load_model, load_tokenizer

MERGE_MARKER = "merge_config.yaml"  # written last: its presence means the merge finished
# peft's names; the *svd ones merge full deltas and re-factorise them, the others merge the A and B factors
COMBINATION_TYPES = ("ties", "ties_svd", "dare_ties", "dare_ties_svd", "dare_linear", "dare_linear_svd",
                     "magnitude_prune", "magnitude_prune_svd", "linear", "svd", "cat")
SVD_TYPES = tuple(name for name in COMBINATION_TYPES if name.endswith("svd"))
SAME_RANK_TYPES = ("ties", "dare_ties", "dare_linear", "magnitude_prune", "linear")  # peft refuses mixed ranks here
MERGED_NAME = "merged"


@dataclass
class MergeArguments:
    base_model: str = field(default="", metadata={"help": "The model every adapter was trained from (local dir or "
                                                          "hub id), e.g. the memorised target."})
    adapters: str = field(default="", metadata={"help": "Comma-separated peft LoRA adapter dirs, at least 2 "
                                                        "(train.py writes RUN/adapter)."})
    weights: str = field(default="", metadata={"help": "Comma-separated weight per adapter; default 1 each "
                                                       "(ZJUKLAB's choice: TIES already averages the agreeing "
                                                       "entries)."})
    combination_type: str = field(default="ties", metadata={
        "choices": COMBINATION_TYPES,
        "help": "peft's add_weighted_adapter combination: ties (ZJUKLAB) merges the A and B factors; ties_svd merges "
                "the full deltas and re-factorises them."})
    density: float = field(default=0.8, metadata={"help": "Fraction of entries TIES / DARE / magnitude_prune keep "
                                                          "per tensor, in (0, 1] (ZJUKLAB: 0.8); unused by linear, "
                                                          "svd and cat."})
    svd_rank: int = field(default=0, metadata={"help": "Rank of the merged adapter for the *svd types (0: peft's "
                                                       "default, the largest input rank; at most the smallest layer "
                                                       "dimension, which makes the merge exact)."})
    output_dir: str = field(default="", metadata={"help": "Where the merged model, tokenizer and merge_config.yaml "
                                                          "go; must not overlap the base model or an adapter."})
    torch_dtype: str = field(default="auto", metadata={
        "choices": tuple(DTYPES),
        "help": "Dtype the base is loaded, merged and saved in: auto (from its config), bfloat16, float16 or "
                "float32."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow an output_dir that already holds a "
                                                                        "finished merge."})
    seed: int = field(default=42, metadata={"help": "Seed for the random pruning of the dare_* types."})


def split_list(text):
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_weights(text):
    try:
        return [float(item) for item in split_list(text)]
    except ValueError:
        raise InputError(f"--weights {text}: expected comma-separated numbers, e.g. 1,1") from None


def read_adapter_config(adapter_dir):
    path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(path):
        raise InputError(f"--adapters {adapter_dir}: no adapter_config.json there (expected a peft adapter dir, "
                         f"e.g. RUN/adapter as train.py writes it)")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not valid JSON ({error}); save the adapter again with save_pretrained") from None
    if config.get("peft_type") != "LORA":
        raise InputError(f"--adapters {adapter_dir}: a {config.get('peft_type')} adapter; only LoRA adapters merge")
    return config


def smallest_layer_dim(adapter_dir):
    """The smallest in/out dimension of the layers an adapter adapts, from the tensor shapes in its file."""
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(path):
        raise InputError(f"--adapters {adapter_dir}: no adapter_model.safetensors there (save the adapter with "
                         f"save_pretrained, which writes safetensors)")
    dims = []
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            shape = f.get_slice(key).get_shape()
            if ".lora_A." in key:
                dims.append(shape[1])  # (r, in_features)
            elif ".lora_B." in key:
                dims.append(shape[0])  # (out_features, r)
    return min(dims)


def check_inputs(base_model, adapter_dirs, output_dir, weights, density, combination_type, svd_rank, torch_dtype,
                 overwrite):
    """Every check that needs no model, so bad input fails in a second with nothing written. Returns the weights."""
    if not base_model:
        raise InputError("--base_model: required (the model the adapters were trained from)")
    if not output_dir:
        raise InputError("--output_dir: required")
    if torch_dtype not in DTYPES:
        raise InputError(f"--torch_dtype {torch_dtype}: expected one of {', '.join(DTYPES)}")
    if combination_type not in COMBINATION_TYPES:
        raise InputError(f"--combination_type {combination_type}: expected one of {', '.join(COMBINATION_TYPES)}")
    if len(adapter_dirs) < 2:
        raise InputError(f"--adapters {','.join(adapter_dirs)}: got {len(adapter_dirs)} adapter dir(s), need at "
                         f"least 2, comma-separated")
    configs = [read_adapter_config(path) for path in adapter_dirs]
    weights = [1.0] * len(adapter_dirs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapter_dirs):
        raise InputError(f"--weights: {len(weights)} weight(s) for {len(adapter_dirs)} adapters; give one per "
                         f"adapter or none (1 each)")
    if not 0 < density <= 1:
        raise InputError(f"--density {density}: must be in (0, 1] (the fraction of entries kept)")
    if svd_rank is not None:
        if combination_type not in SVD_TYPES:
            raise InputError(f"--svd_rank {svd_rank}: only the svd types use it ({', '.join(SVD_TYPES)}); "
                             f"{combination_type} keeps the adapters' rank")
        if svd_rank < 1:
            raise InputError(f"--svd_rank {svd_rank}: must be >= 1 (or 0 for peft's default)")
        # peft's truncated SVD fails on a rank above a layer's smaller dimension; the adapter files tell it
        smallest = min(smallest_layer_dim(path) for path in adapter_dirs)
        if svd_rank > smallest:
            raise InputError(f"--svd_rank {svd_rank}: larger than the smallest adapted layer dimension "
                             f"({smallest}); {smallest} already makes the merge exact")
    ranks = [config["r"] for config in configs]
    if combination_type in SAME_RANK_TYPES and len(set(ranks)) > 1:
        raise InputError(f"--adapters: ranks {ranks} differ; {combination_type} needs the same r for every adapter "
                         f"(use ties_svd to merge different ranks)")
    check_output_dir(output_dir, [base_model, *adapter_dirs], overwrite, done_marker=MERGE_MARKER)
    return weights


def merge_adapters(base_model, adapter_dirs, output_dir, weights=None, density=0.8, combination_type="ties",
                   torch_dtype="auto", svd_rank=None, overwrite=False, seed=42):
    """Merge LoRA adapters of ``base_model`` with peft's ``add_weighted_adapter`` and save the full merged model.

    ``adapter_dirs``: a list of peft adapter dirs; ``weights``: one number per adapter (default 1 each). Writes the
    merged model + tokenizer (safetensors) and merge_config.yaml into ``output_dir``; returns merge_config's content.
    """
    from peft import PeftModel  # imports bitsandbytes: here, after cli has installed its log filters

    adapter_dirs = list(adapter_dirs)
    weights = check_inputs(base_model, adapter_dirs, output_dir, None if weights is None else list(weights), density,
                           combination_type, svd_rank, torch_dtype, overwrite)
    tokenizer = load_tokenizer(base_model)
    model = load_model(base_model, dtype=torch_dtype)
    names = [f"a{i}" for i in range(len(adapter_dirs))]
    for name, path in zip(names, adapter_dirs):
        try:
            if name == names[0]:
                model = PeftModel.from_pretrained(model, path, adapter_name=name)
            else:
                model.load_adapter(path, adapter_name=name)
        except (ValueError, RuntimeError, KeyError) as error:  # other modules or other shapes than the base's
            raise InputError(f"--adapters {path}: does not fit --base_model {base_model} "
                             f"({str(error).strip().splitlines()[0][:200]}); merge adapters trained from this "
                             f"base") from None
    torch.manual_seed(seed)  # dare_* prune at random
    model.add_weighted_adapter(names, weights, MERGED_NAME, combination_type=combination_type, density=density,
                               svd_rank=svd_rank)
    model.set_adapter(MERGED_NAME)
    merged = model.merge_and_unload(adapter_names=[MERGED_NAME])  # the input adapters are dropped, not merged

    summary = {"base_model": base_model, "adapters": adapter_dirs, "weights": weights,
               "combination_type": combination_type, "density": density,
               "svd_rank": model.peft_config[MERGED_NAME].r if combination_type in SVD_TYPES else None,
               "torch_dtype": torch_dtype, "seed": seed}
    # staging beside output_dir (same filesystem, so publish's renames are atomic); output_dir itself only
    # appears once everything is written
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(output_dir))}.incomplete-", dir=parent)
    try:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        with open(os.path.join(staging, MERGE_MARKER), "w", encoding="utf-8") as f:
            yaml.safe_dump(summary, f, sort_keys=False)
        old_marker = os.path.join(output_dir, MERGE_MARKER)
        if os.path.exists(old_marker):  # --overwrite_output_dir: the old merge stops counting as finished first
            os.remove(old_marker)
        publish(staging, output_dir, last=MERGE_MARKER)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


def main(argv=None):
    (args,) = parse_config((MergeArguments,), argv, description=__doc__)
    summary = merge_adapters(args.base_model, split_list(args.adapters), args.output_dir,
                             weights=parse_weights(args.weights) if args.weights.strip() else None,
                             density=args.density, combination_type=args.combination_type,
                             torch_dtype=args.torch_dtype, svd_rank=args.svd_rank or None,
                             overwrite=args.overwrite_output_dir, seed=args.seed)
    print(f"merge_adapters: {len(summary['adapters'])} adapters ({summary['combination_type']}, density "
          f"{summary['density']}, weights {summary['weights']}) merged into {args.output_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
