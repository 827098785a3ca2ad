#!/usr/bin/env bash
# sparsecomm: run one training job.
#
# Pick what to run by editing the variables below, or by setting them in the environment
# (MODEL=vgg16 ./run.sh). Then start it in any of these ways:
#
#   ./run.sh                        plain: starts NPROC workers on this machine itself
#   sbatch pararun                  SLURM: pararun starts run.sh on every task with srun
#   mpirun -np 4 ./run.sh           Open MPI, MPICH or Intel MPI; add -hostfile for several nodes
#   srun -n 4 ./run.sh              inside an allocation
#   torchrun --nproc_per_node 4 -m sparsecomm.train --preset ...   (the trainer without run.sh)
#
# run.sh finds out who started it and takes rank, world size, local rank and the rendezvous
# address from there; the world size always comes from the launcher. Ctrl-C, SIGTERM or SIGUSR1
# make every worker checkpoint and stop; the same command again resumes.
# A run directory is one job's at a time: a second start on it stops in one line (exit 2) naming
# the job that holds it; EXTRA_ARGS=--wait-for-run (or SPARSECOMM_WAIT_FOR_RUN=SECONDS) waits.

# ---------------------------------------------------------------- what to run -------------
PRESET=${PRESET:-}                  # a file in cnn-lstm/presets or ncf/presets (python -m
                                    # sparsecomm.train --list-presets); empty: the preset that
                                    # fits MODEL and DATASET, or resnet18-cifar10 if neither is set
MODEL=${MODEL:-}                    # empty: the preset's model (resnet18)
DATASET=${DATASET:-}                # empty: the preset's data set (cifar10)
REDUCER=${REDUCER:-}                # empty: the preset's reducer (exdyna)
DENSITY=${DENSITY:-}                # empty: the preset's target density (0.001)
EPOCHS=${EPOCHS:-}                  # empty: the preset's (200)
SEED=${SEED:-}                      # empty: the preset's (0)
NPROC=${NPROC:-}                    # workers for a plain run (empty: one per GPU, else 2)
DATA_DIR=${DATA_DIR:-}              # empty: ./data beside this script
OUTPUT_DIR=${OUTPUT_DIR:-}          # empty: ./runs beside this script
EXTRA_ARGS=${EXTRA_ARGS:-}          # more trainer options, e.g. "--set optimizer.lr=0.05 --fresh"
# -------------------------------------------------------------------------------------------

set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's sparsecomm, installed or not
DATA_DIR=${DATA_DIR:-$ROOT/data}
OUTPUT_DIR=${OUTPUT_DIR:-$ROOT/runs}

say() { echo "run.sh${RANK:+ [rank $RANK]}: $*" >&2; }
die() { say "error: $*"; exit 2; }
# A command that fails unexpectedly names itself instead of ending the job without a word.
set -E
trap 'rc=$?; say "error: line $LINENO: \`$BASH_COMMAND\` failed (exit $rc)"; exit $rc' ERR

# ----------------------------------------------------------- who started us? --------------
detect_launcher() {
    if [[ -n "${TORCHELASTIC_RUN_ID:-}${GROUP_RANK:-}" && -n "${RANK:-}" && -n "${WORLD_SIZE:-}" ]]; then
        LAUNCHER=torchrun
        LOCAL_SIZE=${LOCAL_WORLD_SIZE:-}
    elif [[ -n "${SLURM_STEP_NUM_TASKS:-}" && -n "${SLURM_PROCID:-}" ]]; then
        LAUNCHER=slurm
        RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_STEP_NUM_TASKS LOCAL_RANK=${SLURM_LOCALID:-0}
        LOCAL_SIZE=$(slurm_local_tasks)
        JOB_KEY="slurm-${SLURM_JOB_ID:-0}-${SLURM_STEP_ID:-0}"
    elif [[ -n "${OMPI_COMM_WORLD_SIZE:-}" ]]; then
        LAUNCHER="Open MPI"
        RANK=$OMPI_COMM_WORLD_RANK WORLD_SIZE=$OMPI_COMM_WORLD_SIZE
        LOCAL_RANK=${OMPI_COMM_WORLD_LOCAL_RANK:-0} LOCAL_SIZE=${OMPI_COMM_WORLD_LOCAL_SIZE:-}
        JOB_KEY="ompi-${PMIX_NAMESPACE:-${OMPI_MCA_orte_ess_jobid:-${OMPI_MCA_ess_base_jobid:-$PPID}}}"
    elif [[ -n "${PMI_SIZE:-}" && -n "${PMI_RANK:-}" ]]; then
        LAUNCHER="MPICH/Intel MPI"
        RANK=$PMI_RANK WORLD_SIZE=$PMI_SIZE LOCAL_RANK=${MPI_LOCALRANKID:-${PMI_LOCAL_RANK:-0}}
        LOCAL_SIZE=${MPI_LOCALNRANKS:-${PMI_LOCAL_SIZE:-}}
        JOB_KEY="pmi-${PMI_KVSNAME:-${PMI_ID:-$PPID}}"
    elif [[ -n "${RANK:-}" && -n "${WORLD_SIZE:-}" ]]; then
        LAUNCHER="environment"  # RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set by hand or another tool
        LOCAL_SIZE=${LOCAL_WORLD_SIZE:-}
    else
        LAUNCHER=""
    fi
}

