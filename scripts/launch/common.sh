# Shared by the launch scripts (sourced, not run): their options and defaults, the variables every
# rank must see, and printing the exact command before running it.
# A script sets USAGE (its description) and OPTIONS (the option names it takes), then sources this.
# shellcheck shell=bash

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$LAUNCH_DIR/../.." && pwd)"
TRAIN="$ROOT/scripts/train.py"

# What every rank needs besides the launcher's own variables. Under pdsh DeepSpeed forwards only
# NCCL/PYTHON/UCX/MV2/MLFLOW ones; nodes started by hand see only their own shell.
ENV_PATTERN='^(WANDB_[A-Za-z0-9_]*|OMP_NUM_THREADS|MKL_NUM_THREADS|DEEPSPEED_TIMEOUT|TORCH_[A-Z0-9_]*|GLOO_[A-Z0-9_]*|NCCL_[A-Z0-9_]*|HF_[A-Z0-9_]*)$'

declare -A OPTION_HELP=(
    [hosts]="--hosts H1,H2,...     the nodes; the first is node rank 0, the master (rendezvous) host"
    [hostfile]="--hostfile FILE       DeepSpeed hostfile ('HOST slots=N' lines) instead of --hosts"
    [procs-per-node]="--procs-per-node N    processes (GPUs) per node (default: the GPUs of this node, or 2 without GPUs)"
    [sp-size]="--sp-size S           ranks sharing one clip (default: the config's sequence_parallel_size, else 1)"
    [config]="--config FILE         DeepSpeed config (default: configs/ds_zero2.json)"
    [master-addr]="--master-addr ADDR    address of node rank 0 as the others reach it (default: the first host)"
    [master-port]="--master-port PORT    a free TCP port on the master (default: 29500)"
    [node-rank]="--node-rank K         launch node K of --hosts/--hostfile here, without ssh (run once on every node)"
    [rdzv-id]="--rdzv-id ID          rendezvous id, the same on every node, unique per job (default: nonlocal_dist)"
    [env-file]="--env-file FILE       KEY=VALUE lines (as write_env.sh writes them) to export before launching"
)

die() {
    echo "$(basename "$0"): $*" >&2
    exit 2
}

usage() {
    printf '%s\n\nOptions:\n' "$USAGE"
    local name
    for name in $OPTIONS; do printf '  %s\n' "${OPTION_HELP[$name]}"; done
    printf '  %-21s %s\n' "--dry-run" "print the command (and write the files it needs), run nothing" \
        "-h, --help" "this help" "-- ARGS..." "passed to scripts/train.py"
}

# parse_args "$@": sets OPT_<name> (dashes as underscores) for each option in OPTIONS, DRY_RUN, TRAIN_ARGS.
parse_args() {
    unset "${!OPT_@}"  # none from the caller's environment
    DRY_RUN=0
    TRAIN_ARGS=()
    local name value
    while [ $# -gt 0 ]; do
        case "$1" in
            -h | --help) usage; exit 0 ;;
            --dry-run) DRY_RUN=1; shift ;;
            --) shift; TRAIN_ARGS=("$@"); break ;;
            --*)
                name="${1#--}" && name="${name%%=*}"
                [[ " $OPTIONS " == *" $name "* ]] ||
                    die "unknown option $1 (train.py's arguments go after --; see --help)"
                if [[ "$1" == *=* ]]; then value="${1#*=}"; shift
                else
                    [ $# -ge 2 ] || die "$1 needs a value"
                    value="$2"; shift 2
                fi
                printf -v "OPT_${name//-/_}" '%s' "$value" ;;
            *) die "unexpected argument '$1' (train.py's arguments go after --; see --help)" ;;
        esac
    done
}

