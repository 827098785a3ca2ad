"""Virtual workers: W logical workers in one process against W gloo processes on the same
seeds (reduce steps of every registered method, short training runs), resume, the world's
own rules, and bad input."""
import ctypes.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import tiny_data
import train_scenarios as ts
import virtual_scenarios as vs
from run_dirs import assert_same_records
from sparsecomm import reducers
from sparsecomm.config import load_config
from sparsecomm.launch.job import join
from sparsecomm.reducers.comm.virtual import VirtualWorld, VirtualWorldError, ring_sum
from sparsecomm.train import workers as workers_module
from sparsecomm.train.cli import main as cli_main
from sparsecomm.train.loop import Stopped, Trainer
from test_training import overrides

ROOT = Path(__file__).resolve().parents[1]

P = 4
STEPS = 20
DENSITY = 0.05


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tiny_data.write_all(tmp_path_factory.mktemp("data"))


# ---------------------------------------------------------------------- against gloo processes
def test_every_method_matches_gloo_processes_bit_for_bit(clusters):
    """20 reduce steps of every registered method: 4 virtual workers give each rank the averages,
    residuals, byte counts and densities that rank gets as one of 4 gloo processes."""
    cases = vs.cases()
    real = clusters(P).run(vs.methods_in_processes, cases, STEPS, DENSITY)
    virtual = vs.methods_virtual(cases, P, STEPS, DENSITY)
    for name, _ in cases:
        for r in range(P):
            a, b = real[r][name], virtual[r][name]
            for t in range(STEPS):
                assert torch.equal(a["avg"][t], b["avg"][t]), f"{name}: rank {r}'s average differs at step {t}"
                assert torch.equal(a["memory"][t], b["memory"][t]), f"{name}: rank {r}'s residual differs at step {t}"
                assert a["stats"][t] == b["stats"][t], f"{name}: rank {r}'s stats differ at step {t}"


@pytest.mark.parametrize("size", [3, 4])
def test_all_reduce_adds_in_gloos_ring_order(clusters, size):
    """ring_sum reproduces gloo's all-reduce bit for bit (sizes from 1 element to several 1 MiB
    segments per rank); adding in rank order would not."""
    results = clusters(size).run(vs.gloo_all_reduces)
    naive_differs = False
    i = 0
    for n in vs.RING_SIZES:
        for dtype in vs.RING_DTYPES:
            inputs = vs.ring_inputs(size, n, dtype)
            for r in range(size):
                assert torch.equal(results[r][i], results[0][i])
            assert torch.equal(ring_sum(inputs), results[0][i]), f"{n} x {dtype}"
            naive = inputs[0].clone()
            for x in inputs[1:]:
                naive += x
            naive_differs |= not torch.equal(naive, results[0][i])
            i += 1
    assert naive_differs, "the inputs do not tell the orders apart"


def _state(run_dir, workers):
    ck = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    folder = run_dir / "checkpoints" / ck["tag"]
    shared = torch.load(folder / "shared.pt", weights_only=True)
    ranks = [torch.load(folder / f"rank-{r}.pt", weights_only=True) for r in range(workers)]
    return ck, shared, ranks


