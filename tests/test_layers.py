"""The package's layers (docs/layout.md): the reducers, models and data import none of the parts
above them; the tasks and the launch code never import the trainer; the trainer never imports
the tools around it; the shared configuration imports none of them (no cycles)."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sparsecomm"

# package part -> the parts it must not import
ABOVE_THE_LIBRARY = ("train", "tasks", "tools", "launch")
FORBIDDEN = {
    "reducers": (*ABOVE_THE_LIBRARY, "data", "models", "ddp", "fsdp"), "models": (*ABOVE_THE_LIBRARY, "reducers", "data"),
    "data": (*ABOVE_THE_LIBRARY, "reducers", "models"), "ddp.py": ABOVE_THE_LIBRARY, "fsdp.py": ABOVE_THE_LIBRARY,
    "launch": ("train", "tasks", "tools", "reducers"), "tasks": ("train", "tools"), "train": ("tools",),
    "config.py": (*ABOVE_THE_LIBRARY, "reducers"),
}


def imported(path: Path) -> set[str]:
    """The sparsecomm parts a module imports (first component below the package)."""
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module is not None:
            if node.level:
                base = path.relative_to(PACKAGE).parts[:-1]
                target = list(base[:len(base) - (node.level - 1)] if node.level > 1 else base) + node.module.split(".")
            elif node.module.startswith("sparsecomm."):
                target = node.module.split(".")[1:]
            else:
                continue
            if target:
                parts.add(target[0])
        elif isinstance(node, ast.Import):
            parts.update(a.name.split(".")[1] for a in node.names if a.name.startswith("sparsecomm."))
    return parts


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_lower_layers_never_import_the_trainer(part):
    files = [PACKAGE / part] if part.endswith(".py") else sorted((PACKAGE / part).rglob("*.py"))
    assert files
    for path in files:
        wrong = imported(path) & set(FORBIDDEN[part])
        assert not wrong, f"{path.relative_to(PACKAGE)} imports sparsecomm.{', '.join(sorted(wrong))}"