positive_int() {  # positive_int OPTION VALUE
    [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"
}

# Run in the project's environment as if activated: its tools, and what they start themselves (torch
# JIT-builds DeepSpeed's CPU ops with the `ninja` on PATH; two ninja versions rebuild each other's output).
# NONLOCAL_VENV (as for setup_env.sh; default .venv) names it, e.g. .venv-torch2.8.0 for the torch floor.
VENV="${NONLOCAL_VENV:-.venv}"
[[ "$VENV" == /* ]] || VENV="$ROOT/$VENV"
[ ! -d "$VENV/bin" ] || export PATH="$VENV/bin:$PATH"

tool() {
    command -v "$1" || die "$1 not found: pip install -e '.[deepspeed]' (in $VENV or the active environment)"
}

# Sets HOSTS (array) and SLOTS (processes per host) from --hostfile or --hosts; none of them: one node.
read_hosts() {
    HOSTS=() SLOTS=()
    if [ -n "${OPT_hostfile:-}" ]; then
        [ -z "${OPT_hosts:-}" ] || die "give --hosts or --hostfile, not both"
        [ -f "$OPT_hostfile" ] || die "--hostfile $OPT_hostfile: no such file"
        local host slots
        while read -r host slots; do
            [[ "$slots" =~ ^slots=([1-9][0-9]*) ]] || die "--hostfile $OPT_hostfile: '$host $slots' is not 'HOST slots=N'"
            HOSTS+=("$host") SLOTS+=("${BASH_REMATCH[1]}")
        done < <(grep -Ev '^[[:space:]]*(#|$)' "$OPT_hostfile")
        [ ${#HOSTS[@]} -gt 0 ] || die "--hostfile $OPT_hostfile lists no host"
    elif [ -n "${OPT_hosts:-}" ]; then
        IFS=, read -r -a HOSTS <<<"$OPT_hosts"
        local host
        for host in "${HOSTS[@]}"; do [ -n "$host" ] || die "--hosts '$OPT_hosts' has an empty name"; done
    fi
}

multi_node_only() {  # multi_node_only OPTION...: one node (no --hosts/--hostfile) takes none of them
    local name var nodes="--hosts"
    [[ " $OPTIONS " != *" hostfile "* ]] || nodes="--hosts or --hostfile"
    for name in "$@"; do
        var="OPT_${name//-/_}"
        [ -z "${!var:-}" ] || [ ${#HOSTS[@]} -gt 0 ] || die "--$name applies to several nodes only (with $nodes)"
    done
}

# The checks and defaults every script shares; sets PPN, NNODES, WORLD, CONFIG, SP_ARGS, MASTER_ADDR,
# MASTER_PORT and exports OMP_NUM_THREADS (cores / processes unless set) and the --env-file variables.
resolve_common() {
    read_hosts
    NNODES=$(( ${#HOSTS[@]} > 0 ? ${#HOSTS[@]} : 1 ))
    if [ -n "${OPT_procs_per_node:-}" ]; then PPN="$OPT_procs_per_node"
    elif [ ${#SLOTS[@]} -gt 0 ]; then PPN="${SLOTS[0]}"
    else
        PPN=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
        [ "$PPN" -gt 0 ] || PPN=2
    fi
    positive_int --procs-per-node "$PPN"
    WORLD=$(( NNODES * PPN ))
    if [ ${#SLOTS[@]} -gt 0 ] && [ -z "${OPT_procs_per_node:-}" ]; then
        local slots
        WORLD=0
        for slots in "${SLOTS[@]}"; do WORLD=$(( WORLD + slots )); done
    fi
    CONFIG="${OPT_config:-$ROOT/configs/ds_zero2.json}"
    [ -f "$CONFIG" ] || die "--config $CONFIG: no such file"
    CONFIG="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"  # other nodes may start elsewhere
    SP_ARGS=()
    if [ -n "${OPT_sp_size:-}" ]; then
        positive_int --sp-size "$OPT_sp_size"
        (( WORLD % OPT_sp_size == 0 )) ||
            die "--sp-size $OPT_sp_size does not divide the world size $WORLD ($NNODES node(s) x $PPN); change one of them"
        SP_ARGS=(--sp-size "$OPT_sp_size")
    fi
    MASTER_ADDR="${OPT_master_addr:-${HOSTS[0]:-127.0.0.1}}"
    MASTER_PORT="${OPT_master_port:-29500}"
    [[ "$MASTER_PORT" =~ ^[0-9]+$ ]] && (( MASTER_PORT > 0 && MASTER_PORT < 65536 )) ||
        die "--master-port must be a TCP port (1-65535), got '$MASTER_PORT'"
    [ -z "${OPT_env_file:-}" ] || load_env_file "$OPT_env_file"
    local cores
    cores=$(nproc)
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores > PPN ? cores / PPN : 1 ))}"
}

# The env file: KEY=VALUE lines, the value as it would stand inside double quotes (\ " $ ` escaped).
# DeepSpeed's pdsh launch turns each line into 'export KEY="VALUE";' (values without spaces or shell
# characters unquoted, which is the same) in the command every node runs; load_env_file does the same here.
# Its first line marks it as written by write_env_file, which never overwrites a hand-written file.
ENV_MARK="NONLOCAL_DIST_ENV_FILE=1"

write_env_file() {  # write_env_file FILE: this shell's ENV_PATTERN variables
    if [ -e "$1" ] && [ "$(head -n 1 "$1")" != "$ENV_MARK" ]; then
        die "$1 exists and was not written by this script: move it away (DeepSpeed also reads ~/.deepspeed_env)"
    fi
    local name value
    {
        echo "$ENV_MARK"
        while IFS= read -r name; do
            value="${!name}"
            if [[ "$value" == *$'\n'* ]]; then
                echo "$(basename "$0"): left $name out of $1: it holds a newline (one variable per line)" >&2
                continue
            fi
            value="${value//\\/\\\\}" value="${value//\"/\\\"}" value="${value//\$/\\\$}" value="${value//\`/\\\`}"
            echo "$name=$value"
        done < <(compgen -e | grep -E "$ENV_PATTERN" | sort)
    } >"$1.tmp.$$"
    mv "$1.tmp.$$" "$1"  # atomic: a launcher reading it never sees half of it
    echo "wrote $1: $(sed 's/=.*//' "$1" | tr '\n' ' ')"
}

load_env_file() {  # load_env_file FILE: export its variables here
    [ -f "$1" ] || die "--env-file $1: no such file"
    local line names=()
    while IFS= read -r line; do
        [[ ! "$line" =~ ^[[:space:]]*(#|$) ]] || continue
        [[ "$line" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env-file $1: '$line' is not KEY=VALUE"
        eval "export ${line%%=*}=\"${line#*=}\""
        names+=("${line%%=*}")
    done <"$1"
    echo "exported from $1: ${names[*]}"
}

run() {  # print the exact command, copy-pasteable, then run it in place of this shell
    printf '+'
    printf ' %q' "$@"
    printf '\n'
    [ "$DRY_RUN" = 1 ] || exec "$@"
}
