#!/usr/bin/env bash
# Submit the data pipeline to Slurm as one job that runs its own Ray cluster (what `make slurm-data` runs).
# Prints the sbatch command; with DRY=1 only prints it.
#
#   NODES=4 OUTPUT=/shared/v4/shards clusters/slurm/submit_data.sh [extra data_pipeline options]
#
# Settings (environment):
#   NODES       nodes of the Ray cluster (head + NODES-1 workers)                          [1]
#   MIXTURE     mixture YAML                                 [data_pipeline/configs/default_mixture.yaml]
#   OUTPUT      output directory of the shards (shared filesystem)                         [runs/data/<config>]
#   CONFIG      names the default OUTPUT and gives --seq-len / --vocab-size (train.seq_len,
#               data.vocab_size) unless they are among the arguments                       [tiny]
#   TIME, PARTITION, ACCOUNT, QOS, SBATCH_EXTRA   as for submit_pretrain.sh
#   CPUS        CPUs per node to request and give Ray (--cpus-per-task); empty: --exclusive, whole nodes
#   LOG_DIR     batch log and Ray node logs                                                [runs/slurm-data]
#   V4_RAY_AUTH token: Ray token authentication, a fresh token per job (data.sbatch); disabled: the
#               explicit opt-out (docs/CLUSTER_SECURITY.md)                                [token]
#   DRY         1: print the command only
# Positional arguments are appended to `python -m data_pipeline run --mixture M --output O`.
set -euo pipefail
# shellcheck source=../lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

nodes=${NODES:-1}
require_uint NODES "$nodes"
mixture=$(abspath "${MIXTURE:-data_pipeline/configs/default_mixture.yaml}")
[[ ${DRY:-0} == 1 || -f $mixture ]] || die "MIXTURE '$mixture' does not exist"
output=$(abspath "${OUTPUT:-runs/data/${CONFIG:-tiny}}")
log_dir=$(abspath "${LOG_DIR:-runs/slurm-data}")
auth=$(ray_auth_mode)
[[ $auth == token ]] || warn_ray_auth_disabled "the Slurm data job"

sbatch_args=(--job-name=v4-data --nodes="$nodes" --ntasks-per-node=1 --output="$log_dir/slurm-%j.out")
if [[ -n ${CPUS:-} ]]; then
    require_uint CPUS "$CPUS"
    sbatch_args+=(--cpus-per-task="$CPUS")
else
    sbatch_args+=(--exclusive)
fi
[[ -n ${TIME:-} ]] && sbatch_args+=(--time="$TIME")
[[ -n ${PARTITION:-} ]] && sbatch_args+=(--partition="$PARTITION")
[[ -n ${ACCOUNT:-} ]] && sbatch_args+=(--account="$ACCOUNT")
[[ -n ${QOS:-} ]] && sbatch_args+=(--qos="$QOS")
if [[ -n ${SBATCH_EXTRA:-} ]]; then
    read -r -a extra <<<"$SBATCH_EXTRA"
    sbatch_args+=("${extra[@]}")
fi

# sequence length and vocabulary of the shards: from CONFIG (as `make pretrain` does), unless given as arguments
shape_args=$(data_shape_args "$@")
read -r -a shape <<<"$shape_args"
job_env=(V4_REPO="$V4_REPO" V4_LOG_DIR="$log_dir")
job_env+=(V4_RAY_AUTH="$auth")
for v in V4_PYTHON V4_RAY_PORT V4_RAY_DASHBOARD_PORT V4_RAY_DASHBOARD_HOST V4_RAY_HEAD_IP V4_RAY_TMP \
         V4_RAY_OBJECT_STORE_BYTES V4_RAY_START_ARGS; do
    [[ -n ${!v:-} ]] && job_env+=("$v=${!v}")
done

[[ ${DRY:-0} == 1 ]] || mkdir -p "$log_dir"
cmd=(env "${job_env[@]}" sbatch --parsable "${sbatch_args[@]}" "$V4_REPO/clusters/slurm/data.sbatch"
     run --mixture "$mixture" --output "$output" "$@" "${shape[@]}")
show_cmd slurm-data "${cmd[@]}"
[[ ${DRY:-0} == 1 ]] && exit 0
out=$(cd "$V4_REPO" && "${cmd[@]}")
echo "[slurm-data] submitted job ${out%%;*} (log: $log_dir/slurm-${out%%;*}.out)"
