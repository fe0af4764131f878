# Helpers for the launch scripts in clusters/ (sourced by the submit scripts on the login node, and by
# clusters/slurm/data.sbatch inside the job).
# shellcheck shell=bash

# command substitutions $(...) stop at the first failure too (bash does not pass `set -e` into them by default)
shopt -s inherit_errexit

# The repository root (clusters/..), absolute.
V4_REPO=${V4_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}

die() {
    echo "error: $*" >&2
    exit 2
}

# require_uint NAME VALUE: VALUE must be a positive integer.
require_uint() {
    [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"
}

# resolve_config NAME|PATH -> prints the config as the trainer's --config takes it: the NAME of a config in
# pretrain/configs/, or the absolute path of a YAML file; dies with the list of known configs.
resolve_config() {
    local c=$1 known
    known=$(cd "$V4_REPO/pretrain/configs" 2>/dev/null && ls -1 ./*.yaml 2>/dev/null | sed 's|^\./||; s|\.yaml$||' | paste -sd ' ' -)
    [[ -n $c ]] || die "CONFIG is required, e.g. CONFIG=flash (known: ${known:-none})"
    if [[ $c != */* && $c != *.yaml && -f $V4_REPO/pretrain/configs/$c.yaml ]]; then
        echo "$c"
    elif [[ -f $c ]]; then
        (cd "$(dirname "$c")" && echo "$(pwd)/$(basename "$c")")
    else
        die "unknown CONFIG '$c': not a file and not in pretrain/configs/ (known: ${known:-none})"
    fi
}

# data_shape_args ARGS...: "--seq-len S --vocab-size V" from CONFIG (train.seq_len, data.vocab_size), as
# `make pretrain` passes them to the data pipeline; nothing when ARGS already hold either option.
data_shape_args() {
    local python=${V4_PYTHON:-$V4_REPO/.venv/bin/python} config shape
    [[ " $* " == *" --seq-len "* || " $* " == *" --vocab-size "* ]] && return 0
    config=$(resolve_config "${CONFIG:-tiny}") || exit 2
    shape=$(cd "$V4_REPO" && "$python" -c "from pretrain.config import load_config as l
c = l('$config'); print('--seq-len', c.train.seq_len, '--vocab-size', c.data.vocab_size)") \
        || die "cannot read CONFIG '$config' with $python"
    echo "$shape"
}

# abspath PATH: absolute form of PATH relative to the repository root (the directory need not exist).
abspath() {
    case $1 in
        /*) echo "$1" ;;
        *)  echo "$V4_REPO/$1" ;;
    esac
}

# quote ARG: ARG as the shell reads it back (plain when safe, else in single quotes).
quote() {
    if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
        printf '%s' "$1"
    else
        printf "'%s'" "${1//\'/\'\\\'\'}"
    fi
}

# show_cmd TAG ARGV...: print a command as one copy-pastable shell line.
show_cmd() {
    local tag=$1 sep="" a
    shift
    printf '[%s] ' "$tag"
    for a in "$@"; do
        printf '%s' "$sep"
        quote "$a"
        sep=" "
    done
    echo
}

# run_or_show TAG ARGV...: print the command; run it unless DRY=1. Prints the command's stdout.
run_or_show() {
    local tag=$1
    show_cmd "$@"
    if [[ ${DRY:-0} == 1 ]]; then
        return 0
    fi
    shift
    "$@"
}

# ---------------------------------------------------------------------------------------------- Ray auth
# Every Ray cluster we start uses Ray's token authentication (RAY_AUTH_MODE=token, the token in a 0600 file named
# by RAY_AUTH_TOKEN_PATH). The one opt-out is V4_RAY_AUTH=disabled (see docs/CLUSTER_SECURITY.md).

# ray_auth_mode -> prints "token" (default) or "disabled" from V4_RAY_AUTH; dies on anything else.
ray_auth_mode() {
    case ${V4_RAY_AUTH:-token} in
        token | disabled) echo "${V4_RAY_AUTH:-token}" ;;
        *) die "V4_RAY_AUTH must be token or disabled, got '${V4_RAY_AUTH}'" ;;
    esac
}

# new_ray_token FILE: write a fresh random token (256 bits, hex, as Ray's own generator) to FILE, readable by the
# owner only (0600), in a directory only the owner can enter (0700). Prints nothing: the token is never shown.
new_ray_token() {
    local file=$1 dir
    dir=$(dirname "$file")
    (
        umask 077
        mkdir -p "$dir"
        chmod 700 "$dir"
        od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$file.tmp"
        mv -f "$file.tmp" "$file"
    ) || die "cannot write the Ray token file $file"
}

# warn_ray_auth_disabled WHERE: the explicit opt-out, said loudly.
warn_ray_auth_disabled() {
    echo "warning: Ray token authentication is DISABLED for $1 (V4_RAY_AUTH=disabled): anyone who can reach" \
         "the head's ports can run code as $(id -un) and read what the job reads" >&2
}

# ray_cluster_name YAML -> the `cluster_name:` of a `ray up` config (names its token directory runs/ray-auth/NAME).
ray_cluster_name() {
    local name
    name=$(awk '/^cluster_name:/ {print $2; exit}' "$1")
    [[ $name =~ ^[A-Za-z0-9_.-]+$ ]] || die "$1: cluster_name must be set (letters, digits, . _ -), got '${name}'"
    echo "$name"
}

# ray_client_auth TAG: settings of a Ray client here (`ray job submit`): RAY_AUTH_MODE=token with the cluster's
# token from RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, else from the `make ray-up` cluster RAY_CLUSTER names
# (runs/ray-auth/<cluster_name>/auth_token); dies naming the variables when none is found. V4_RAY_AUTH=disabled:
# no token (a cluster started with the opt-out).
ray_client_auth() {
    local tag=$1 auth yaml file
    auth=$(ray_auth_mode)
    if [[ $auth == disabled ]]; then
        export RAY_AUTH_MODE=disabled
        warn_ray_auth_disabled "$tag"
        return 0
    fi
    export RAY_AUTH_MODE=token
    [[ -n ${RAY_AUTH_TOKEN:-} ]] && return 0
    if [[ -n ${RAY_AUTH_TOKEN_PATH:-} ]]; then
        [[ -r $RAY_AUTH_TOKEN_PATH && -s $RAY_AUTH_TOKEN_PATH ]] \
            || die "RAY_AUTH_TOKEN_PATH='$RAY_AUTH_TOKEN_PATH' is not a readable, non-empty token file"
        return 0
    fi
    yaml=$(abspath "${RAY_CLUSTER:-clusters/ray/cluster.yaml}")
    file=$V4_REPO/runs/ray-auth/$( [[ -f $yaml ]] && ray_cluster_name "$yaml" || echo "?")/auth_token
    [[ -s $file ]] || die "no Ray token for $tag: set RAY_AUTH_TOKEN_PATH to the cluster's token file (a Slurm" \
        "data job's is LOG_DIR/slurm-<jobid>/ray-auth/token; \`make ray-up\` writes $file) or RAY_AUTH_TOKEN;" \
        "V4_RAY_AUTH=disabled only for a cluster started without authentication"
    export RAY_AUTH_TOKEN_PATH=$file
}