def _train_virtual(ov, workers, fresh=False):
    """Train on virtual workers with one thread, as the gloo processes compared with do (a
    convolution's backward sums in another order with more threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(load_config(None, ov), join("cpu", virtual=workers), fresh=fresh)
        try:
            return trainer, trainer.run()
        except Stopped:
            return trainer, None
    finally:
        torch.set_num_threads(threads)


TRAINING = {  # task, reducer, extra settings: dropout; batch norm; gradient hooks (overlap); the other tasks
    "mnist-exdyna": ("mnist", "exdyna", []),
    "cifar10-sage": ("cifar10", "sage", []),
    "mnist-omgs": ("mnist", "omgs", ["reducer.options={groups: [3, 5]}"]),
    "logreg-gtopk": ("logreg", "gtopk", []),
    "ml-1m-powersgd": ("ml-1m", "powersgd", []),
}


@pytest.mark.parametrize("case", sorted(TRAINING))
def test_training_matches_gloo_processes(clusters, data_dir, tmp_path, accept_tiny_cifar, case):
    """The same short run on 4 gloo processes and on 4 virtual workers ends with the same model
    (parameters and normalisation statistics) and the same residual on every rank."""
    task, reducer, extra = TRAINING[case]
    train = vs.train_tiny_cifar if task == "cifar10" else ts.train
    real = clusters(P).run(train, overrides(task, data_dir, tmp_path / "real", reducer, extra, epochs=1.5))
    trainer, summary = _train_virtual(overrides(task, data_dir, tmp_path / "virtual", reducer, extra, epochs=1.5), P)
    assert summary["steps"] == real[0]["steps"] > 1 and summary["workers"] == P and summary["virtual"]
    real_dir = next((tmp_path / "real").iterdir())
    assert trainer.run_dir.name == real_dir.name.replace(f"-P{P}-", f"-V{P}-")
    (_, a, ra), (ck, b, rb) = _state(real_dir, P), _state(trainer.run_dir, P)
    assert ck["virtual"] is True and ck["world"] == P
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), f"{key} differs"
    for r in range(P):
        assert torch.equal(ra[r]["reducer"]["residual"], rb[r]["reducer"]["residual"]), f"rank {r}'s residual"
    if reducer == "omgs":
        assert trainer.reducer.stats["overlapped"], "the hooks of worker 0 launched its groups during backward"


# --------------------------------------------------------------------------- runs and records
@pytest.mark.parametrize("task,reducer", [("mnist", "topk"), ("ptb", "exdyna")])
def test_virtual_run_resumes_bit_exactly(data_dir, tmp_path, task, reducer):
    """4 virtual workers stopped at max_steps and resumed end as an uninterrupted run does: the
    model, every worker's residual, RNG and (for the LSTM) carried state, and the records."""
    straight, _ = _train_virtual(overrides(task, data_dir, tmp_path / "straight", reducer, epochs=2.5), P)
    ov = overrides(task, data_dir, tmp_path / "resumed", reducer, epochs=2.5)
    first, summary = _train_virtual(ov + ["max_steps=3"], P)
    assert summary is None and first.step == 3
    second, summary = _train_virtual(ov, P)
    assert summary["complete"] and second.step == straight.step
    (_, a, ra), (_, b, rb) = _state(straight.run_dir, P), _state(second.run_dir, P)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), f"{key} differs"
    for r in range(P):
        assert torch.equal(ra[r]["reducer"]["residual"], rb[r]["reducer"]["residual"]), f"rank {r}'s residual"
        assert torch.equal(ra[r]["rng"]["torch"], rb[r]["rng"]["torch"]), f"rank {r}'s random stream"
        assert repr(ra[r]["task"]) == repr(rb[r]["task"]), f"rank {r}'s task state"
    assert_same_records(straight.run_dir, second.run_dir, stopped_at=3)
    config = yaml.safe_load((second.run_dir / "config.yaml").read_text())["environment"]
    assert (config["world_size"], config["virtual"], config["backend"]) == (P, True, "virtual")


def test_a_virtual_checkpoint_is_not_resumed_by_processes(data_dir, tmp_path):
    ov = overrides("mnist", data_dir, tmp_path, "topk", ["name=fixed", "max_steps=2"])
    _train_virtual(ov, 2)
    with pytest.raises(Exception, match=r"written by 2 virtual workers in one process; this job has 1 workers"):
        Trainer(load_config(None, ov), join("cpu"))


# ------------------------------------------------------------------------- the world's rules
def test_many_workers_conserve_and_agree():
    """128 workers: identical averages everywhere and sum_w x_w = W avg + sum_w m_w, per method."""
    W, d = 128, 3000
    for name in ("exdyna", "topk", "gtopk", "powersgd"):
        world = VirtualWorld(W)
        rs = [reducers.build(name, density=0.01, group=world.communicator(r)) for r in range(W)]
        grads = [[torch.randn(d, generator=torch.Generator().manual_seed(r)).view(30, 100)] for r in range(W)]
        averages = world.run(lambda r: rs[r].reduce(grads[r]))
        assert all(torch.equal(a[0], averages[0][0]) for a in averages), name
        total = sum(g[0].double() for g in grads)
        torch.testing.assert_close(W * averages[0][0].double() + sum(r.residual[0].double() for r in rs), total,
                                   rtol=1e-5, atol=1e-4, msg=name)
        world.close()


def _skip_on_rank(r, comm, skipper):
    if r != skipper:
        comm[r].all_reduce_(torch.ones(3))


def test_a_collective_one_worker_never_joins_is_named():
    world = VirtualWorld(4)
    comm = [world.communicator(r) for r in range(4)]
    with pytest.raises(VirtualWorldError, match=r"ranks 0-1, 3 wait for all_reduce #0 \(3 of 4 joined\); rank 2 "
                                                r"finished"):
        world.run(lambda r: _skip_on_rank(r, comm, 2))
    with pytest.raises(VirtualWorldError, match="unusable after an earlier failure"):
        world.run(lambda r: None)


