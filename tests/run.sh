#!/usr/bin/env bash
# The test command: sets up the environment on first use, then runs the whole suite.
# Extra arguments go to pytest (for example: tests/run.sh -k exdyna -x).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure-env.sh
exec "$PY" -m pytest "$@"
