"""Every entry point the README and docs/ show works as written in a new shell: a clean
environment (no virtual environment on PATH), `source scripts/activate` as the README says,
then the command's --help. Also ./run.sh's informational flags, which need no settings."""
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from sparsecomm.__main__ import TOOLS

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# `python -m sparsecomm.x`, `torchrun ... -m module` or `torchrun ... file.py`, `python file.py`,
# `.venv/bin/python file.py` (the benchmark scripts' commands).
_MODULE = re.compile(r"(?:^|[\s`(])(?:\.venv/bin/)?python3? -m ((?:sparsecomm|torch)(?:\.\w+)*)(?: ([a-z]+))?")
_SCRIPT = re.compile(r"(?:^|[\s`(])(?:\.venv/bin/)?python3? ((?:examples|bench|scripts|cnn-lstm|ncf)/[\w./-]+\.py)")
_TORCHRUN = re.compile(r"(?:^|[\s`(])torchrun ((?:--?[\w-]+(?:[ =][\w.:-]+)? )*)(-m [\w.]+|[\w./-]+\.py)")


def documented() -> dict[str, set[str]]:
    """The commands of the docs as shell command lines that print their help; where each is shown."""
    found: dict[str, set[str]] = {}
    for doc in DOCS:
        text = doc.read_text()
        for module, word in _MODULE.findall(text):  # a module, or the tools' `sparsecomm TOOL`
            if module == "sparsecomm":
                if word not in TOOLS:
                    continue
                module = f"sparsecomm {word}"
            found.setdefault(f"python -m {module} --help", set()).add(doc.name)
        for script in _SCRIPT.findall(text):
            found.setdefault(f"python {script} --help", set()).add(doc.name)
        for _, target in _TORCHRUN.findall(text):
            found.setdefault("torchrun --help", set()).add(doc.name)
            found.setdefault(f"python {target} --help", set()).add(doc.name)
    return found


def clean_shell(script: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``script`` in bash with a new user's environment: no virtual environment on PATH."""
    env = {"HOME": os.environ.get("HOME", "/root"), "PATH": "/usr/local/bin:/usr/bin:/bin",
           "LANG": os.environ.get("LANG", "C.UTF-8")}
    return subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_docs_show_the_entry_points_this_test_expects():
    commands = documented()
    for expected in ("python -m sparsecomm compare --help", "python -m sparsecomm plot --help",
                     "python -m sparsecomm sweep --help", "python -m sparsecomm predict --help",
                     "python -m sparsecomm.train --help", "python examples/ddp_hook.py --help", "torchrun --help"):
        assert expected in commands, sorted(commands)


def test_every_documented_command_runs_in_a_new_shell_after_activate():
    commands = sorted(documented())
    # one shell: activate once, then each command; a line per command with its exit status
    lines = ["source scripts/activate 2>/dev/null || { echo 'ACTIVATE FAILED'; exit 3; }"]
    lines += [f"{c} >/dev/null 2>/tmp/sc-doc-$$.err; echo \"rc=$? {shlex.quote(c)}\"; "
              f"tail -n 2 /tmp/sc-doc-$$.err | sed 's/^/    /'" for c in commands]
    lines.append("rm -f /tmp/sc-doc-$$.err")
    done = clean_shell("\n".join(lines))
    assert done.returncode == 0 and "ACTIVATE FAILED" not in done.stdout, done.stdout + done.stderr
    failed = [line for line in done.stdout.splitlines() if line.startswith("rc=") and not line.startswith("rc=0 ")]
    assert not failed, done.stdout


def test_activate_is_needed_and_says_where_the_environment_is():
    """Without activate a new shell lacks the dependencies (what a new user met); with it, the
    shell's python is the environment's."""
    done = clean_shell("source scripts/activate && command -v python && command -v torchrun")
    assert done.returncode == 0, done.stderr
    python, torchrun = done.stdout.split()
    assert Path(python).parent == Path(torchrun).parent and "sparsecomm: using" in done.stderr


@pytest.mark.parametrize("flag", ["--help", "--list-presets", "--list-reducers"])
def test_run_sh_answers_its_informational_flags(flag):
    done = clean_shell(f"./run.sh {flag}", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "unbound variable" not in done.stderr and "Traceback" not in done.stderr
    expect = {"--help": "PRESET=", "--list-presets": "resnet18-cifar10", "--list-reducers": "exdyna"}[flag]
    assert expect in done.stdout


def test_a_data_dir_that_is_a_file_is_refused_before_any_work(tmp_path):
    afile = tmp_path / "data.txt"
    afile.write_text("not a folder")
    done = clean_shell(f"PRESET=mnist-cnn DATA_DIR={shlex.quote(str(afile))} OUTPUT_DIR={shlex.quote(str(tmp_path / 'out'))} "
                       f"./run.sh", timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: the data directory {afile} is a file, not a folder; set DATA_DIR (--data-dir) to a "
                      f"folder"], done.stderr
    assert not (tmp_path / "out").exists()
