"""slurm/: the accelerate launch command each node runs, resuming, and requeueing after a stop, with a fake SLURM.

Fake `scontrol` (hostnames; requeue is logged) and `srun` (runs its command once per node with SLURM_PROCID set, as
srun does with one task per node) go first on PATH; DRY_RUN=1 makes slurm/launch_command.sh print the command.
"""

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from conftest import ROOT

SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$FAKE_SLURM_LOG"
if [ "$1 $2" = "show hostnames" ]; then printf 'gpu07\\ngpu08\\n'; fi
"""
SRUN = """#!/bin/bash
echo "srun $*" >> "$FAKE_SLURM_LOG"
while [[ "$1" == -* ]]; do shift; done
for ((rank = 0; rank < SLURM_NNODES; rank++)); do SLURM_PROCID=$rank "$@" || exit $?; done
"""
# stands in for accelerate + train.py: waits for a stop signal, "checkpoints", and fails as accelerate launch does
FAKE_TRAINING = f"""#!{sys.executable}
import os, signal, sys, time
stop = []
signal.signal(signal.SIGUSR1, lambda *_: stop.append(1))
open(os.environ["FAKE_STARTED"], "w").close()
while not stop:
    time.sleep(0.05)
open(os.environ["FAKE_STARTED"], "a").write("stopped")
sys.exit(1)
"""


def write_script(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def slurm(tmp_path):
    """Environment of a 2-node job (4242) with fake SLURM commands; returns (env, log path)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_script(bin_dir / "scontrol", SCONTROL)
    write_script(bin_dir / "srun", SRUN)
    log = tmp_path / "slurm.log"
    log.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "ACCELERATE_", "DRY_RUN"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE_SLURM_LOG=str(log), DRY_RUN="1",
               SLURM_JOB_ID="4242", SLURM_JOB_NAME="unlearn", SLURM_JOB_NODELIST="gpu[07-08]", SLURM_NNODES="2",
               SLURM_PROCID="0", SLURM_GPUS_ON_NODE="8", SLURM_CPUS_PER_TASK="32", SLURM_SUBMIT_DIR=ROOT)
    return env, log


def run(script, args, env, **kwargs):
    return subprocess.run(["bash", os.path.join(ROOT, "slurm", script), *args], capture_output=True, text=True,
                          env=env, cwd=kwargs.pop("cwd", ROOT), timeout=60, **kwargs)


TRAIN_ARGS = ["configs/paper.yaml", "--model_name_or_path", "allenai/OLMo-7B-0724-Instruct-hf", "--output_dir"]


def test_launch_command_of_the_second_node(slurm, tmp_path):
    env, log = slurm
    env["SLURM_PROCID"] = "1"
    result = run("launch_command.sh", ["configs/paper.yaml", "--output_dir", "out dir"], env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "accelerate launch --config_file accelerate_configs/multi_gpu.yaml --num_machines 2 --num_processes 16 "
        "--machine_rank 1 --main_process_ip gpu07 --main_process_port 29742 --mixed_precision bf16 "
        "train.py configs/paper.yaml --output_dir out\\ dir\n")
    assert log.read_text() == "scontrol show hostnames gpu[07-08]\n"


def test_multinode_sbatch(slurm, tmp_path):
    env, log = slurm
    out = str(tmp_path / "out")
    result = run("unlearn_multinode.sbatch", TRAIN_ARGS + [out, "--learning_rate", "5e-5"], env)
    assert result.returncode == 0, result.stderr
    train_args = (f"train.py configs/paper.yaml --run_name unlearn-4242 --model_name_or_path "
                  f"allenai/OLMo-7B-0724-Instruct-hf --output_dir {out} --learning_rate 5e-5")
    assert result.stdout.splitlines() == [
        f"accelerate launch --config_file accelerate_configs/multi_node.yaml --num_machines 2 --num_processes 16 "
        f"--machine_rank {rank} --main_process_ip gpu07 --main_process_port 29742 --mixed_precision bf16 {train_args}"
        for rank in (0, 1)]
    assert log.read_text().splitlines()[0] == (
        "srun --nodes=2 --ntasks-per-node=1 --cpus-per-task=32 --kill-on-bad-exit=1 bash slurm/launch_command.sh "
        + train_args[len("train.py "):])


