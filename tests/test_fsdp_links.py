"""bench/fsdp_links.py: its workers' timing loop over every kind of FSDP configuration on 2
local processes, and its tables from a small results file (the netlab run itself is a
benchmark, not a test)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import fsdp_links
import gloo_workers


def test_two_workers_time_every_kind_of_configuration(tmp_path):
    """The real worker entry on 2 local processes (no netlab: gloo over 127.0.0.1): FSDP's own
    reduce-scatter in fp32 and bfloat16, the floor without it, and methods as the reduce-scatter
    of each unit (FSDP calls no reduce-scatter on a group of one)."""
    result = tmp_path / "rows.json"
    labels = "local,fsdp,fsdp-bf16,topk,powersgd"
    command = [sys.executable, fsdp_links.__file__, "worker", "--models", "mnist_cnn", "--configs", labels,
               "--steps", "1", "--rounds", "1", "--result", str(result)]
    port = gloo_workers.free_port()
    procs = [subprocess.Popen(command, env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                            "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    rows = json.loads(result.read_text())["mnist_cnn"]
    assert list(rows) == labels.split(",")
    assert all(r["steps"] == 1 and r["t_iter"] > 0 and r["params"] == 1199882 for r in rows.values())
    assert rows["fsdp"]["t_reduce"] is None and rows["local"]["t_reduce"] is None
    assert rows["topk"]["units"] >= 2 and rows["topk"]["t_reduce"] > 0
    # powersgd's P and Q against topk's pairs at 1% (about 96 kB): both far under 4.8 MB
    assert 0 < rows["powersgd"]["bytes_sent"] < 1e6 and 0 < rows["topk"]["bytes_sent"] < 1e6


def test_tables_from_a_results_file(tmp_path, capsys):
    def row(t, tx, reduce=None):
        return {"t_iter": t, "t_forward": 0.01, "t_backward": t / 2, "t_step": 0.001, "t_reduce": reduce,
                "tx_bytes": tx, "steps": 6, "params": 1199882}
    cell = {"hosts": 2, "rate": "100mbit", "model": "mnist_cnn",
            "rows": {"local": row(0.1, 2.5e6), "fsdp": row(0.4, 7.5e6), "topk": row(0.2, 2.6e6, 0.05)}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"cells": [cell]}))
    assert fsdp_links.main(["table", str(path)]) == 0
    text = capsys.readouterr().out
    assert "/fsdp" in text and "mnist_cnn (1.20M parameters), 2 hosts at 100mbit" in text
    assert fsdp_links.main(["table", str(path), "--markdown"]) == 0
    md = capsys.readouterr().out.splitlines()
    assert "| topk | 200 | 100 | 50 | 2.6 | 0.1 | 0.50 |" in md and "| fsdp | 400 | 200 |  | 7.5 | 5 | 1.00 |" in md
    assert "| local | 100 | 50 |  | 2.5 |  | 0.25 |" in md
