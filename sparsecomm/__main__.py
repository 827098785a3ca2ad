"""``python -m sparsecomm TOOL ...``: the tools around training runs.

    python -m sparsecomm compare RUN...      one row per run (sparsecomm/tools/compare.py)
    python -m sparsecomm plot RUN...         figures of runs (sparsecomm/tools/plot.py)
    python -m sparsecomm sweep ...           a grid of runs (sparsecomm/tools/sweep.py)
    python -m sparsecomm predict ...         a method's step on clusters we do not have (sparsecomm/tools/predict.py)
    python -m sparsecomm netlab up N RATE    test hosts with real links (sparsecomm/tools/netlab.py)
    python -m sparsecomm train ...           the trainer (also python -m sparsecomm.train)
"""
from __future__ import annotations

import importlib
import sys

TOOLS = {"compare": "sparsecomm.tools.compare", "plot": "sparsecomm.tools.plot", "sweep": "sparsecomm.tools.sweep",
         "predict": "sparsecomm.tools.predict", "netlab": "sparsecomm.tools.netlab", "train": "sparsecomm.train.cli"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    tool, rest = argv[0], argv[1:]
    if tool not in TOOLS:
        print(f"error: unknown tool {tool!r}; tools: {', '.join(TOOLS)}", file=sys.stderr)
        return 2
    return importlib.import_module(TOOLS[tool]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
