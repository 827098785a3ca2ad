"""bench/ddp_accuracy.py: configurations trained by a preset's task on a 1-process gloo group,
and the table that turns steps to a target into seconds on each link (the runs are a benchmark)."""
import argparse
import json
import os
import sys

import pytest
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ddp_accuracy  # noqa: E402
import tiny_data  # noqa: E402


@pytest.mark.parametrize("model,label", [("mnist_cnn", "ddp"), ("mnist_cnn", "torch-fp16"),
                                         ("mnist_cnn", "topk/bucket"), ("lstm", "torch-bf16"),
                                         ("lstm", "powersgd/bucket")])
def test_a_configuration_trains_by_the_preset_and_is_evaluated(tmp_path, model, label):
    data = tiny_data.write_corpus(tiny_data.write_mnist(tmp_path / "data"), "ptb")
    args = argparse.Namespace(model=model, data_dir=str(data), density=0.01, bucket_mb=None, eval_every=3,
                              epochs=10, max_steps=7)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        results = {}
        args.configs = label
        ddp_accuracy._worker(0, results, args)
    finally:
        dist.destroy_process_group()
    run = results["runs"][label]
    assert results["model"] == model and run["steps"] == 7
    assert [s for s, _ in run["curve"]] == [3, 6, 7]
    if model == "lstm":  # validation perplexity, lower is better
        assert run["split"] == "valid" and run["metric"] == "perplexity" and not run["higher_is_better"]
        assert all(v > 1 for _, v in run["curve"])
    else:
        assert run["split"] == "test" and run["higher_is_better"] and all(0 <= v <= 1 for _, v in run["curve"])


def test_a_lower_is_better_metric_is_reached_at_or_under_its_target():
    curve = [[250, 260.0], [500, 180.0], [750, 151.0]]
    assert ddp_accuracy.steps_to(curve, 180.0, higher_is_better=False) == 500
    assert ddp_accuracy.steps_to(curve, 150.0, higher_is_better=False) is None


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