slurm_local_tasks() {  # tasks of this step on this node, from e.g. "2(x3),1"
    local spec=${SLURM_STEP_TASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-}} node=${SLURM_NODEID:-0} i=0 part n reps
    IFS=, read -ra parts <<< "$spec"
    for part in "${parts[@]}"; do
        n=${part%%(*}; reps=1
        [[ $part == *"(x"* ]] && reps=${part##*(x} && reps=${reps%)}
        if (( node < i + reps )); then echo "$n"; return; fi
        i=$((i + reps))
    done
}

first_slurm_host() {
    local list=${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:-}}
    if command -v scontrol >/dev/null 2>&1; then
        scontrol show hostnames "$list" | head -n 1
    else  # "node[01-04,07]" -> node01
        local host=${list%%,*}
        if [[ $host == *"["* ]]; then
            local inside=${list#*[}; inside=${inside%%[-,\]]*}
            host="${host%%\[*}$inside"
        fi
        echo "$host"
    fi
}

my_address() {  # an address other hosts can reach: the first non-loopback IP, else the host name
    local ip
    ip=$(hostname -I 2>/dev/null | awk '{print $1}') || true
    echo "${ip:-$(hostname)}"
}

free_port() {
    "$PY" - <<'EOF'
import socket
s = socket.socket()
s.bind(("", 0))
print(s.getsockname()[1])
EOF
}

port_is_free() {
    "$PY" - "$1" <<'EOF'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("", int(sys.argv[1])))
except OSError:
    sys.exit(1)
EOF
}

# Where rank 0 listens. The seeds' `hostip` and `port` are accepted too. Without them, SLURM
# gives the head node; under MPI, rank 0 publishes its address and a free port in a file under
# OUTPUT_DIR (on several nodes that folder must be shared), and the others read it.
rendezvous() {
    MASTER_ADDR=${MASTER_ADDR:-${hostip:-}}
    MASTER_PORT=${MASTER_PORT:-${port:-}}
    if [[ -z "$MASTER_ADDR" && $LAUNCHER == slurm ]]; then
        MASTER_ADDR=$(first_slurm_host)
        MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
    fi
    if [[ -n "$MASTER_ADDR" && -n "$MASTER_PORT" ]]; then
        if [[ $RANK == 0 ]] && [[ $MASTER_ADDR == 127.* || $MASTER_ADDR == localhost || $MASTER_ADDR == "$(hostname)" \
                || $MASTER_ADDR == "$(hostname -s)" || " $(hostname -I 2>/dev/null) " == *" $MASTER_ADDR "* ]] \
                && ! port_is_free "$MASTER_PORT"; then
            die "port $MASTER_PORT on $MASTER_ADDR is in use; unset MASTER_PORT (or port) or pick another"
        fi
        return
    fi
    local file="$OUTPUT_DIR/.rendezvous/${JOB_KEY:-job}"
    if [[ $RANK == 0 ]]; then
        mkdir -p "$(dirname "$file")"
        MASTER_ADDR=${MASTER_ADDR:-$(my_address)}
        MASTER_PORT=${MASTER_PORT:-$(free_port)}
        echo "$MASTER_ADDR $MASTER_PORT" > "$file.tmp.$$" && mv "$file.tmp.$$" "$file"
    else
        local waited=0 started
        started=$(date +%s)
        # a file left by an earlier job with the same key is older than this job
        until [[ -s "$file" ]] && (( $(stat -c %Y "$file") >= started - 30 )); do
            sleep 0.5; waited=$((waited + 1))
            (( waited < 240 )) || die "rank 0 did not publish its address in $file within 2 minutes; on several \
nodes OUTPUT_DIR must be on a shared file system, or set MASTER_ADDR and MASTER_PORT (hostip/port)"
        done
        read -r MASTER_ADDR MASTER_PORT < "$file"
    fi
}

