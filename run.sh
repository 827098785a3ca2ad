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

# Everything after finding Python is sparsecomm/train/start.py's: the launcher, the settings
# check, the rendezvous, the network interface, the data, then the trainer (docs/launching.md).

# Started by a launcher (torchrun, SLURM, MPI, or RANK and WORLD_SIZE by hand)? The same test as
# sparsecomm/launch/launcher.py's, which reads the rest.
launched() {
    [[ -n "${SLURM_STEP_NUM_TASKS:-}" && -n "${SLURM_PROCID:-}" ]] || [[ -n "${OMPI_COMM_WORLD_SIZE:-}" ]] \
        || [[ -n "${PMI_SIZE:-}" && -n "${PMI_RANK:-}" ]] || [[ -n "${RANK:-}" && -n "${WORLD_SIZE:-}" ]]
}

# Can this Python run the trainer of this checkout (its dependencies installed)?
has_sparsecomm() {  # finds the modules without importing them (importing torch takes seconds)
    (cd / && PYTHONPATH=$ROOT "$1" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in \
('torch', 'torchvision', 'yaml', 'numpy', 'pandas', 'tqdm', 'matplotlib', 'sparsecomm')))") >/dev/null 2>&1
}

find_python() {  # $1: may it install (not under a launcher: many ranks would race)
    if [[ -x "$ROOT/.venv/bin/python" ]] && has_sparsecomm "$ROOT/.venv/bin/python"; then
        PY=$ROOT/.venv/bin/python
    elif [[ -x "$ROOT/.conda-env/bin/python" ]] && has_sparsecomm "$ROOT/.conda-env/bin/python"; then
        PY=$ROOT/.conda-env/bin/python
    elif has_sparsecomm "${PYTHON:-python3}"; then
        PY=${PYTHON:-python3}
    elif [[ $1 == no ]]; then  # say names the launcher's rank
        RANK=${RANK:-${SLURM_PROCID:-${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-}}}} die "sparsecomm is not installed for \
${PYTHON:-python3}, and run.sh never installs under a launcher (many ranks would race). Run ./run.sh --setup once on \
this machine (or \`pip install -e .\`), then start the job again"
    else
        say "sparsecomm is not installed: setting up its environment first (once)"
        # shellcheck source=scripts/ensure-env.sh
        source "$ROOT/scripts/ensure-env.sh"
    fi
}

usage() {  # this script's header, then the trainer's options
    sed -n '2,/^# ----.*what to run/{/^# ----/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
    sed -n '/^# ----.*what to run/,/^# ------/{/^# ----/d;p}' "${BASH_SOURCE[0]}"
    echo; echo "Options after ./run.sh (or in EXTRA_ARGS) go to the trainer:"; echo
}

case "${1:-}" in
    --setup) find_python yes; say "environment ready: $PY"; exit 0 ;;
    -h|--help) find_python yes; usage; exec "$PY" -m sparsecomm.train --help ;;
    --list-presets|--list-reducers) find_python yes; exec "$PY" -m sparsecomm.train "$1" ;;
esac
if launched; then find_python no; else find_python yes; fi
eval "extra=($EXTRA_ARGS)"  # shell quoting in EXTRA_ARGS is honoured
export PRESET MODEL DATASET REDUCER DENSITY EPOCHS SEED NPROC DATA_DIR OUTPUT_DIR
exec "$PY" -m sparsecomm.train.start "${extra[@]}" "$@"
