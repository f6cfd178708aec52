"""Every preset in configs/ loads and trains two steps on a tiny model; npo / kl need LoRA."""

import glob
import json
import os

import pytest
import yaml

import train
from cli import InputError
from conftest import ROOT, make_unlearning_data, reset_accelerate, write_jsonl
from demo import needs_calibration

PRESETS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def test_the_grid_is_there():
    names = {os.path.basename(p)[:-5] for p in PRESETS}
    assert {"paper", "paper_old_system", "gi_only", "gi_retain", "gi_squared", "idk_retain", "grad_ascent",
            "grad_diff", "npo", "npo_kl"} <= names


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: os.path.basename(p)[:-5])
def test_preset_runs_two_steps(preset, tmp_path, tiny_model_dir):
    data = make_unlearning_data(tmp_path / "data", n_docs=3)
    extra = []
    if needs_calibration(preset):  # held-out rows: documents never in forget or retain
        heldout = make_unlearning_data(tmp_path / "heldout", n_docs=3, seed=1)
        rows = [dict(json.loads(line), id=json.loads(line)["id"].replace("retain", "held"))
                for line in open(os.path.join(heldout, "retain.jsonl"))]
        extra = ["--calibration_file", write_jsonl(tmp_path / "calibration.jsonl", rows), "--eval_max_new_tokens", "4"]
    reset_accelerate()
    summary = train.train(*train.parse_config(
        (train.ModelArguments, train.DataArguments, train.TrainArguments),
        [preset, "--model_name_or_path", tiny_model_dir, "--data_dir", data, "--output_dir", str(tmp_path / "out"),
         "--max_steps", "2", "--per_device_train_batch_size", "2", "--no_merge_lora", "--report_to", "none", *extra]))
    assert summary["optimizer_steps"] == 2 and summary["skipped_steps"] == 0
    config = yaml.safe_load(open(preset))
    kinds = set(summary["examples_per_kind"])
    assert ("forget" in kinds) == (config["forget_loss"] != "none")
    assert ("idk" in kinds) == bool(config.get("idk_responses"))
    assert ("retain" in kinds) == (config["retain_loss"] != "none")
    saved = ("adapter/adapter_model.safetensors" if config.get("lora_r", 8) > 0 else "model.safetensors")
    assert os.path.isfile(os.path.join(tmp_path, "out", saved))


@pytest.mark.parametrize("flag", [["--forget_loss", "npo"], ["--retain_loss", "kl"]])
def test_reference_objectives_need_lora(flag, tmp_path, tiny_model_dir):
    data = make_unlearning_data(tmp_path / "data", n_docs=1)
    with pytest.raises(InputError, match="set --lora_r > 0"):
        train.train(*train.parse_config(
            (train.ModelArguments, train.DataArguments, train.TrainArguments),
            ["--model_name_or_path", tiny_model_dir, "--data_dir", data, "--output_dir", str(tmp_path / "o"),
             "--lora_r", "0", *flag]))
    assert not (tmp_path / "o").exists()
