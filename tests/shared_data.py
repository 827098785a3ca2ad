"""The real data sets kept offline beside the project (../shared/data), for tests that use them."""
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def need(path: Path) -> Path:
    """``path``, or skip the test (printing why) when the shared data is not there."""
    if not path.exists():
        reason = f"real data not available: {path} is missing"
        print(reason)
        pytest.skip(reason)
    return path
