"""bench/ddp_links.py: the hidden share's definition, and one worker's timing loop on a
1-process gloo group (the netlab run itself is a benchmark, not a test)."""
import argparse
import os
import sys

import pytest
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import ddp_links  # noqa: E402


def test_hidden_share_against_the_non_overlapped_twin():
    rows = {"local": {"t_iter": 1.0}, "ddp": {"t_iter": 1.25}, "exact/model": {"t_iter": 2.0},
            "fp16/bucket": {"t_iter": 1.5}, "fp16/model": {"t_iter": 1.5}, "torch-fp16": {"t_iter": 1.1}}
    assert ddp_links.twin("ddp") == "exact/model" and ddp_links.twin("topk/bucket") == "topk/model"
    assert ddp_links.hidden(rows, "ddp") == pytest.approx(0.75)
    assert ddp_links.hidden(rows, "fp16/bucket") == pytest.approx(0.0)
    assert ddp_links.hidden(rows, "torch-fp16") is None and ddp_links.hidden(rows, "fp16/model") is None


def test_one_worker_times_every_kind_of_configuration(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        args = argparse.Namespace(density=0.01, bucket_mb=None, steps=1, rounds=1)
        labels = ["local", "ddp", "exact/model", "torch-fp16", "fp16+allreduce/bucket", "fp16/model"]
        rows = ddp_links.time_model("mnist_cnn", labels, args)
    finally:
        dist.destroy_process_group()
    assert list(rows) == labels
    assert all(r["steps"] == 1 and r["t_iter"] > 0 and r["params"] == 1199882 for r in rows.values())
    assert rows["fp16+allreduce/bucket"]["scope"] == "bucket" and rows["fp16/model"]["scope"] == "model"
    assert rows["fp16/model"]["t_reduce"] > 0 and rows["ddp"]["t_reduce"] is None
    assert "fp16+allreduce/bucket" in ddp_links.table([{"hosts": 1, "rate": "none", "model": "mnist_cnn",
                                                         "rows": rows}])


def test_validate_prices_each_configuration_over_the_measured_floor(tmp_path):
    """The cost model's step is the measured floor plus what it predicts the exchange adds: all
    of it in model scope, only what outlasts backward by bucket; torch's 16-bit hooks send half
    of DDP's bytes."""
    from sparsecomm.tools import costmodel

    grads, shapes, ready = ddp_links._model_gradients("mnist_cnn", 2)
    assert len(grads) == 2 and len(ready) == len(shapes) and all(0 <= r <= 1 for r in ready)
    links = costmodel.Links(costmodel.Cost(1e-4, 1.0), costmodel.Cost(1e-4, 1.0))
    floor = {"t_iter": 0.5, "t_forward": 0.2, "t_backward": 0.3}
    rows = {"local": floor}
    slow = 1e8  # 100 Mbit/s: 4.8 MB of gradient takes about 0.77 s to all-reduce
    def step(label):
        return ddp_links.predicted(rows, ddp_links.priced(label, grads, shapes, ready, 0.01), links, slow)

    model, ddp, fp16 = step("exact/model"), step("ddp"), step("torch-fp16")
    assert model > ddp > fp16 > floor["t_iter"]
    assert model - floor["t_iter"] == pytest.approx(2 * 4 * sum(s.numel() for s in shapes) * 8 / 2 / slow, rel=0.05)
    assert ddp_links.priced("fp16+allreduce/bucket", grads, shapes, ready, 0.01) is None
