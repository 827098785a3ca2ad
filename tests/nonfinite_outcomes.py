"""What a NaN on one rank must do wherever a method reduces (the DDP hook, FSDP's
reduce-scatter): with ``nonfinite="skip"`` that step is skipped and zeroed on every rank, with
``"raise"`` every rank raises and the group stays in step."""
from __future__ import annotations

from typing import Any, Callable


def assert_skip_then_raise(cluster: Any, scenario: Callable[[str], dict[str, Any]]) -> None:
    """``scenario(policy)``: three steps, a NaN loss on rank 1 at step 1 (see ddp_scenarios.nonfinite)."""
    for got in cluster.run(scenario, "skip"):
        assert got["error"] is None and got["group_alive"]
        assert [s["skipped"] for s in got["steps"]] == [False, True, False]
        assert [s["zero"] for s in got["steps"]] == [False, True, False]
    for got in cluster.run(scenario, "raise"):
        assert got["group_alive"] and len(got["steps"]) == 1
        assert got["error"] is not None and got["error"][0] == "NonFiniteGradientError", got
