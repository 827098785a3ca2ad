"""bench/results_files.py: a benchmark sets an earlier run's result file aside instead of
overwriting it (the end-to-end case is in test_research_compare.py)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import results_files  # noqa: E402


def test_earlier_results_are_numbered_aside(tmp_path, capsys):
    out = tmp_path / "reducers.json"
    assert results_files.keep_earlier(out) is None and not list(tmp_path.iterdir())
    for n, text in enumerate(["first", "second"], start=1):
        out.write_text(text)
        assert results_files.keep_earlier(out) == tmp_path / f"reducers.{n}.json"
        assert not out.exists()
    assert (tmp_path / "reducers.1.json").read_text() == "first"
    assert (tmp_path / "reducers.2.json").read_text() == "second"
    assert capsys.readouterr().out.splitlines()[-1] == f"{out}: an earlier run's results, kept as {tmp_path}/reducers.2.json"
