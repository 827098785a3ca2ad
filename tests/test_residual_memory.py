"""Holding less between steps: a 16-bit error-feedback residual (``residual_dtype``) and the
reducer's buffers dropped after each reduce (``keep_buffers=False``), for every method."""
import io

import pytest
import torch

import reducer_scenarios as sc
import residual_scenarios as rs
from sparsecomm import reducers

METHODS = reducers.available()


@pytest.mark.parametrize("name", METHODS)
def test_a_bfloat16_residual_is_the_float32_one_rounded_each_step(clusters, name):
    for outcome in clusters(2).run(rs.narrow_residual_matches, name, "bfloat16"):
        assert outcome == {"tensors": True, "flat": True}


@pytest.mark.parametrize("name", ["topk", "exdyna", "dgc", "powersgd", "efsignsgd", "fp16"])
def test_a_float16_residual_on_three_workers(clusters, name):
    for outcome in clusters(3).run(rs.narrow_residual_matches, name, "float16", 3):
        assert outcome == {"tensors": True, "flat": True}


@pytest.mark.parametrize("name", METHODS)
def test_dropping_the_buffers_changes_no_value(clusters, name):
    for outcome in clusters(2).run(rs.released_buffers_match, name):
        assert outcome["same"]
        assert all(buffers == [] and spare for buffers, spare in outcome["left"]), outcome["left"]


@pytest.mark.parametrize("name", ["topk", "sage", "powersgd", "dgc"])
def test_a_narrow_residual_resumes_bit_exactly(clusters, name):
    assert all(clusters(2).run(sc.resume_matches, name, options={"residual_dtype": "bfloat16"}))


def test_a_state_with_another_residual_dtype_is_refused():
    narrow = reducers.build("topk", density=0.1, residual_dtype="bfloat16")
    narrow.reduce(sc.make_grads(sc.SHAPES, 0, 0))
    buf = io.BytesIO()
    torch.save(narrow.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["residual"].dtype == torch.bfloat16 and state["residual_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match=r"residual_dtype: saved 'bfloat16', this reducer None"):
        reducers.build("topk", density=0.1).load_state_dict(state)


@pytest.mark.parametrize("options, message", [
    ({"residual_dtype": "int8"}, r"residual_dtype must be one of \['float16', 'bfloat16', 'float32', 'float64'\], got 'int8'"),
    ({"keep_buffers": "no"}, r"keep_buffers must be true or false, got 'no'"),
])
def test_bad_memory_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        reducers.build("topk", **options)


def test_a_float16_residual_saturates_instead_of_overflowing():
    """Gradients of 4e4 sent at 1% pile up past float16's 65504 in the residual: it holds the
    largest finite value there, and the next steps go on (no non-finite x, nothing skipped)."""
    r = reducers.build("topk", density=0.01, residual_dtype="float16", nonfinite="skip")
    for step in range(6):
        r.reduce([torch.full((1000,), 4e4) + torch.arange(1000.0)])
        assert r.stats["skipped"] is False, step
    m = torch.cat([t.reshape(-1) for t in r.residual])
    assert torch.isfinite(m).all() and m.max() == torch.finfo(torch.float16).max


def test_keep_buffers_is_not_part_of_what_a_state_means():
    kept = reducers.build("topk", density=0.1, keep_buffers=True)
    kept.reduce(sc.make_grads(sc.SHAPES, 0, 0))
    lean = reducers.build("topk", density=0.1, keep_buffers=False)
    lean.load_state_dict(kept.state_dict())
    assert torch.equal(sc.flat(lean.reduce(sc.make_grads(sc.SHAPES, 0, 1))),
                       sc.flat(kept.reduce(sc.make_grads(sc.SHAPES, 0, 1))))


def test_a_bucket_reducer_refuses_a_state_with_another_residual_dtype():
    from sparsecomm.reducers.buckets import BucketReducer

    narrow = BucketReducer("topk", 0.1, residual_dtype="bfloat16")
    narrow.reduce(sc.make_grads(sc.SHAPES, 0, 0))
    with pytest.raises(ValueError, match=r"residual_dtype: saved 'bfloat16', this reducer None"):
        BucketReducer("topk", 0.1).load_state_dict(narrow.state_dict())
