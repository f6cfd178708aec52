"""Runs that survive: SIGKILL at any point + resume, SIGTERM preemption, Ctrl-C, and the time budget."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

import train
from conftest import ROOT, make_unlearning_data

pytestmark = pytest.mark.slow  # subprocess runs killed and resumed

ENV = dict(os.environ, OMP_NUM_THREADS="1")


def train_command(model_dir, data_dir, out_dir, *extra):
    # dropout on, so resuming must also restore the RNG state to match
    return [sys.executable, os.path.join(ROOT, "train.py"), os.path.join(ROOT, "configs", "paper.yaml"),
            "--model_name_or_path", model_dir, "--data_dir", data_dir, "--output_dir", out_dir,
            "--per_device_train_batch_size", "2", "--num_train_epochs", "3", "--learning_rate", "1e-3",
            "--no_merge_lora", "--report_to", "none", *extra]


def adapter_weights(out_dir):
    return load_file(os.path.join(out_dir, "adapter", "adapter_model.safetensors"))


def max_abs_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """The uninterrupted run, without checkpoints."""
    root = tmp_path_factory.mktemp("resume")
    data = make_unlearning_data(root / "data", n_docs=8)
    out = str(root / "reference")
    subprocess.run(train_command(tiny_model_dir, data, out), check=True, env=ENV, capture_output=True, timeout=300)
    return data, adapter_weights(out), yaml.safe_load(open(os.path.join(out, "train_config.yaml")))["result"]


def wait_for_checkpoint(out_dir, process, minimum_step):
    root = os.path.join(out_dir, "checkpoints")
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        steps = [int(n[5:]) for n in os.listdir(root) if n.startswith("step-")] if os.path.isdir(root) else []
        if steps and max(steps) >= minimum_step:
            return max(steps)
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint >= {minimum_step} appeared (exit code {process.poll()})")


def test_sigkill_at_several_points_then_resume(tmp_path, tiny_model_dir, reference):
    data, expected, expected_result = reference
    out = str(tmp_path / "out")
    command = train_command(tiny_model_dir, data, out, "--save_steps", "1", "--save_total_limit", "3")
    resume = ["--resume_from_checkpoint", "latest"]
    for attempt, kill_after in enumerate((3, 9, 17)):
        process = subprocess.Popen(command + (resume if attempt else []), env=ENV, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        wait_for_checkpoint(out, process, kill_after)
        process.send_signal(signal.SIGKILL)  # lands during a step or during the next checkpoint's write
        process.wait()
    # a kill in the middle of a checkpoint write leaves at most a .tmp-step-N dir; fake a worse one too
    os.makedirs(os.path.join(out, "checkpoints", ".tmp-step-999"), exist_ok=True)
    os.makedirs(os.path.join(out, "checkpoints", "step-998"), exist_ok=True)  # no trainer_state.json: unfinished
    assert not os.path.exists(os.path.join(out, "train_config.yaml"))
    # starting over by accident is refused while checkpoints exist
    refused = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--resume_from_checkpoint latest" in refused.stderr
    subprocess.run(command + resume, check=True, env=ENV, capture_output=True, timeout=300)
    result = yaml.safe_load(open(os.path.join(out, "train_config.yaml")))["result"]
    assert result["optimizer_steps"] == expected_result["optimizer_steps"]
    assert result["resumed_from_step"] >= 17
    assert max_abs_diff(adapter_weights(out), expected) < 1e-5


def test_sigterm_checkpoints_and_exits_75_then_resume_completes(tmp_path, tiny_model_dir, reference):
    data, expected, _ = reference
    out = str(tmp_path / "out")
    command = train_command(tiny_model_dir, data, out, "--save_steps", "4")
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(out, process, 4)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == train.PREEMPTED_EXIT_CODE, stderr[-2000:]
    checkpoints = train.list_checkpoints(out)
    assert checkpoints and not os.path.exists(os.path.join(out, "train_config.yaml"))
    subprocess.run(command + ["--resume_from_checkpoint", "latest"], check=True, env=ENV, capture_output=True,
                   timeout=300)
    assert max_abs_diff(adapter_weights(out), expected) < 1e-5


def test_ctrl_c_checkpoints_and_exits_130_then_resume_completes(tmp_path, tiny_model_dir, reference):
    """Ctrl-C as a terminal sends it: SIGINT to the whole process group, with no periodic checkpoints set."""
    data, expected, _ = reference
    out = str(tmp_path / "out")
    command = [c for c in train_command(tiny_model_dir, data, out, "--save_minutes", "0") if c != "none"]
    command[command.index("--report_to"):command.index("--report_to") + 1] = ["--report_to", "tensorboard"]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    deadline = time.time() + 240
    while not os.path.isdir(os.path.join(out, "runs")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)  # the TensorBoard dir appears once the model is loaded, just before the first step
    os.killpg(process.pid, signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == train.INTERRUPTED_EXIT_CODE, output[-2000:]
    assert "Traceback" not in output and "--resume_from_checkpoint latest" in output, output[-2000:]
    assert train.list_checkpoints(out) and not os.path.exists(os.path.join(out, "train_config.yaml"))
    subprocess.run(command + ["--resume_from_checkpoint", "latest"], check=True, env=ENV, capture_output=True,
                   timeout=300)
    assert max_abs_diff(adapter_weights(out), expected) < 1e-5


def test_second_ctrl_c_aborts_at_once_and_handlers_come_back():
    before = signal.getsignal(signal.SIGINT)
    with train.preemption_signals() as request:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert request.received and request.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is before


def test_time_budget_stops_early_and_saves(tmp_path, tiny_model_dir, reference):
    from transformers import AutoModelForCausalLM

    data, _, expected_result = reference
    out = str(tmp_path / "out")
    command = train_command(tiny_model_dir, data, out, "--num_train_epochs", "200", "--max_train_minutes", "0.1")
    subprocess.run([c for c in command if c != "--no_merge_lora"], check=True, env=ENV, capture_output=True,
                   timeout=300)
    result = yaml.safe_load(open(os.path.join(out, "train_config.yaml")))["result"]
    assert result["stopped_early"] and result["optimizer_steps"] < result["planned_steps"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size
