"""Scale unchanged: the same train.py, chosen accelerate config file, same result.

On CPU with a tiny model and a fixed seed, the final LoRA adapter is the same (max abs diff < 1e-4, float32) after
1 process (accelerate_configs/cpu.yaml), 2-process DDP over gloo (multi_gpu.yaml) and DeepSpeed ZeRO-2 / ZeRO-3 with
2 processes (deepspeed_zero2.yaml / deepspeed_zero3.yaml), the global batch held equal: 1 process x 2 accumulation
steps = 2 processes x 1. LoRA dropout is 0 here: dropout masks come from each process's own RNG stream, so with
dropout the runs differ by construction (not a bug). Also: DeepSpeed's "auto" fields are all filled from the flags,
a non-finite loss never reaches the weights (plain and DeepSpeed), an 8-bit or 4-bit base trains with LoRA on CPU,
and the combinations that cannot work are refused before anything loads.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml

import train
from cli import run_main
from conftest import ROOT, make_unlearning_data, reset_accelerate

pytestmark = pytest.mark.slow  # subprocess launches: DDP, ZeRO, DeepSpeed

# lr 1e-2 and no warmup so the adapter moves far beyond the tolerance; clipping at 0.5 is active (the LoRA gradient
# norm of this model starts near 1), so DeepSpeed must clip at --max_grad_norm, not its own default of 1.0
TRAIN_ARGS = ["--augment", "none", "--per_device_train_batch_size", "2", "--num_train_epochs", "2",
              "--learning_rate", "1e-2", "--warmup_ratio", "0", "--max_grad_norm", "0.5", "--lora_dropout", "0",
              "--seed", "3", "--report_to", "none"]
TOLERANCE = 1e-4


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config, num_processes, *args, script=os.path.join(ROOT, "train.py")):
    """accelerate launch with a config file from accelerate_configs/, on CPU."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if "deepspeed" in config:
        # DeepSpeed runs on CPU (gloo) as long as accelerate is not forced onto CPU: with ACCELERATE_USE_CPU=true it
        # silently drops DeepSpeed and runs plain DDP
        env.pop("ACCELERATE_USE_CPU", None)
    else:
        env["ACCELERATE_USE_CPU"] = "true"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               os.path.join(ROOT, "accelerate_configs", config), "--num_processes", str(num_processes),
               "--main_process_port", str(free_port()), "--mixed_precision", "no", script, *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def load_adapter(out):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))


