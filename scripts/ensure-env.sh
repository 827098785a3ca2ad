#!/usr/bin/env bash
# Source this file: it makes sure the project's Python environment exists and is current, then
# sets PY to its python. On first use (and again whenever pyproject.toml changes) it creates
#   - a virtual environment in .venv from pyproject.toml (pinned torch and torchvision, numpy,
#     pandas, pyyaml, tqdm, matplotlib, pytest), or
#   - when conda is on PATH and there is no .venv yet, the conda environment of environment.yml
#     in .conda-env (SPARSECOMM_ENV=venv forces the virtual environment).
# SPARSECOMM_VENV overrides where the virtual environment lives; PYTHON picks the interpreter
# that creates it; SPARSECOMM_TORCH_INDEX adds a package index for torch and torchvision (for
# example https://download.pytorch.org/whl/cpu: a CPU-only build, about 1 GB instead of 5.7 GB).
_sc_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_sc_want=$(cd "$_sc_root" && cat pyproject.toml environment.yml | sha256sum | cut -d' ' -f1)
_sc_fail() {
    echo "sparsecomm: $1" >&2
    return 1 2>/dev/null || exit 1
}
if [ -z "${SPARSECOMM_VENV:-}" ] && [ "${SPARSECOMM_ENV:-}" != venv ] && [ ! -x "$_sc_root/.venv/bin/python" ] \
        && command -v conda >/dev/null 2>&1; then
    _sc_env=$_sc_root/.conda-env
    if [ ! -x "$_sc_env/bin/python" ] || [ "$(cat "$_sc_env/.sparsecomm-installed" 2>/dev/null)" != "$_sc_want" ]; then
        echo "sparsecomm: creating the conda environment $_sc_env from environment.yml (first use; takes minutes)" >&2
        if [ -x "$_sc_env/bin/python" ]; then
            (cd "$_sc_root" && conda env update --prune -p "$_sc_env" -f environment.yml) || _sc_fail "conda env update failed"
        else
            (cd "$_sc_root" && conda env create -p "$_sc_env" -f environment.yml) || _sc_fail "conda env create failed"
        fi
        echo "$_sc_want" > "$_sc_env/.sparsecomm-installed"
    fi
    PY=$_sc_env/bin/python
else
    _sc_venv=${SPARSECOMM_VENV:-$_sc_root/.venv}
    if [ ! -x "$_sc_venv/bin/python" ] || [ "$(cat "$_sc_venv/.sparsecomm-installed" 2>/dev/null)" != "$_sc_want" ]; then
        _sc_python=${PYTHON:-python3}
        "$_sc_python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
            || _sc_fail "need Python >= 3.10 to create the environment; set PYTHON=/path/to/python3"
        echo "sparsecomm: setting up the Python environment in $_sc_venv (first use; torch is large, this takes minutes)" >&2
        _sc_index=()
        if [ -n "${SPARSECOMM_TORCH_INDEX:-}" ]; then
            _sc_index=(--extra-index-url "$SPARSECOMM_TORCH_INDEX")
            echo "sparsecomm: torch and torchvision may come from $SPARSECOMM_TORCH_INDEX" >&2
        elif ! command -v nvidia-smi >/dev/null 2>&1; then
            echo "sparsecomm: no GPU found; torch's default build brings its CUDA libraries anyway (about 5.7 GB in \
all on x86_64). Where a CPU-only build is reachable, set SPARSECOMM_TORCH_INDEX=https://download.pytorch.org/whl/cpu \
before the first ./run.sh" >&2
        fi
        "$_sc_python" -m venv "$_sc_venv" \
            && "$_sc_venv/bin/python" -m pip install --quiet --disable-pip-version-check "${_sc_index[@]}" -e "$_sc_root[test]" \
            && echo "$_sc_want" > "$_sc_venv/.sparsecomm-installed" \
            || _sc_fail "installing the environment failed (see pip's message above)"
    fi
    PY=$_sc_venv/bin/python
fi
unset _sc_root _sc_want _sc_env _sc_venv _sc_python _sc_index
unset -f _sc_fail
