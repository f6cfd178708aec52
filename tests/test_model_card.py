"""The model card train.py writes (README.md in OUT), its rewrite with evaluate.py's scores, and --push_to_hub with
the Hub's upload replaced."""

import json
import os

import pytest
import yaml

import model_card
import train
from cli import InputError
from conftest import make_unlearning_data, reset_accelerate


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records the repo created and the files an upload would send."""
    calls = []

    def __init__(self, token=None):
        pass

    def create_repo(self, repo_id, private=None, exist_ok=False):
        FakeHub.calls.append(("create_repo", repo_id, private, exist_ok))

    def upload_folder(self, repo_id, folder_path, ignore_patterns=None, commit_message=None):
        import fnmatch

        files = sorted(os.path.relpath(os.path.join(root, name), folder_path)
                       for root, _, names in os.walk(folder_path) for name in names)
        sent = [f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in ignore_patterns or [])]
        FakeHub.calls.append(("upload_folder", repo_id, sent))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    return FakeHub


def test_train_writes_the_card_and_pushes_the_run_without_checkpoints(tmp_path, tiny_model_dir, fake_hub, capsys):
    data = make_unlearning_data(tmp_path / "data", n_docs=2)
    out = str(tmp_path / "out")
    reset_accelerate()
    assert train.main([os.path.join(train.ROOT, "configs", "paper.yaml"), "--model_name_or_path", tiny_model_dir,
                       "--data_dir", data, "--output_dir", out, "--max_steps", "2", "--save_steps", "1",
                       "--report_to", "none", "--push_to_hub", "--hub_model_id", "me/tiny-unlearned",
                       "--hub_private_repo"]) == 0
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    metadata = yaml.safe_load(card.split("---")[1])
    # the base model is a local dir here: the Hub's base_model field takes only Hub ids, so it is left out
    assert metadata["library_name"] == "transformers" and "unlearning" in metadata["tags"]
    assert "base_model" not in metadata
    assert f"`{tiny_model_dir}` after unlearning" in card and "preset `" in card and "paper.yaml" in card
    assert "forget objective: gi (gradient interference, alpha / L_ntp" in card
    assert f"source: `{data}`" in card and "2 optimizer steps of" in card
    assert "Not evaluated yet" in card and "python train.py train_config.yaml --output_dir NEW_DIR" in card
    assert fake_hub.calls[0] == ("create_repo", "me/tiny-unlearned", True, True)
    _, repo, sent = fake_hub.calls[1]
    assert repo == "me/tiny-unlearned"
    assert {"README.md", "train_config.yaml", "model.safetensors", "adapter/adapter_model.safetensors"} <= set(sent)
    assert os.path.isdir(os.path.join(out, "checkpoints")) and not any(f.startswith("checkpoints") for f in sent)
    assert "uploaded to https://huggingface.co/me/tiny-unlearned/commit/abc" in capsys.readouterr().out


def test_card_with_scores_from_evaluate(tmp_path):
    record = {"config": {"model_name_or_path": "allenai/OLMo-7B-0724-Instruct-hf", "lora_r": 8, "lora_alpha": 32,
                         "merge_lora": False, "lora_target_modules": "all-linear", "forget_loss": "npo",
                         "retain_loss": "ntp_kl", "dataset_name": "locuslab/lume", "forget_split": "forget_train",
                         "retain_split": "retain_train", "learning_rate": 1e-5, "output_dir": "runs/npo"},
              "result": {"optimizer_steps": 10, "planned_steps": 10}, "launch": {"num_processes": 8},
              "provenance": {}}
    results = {"harmonic-mean-task-aggregate": 0.5, "mia_loss_acc": 0.75, "mia_final_score": 0.5,
               "aggregate-score": None, "partial-aggregate-score": 0.5,
               "forget-set": {"Task1": {"regurgitation-score": 0.25, "knowledge-score": 0.0}},
               "retain-set": {"Task1": {"regurgitation-score": 1.0, "knowledge-score": 1.0}}}
    card = str(model_card.build_card(record, results))
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["base_model"] == "allenai/OLMo-7B-0724-Instruct-hf" and metadata["library_name"] == "peft"
    assert metadata["datasets"] == ["locuslab/lume"]
    assert "(splits forget_train / retain_train)" in card and "adapter in adapter/" in card
    assert "| 0.500 | 0.750 | 0.500 | n/a | 0.500 |" in card  # task agg., MIA AUC, MIA score, MMLU, partial
    assert "partial: MMLU not run" in card
    assert "| forget | 0.250 / 0.000 | n/a / n/a | n/a / n/a |" in card
    assert "8 process(es), fp32 (no mixed precision)" in card
    # forget Task1 regurgitation 0.25 -> term 0.75; knowledge 0 -> term 1; retain 1, 1: the lowest term is 0.75
    assert "lowest term: forget Task1 regurgitation 0.7500" in card


def test_model_card_cli_adds_the_scores_and_refuses_bad_dirs(tmp_path, fake_hub):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.yaml").write_text(yaml.safe_dump({"config": {"model_name_or_path": "m", "lora_r": 0,
                                                                      "forget_loss": "gi", "alpha": 1.0}}))
    (run / "eval").mkdir()
    (run / "eval" / "evaluation_results.json").write_text(json.dumps(
        {"harmonic-mean-task-aggregate": 0.8, "mia_loss_acc": 0.5, "mia_final_score": 1.0, "mmlu_average": 0.4,
         "aggregate-score": 0.7}))
    assert model_card.main([str(run), "--eval_dir", str(run / "eval"), "--push_to_hub"]) is None
    card = (run / "README.md").read_text()
    assert "| task aggregate | MIA AUC | MIA score | MMLU | final score |" in card
    assert "| 0.800 | 0.500 | 1.000 | 0.400 | 0.700 |" in card and "partial" not in card
    assert fake_hub.calls[0][1] == "run"  # no --hub_model_id: the run dir's name under the user's account
    with pytest.raises(InputError, match="no train_config.yaml; give the output dir of a finished train.py run"):
        model_card.main([str(tmp_path)])
    with pytest.raises(InputError, match="--eval_dir .*: no evaluation_results.json"):
        model_card.main([str(run), "--eval_dir", str(tmp_path)])


def test_hub_model_id_without_push_to_hub_is_refused():
    with pytest.raises(InputError, match="--hub_model_id / --hub_private_repo: add --push_to_hub"):
        train.parse_arguments(["--model_name_or_path", "m", "--hub_model_id", "me/x"])
