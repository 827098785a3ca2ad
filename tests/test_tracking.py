"""Threshold controllers keep the achieved density near the target while the gradient scale
drifts (two workers, a few hundred steps), and ExDyna's partitions follow their rules."""
import statistics

import pytest

import reducer_scenarios as sc
import warm_start_scenarios as ws

DENSITY = 0.01
PAPER = {"controller": "paper", "warm_start": False}


def windows(series, start, width=50):
    return [statistics.mean(series[i:i + width]) for i in range(start, len(series), width)]


@pytest.mark.parametrize("name,measure", [("sage", "local_density"), ("micro", "density"), ("exdyna", "density")])
def test_density_tracks_the_target_under_drift(clusters, capsys, name, measure):
    """SAGE controls each worker's own density; MiCRO and ExDyna the total over all workers.
    The default (warm start, fast controller) is held to the band; the published method's
    figures are printed beside it."""
    figures = {}
    for label, options in (("default", {}), ("paper", PAPER)):
        per_step = clusters(2).run(ws.track, name, "drifting_grads", sc.SETTLE + 400, DENSITY, options)[0]
        ratios = [s[measure] / DENSITY for s in per_step]
        figures[label] = (windows(ratios[:sc.SETTLE], 0), windows(ratios, sc.SETTLE))
    with capsys.disabled():
        for label, (settling, drift) in figures.items():
            print(f"\n{name} ({label}): {measure}/target per 50 steps at a constant scale "
                  + " ".join(f"{r:.2f}" for r in settling) + "; per 50 steps while the scale drifts x2 and back: "
                  + " ".join(f"{r:.2f}" for r in drift) + f" (mean {statistics.mean(drift):.2f})")
    settling, drift = figures["default"]
    assert all(0.7 <= r <= 1.4 for r in drift), drift
    assert 0.85 <= statistics.mean(drift) <= 1.2
    assert 0.5 <= settling[0] <= 2 and all(0.85 <= r <= 1.2 for r in settling[1:]), settling


def test_exdyna_partitions_follow_the_rules(clusters):
    P = 3
    runs = clusters(P).run(sc.exdyna_partitions)
    moved = False
    for t, step in enumerate(runs[0]):
        assert all(run[t]["bounds"] == step["bounds"] for run in runs), "ranks disagree on partitions"
        bounds, d = step["bounds"], 50_000
        assert bounds[0][0] == 0 and bounds[-1][1] == d
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:])), "partitions must be contiguous and disjoint"
        assert step["block_size"] % 32 == 0
        assert all(n >= step["min_blocks"] for n in step["blocks"])
        assert all((b - a) % step["block_size"] == 0 for a, b in bounds[:-1])
        assert sorted(run[t]["owned"] for run in runs) == list(range(P)), "each partition has one owner"
        assert [run[t]["owned"] for run in runs] == [(t + 1 + r) % P for r in range(P)]
        if t and step["blocks"] != runs[0][t - 1]["blocks"]:
            moved = True
            changes = [a - b for a, b in zip(step["blocks"], runs[0][t - 1]["blocks"])]
            assert sum(changes) == 0 and max(abs(c) for c in changes) <= 2
    assert moved, "the skewed gradient should have moved some boundary"
    first, last = runs[0][0]["blocks"], runs[0][-1]["blocks"]
    assert last[0] < first[0], "the partition over the heavy head should have shrunk"
