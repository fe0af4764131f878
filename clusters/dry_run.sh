#!/usr/bin/env bash
# The layout and memory plan of a config on NODES x GPUS devices, without GPUs (what `make dry-run` runs;
# the planner is pretrain/dry_run.py):
#   CONFIG=flash NODES=32 GPUS=8 clusters/dry_run.sh [section.key=value ...]
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

config=$(resolve_config "${CONFIG:-}")
nodes=${NODES:-1}
gpus=${GPUS:-8}
require_uint NODES "$nodes"
require_uint GPUS "$gpus"
for kv in "$@"; do
    [[ $kv == *=* ]] || die "overrides must look like section.key=value, got '$kv'"
done
python=${PY:-$V4_REPO/.venv/bin/python}
[[ $python == /* ]] || python=$V4_REPO/$python

cd "$V4_REPO"
# the planner builds the real model shards on the meta device; it needs only the world size
cmd=("$python" -m pretrain.dry_run --config "$config" --world "$((nodes * gpus))" "$@")
run_or_show dry-run "${cmd[@]}"