def test_mismatched_collectives_and_errors_reach_every_worker():
    world = VirtualWorld(3)
    comm = [world.communicator(r) for r in range(3)]
    with pytest.raises(VirtualWorldError, match=r"collective #0 does not match across workers: rank 0: all_reduce "
                                                r"of 2 x float32; rank 1: all_reduce of 2 x float32; rank 2: "
                                                r"all_gather of 2 x float32"):
        world.run(lambda r: comm[r].all_gather(torch.ones(2)) if r == 2 else comm[r].all_reduce_(torch.ones(2)))

    def fail_on_1(r):
        if r == 1:
            raise KeyError("rank 1 broke")
        comm2[r].broadcast_(torch.full((2,), float(r)), 0)

    world = VirtualWorld(3)
    comm2 = [world.communicator(r) for r in range(3)]
    with pytest.raises(KeyError, match="rank 1 broke"):
        world.run(fail_on_1)


def test_results_of_collectives_and_messages():
    world = VirtualWorld(3)
    comm = [world.communicator(r) for r in range(3)]

    def work(r):
        total = comm[r].all_reduce_(torch.tensor([float(r + 1)]))
        table = comm[r].all_gather(torch.tensor([r, 10 * r]))
        root = comm[r].broadcast_(torch.tensor([float(r)]), 2)
        if r == 0:
            comm[r].send(torch.tensor([7.0]), 1)
        got = comm[r].recv_(torch.zeros(1), 0) if r == 1 else None
        swapped = comm[r].exchange(torch.tensor([float(r)]), 1 - r) if r < 2 else None
        return total.item(), table.tolist(), root.item(), got, swapped, comm[r].bytes_sent, comm[r].bytes_wire

    out = world.run(work)
    for r, (total, table, root, got, swapped, sent, wire) in enumerate(out):
        assert total == 6.0 and table == [[0, 0], [1, 10], [2, 20]] and root == 2.0
        assert sent == 4 + 16 + (4 if r == 2 else 0) + (4 if r == 0 else 0) + (4 if r < 2 else 0)
        assert wire == pytest.approx(2 * 2 / 3 * 4 + 2 * 16 + (4 if r < 2 else 0) + (4 if r == 1 else 0)
                                     + (4 if r < 2 else 0))
    assert out[1][3].tolist() == [7.0] and out[0][4].tolist() == [1.0] and out[1][4].tolist() == [0.0]


def test_writing_into_a_shared_all_gather_result_is_caught():
    world = VirtualWorld(2)
    comm = [world.communicator(r) for r in range(2)]
    with pytest.raises(VirtualWorldError, match="all-gather results are read-only"):
        world.run(lambda r: comm[r].all_gather(torch.ones(3)).add_(1) if r == 1 else comm[r].all_gather(torch.ones(3)))


# ---------------------------------------------------------------------------------- bad input
def _cli(data_dir, tmp_path, *args):
    return cli_main(["--task", "mnist", "--model", "mnist_cnn", "--data-dir", str(data_dir), "--output-dir",
                     str(tmp_path), "--set", "records.progress=false", "--epochs", "0.1", *args])


def test_bad_virtual_worker_counts_are_one_line_errors(data_dir, tmp_path, capsys, monkeypatch, caplog):
    with pytest.raises(SystemExit) as done:
        _cli(data_dir, tmp_path, "--virtual-workers", "0")
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: argument --virtual-workers: must be a positive integer") and "\n" not in err
    # 128 training images (tiny_data.write_mnist)
    assert _cli(data_dir, tmp_path, "--virtual-workers", "200") == 2
    assert "--virtual-workers 200 exceeds the 128 training examples of 'mnist'" in caplog.text
    caplog.clear()
    for name, value in (("TORCHELASTIC_RUN_ID", "x"), ("RANK", "0"), ("WORLD_SIZE", "2")):  # as torchrun sets them
        monkeypatch.setenv(name, value)
    assert _cli(data_dir, tmp_path, "--virtual-workers", "8") == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"error: --virtual-workers 8 simulates 8 workers in one process, but this process is one "
                        r"of 2 started by torchrun: .*drop --virtual-workers", err), err
    for name in ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name)
    monkeypatch.setattr(workers_module, "available_memory", lambda device: 50_000_000)
    assert _cli(data_dir, tmp_path, "--virtual-workers", "64", "--reducer", "exdyna") == 2
    [line] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert re.fullmatch(r"--virtual-workers 64: mnist_cnn \([\d,]+ float32 parameters\) needs about [\d.]+ GB for 64 "
                        r"workers' gradients, residuals and reducer buffers; 50 MB of memory is available", line), line