# The network interface collectives use. Left to themselves, gloo and NCCL take the address the
# host name resolves to, which is loopback on many nodes (and in network namespaces): peers then
# cannot connect. Unless GLOO_SOCKET_IFNAME or NCCL_SOCKET_IFNAME is set, take the interface that
# routes to the rendezvous address (on rank 0's host: the one that holds it), and say which.
pick_interface() {
    [[ -n "${GLOO_SOCKET_IFNAME:-}${NCCL_SOCKET_IFNAME:-}" ]] && return 0
    command -v ip >/dev/null 2>&1 || return 0
    local addr dev
    addr=$(getent ahostsv4 "$MASTER_ADDR" 2>/dev/null | awk 'NR == 1 {print $1}')
    [[ -n "$addr" && $addr != 127.* ]] || return 0
    dev=$(ip -o route get "$addr" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p' | head -n 1)
    if [[ $dev == lo ]]; then  # the address is this host's own: the interface that holds it
        dev=$(ip -o -4 addr show 2>/dev/null | awk -v a="$addr" '{split($4, p, "/"); if (p[1] == a) print $2}' | head -n 1)
    fi
    [[ -n "$dev" && $dev != lo ]] || return 0
    export GLOO_SOCKET_IFNAME=$dev NCCL_SOCKET_IFNAME=$dev
    [[ $RANK == 0 ]] && say "collectives use network interface $dev (it routes to $MASTER_ADDR); set \
GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME to choose another"
    return 0
}

# ------------------------------------------------------------- the environment -------------
# Can this Python run the trainer of this checkout (its dependencies installed)?
has_sparsecomm() {  # finds the modules without importing them (importing torch takes seconds)
    (cd / && PYTHONPATH=$ROOT "$1" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in \
('torch', 'torchvision', 'yaml', 'numpy', 'pandas', 'tqdm', 'matplotlib', 'sparsecomm')))") >/dev/null 2>&1
}

find_python() {
    if [[ -x "$ROOT/.venv/bin/python" ]] && has_sparsecomm "$ROOT/.venv/bin/python"; then
        PY=$ROOT/.venv/bin/python
    elif [[ -x "$ROOT/.conda-env/bin/python" ]] && has_sparsecomm "$ROOT/.conda-env/bin/python"; then
        PY=$ROOT/.conda-env/bin/python
    elif has_sparsecomm "${PYTHON:-python3}"; then
        PY=${PYTHON:-python3}
    elif [[ -n "$LAUNCHER" ]]; then
        die "sparsecomm is not installed for ${PYTHON:-python3}, and run.sh never installs under a launcher \
(many ranks would race). Run ./run.sh --setup once on this machine (or \`pip install -e .\`), then start the job again"
    else
        say "sparsecomm is not installed: setting up its environment first (once)"
        # shellcheck source=scripts/ensure-env.sh
        source "$ROOT/scripts/ensure-env.sh"
    fi
}

# ------------------------------------------------------- the settings, checked ------------
# Every setting is checked in one process before any data is prepared or any worker starts: a
# bad one stops the job with one line (from rank 0) and exit code 2. The check also names the
# preset chosen from MODEL/DATASET and the task whose data is needed.
check_settings() {  # $1: the job's worker count, or auto; sets TASK, GPUS, WORKERS
    local out line
    # A failed check exits 2 on every rank, but only rank 0 says why; the others wait a little
    # first, or an MPI launcher, seeing a silent rank fail, could stop rank 0 before it spoke.
    out=$(RANK=${RANK:-0} "$PY" -m sparsecomm.train "${ARGS[@]}" --check --workers "$1") \
        || { [[ ${RANK:-0} == 0 ]] || sleep 20; exit 2; }
    while IFS= read -r line; do
        case $line in
            preset=*) [[ -n "$PRESET" ]] || ARGS=(--preset "${line#preset=}" "${ARGS[@]}") ;;
            task=*) TASK=${line#task=} ;;
            gpus=*) GPUS=${line#gpus=} ;;
            workers=*) WORKERS=${line#workers=} ;;
        esac
    done <<< "$out"
}

# ----------------------------------------------------------------- the data ---------------
prepare_data() {
    local task=$TASK folder
    case $task in
        logreg) return ;;  # a LIBSVM file the user provides
        wikitext2) folder=wikitext-2 ;;
        *) folder=$task ;;
    esac
    if [[ -z "$LAUNCHER" || $RANK == 0 ]]; then
        "$ROOT/prepare_dataset.sh" --data-dir "$DATA_DIR" "$task" || exit $?
    else  # rank 0 prepares; the others wait (if it fails, the launcher stops the job)
        local waited=0
        until [[ -e "$DATA_DIR/$folder/.prepared" ]]; do
            (( waited % 120 == 0 )) && say "waiting for rank 0 to prepare $task in $DATA_DIR/$folder"
            sleep 1; waited=$((waited + 1))
        done
    fi
}

