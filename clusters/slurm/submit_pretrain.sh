#!/usr/bin/env bash
# Submit V4 pretraining to Slurm (what `make slurm-pretrain` runs). Prints every sbatch command it submits;
# with DRY=1 it only prints them (no cluster needed).
#
#   CONFIG=flash NODES=32 GPUS=8 TIME=24:00:00 clusters/slurm/submit_pretrain.sh [section.key=value ...]
#
# Settings (environment):
#   CONFIG       config name in pretrain/configs/ or a YAML path                          (required)
#   NODES        number of nodes                                                          [1]
#   GPUS         GPUs (ranks) per node; in DEVICE=cpu mode: processes per node            [8]
#   DEVICE       gpu | cpu  (cpu: no --gpus-per-node, gloo; the local tests use it)       [gpu]
#   TIME         time limit of each job (sbatch --time); empty: the partition's default   []
#   SIGNAL_LEAD  seconds before the time limit at which the trainer checkpoints and exits [600]
#   PARTITION, ACCOUNT, QOS   passed to sbatch when set
#   RUN_DIR      run.dir (checkpoints, metrics, logs); must be on a shared filesystem    [runs/<config name>]
#   CHAIN        number of jobs to chain with --dependency=afterany (multi-week runs)     [1]
#   REQUEUE      1: a job requeues itself after its pre-deadline checkpoint (runs until
#                train.steps is done); 0: --no-requeue, the next job of the CHAIN resumes [1]
#   SBATCH_EXTRA extra sbatch options (word-split), e.g. "--reservation=big --exclude=gpu[001-002]"
#   DRY          1: print the commands only
# Positional arguments are config overrides passed to `python -m pretrain` (`section.key=value`).
set -euo pipefail
# shellcheck source=../lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

config=$(resolve_config "${CONFIG:-}")
config_name=$(basename "${config%.yaml}")
nodes=${NODES:-1}
gpus=${GPUS:-8}
device=${DEVICE:-gpu}
chain=${CHAIN:-1}
requeue=${REQUEUE:-1}
signal_lead=${SIGNAL_LEAD:-600}
require_uint NODES "$nodes"
require_uint GPUS "$gpus"
require_uint CHAIN "$chain"
require_uint SIGNAL_LEAD "$signal_lead"
[[ $device == gpu || $device == cpu ]] || die "DEVICE must be gpu or cpu, got '$device'"
[[ $requeue == 0 || $requeue == 1 ]] || die "REQUEUE must be 0 or 1, got '$requeue'"
for kv in "$@"; do
    [[ $kv == *=* ]] || die "overrides must look like section.key=value, got '$kv'"
done
run_dir=$(abspath "${RUN_DIR:-runs/$config_name}")

sbatch_args=(--job-name="v4-$config_name" --nodes="$nodes" --ntasks-per-node=1
             --output="$run_dir/logs/slurm-%j.out" --signal="USR1@$signal_lead")
[[ -n ${TIME:-} ]] && sbatch_args+=(--time="$TIME")
[[ -n ${PARTITION:-} ]] && sbatch_args+=(--partition="$PARTITION")
[[ -n ${ACCOUNT:-} ]] && sbatch_args+=(--account="$ACCOUNT")
[[ -n ${QOS:-} ]] && sbatch_args+=(--qos="$QOS")
if [[ $device == gpu ]]; then
    # whole nodes: the 8 GPUs, all CPUs (data loading) and the node's network cards belong to this job
    sbatch_args+=(--gpus-per-node="$gpus" --exclusive)
fi
[[ $requeue == 0 ]] && sbatch_args+=(--no-requeue)
if [[ -n ${SBATCH_EXTRA:-} ]]; then
    read -r -a extra <<<"$SBATCH_EXTRA"
    sbatch_args+=("${extra[@]}")
fi

job_env=(V4_REPO="$V4_REPO" V4_RUN_DIR="$run_dir" V4_DEVICE="$device" V4_NPROC_PER_NODE="$gpus"
         V4_SELF_REQUEUE="$requeue")
[[ -n ${V4_PYTHON:-} ]] && job_env+=(V4_PYTHON="$V4_PYTHON")
[[ -n ${V4_RDZV_PORT:-} ]] && job_env+=(V4_RDZV_PORT="$V4_RDZV_PORT")
[[ -n ${V4_SITE_ENV:-} ]] && job_env+=(V4_SITE_ENV="$(abspath "$V4_SITE_ENV")")

echo "[slurm-pretrain] $config_name on $nodes node(s) x $gpus $([[ $device == gpu ]] && echo GPU || echo CPU-process)(s)," \
     "run.dir $run_dir, $chain chained job(s), self-requeue $([[ $requeue == 1 ]] && echo on || echo off)"
[[ ${DRY:-0} == 1 ]] || mkdir -p "$run_dir/logs"

prev=""
for ((i = 1; i <= chain; i++)); do
    dep=()
    [[ -n $prev ]] && dep=(--dependency="afterany:$prev")
    cmd=(env "${job_env[@]}" sbatch --parsable "${sbatch_args[@]}" "${dep[@]}"
         "$V4_REPO/clusters/slurm/pretrain.sbatch" "$config" "$@")
    if [[ ${DRY:-0} == 1 ]]; then
        show_cmd slurm-pretrain "${cmd[@]}"
        prev="JOBID$i"
        continue
    fi
    show_cmd slurm-pretrain "${cmd[@]}"
    out=$(cd "$V4_REPO" && "${cmd[@]}")
    prev=${out%%;*}
    echo "[slurm-pretrain] submitted job $prev (log: $run_dir/logs/slurm-$prev.out)"
done
