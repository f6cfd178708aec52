# What both sbatch scripts do around their launch; sourced from the repo root (the submit dir) by
# slurm/unlearn_1node.sbatch and slurm/unlearn_multinode.sbatch, which differ only in how they start the launch.
#
#   train_arguments "$@"      sets output_dir and train_args: the job's train.py arguments, with a run name per job
#                             and --resume_from_checkpoint latest when an earlier run of this job left a checkpoint
#   run_until_stopped shield|forward CMD...
#                             runs CMD in its own process group; SLURM's USR1 (near the time limit) or TERM
#                             (preemption) is passed on to it as USR1, so train.py checkpoints and exits 75; sets
#                             status. shield: CMD starts with TERM and USR1 ignored (accelerate's one-process
#                             launcher then leaves them to train.py, which sets its own handlers); forward: CMD keeps
#                             them (srun forwards USR1 to every node)
#   requeue_or_exit           requeues the job when train.py stopped for a checkpoint, else exits with its status

job=${SLURM_JOB_ID:-0}
# the artefact names, from their one place
read -r train_record checkpoint_state checkpoints_dir < <(
    python3 -c 'import artefacts as a; print(a.TRAIN_RECORD, a.CHECKPOINT_STATE, a.CHECKPOINTS_DIR)')
# accelerate's multi-process launcher (torch elastic) forwards these signals to train.py, then waits this long for
# it to checkpoint and exit before killing it (default 30 s)
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}

train_arguments() {
    # --output_dir from the command line: resume from its checkpoints, and know whether the run finished
    output_dir=""
    local previous="" arg
    for arg in "$@"; do
        [ "$previous" = --output_dir ] && output_dir=$arg
        case $arg in --output_dir=*) output_dir=${arg#--output_dir=} ;; esac
        previous=$arg
    done
    [ -n "$output_dir" ] || { echo "error: pass --output_dir on the command line" >&2; exit 2; }
    # one TensorBoard run per job (a requeued job keeps its id, so it continues the same run)
    local extra=(--run_name "${SLURM_JOB_NAME:-unlearn}-$job")
    # a finished checkpoint (train.py writes its state file last) means an earlier run of this job was stopped
    if compgen -G "$output_dir/$checkpoints_dir/step-*/$checkpoint_state" > /dev/null; then
        extra+=(--resume_from_checkpoint latest)
    fi
    # a YAML config must stay the first argument of train.py
    if [[ "${1:-}" == *.yaml || "${1:-}" == *.yml ]]; then
        train_args=("$1" "${extra[@]}" "${@:2}")
    else
        train_args=("${extra[@]}" "$@")
    fi
}

stopping=0
stop_training() {
    stopping=1
    echo "$(date '+%F %T') job $job: $1 received, asking train.py to checkpoint and stop"
    kill -USR1 -- "-$launch_pid" 2> /dev/null
}

run_until_stopped() {
    # Stop signals: SLURM sends USR1 to this shell 120 s before the time limit (--signal) and TERM on preemption.
    # The launch runs in its own process group, which gets USR1: accelerate's launcher (or srun, which would turn
    # TERM into KILL) forwards it to every train.py process; with one process, train.py gets it directly.
    local how=$1
    shift
    set -m
    trap 'stop_training USR1' USR1
    trap 'stop_training TERM' TERM
    if [ "$how" = shield ]; then
        (trap '' TERM USR1; exec "$@") &
    else
        "$@" &
    fi
    launch_pid=$!
    wait "$launch_pid"
    status=$?
    while [ "$stopping" = 1 ] && kill -0 "$launch_pid" 2> /dev/null; do  # a trap interrupts wait: wait for the exit
        wait "$launch_pid"
        status=$?
    done
}

requeue_or_exit() {
    # 75 = train.py saved a preemption checkpoint. accelerate launch reports any failure of its processes as 1, so a
    # stop we asked for also counts when the run did not finish (train.py writes its record last).
    if [ "$status" = 75 ] || { [ "$stopping" = 1 ] && [ ! -f "$output_dir/$train_record" ]; }; then
        if [ "${SLURM_RESTART_COUNT:-0}" -lt "${MAX_REQUEUES:-20}" ]; then
            echo "$(date '+%F %T') job $job: requeued (exit status $status); it resumes from the last checkpoint"
            scontrol requeue "$job"
            exit 0
        fi
        echo "job $job: not requeued: already restarted ${SLURM_RESTART_COUNT} times (MAX_REQUEUES)" >&2
    fi
    exit "$status"
}
