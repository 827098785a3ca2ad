"""Building reducers: the registry, option checking and single-worker use."""
import pytest
import torch

from sparsecomm import reducers

FIRST_METHODS = {"exact", "topk", "global_topk", "randomk", "thresh", "sage", "micro", "exdyna"}


def test_available_lists_the_methods():
    assert FIRST_METHODS <= set(reducers.available())


def test_unknown_name_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown reducer 'topkk'; available: .*exdyna.*topk"):
        reducers.build("topkk")


def test_unknown_option_names_it_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown option 'blocks' for reducer 'exdyna'; allowed: block_align, "
                                         r"controller, indices, num_blocks, selection, values, warm_start, nonfinite, "
                                         r"sync_timing"):
        reducers.build("exdyna", blocks=12)


@pytest.mark.parametrize("density", [0, -0.1, 1.5, float("nan"), "0.1", True, None])
def test_density_outside_the_unit_interval_is_refused(density):
    with pytest.raises(ValueError, match="density must be a number in"):
        reducers.build("topk", density=density)


@pytest.mark.parametrize("threshold", [0, -1.0, float("nan"), float("inf"), "1"])
def test_threshold_must_be_positive(threshold):
    with pytest.raises(ValueError, match="threshold must be a finite number > 0"):
        reducers.build("thresh", threshold=threshold)


@pytest.mark.parametrize("name,options,message", [
    ("topk", {"exchange": "allgather"}, "exchange must be one of"),
    ("thresh", {"scope": "tensor"}, "scope must be one of"),
    ("exdyna", {"num_blocks": 0}, "num_blocks must be a positive integer"),
    ("exdyna", {"block_align": 2.5}, "block_align must be a positive integer"),
    ("sage", {"sample_error": 0}, r"sample_error must be a number in \(0, 1\)"),
    ("micro", {"nonfinite": "ignore"}, "nonfinite must be one of"),
])
def test_bad_option_values_are_refused(name, options, message):
    with pytest.raises(ValueError, match=message):
        reducers.build(name, **options)


def test_method_options_report_defaults():
    assert reducers.method_options("exdyna") == {"num_blocks": 1024, "block_align": 32, "warm_start": True,
                                                 "controller": "fast", "selection": "auto", "values": "full",
                                                 "indices": "int32"}
    assert reducers.method_options("thresh") == {"threshold": None, "scope": "flat", "selection": "auto",
                                                 "exchange": "gather", "values": "full", "indices": "int32"}
    assert reducers.method_options("exact") == {}


@pytest.mark.parametrize("name", sorted(FIRST_METHODS))
def test_single_worker_without_process_group(name):
    r = reducers.build(name, density=0.1)
    assert r.world_size == 1 and r.residual == []
    g = [torch.randn(8, 5), torch.randn(3)]
    avg = r.reduce(g)
    x = torch.cat([t.reshape(-1) for t in g])
    got = torch.cat([t.reshape(-1) for t in avg])
    residual = torch.cat([t.reshape(-1) for t in r.residual])
    torch.testing.assert_close(got + residual, x)  # conservation with P = 1
    assert r.stats["bytes_wire"] == 0 and r.stats["bytes_sent"] > 0


def test_exact_is_the_identity_for_one_worker():
    g = [torch.randn(4, 4), torch.randn(2)]
    avg = reducers.build("exact").reduce(g)
    assert all(torch.equal(a, b) for a, b in zip(avg, g))


def test_error_feedback_off_keeps_no_residual():
    r = reducers.build("global_topk", density=0.1, error_feedback=False)
    r.reduce([torch.randn(50)])
    assert all(int(m.count_nonzero()) == 0 for m in r.residual)
    assert r.stats["residual_norm"] == 0.0