def max_diff(a, b):
    assert sorted(a) == sorted(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """1 process x 2 accumulation steps: the adapter every other configuration must reproduce."""
    root = tmp_path_factory.mktemp("scaling")
    data = make_unlearning_data(root / "data", n_docs=4)  # 8 forget + 8 retain rows: 4 steps of 4 rows per epoch
    args = ["--model_name_or_path", tiny_model_dir, "--data_dir", data, *TRAIN_ARGS]
    out = str(root / "one_process")
    launch("cpu.yaml", 1, *args, "--output_dir", out, "--gradient_accumulation_steps", "2")
    return root, args, out


@pytest.mark.parametrize("config,distributed_type,zero_stage", [
    ("multi_gpu.yaml", "MULTI_CPU", None),
    ("deepspeed_zero2.yaml", "DEEPSPEED", 2),
    ("deepspeed_zero3.yaml", "DEEPSPEED", 3),
])
def test_same_adapter_whatever_the_config(reference, tiny_model_dir, config, distributed_type, zero_stage):
    root, args, reference_out = reference
    out = str(root / config.replace(".yaml", ""))
    launch(config, 2, *args, "--output_dir", out, "--gradient_accumulation_steps", "1")
    with open(os.path.join(out, train.TRAIN_RECORD)) as f:
        saved = yaml.safe_load(f)
    assert saved["launch"] == {"distributed_type": distributed_type, "num_processes": 2, "mixed_precision": "no",
                               "zero_stage": zero_stage}  # it really ran that way
    expected, adapter = load_adapter(reference_out), load_adapter(out)
    assert max(t.abs().max().item() for k, t in expected.items() if "lora_B" in k) > 100 * TOLERANCE  # it trained
    assert all(t.dtype == torch.float32 for t in adapter.values())
    assert max_diff(expected, adapter) < TOLERANCE
    if zero_stage == 3:
        # the merged model too: built from the gathered adapter, not from ZeRO-3's sharded live weights
        from safetensors.torch import load_file

        merged = load_file(os.path.join(out, "model.safetensors"))
        assert max_diff(load_file(os.path.join(reference_out, "model.safetensors")), merged) < TOLERANCE


PROBE = """
import json, os, sys, types
sys.path.insert(0, {root!r})
import torch
import train
from accelerate.state import AcceleratorState
from cli import InputError

def resolved(ds_file, **flags):
    os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = ds_file
    AcceleratorState._reset_state(True)
    accelerator = train.make_accelerator(train.TrainArguments(output_dir="unused", report_to="none", **flags))
    model = torch.nn.Linear(8, 8)
    model.config = types.SimpleNamespace(hidden_size=8)  # for the hidden-size based bucket sizes
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    return accelerator.deepspeed_config

config = resolved("ds_configs/zero3.json", per_device_train_batch_size=3, gradient_accumulation_steps=4,
                  max_grad_norm=0.5)
print(json.dumps(config, default=str))
with open({mismatch!r}, "w") as f:
    json.dump(dict(json.load(open(os.path.join({root!r}, "ds_configs", "zero2.json"))), gradient_clipping=2.0), f)
try:
    resolved({mismatch!r})
except InputError as error:
    print(error)
"""


def test_deepspeed_auto_fields_filled_from_the_flags(tmp_path):
    """Every "auto" in ds_configs/ resolves: batch, accumulation, clipping from train.py's flags, precision from
    --mixed_precision (here bf16), the rest by accelerate; a fixed value that contradicts a flag is refused."""
    auto = {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping", "train_batch_size"}
    for name in os.listdir(os.path.join(ROOT, "ds_configs")):
        with open(os.path.join(ROOT, "ds_configs", name)) as f:
            config = json.load(f)
        assert {k for k, v in config.items() if v == "auto"} == auto, name
        assert config["bf16"] == config["fp16"] == {"enabled": "auto"}, name

    script = tmp_path / "probe.py"
    script.write_text(PROBE.format(root=ROOT, mismatch=str(tmp_path / "mismatch.json")))
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_MIXED_PRECISION="bf16",
               RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env.pop("ACCELERATE_USE_CPU", None)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                            cwd=str(tmp_path), timeout=300)  # not the repo root: the JSON path still resolves
    assert result.returncode == 0, result.stderr[-3000:]
    resolved, message = result.stdout.strip().splitlines()[-2:]
    assert "auto" not in resolved
    config = json.loads(resolved)
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"], config["gradient_clipping"]) == (3, 4, 12, 0.5)
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
    assert message == ('the DeepSpeed config sets gradient_clipping=2.0 but --max_grad_norm is 1.0: set it to "auto" '
                       'in the JSON (the flag decides) or pass --max_grad_norm 2.0')


# --- a non-finite loss ---------------------------------------------------------------------------------------------

# train.py with its loss made NaN on the N-th batch: what a diverging GI step or a bad row looks like to the loop
NAN_TRAIN = """import sys
sys.path.insert(0, {root!r})
import train
real_batch_loss, calls = train.batch_loss, [0]
def batch_loss(*args, **kwargs):
    calls[0] += 1
    loss, nll = real_batch_loss(*args, **kwargs)
    return (loss * float("nan"), nll) if calls[0] == {nan_call} else (loss, nll)
train.batch_loss = batch_loss
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("config", ["cpu.yaml", "deepspeed_zero2.yaml"])
def test_non_finite_loss_skips_the_step_and_never_reaches_the_weights(tmp_path, tiny_model_dir, config):
    """Step 2 of 2 gets a NaN loss: it is counted as skipped and the adapter equals that of a 1-step run (warmup 0,
    so step 1 has the same learning rate in both). Under DeepSpeed, which steps the optimizer inside backward, too."""
    data = make_unlearning_data(tmp_path / "data", n_docs=2)
    script = tmp_path / "nan_train.py"
    script.write_text(NAN_TRAIN.format(root=ROOT, nan_call=2))
    args = ["--model_name_or_path", tiny_model_dir, "--data_dir", data, *TRAIN_ARGS, "--merge_lora", "false"]
    skipped, one_step = str(tmp_path / "skipped"), str(tmp_path / "one_step")
    launch(config, 1, *args, "--max_steps", "2", "--output_dir", skipped, script=str(script))
    launch(config, 1, *args, "--max_steps", "1", "--output_dir", one_step)
    with open(os.path.join(skipped, train.TRAIN_RECORD)) as f:
        result = yaml.safe_load(f)["result"]
    assert result["optimizer_steps"] == 2 and result["skipped_steps"] == 1
    adapter = load_adapter(skipped)
    assert all(torch.isfinite(t).all() for t in adapter.values())
    assert max(t.abs().max().item() for k, t in adapter.items() if "lora_B" in k) > 1e-3  # step 1 did train
    assert max_diff(adapter, load_adapter(one_step)) < 1e-7


# --- quantized base -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("quantization", ["--load_in_8bit", "--load_in_4bit"])
def test_quantized_lora_trains_on_cpu_and_merges_into_full_precision(tmp_path, tiny_model_dir, quantization):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = make_unlearning_data(tmp_path / "data", n_docs=2)
    out = str(tmp_path / "out")
    reset_accelerate()
    assert train.main(["--model_name_or_path", tiny_model_dir, "--data_dir", data, "--output_dir", out,
                       quantization, *TRAIN_ARGS, "--num_train_epochs", "1"]) == 0
    with open(os.path.join(out, train.TRAIN_RECORD)) as f:
        result = yaml.safe_load(f)["result"]
    assert result["optimizer_steps"] == result["planned_steps"] == 4 and result["skipped_steps"] == 0
    adapter = load_adapter(out)
    assert max(t.abs().max().item() for k, t in adapter.items() if "lora_B" in k) > 1e-3  # gradients reached LoRA

    # the merged model is the full-precision base + adapter (not merged into quantized weights), and loads as such
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert getattr(merged.config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, os.path.join(out, "adapter")).eval()
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)
        assert not torch.allclose(merged(ids).logits, base_logits, atol=1e-3)


ZERO3 = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds_configs/zero3.json"}


@pytest.mark.parametrize("flags,env,message", [
    (["--load_in_8bit", "--load_in_4bit"], {}, "--load_in_8bit and --load_in_4bit: choose one"),
    (["--load_in_8bit", "--lora_r", "0"], {}, "needs LoRA (quantized weights cannot be trained)"),
    (["--load_in_8bit"], ZERO3, "--load_in_8bit with DeepSpeed ZeRO-3: ZeRO-3 shards every weight and cannot shard "
                                "bitsandbytes' quantized ones; use ZeRO-2 (accelerate_configs/deepspeed_zero2.yaml) "
                                "or DDP (multi_gpu.yaml)"),
])
def test_quantization_refused_before_anything_loads(tmp_path, monkeypatch, capsys, tiny_model_dir, flags, env,
                                                    message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # the relative DeepSpeed JSON path is still found (next to train.py)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: train.main(["--model_name_or_path", tiny_model_dir, "--data_dir", str(tmp_path),
                                     "--output_dir", str(out), *flags]))
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: ") and message in stderr and stderr.count("\n") == 1
    assert not out.exists()


def test_8bit_allowed_with_zero2(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "ds_configs/zero2.json")
    args = train.ModelArguments(model_name_or_path="m", load_in_8bit=True), train.DataArguments(), \
        train.TrainArguments(output_dir="o")
    train.check_arguments(*args)  # no error: ZeRO-2 leaves the (quantized) weights whole on every GPU
