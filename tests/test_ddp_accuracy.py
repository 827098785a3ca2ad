"""bench/ddp_accuracy.py: one configuration's training loop on a 1-process gloo group, and the
table that turns steps to a target into seconds on each link (the runs are a benchmark)."""
import argparse
import json
import os
import sys

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import ddp_accuracy  # noqa: E402


@pytest.mark.parametrize("label", ["ddp", "torch-fp16", "topk/bucket"])
def test_a_configuration_trains_its_two_epochs_and_is_evaluated(tmp_path, label):
    gen = torch.Generator().manual_seed(0)
    train = (torch.randn(300, 1, 28, 28, generator=gen), torch.randint(0, 10, (300,), generator=gen))
    test = (torch.randn(50, 1, 28, 28, generator=gen), torch.randint(0, 10, (50,), generator=gen))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        args = argparse.Namespace(density=0.01, bucket_mb=None, eval_every=3)
        run = ddp_accuracy._train_one(label, args, train, test)
    finally:
        dist.destroy_process_group()
    assert run["steps"] == 8  # 300 // 64 = 4 steps per epoch, 2 epochs
    assert [s for s, _ in run["curve"]] == [3, 6, 8] and all(0 <= a <= 1 for _, a in run["curve"])


def test_steps_to_a_target_times_the_step_on_each_link(tmp_path, capsys):
    runs = {"ddp": {"curve": [[50, 0.95], [100, 0.981], [150, 0.99]]},
            "exdyna/bucket": {"curve": [[50, 0.97], [100, 0.979], [150, 0.985]]}}
    cells = [{"hosts": 2, "rate": r, "model": "mnist_cnn",
              "rows": {"ddp": {"t_iter": t}, "exdyna/bucket": {"t_iter": 0.5}}} for r, t in (("100mbit", 2.0), ("10gbit", 0.2))]
    (tmp_path / "acc.json").write_text(json.dumps({"runs": runs}))
    (tmp_path / "links.json").write_text(json.dumps({"cells": cells}))
    assert ddp_accuracy.steps_to(runs["ddp"]["curve"], 0.98) == 100 and ddp_accuracy.steps_to(runs["ddp"]["curve"], 0.999) is None
    ddp_accuracy.main(["table", str(tmp_path / "acc.json"), str(tmp_path / "links.json")])
    out = capsys.readouterr().out
    assert "| ddp | 0.9900 | 100 | 100 | 150 | 200 | 20 |" in out
    assert "| exdyna/bucket | 0.9850 | 50 | 150 | 150 | 75 | 75 |" in out
    assert "- 100mbit: first to 0.98: exdyna/bucket (75 s)" in out and "- 10gbit: first to 0.98: ddp (20 s)" in out
