#!/usr/bin/env bash
# `ray up` / `ray down` for the cluster described by clusters/ray/cluster.yaml (what `make ray-up|ray-down` run).
#   clusters/ray/cluster.sh up|down [CLUSTER_YAML]      DRY=1: print the command only
#
# Token authentication (docs/CLUSTER_SECURITY.md): `up` writes this cluster's Ray token, once per cluster, to
# runs/ray-auth/<cluster_name>/auth_token (0600, directory 0700) and auth.env (RAY_AUTH_MODE and
# RAY_AUTH_TOKEN_PATH as the nodes read them); the YAML's file mount "~/.v4-ray" copies both to every node.
# `down` removes them, so the next `up` gets a fresh token. V4_RAY_AUTH=disabled: the explicit opt-out.
# The token is never printed; `make ray-data` finds it through RAY_CLUSTER.
set -euo pipefail
# shellcheck source=../lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

action=${1:-}
yaml=$(abspath "${2:-clusters/ray/cluster.yaml}")
ray_bin=${RAY_BIN:-$V4_REPO/.venv/bin/ray}
[[ $action == up || $action == down ]] || die "usage: cluster.sh up|down [CLUSTER_YAML]"
[[ -f $yaml ]] || die "cluster config '$yaml' does not exist"
auth=$(ray_auth_mode)
name=$(ray_cluster_name "$yaml")
auth_rel=runs/ray-auth/$name
auth_dir=$V4_REPO/$auth_rel
mount=$(awk -F'"' '$2 == "~/.v4-ray" {print $4; exit}' "$yaml")
[[ $mount == "$auth_rel" ]] || die "$yaml: file_mounts must copy this cluster's auth directory to the nodes:" \
    "\"~/.v4-ray\": \"$auth_rel\" (found '${mount:-nothing}'; cluster_name is '$name')"

if [[ $action == up && ${DRY:-0} != 1 ]]; then
    (umask 077; mkdir -p "$auth_dir"; chmod 700 "$auth_dir")
    if [[ $auth == token ]]; then
        [[ -s $auth_dir/auth_token ]] || new_ray_token "$auth_dir/auth_token"
        # shellcheck disable=SC2016  # $HOME is expanded on the node that sources the file
        printf 'RAY_AUTH_MODE=token\nRAY_AUTH_TOKEN_PATH=$HOME/.v4-ray/auth_token\n' >"$auth_dir/auth.env"
    else
        rm -f "$auth_dir/auth_token"
        printf 'RAY_AUTH_MODE=disabled\n' >"$auth_dir/auth.env"
        warn_ray_auth_disabled "the Ray cluster '$name'"
    fi
fi

# relative file mounts ("." and runs/ray-auth/...) are read from the repository root
cd "$V4_REPO"
run_or_show "ray-$action" "$ray_bin" "$action" --yes "$yaml"
[[ ${DRY:-0} == 1 ]] && exit 0
if [[ $action == up ]]; then
    echo "[ray-up] the dashboard / job server listens on the head's loopback: run \`$ray_bin dashboard $yaml\`" \
         "(forwards localhost:8265 over ssh), then \`make ray-data RAY_ADDRESS=http://127.0.0.1:8265\`" \
         "(it reads the token from $auth_rel/auth_token)"
else
    rm -rf "$auth_dir"
fi