@pytest.mark.parametrize("gpus,extra_env,config,precision", [
    ("4", {}, "multi_gpu.yaml", "bf16"),
    ("1", {}, "single_gpu.yaml", "bf16"),
    ("8", {"ACCELERATE_CONFIG": "accelerate_configs/deepspeed_zero3.yaml", "MIXED_PRECISION": "fp16"},
     "deepspeed_zero3.yaml", "fp16"),
])
def test_1node_sbatch(slurm, tmp_path, gpus, extra_env, config, precision):
    env, _ = slurm
    env.update(SLURM_NNODES="1", SLURM_JOB_NODELIST="gpu07", SLURM_GPUS_ON_NODE=gpus, **extra_env)
    out = str(tmp_path / "out")
    result = run("unlearn_1node.sbatch", ["--output_dir", out], env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"accelerate launch --config_file accelerate_configs/{config} --num_machines 1 --num_processes {gpus} "
        f"--machine_rank 0 --main_process_ip gpu07 --main_process_port 29742 --mixed_precision {precision} "
        f"train.py --run_name unlearn-4242 --output_dir {out}\n")


def test_resumes_only_from_a_finished_checkpoint(slurm, tmp_path):
    env, _ = slurm
    out = tmp_path / "out"
    (out / "checkpoints" / "step-8").mkdir(parents=True)  # unfinished: no trainer_state.json yet
    result = run("unlearn_multinode.sbatch", TRAIN_ARGS + [str(out)], env)
    assert "--resume_from_checkpoint" not in result.stdout
    (out / "checkpoints" / "step-8" / "trainer_state.json").write_text("{}")
    result = run("unlearn_multinode.sbatch", TRAIN_ARGS + [f"--output_dir={out}"], env)
    assert result.stdout.count("train.py configs/paper.yaml --run_name unlearn-4242 --resume_from_checkpoint latest "
                               "--model_name_or_path") == 2


def test_needs_output_dir(slurm):
    env, _ = slurm
    result = run("unlearn_1node.sbatch", ["configs/paper.yaml"], env)
    assert result.returncode == 2 and "pass --output_dir on the command line" in result.stderr
    assert not result.stdout


@pytest.mark.parametrize("exit_code,requeued", [(75, True), (0, False), (1, False)])
def test_requeue_on_exit_75(slurm, tmp_path, exit_code, requeued):
    env, log = slurm
    write_script(tmp_path / "bin" / "accelerate", f"#!/bin/bash\nexit {exit_code}\n")
    env.pop("DRY_RUN")
    result = run("unlearn_1node.sbatch", ["--output_dir", str(tmp_path / "out")], env)
    assert ("scontrol requeue 4242" in log.read_text()) == requeued
    assert result.returncode == (0 if requeued else exit_code)


def test_stop_signal_checkpoints_then_requeues(slurm, tmp_path):
    """SLURM's USR1 before the time limit reaches the training process; the job requeues itself when it stops."""
    env, log = slurm
    write_script(tmp_path / "bin" / "accelerate", FAKE_TRAINING)
    started = tmp_path / "started"
    env.pop("DRY_RUN")
    env.update(SLURM_NNODES="1", FAKE_STARTED=str(started))
    job = subprocess.Popen(["bash", os.path.join(ROOT, "slurm", "unlearn_1node.sbatch"), "--output_dir",
                            str(tmp_path / "out")], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    deadline = time.time() + 30
    while not started.exists() and time.time() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 sends to the batch shell
    stdout, stderr = job.communicate(timeout=30)
    assert started.read_text() == "stopped"  # the training process got the signal
    assert "USR1 received, asking train.py to checkpoint and stop" in stdout
    assert "scontrol requeue 4242" in log.read_text() and job.returncode == 0, stderr
