"""train.py: the batch schedule, configuration, end-to-end launches (1 and 2 processes) and unlearning behaviour."""

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

import train
from conftest import ROOT, make_unlearning_data, reset_accelerate, save_tiny_model
from objectives import per_sequence_nll
from batches import pad_batch
from records import encode_example, load_records


# --- the schedule -------------------------------------------------------------------------------------------------

def test_schedule_one_kind_per_step_and_full_coverage():
    lengths = {"forget": [5 + i % 7 for i in range(21)], "retain": [9] * 10, "idk": [4] * 3}
    steps = train.epoch_schedule(lengths, micro_batch_size=2, micro_batches_per_step=3, seed=1, epoch=0)
    by_kind = {}
    for kind, micro_batches in steps:
        assert len(micro_batches) == 3 and all(len(mb) == 2 for mb in micro_batches)
        by_kind.setdefault(kind, []).extend(i for mb in micro_batches for i in mb)
    for kind, kind_lengths in lengths.items():
        seen = by_kind[kind]
        assert set(seen) == set(range(len(kind_lengths)))  # every example at least once
        assert len(seen) == 6 * -(-len(kind_lengths) // 6)  # filled up to whole steps by wrapping around
    kinds_in_order = [kind for kind, _ in steps]
    assert kinds_in_order != sorted(kinds_in_order)  # kinds are interleaved, not run one after the other


def test_schedule_deterministic_and_changes_per_epoch():
    lengths = {"forget": list(range(40)), "retain": list(range(30))}
    a = train.epoch_schedule(lengths, 4, 2, seed=7, epoch=3)
    assert a == train.epoch_schedule(lengths, 4, 2, seed=7, epoch=3)
    assert a != train.epoch_schedule(lengths, 4, 2, seed=7, epoch=4)


def test_schedule_groups_similar_lengths():
    lengths = {"forget": [10 * (i % 2) + 1 for i in range(64)]}  # half length 1, half length 11
    steps = train.epoch_schedule(lengths, 4, 1, seed=0, epoch=0)
    mixed = sum(len({lengths["forget"][i] for i in mb}) > 1 for _, mbs in steps for mb in mbs)
    assert mixed <= 1  # with random batching about 14 of the 16 micro-batches would mix lengths


def test_processes_take_disjoint_micro_batches():
    lengths = {"forget": [3] * 16}
    for kind, micro_batches in train.epoch_schedule(lengths, 2, 4, seed=0, epoch=0):
        # 2 processes x 2 accumulation steps = 4 micro-batches per step
        taken = [train.micro_batch_for(micro_batches, a, rank, 2) for a in range(2) for rank in range(2)]
        flat = [i for mb in taken for i in mb]
        assert len(flat) == len(set(flat)) == 8


# --- configuration and bad input ------------------------------------------------------------------------------------

ARG_TYPES = (train.ModelArguments, train.DataArguments, train.TrainArguments)


def test_yaml_then_flags(tmp_path):
    from cli import parse_config

    model_args, data_args, train_args = parse_config(
        ARG_TYPES, [os.path.join(ROOT, "configs", "paper.yaml"), "--learning_rate", "5e-5"])
    assert train_args.learning_rate == 5e-5  # the flag wins
    assert (train_args.forget_loss, data_args.augment, train_args.num_train_epochs) == ("gi", "segments", 5)
    assert (model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout) == (8, 32, 0.05)


def run_train_cli(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


@pytest.mark.parametrize("extra,message", [
    (["--learning_rate", "-1"], "--learning_rate -1.0: must be > 0"),
    (["--num_train_epochs", "0"], "--num_train_epochs 0: must be >= 1"),
    (["--forget_loss", "bogus"], "--forget_loss bogus"),
    (["--load_in_8bit", "--lora_r", "0"], "needs LoRA"),
])
def test_bad_options_one_line(tmp_path, tiny_model_dir, extra, message):
    data = make_unlearning_data(tmp_path / "data", n_docs=2)
    out = tmp_path / "out"
    result = run_train_cli("--model_name_or_path", tiny_model_dir, "--data_dir", data, "--output_dir", str(out),
                           *extra)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_unknown_yaml_key(tmp_path, tiny_model_dir):
    config = tmp_path / "bad.yaml"
    config.write_text("learning_rate: 1e-4\nlearnign_rate: 2e-4\n")
    result = run_train_cli(str(config), "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "o"))
    assert result.returncode == 2 and "unknown option 'learnign_rate'" in result.stderr
    assert "Traceback" not in result.stderr


def test_refuses_output_dir_equal_to_model_dir(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    before = sorted(os.listdir(model_dir))
    data = make_unlearning_data(tmp_path / "data", n_docs=2)
    result = run_train_cli("--model_name_or_path", model_dir, "--data_dir", data, "--output_dir", model_dir)
    assert result.returncode == 2 and "overlaps the input" in result.stderr
    assert sorted(os.listdir(model_dir)) == before


@pytest.mark.slow
def test_run_record_names_its_origin_and_reruns_the_same_configuration(tmp_path, tiny_model_dir):
    """train_config.yaml records the preset, versions, commit, times and the real run name; fed back as a preset it
    reruns the same configuration (same adapter); the header and the closing block say what happened."""
    import yaml
    from safetensors.torch import load_file

    data = make_unlearning_data(tmp_path / "data", n_docs=2)
    first, again = str(tmp_path / "first"), str(tmp_path / "again")
    result = run_train_cli(os.path.join(ROOT, "configs", "paper.yaml"), "--model_name_or_path", tiny_model_dir,
                           "--data_dir", data, "--output_dir", first, "--num_train_epochs", "1",
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    forget_rows = len(load_records(os.path.join(data, "forget.jsonl")))
    assert f"forget {forget_rows} rows -> " in result.stdout and "(--augment segments)" in result.stdout
    assert "unlearning:" in result.stderr  # the progress bar's label
    record = yaml.safe_load(open(os.path.join(first, "train_config.yaml")))
    provenance = record["provenance"]
    assert provenance["preset"].endswith(os.path.join("configs", "paper.yaml"))
    assert provenance["versions"]["torch"] == torch.__version__
    assert provenance["started"] <= provenance["finished"]
    run_name = record["config"]["run_name"]
    assert run_name and os.listdir(os.path.join(first, "runs")) == [run_name]  # the name the TensorBoard dir has
    assert f"--model_name_or_path {first} --data_dir {data}" in result.stdout  # the next command, with the paths
    assert os.path.join(first, "adapter") in result.stdout

    rerun = run_train_cli(os.path.join(first, "train_config.yaml"), "--output_dir", again,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    rerun_record = yaml.safe_load(open(os.path.join(again, "train_config.yaml")))
    assert {k: v for k, v in rerun_record["config"].items() if k != "output_dir"} == \
        {k: v for k, v in record["config"].items() if k != "output_dir"}
    a = load_file(os.path.join(first, "adapter", "adapter_model.safetensors"))
    b = load_file(os.path.join(again, "adapter", "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_building_a_target_is_labelled_fine_tuning(tmp_path, tiny_model_dir):
    data = make_unlearning_data(tmp_path / "data", n_docs=2)
    result = run_train_cli(os.path.join(ROOT, "configs", "target.yaml"), "--model_name_or_path", tiny_model_dir,
                           "--data_dir", data, "--output_dir", str(tmp_path / "out"), "--num_train_epochs", "1",
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fine-tuning:" in result.stderr and "unlearning:" not in result.stderr


@pytest.mark.slow
def test_lr_is_the_rate_each_step_trained_at_and_logging_steps_average(tmp_path, tiny_model_dir):
    """The logged lr is the one the step used (transformers' cosine schedule recomputed by hand); --logging_steps 3
    logs at steps 3, 6, ... and the last, each scalar the mean of those steps' values in the every-step run."""
    import demo

    data = make_unlearning_data(tmp_path / "data", n_docs=3)
    common = ["--model_name_or_path", tiny_model_dir, "--data_dir", data, "--augment", "none",
              "--per_device_train_batch_size", "2", "--num_train_epochs", "2", "--learning_rate", "1e-3",
              "--lr_scheduler_type", "cosine", "--warmup_steps", "2", "--no_merge_lora"]
    curves = {}
    for every in (1, 3):
        out = str(tmp_path / f"log{every}")
        result = run_train_cli(*common, "--output_dir", out, "--logging_steps", str(every),
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert result.returncode == 0, result.stderr[-2000:]
        curves[every] = demo.read_curves(out)
    lrs = dict(curves[1]["lr"])
    total = max(lrs)
    assert total == 12  # 2 epochs x (6 forget + 6 retain rows) / 2 per step
    for step, value in lrs.items():  # step k trains at the schedule's value after k - 1 scheduler steps
        done = step - 1
        expected = 1e-3 * (done / 2 if done < 2 else 0.5 * (1 + math.cos(math.pi * (done - 2) / (total - 2))))
        assert value == pytest.approx(expected, rel=1e-5, abs=1e-9), step
    assert lrs[1] == 0.0 and lrs[3] == pytest.approx(1e-3)
    every3 = dict(curves[3]["lr"])
    assert sorted(every3) == [3, 6, 9, 12]
    for step, value in every3.items():
        assert value == pytest.approx(sum(lrs[s] for s in range(step - 2, step + 1)) / 3, rel=1e-5, abs=1e-9)
    assert dict(curves[3]["epoch"]) == {step: dict(curves[1]["epoch"])[step] for step in every3}


@pytest.mark.slow
def test_lora_target_modules_and_trackers(tmp_path, tiny_model_dir):
    import yaml
    from safetensors.torch import load_file

    data = make_unlearning_data(tmp_path / "data", n_docs=2)
    out = str(tmp_path / "out")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = run_train_cli("--model_name_or_path", tiny_model_dir, "--data_dir", data, "--output_dir", out,
                           "--num_train_epochs", "1", "--lora_target_modules", "q_proj,v_proj", "--no_merge_lora",
                           "--report_to", "none", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    names = load_file(os.path.join(out, "adapter", "adapter_model.safetensors")).keys()
    assert names and {name.split(".")[-3] for name in names} == {"q_proj", "v_proj"}
    assert yaml.safe_load(open(os.path.join(out, "adapter", "adapter_config.json")))["target_modules"] \
        in (["q_proj", "v_proj"], ["v_proj", "q_proj"])
    for extra, message in ((["--lora_target_modules", "qkv_proj"], "--lora_target_modules: qkv_proj not a module"),
                           (["--report_to", "tensorbord"], "--report_to tensorbord: expected none, all, or"),
                           (["--logging_steps", "0"], "--logging_steps >= 1"),
                           (["--lr_scheduler_type", "cosine_warm"], "--lr_scheduler_type cosine_warm: expected")):
        bad = run_train_cli("--model_name_or_path", tiny_model_dir, "--data_dir", data, "--output_dir",
                            str(tmp_path / "bad"), *extra, env=env)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-1000:]
        assert not (tmp_path / "bad").exists()


def test_a_tracker_whose_package_is_missing_is_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    model_args, data_args, train_args = (train.ModelArguments(model_name_or_path="m"), train.DataArguments(),
                                         train.TrainArguments(output_dir="o", report_to="tensorboard,wandb"))
    with pytest.raises(train.InputError, match="--report_to wandb: the wandb package is not installed"):
        train.check_arguments(model_args, data_args, train_args)


def test_trust_remote_code_reaches_from_pretrained(monkeypatch, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import modeling

    seen = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        real = cls.from_pretrained
        monkeypatch.setattr(cls, "from_pretrained", lambda *a, real=real, **k: seen.append(
            k.get("trust_remote_code")) or real(*a, **k))
    modeling.load_for_inference(tiny_model_dir, trust_remote_code=True)
    modeling.load_for_inference(tiny_model_dir)
    assert seen == [True, True, False, False]


# --- end to end through accelerate launch ---------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(num_processes, *args):
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    mode = ["--num_processes", "1", "--cpu"] if num_processes == 1 else \
        ["--multi_gpu", "--num_processes", str(num_processes), "--main_process_port", str(free_port())]
    command = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--mixed_precision", "no",
               "--num_machines", "1", "--dynamo_backend", "no", os.path.join(ROOT, "train.py"), *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_batch_log(out_dir):
    entries = []
    for name in sorted(os.listdir(os.path.join(out_dir, "batch_log"))):
        rank = int(name[len("rank"):-len(".jsonl")])
        with open(os.path.join(out_dir, "batch_log", name)) as f:
            entries += [dict(json.loads(line), rank=rank) for line in f]
    return entries


@pytest.mark.slow
@pytest.mark.parametrize("num_processes", [1, 2])
def test_launch_end_to_end(tmp_path, tiny_model_dir, num_processes):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = make_unlearning_data(tmp_path / "data", n_docs=4)  # 8 forget rows, 8 retain rows
    out = str(tmp_path / "out")
    launch(num_processes, os.path.join(ROOT, "configs", "paper.yaml"), "--model_name_or_path", tiny_model_dir,
           "--data_dir", data, "--output_dir", out, "--augment", "none", "--per_device_train_batch_size", "2",
           "--gradient_accumulation_steps", str(2 // num_processes), "--num_train_epochs", "2", "--batch_log")

    # one kind per step on every process; processes read disjoint rows; each epoch covers every row once
    entries = read_batch_log(out)
    assert {e["rank"] for e in entries} == set(range(num_processes))
    steps = {}
    for e in entries:
        steps.setdefault(e["step"], []).append(e)
    assert len(steps) == 2 * (8 // 4 + 8 // 4)  # epochs x (forget steps + retain steps), 4 rows per step
    for step_entries in steps.values():
        assert len({e["kind"] for e in step_entries}) == 1
        ids = [i for e in step_entries for i in e["ids"]]
        assert len(ids) == len(set(ids)) == 4
        if num_processes == 2:
            rank_ids = [{i for e in step_entries if e["rank"] == r for i in e["ids"]} for r in range(2)]
            assert rank_ids[0] and rank_ids[1] and not rank_ids[0] & rank_ids[1]
    first_epoch = [i for s in sorted(steps)[:4] for e in steps[s] for i in e["ids"]]
    all_ids = {r.id for split in ("forget", "retain") for r in load_records(os.path.join(data, f"{split}.jsonl"))}
    assert sorted(first_epoch) == sorted(all_ids)

    # the outputs load both ways and agree
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), os.path.join(out, "adapter")).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        assert not torch.allclose(base(ids).logits, merged(ids).logits, atol=1e-6)  # training changed the model
    summary = __import__("yaml").safe_load(open(os.path.join(out, "train_config.yaml")))
    assert summary["result"]["num_processes"] == num_processes and summary["result"]["skipped_steps"] == 0
    assert os.listdir(os.path.join(out, "runs"))  # TensorBoard events
    assert not [n for n in os.listdir(out) if n.startswith(".incomplete")]


# --- behaviour: memorise, then unlearn ------------------------------------------------------------------------------

def mean_answer_nll(model_dir, data_file):
    from transformers import AutoModelForCausalLM

    from modeling import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    batch = pad_batch([encode_example(tokenizer, r.input, r.output, 512) for r in load_records(data_file)],
                      tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return per_sequence_nll(logits, batch["labels"]).mean().item()


def test_unlearning_behaviour(tmp_path, tiny_model_dir):
    """Memorise 16 forget + 16 retain rows, then unlearn with the paper's recipe (configs/paper.yaml via unlearn()).

    The only change to the preset is the learning rate: a hidden-64 random model with LoRA r=8 needs a 10x larger
    step than a 7B model to move within 5 short epochs (at 1e-4 the forget NLL moves by ~2%).
    """
    data = make_unlearning_data(tmp_path / "data", n_docs=8)
    forget_file, retain_file = os.path.join(data, "forget.jsonl"), os.path.join(data, "retain.jsonl")
    target = str(tmp_path / "target")
    reset_accelerate()
    train.main(["--model_name_or_path", tiny_model_dir, "--data_dir", data, "--output_dir", target,
                "--forget_loss", "ntp", "--lora_r", "0", "--learning_rate", "3e-3", "--num_train_epochs", "40",
                "--warmup_ratio", "0", "--report_to", "none"])
    forget_before, retain_before = mean_answer_nll(target, forget_file), mean_answer_nll(target, retain_file)
    assert forget_before < 0.8 and retain_before < 0.8  # memorised (random model: ~6)

    reset_accelerate()
    data_copy_before = {name: open(os.path.join(data, name)).read() for name in os.listdir(data)}
    summary = train.unlearn(target, str(tmp_path / "unlearned"), data, data, learning_rate=1e-3, report_to="none")
    forget_after = mean_answer_nll(str(tmp_path / "unlearned"), forget_file)
    retain_after = mean_answer_nll(str(tmp_path / "unlearned"), retain_file)
    assert forget_after >= 2 * forget_before, (forget_before, forget_after)
    assert retain_after <= 1.25 * retain_before, (retain_before, retain_after)
    assert summary["examples_per_kind"]["forget"] > 16  # segments augmentation added rows
    assert {name: open(os.path.join(data, name)).read() for name in os.listdir(data)} == data_copy_before


def test_an_unreachable_hub_is_one_line_with_what_to_do(monkeypatch, tmp_path):
    """A hub id, no cache, no network: the error comes at once and names HF_HUB_OFFLINE, hf download and a local dir;
    with HF_HUB_OFFLINE=1, or for a local dir, no connection is tried."""
    import socket

    from huggingface_hub import constants

    import modeling

    tries = []

    def no_network(address, timeout=None):
        tries.append(address)
        raise OSError("no route to host")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(train.InputError, match="is unreachable .*hf download someone/some-model.*HF_HUB_OFFLINE=1"):
        modeling.load_tokenizer("someone/some-model")
    assert len(tries) == 1
    modeling.check_hub_reachable(str(tmp_path))  # a local dir
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    modeling.check_hub_reachable("someone/some-model")
    assert len(tries) == 1


@pytest.mark.slow
def test_dataset_name_from_a_local_dataset_dir_trains_like_the_same_rows_in_files(tmp_path, tiny_model_dir):
    """--dataset_name DIR (DatasetDict.save_to_disk, split names as the LUME Hub release's) gives the adapter the
    same rows as JSONL files give; its rows get the same checks, with one-line errors."""
    import datasets
    from safetensors.torch import load_file

    import evaluate

    data = make_unlearning_data(tmp_path / "data", n_docs=2)
    splits = {f"{split}_train": datasets.Dataset.from_list(
        [{"id": r.id, "input": r.input, "output": r.output, "task": r.task}
         for r in load_records(os.path.join(data, f"{split}.jsonl"))]) for split in ("forget", "retain")}
    dataset_dir = str(tmp_path / "lume")
    datasets.DatasetDict(splits).save_to_disk(dataset_dir)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = ["--model_name_or_path", tiny_model_dir, "--num_train_epochs", "1", "--no_merge_lora",
              "--report_to", "none"]
    from_files = run_train_cli(*common, "--data_dir", data, "--output_dir", str(tmp_path / "files"), env=env)
    assert from_files.returncode == 0, from_files.stderr[-2000:]
    split_flags = ["--forget_split", "forget_train", "--retain_split", "retain_train"]
    from_dataset = run_train_cli(*common, "--dataset_name", dataset_dir, *split_flags,
                                 "--output_dir", str(tmp_path / "dataset"), env=env)
    assert from_dataset.returncode == 0, from_dataset.stderr[-2000:]
    assert f"--dataset_name {dataset_dir} --forget_split forget_train" in from_dataset.stdout  # the next command
    a = load_file(str(tmp_path / "files" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "dataset" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    results = evaluate.main(["--model_name_or_path", tiny_model_dir, "--dataset_name", dataset_dir, *split_flags,
                             "--max_new_tokens", "4", "--torch_dtype", "float32",
                             "--output_dir", str(tmp_path / "eval")])
    assert results["forget-set"]["overall-regurgitation-score"] is not None

    bad_dir = str(tmp_path / "bad")
    rows = splits["forget_train"].to_list()
    del rows[1]["task"]
    datasets.DatasetDict({"forget": datasets.Dataset.from_list(rows[1:] + rows[:1]),
                          "retain": splits["retain_train"]}).save_to_disk(bad_dir)
    for flags, message in ((["--dataset_name", dataset_dir], f"--dataset_name {dataset_dir}: no split 'forget' "
                                                             f"(it has forget_train, retain_train)"),
                           (["--dataset_name", bad_dir], f"{bad_dir}[forget]:1: missing field 'task'"),
                           (["--dataset_name", str(tmp_path / "data")], "not a dataset saved with save_to_disk"),
                           (["--dataset_name", dataset_dir, "--data_dir", data], "give one of them")):
        bad = run_train_cli(*common, *flags, "--output_dir", str(tmp_path / "refused"), env=env)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-1500:]
        assert not (tmp_path / "refused").exists()
