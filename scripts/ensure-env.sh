#!/usr/bin/env bash
# Source this file: it makes sure the project's virtual environment exists and is current,
# then sets PY to its python. The environment is created from pyproject.toml (pinned torch
# and torchvision, numpy, pandas, pyyaml, tqdm, matplotlib, pytest) on first use and again
# whenever pyproject.toml changes. SPARSECOMM_VENV overrides where it lives (default .venv).
_sc_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_sc_venv=${SPARSECOMM_VENV:-$_sc_root/.venv}
_sc_stamp=$_sc_venv/.sparsecomm-installed
_sc_want=$(cd "$_sc_root" && sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x "$_sc_venv/bin/python" ] || [ "$(cat "$_sc_stamp" 2>/dev/null)" != "$_sc_want" ]; then
    _sc_python=${PYTHON:-python3}
    if ! "$_sc_python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        echo "sparsecomm: need Python >= 3.10 to create the environment; set PYTHON=/path/to/python3" >&2
        return 1 2>/dev/null || exit 1
    fi
    echo "sparsecomm: setting up the Python environment in $_sc_venv (first use; torch is large, this takes minutes)" >&2
    "$_sc_python" -m venv "$_sc_venv" &&
        "$_sc_venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$_sc_root[test]" &&
        echo "$_sc_want" > "$_sc_stamp" || {
            echo "sparsecomm: installing the environment failed (see pip's message above)" >&2
            return 1 2>/dev/null || exit 1
        }
fi
PY=$_sc_venv/bin/python
unset _sc_root _sc_venv _sc_stamp _sc_want _sc_python
