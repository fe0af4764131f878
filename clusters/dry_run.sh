#!/usr/bin/env bash
# The layout and memory plan of a config on NODES x GPUS devices, without GPUs (what `make dry-run` runs):
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
"$python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('pretrain.dry_run') is None)" \
    || die "pretrain.dry_run is not in this checkout (the layout/memory planner of the parallelism issue)"
cmd=("$python" -m pretrain.dry_run --config "$config" --nodes "$nodes" --gpus-per-node "$gpus" "$@")
run_or_show dry-run "${cmd[@]}"