@pytest.mark.skipif(not (sys.platform.startswith("linux") and os.path.exists("/proc/self/status")
                         and ctypes.util.find_library("c")), reason="needs Linux's /proc and glibc's mallopt")
@pytest.mark.parametrize("method", ["topk", "sage"])
def test_a_bounded_allocator_keeps_many_workers_within_the_estimate(method):
    """With glibc's default allocator the heap of 64 workers fragmented to 1.6x the live bytes
    (2.0 GB against 1.2 GB for top-k on the MNIST CNN's sizes); bounded, the peak stays within
    the estimate's 15%."""
    code = ("import json, sys; sys.path[:0] = sys.argv[1:3]; import virtual_scenarios as vs; "
            f"print(json.dumps(vs.resident_growth({method!r}, 64, [1_179_648, 18_432, 1_280], bound=True)))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT), str(ROOT / "tests")], capture_output=True,
                         text=True, timeout=300, check=True).stdout
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["growth"] <= 1.15 * figures["estimate"], figures


def test_the_host_allocator_is_bounded_only_when_its_fragmentation_would_not_fit(monkeypatch):
    """bound_allocator_if_tight answers whether the allocator is bounded; it bounds it only when
    4x the estimate would pass the share of the memory available, and only for host memory."""
    calls = []
    monkeypatch.setattr(workers_module, "_bounded", False)
    monkeypatch.setattr(workers_module, "bound_host_allocator", lambda: calls.append(1) or True)
    GB = 1 << 30
    assert not workers_module.bound_allocator_if_tight(GB, 5 * GB, torch.device("cpu"), 0.9) and not calls
    assert not workers_module.bound_allocator_if_tight(GB, 4 * GB, torch.device("cuda"), 0.9) and not calls
    assert workers_module.bound_allocator_if_tight(GB, 4 * GB, torch.device("cpu"), 0.9) and calls == [1]


def test_all_to_all_and_routed_pairs_in_a_virtual_world():
    """The virtual communicator's all-to-all (uneven and empty parts) and a routed top-k: each
    worker's owned coordinates of the average, to the bit, as without routing."""
    from sparsecomm.reducers.comm.exchange import Owners

    P = 3
    world = VirtualWorld(P)
    comms = [world.communicator(r) for r in range(P)]
    sends = [[2, 0, 1], [1, 3, 0], [0, 2, 2]]  # worker w sends sends[w][r] elements to worker r

    def swap(r):
        data = torch.arange(sum(sends[r]), dtype=torch.float32) + 100 * r
        return comms[r].all_to_all(data, sends[r], [sends[w][r] for w in range(P)])

    got = world.run(swap)
    for r in range(P):
        parts = []
        for w in range(P):
            at = sum(sends[w][:r])
            parts.append(torch.arange(at, at + sends[w][r], dtype=torch.float32) + 100 * w)
        assert torch.equal(got[r], torch.cat(parts))
    shapes = [(40, 30), (30,), (7, 3, 3, 3)]
    d = sum(torch.Size(s).numel() for s in shapes)
    owners = Owners([(0, 500, 0), (500, 900, 1), (900, d, 2)], P)
    grads = [[torch.randn(s, generator=torch.Generator().manual_seed(7 * r + i)) for i, s in enumerate(shapes)]
             for r in range(P)]
    plain = [reducers.build("topk", density=0.05, group=world.communicator(r)) for r in range(P)]
    routed = [reducers.build("topk", density=0.05, group=world.communicator(r)) for r in range(P)]
    for r in range(P):
        routed[r].route_to(owners)
    want = world.run(lambda r: torch.cat([g.reshape(-1) for g in plain[r].reduce(grads[r])]))
    have = world.run(lambda r: torch.cat([g.reshape(-1) for g in routed[r].reduce(grads[r])]))
    for r in range(P):
        for a, b in owners.owned(r):
            assert torch.equal(have[r][a:b], want[r][a:b])
        assert routed[r].stat("routed") and routed[r].stat("bytes_wire") < plain[r].stat("bytes_wire")