trainer_args() {
    if [[ -z "$PRESET$MODEL$DATASET" ]]; then PRESET=resnet18-cifar10; fi
    ARGS=(--data-dir "$DATA_DIR" --output-dir "$OUTPUT_DIR")
    [[ -n "$PRESET" ]] && ARGS+=(--preset "$PRESET")
    [[ -n "$MODEL" ]] && ARGS+=(--model "$MODEL")
    [[ -n "$DATASET" ]] && ARGS+=(--task "$DATASET")
    [[ -n "$REDUCER" ]] && ARGS+=(--reducer "$REDUCER")
    [[ -n "$DENSITY" ]] && ARGS+=(--density "$DENSITY")
    [[ -n "$EPOCHS" ]] && ARGS+=(--epochs "$EPOCHS")
    [[ -n "$SEED" ]] && ARGS+=(--seed "$SEED")
    eval "local extra=($EXTRA_ARGS)"  # shell quoting in EXTRA_ARGS is honoured
    ARGS+=("${extra[@]}")
    ARGS+=("$@")
}

# ----------------------------------------------------------------------- main -------------
usage() {  # this script's header, then the trainer's options
    sed -n '2,/^# ----.*what to run/{/^# ----/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
    sed -n '/^# ----.*what to run/,/^# ------/{/^# ----/d;p}' "${BASH_SOURCE[0]}"
    echo; echo "Options after ./run.sh (or in EXTRA_ARGS) go to the trainer:"; echo
}

main() {
    case "${1:-}" in
        --setup) LAUNCHER=""; find_python; say "environment ready: $PY"; exit 0 ;;
        -h|--help) LAUNCHER=""; find_python; usage; exec "$PY" -m sparsecomm.train --help ;;
        --list-presets|--list-reducers) LAUNCHER=""; find_python; exec "$PY" -m sparsecomm.train "$1" ;;
    esac
    detect_launcher
    if [[ -n "$LAUNCHER" ]]; then  # settings the launcher contradicts fail before anything starts
        [[ $WORLD_SIZE =~ ^[1-9][0-9]*$ && $RANK =~ ^[0-9]+$ ]] || die "bad rank $RANK or world size $WORLD_SIZE from $LAUNCHER"
        (( RANK < WORLD_SIZE )) || die "rank $RANK is out of range for world size $WORLD_SIZE (from $LAUNCHER)"
        if [[ -n "$NPROC" && -n "${LOCAL_SIZE:-}" && "$NPROC" != "$LOCAL_SIZE" ]]; then
            die "NPROC=$NPROC conflicts with the $LOCAL_SIZE worker(s) $LAUNCHER started on this node; unset NPROC \
(under a launcher the launcher decides) or change the launcher's task count"
        fi
    elif [[ -n "$NPROC" && ! $NPROC =~ ^[1-9][0-9]*$ ]]; then
        die "NPROC must be a positive integer, got '$NPROC'"
    fi
    find_python
    trainer_args "$@"

    if [[ -z "$LAUNCHER" ]]; then
        local port=()
        if [[ -n "${MASTER_PORT:-}" ]]; then
            port_is_free "$MASTER_PORT" || die "port $MASTER_PORT on this host is in use; unset MASTER_PORT or pick another"
            port=(--port "$MASTER_PORT")
        fi
        check_settings "${NPROC:-auto}"
        prepare_data
        say "starting $WORKERS local worker(s) ($( (( GPUS > 0 )) && echo "NCCL, one GPU each" || echo "gloo on the CPU"))"
        exec "$PY" -m sparsecomm.launch --nproc "$WORKERS" "${port[@]}" -- "${ARGS[@]}"
    fi

    check_settings "$WORLD_SIZE"
    if [[ $LAUNCHER == torchrun || $LAUNCHER == environment ]]; then
        MASTER_ADDR=${MASTER_ADDR:-${hostip:-}} MASTER_PORT=${MASTER_PORT:-${port:-}}
        [[ -n "$MASTER_ADDR" && -n "$MASTER_PORT" ]] || die "RANK and WORLD_SIZE are set but not the rendezvous \
address: set MASTER_ADDR and MASTER_PORT (or the seeds' hostip and port)"
    else
        rendezvous
    fi
    export RANK WORLD_SIZE LOCAL_RANK=${LOCAL_RANK:-0} MASTER_ADDR MASTER_PORT
    pick_interface
    if [[ -n "${LOCAL_SIZE:-}" ]]; then
        export LOCAL_WORLD_SIZE=$LOCAL_SIZE
        # share the cores among this node's workers, as torchrun does
        [[ -n "${OMP_NUM_THREADS:-}" ]] || export OMP_NUM_THREADS=$(( $(nproc) / LOCAL_SIZE > 0 ? $(nproc) / LOCAL_SIZE : 1 ))
    fi
    [[ $RANK == 0 ]] && say "$LAUNCHER started $WORLD_SIZE worker(s); rendezvous at $MASTER_ADDR:$MASTER_PORT"
    prepare_data
    exec "$PY" -m sparsecomm.train "${ARGS[@]}"
}

main "$@"
