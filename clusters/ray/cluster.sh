#!/usr/bin/env bash
# `ray up` / `ray down` for the cluster described by clusters/ray/cluster.yaml (what `make ray-up|ray-down` run).
#   clusters/ray/cluster.sh up|down [CLUSTER_YAML]      DRY=1: print the command only
set -euo pipefail
# shellcheck source=../lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

action=${1:-}
yaml=$(abspath "${2:-clusters/ray/cluster.yaml}")
ray_bin=${RAY_BIN:-$V4_REPO/.venv/bin/ray}
[[ $action == up || $action == down ]] || die "usage: cluster.sh up|down [CLUSTER_YAML]"
[[ -f $yaml ]] || die "cluster config '$yaml' does not exist"
# Explicit auth mode: Ray 2.60 switches to token auth whenever ~/.ray/auth_token exists.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}

run_or_show "ray-$action" "$ray_bin" "$action" --yes "$yaml"
if [[ $action == up && ${DRY:-0} != 1 ]]; then
    echo "[ray-up] dashboard/job server: run \`$ray_bin dashboard $yaml\` (forwards localhost:8265), then" \
         "\`make ray-data RAY_ADDRESS=http://127.0.0.1:8265\`"
fi
