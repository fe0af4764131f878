# Helpers for the submit scripts in clusters/ (sourced; they run on the login node, not inside jobs).
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
