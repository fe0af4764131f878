#!/usr/bin/env bash
# One node's share of a pretraining job: started by pretrain.sbatch through `srun --ntasks-per-node=1`, it runs
# torchrun for this node's V4_NPROC_PER_NODE ranks (`python -m pretrain ARGS...`) and relays Slurm's signals.
#
# Why a wrapper and not `srun torchrun` directly: torchrun starts every rank in its own session (setsid), so a
# signal Slurm sends to the step's process group (proctrack/pgid) reaches torchrun but not the ranks, and
# torchrun's default action for SIGUSR1 is to die. Here torchrun inherits SIGUSR1 as *ignored*, and on SIGUSR1
# this script forwards it to the ranks (the trainer installs its own handler: checkpoint, then exit) and leaves
# a marker so that pretrain.sbatch requeues the job. SIGTERM (time limit, scancel, requeue, preemption) reaches
# torchrun directly; torchrun passes it on to the ranks and waits for them, and so does this script.
set -euo pipefail

: "${V4_PYTHON:?}" "${V4_NPROC_PER_NODE:?}" "${V4_RDZV_ENDPOINT:?}" "${V4_RDZV_ID:?}" "${V4_JOB_LOG_DIR:?}"
: "${SLURM_NNODES:?must run inside a Slurm step}" "${SLURM_NODEID:?must run inside a Slurm step}"

if [[ ${V4_DEVICE:-gpu} == cpu ]]; then
    export CUDA_VISIBLE_DEVICES=""                 # the trainer then uses gloo
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

log() { echo "[torchrun_node $(hostname -s) node $SLURM_NODEID $(date +%T)] $*"; }

# The first node hosts the rendezvous store (decided here, not by hostname matching inside torchrun, which
# misses when the node list uses short names and the host reports an FQDN).
is_host=0
[[ $SLURM_NODEID == 0 ]] && is_host=1

trap '' USR1        # inherited by torchrun (and by the ranks until the trainer installs its handler)
"$V4_PYTHON" -m torch.distributed.run \
    --nnodes="$SLURM_NNODES" --nproc-per-node="$V4_NPROC_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$V4_RDZV_ENDPOINT" --rdzv-id="$V4_RDZV_ID" \
    --rdzv-conf="is_host=$is_host,join_timeout=900" \
    --max-restarts=0 --log-dir="$V4_JOB_LOG_DIR/torchrun" --tee=3 \
    -m pretrain "$@" &
torchrun_pid=$!

# On SIGUSR1: signal the ranks (torchrun's children) now, and again every V4_RESIGNAL_S seconds until torchrun
# exits: a rank that is still starting up ignores SIGUSR1 until the trainer has installed its handler, and the
# trainer treats repeats as one request.
resender_pid=""
relay_usr1() {
    log "SIGUSR1 (time limit near): asking the ranks to checkpoint and exit"
    touch "$V4_JOB_LOG_DIR/requeue-requested"
    pkill -USR1 -P "$torchrun_pid" || log "no rank process to signal yet"
    if [[ -z $resender_pid ]]; then
        (
            trap - USR1 TERM
            while sleep "${V4_RESIGNAL_S:-15}" && kill -0 "$torchrun_pid" 2>/dev/null; do
                pkill -USR1 -P "$torchrun_pid" || true
            done
        ) &
        resender_pid=$!
    fi
}
trap relay_usr1 USR1
trap 'log "SIGTERM: torchrun is stopping the ranks; waiting for it"' TERM

# `wait` returns early when a trapped signal arrives; keep waiting until torchrun has really exited.
while :; do
    rc=0
    wait "$torchrun_pid" || rc=$?
    kill -0 "$torchrun_pid" 2>/dev/null || break
done
if [[ -n $resender_pid ]]; then
    kill "$resender_pid" 2>/dev/null || true
    wait "$resender_pid" 2>/dev/null || true
fi
if [[ -e $V4_JOB_LOG_DIR/requeue-requested && $rc == 1 ]]; then
    # the trainer exits with run.preempt_exit_code (75) after its checkpoint; torchrun reports any nonzero
    # status of a rank as 1 ("ChildFailedError"): expected here, pretrain.sbatch requeues the job
    log "torchrun exited with status 1 after the pre-deadline checkpoint (the ranks' requeue exit status)"
else
    log "torchrun exited with status $rc"
fi
exit "$rc"
