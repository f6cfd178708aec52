#!/bin/bash
# Run train.py on this node of a SLURM job through `accelerate launch`. The sbatch scripts call it: the one-node
# script directly, the multi-node script through srun, once per node (one task per node: SLURM_PROCID is the node's
# rank). DRY_RUN=1 prints the command instead of running it (tests/test_slurm.py checks it).
#
#   slurm/launch_command.sh [train.py arguments...]
#
# Environment: ACCELERATE_CONFIG (a file in accelerate_configs/, default multi_gpu.yaml), GPUS_PER_NODE (default
# SLURM_GPUS_ON_NODE, else 1), MIXED_PRECISION (default bf16; DeepSpeed configs take it only from here),
# MAIN_PROCESS_PORT (default 29500 + job id % 1000, so two jobs sharing a node do not collide).
# From SLURM: SLURM_JOB_NODELIST, SLURM_NNODES, SLURM_PROCID, SLURM_JOB_ID.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."  # the repo root: the accelerate configs name ds_configs/ relative to it

nodes=${SLURM_NNODES:-1}
gpus=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
# every node must name the same main process: the first host of the allocation
hosts=($(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}"))
port=${MAIN_PROCESS_PORT:-$((29500 + ${SLURM_JOB_ID:-0} % 1000))}

cmd=(accelerate launch --config_file "${ACCELERATE_CONFIG:-accelerate_configs/multi_gpu.yaml}"
     --num_machines "$nodes" --num_processes $((nodes * gpus)) --machine_rank "${SLURM_PROCID:-0}"
     --main_process_ip "${hosts[0]}" --main_process_port "$port" --mixed_precision "${MIXED_PRECISION:-bf16}"
     train.py "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
    printf -v line '%q ' "${cmd[@]}"
    echo "${line% }"
    exit 0
fi
exec "${cmd[@]}"
