#!/usr/bin/env bash
# prepare_dataset.sh: fetch, verify, unpack and lay out the benchmark data sets sparsecomm reads.
#
#   ./prepare_dataset.sh [--data-dir DIR] [--base-url URL] [--checksums FILE] [--force] NAME...
#
# The work is done by `python -m sparsecomm.data.prepare` (options, environment and exit status:
# --help; what happens: sparsecomm/data/preparation.py). This script only picks the Python as
# run.sh does (.venv, .conda-env, else $PYTHON or python3) and defaults DATA_DIR to ./data here.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's sparsecomm, installed or not
export DATA_DIR=${DATA_DIR:-$ROOT/data}
if [[ -x $ROOT/.venv/bin/python ]]; then PY=$ROOT/.venv/bin/python
elif [[ -x $ROOT/.conda-env/bin/python ]]; then PY=$ROOT/.conda-env/bin/python
else PY=${PYTHON:-python3}; fi
exec "$PY" -m sparsecomm.data.prepare "$@"
