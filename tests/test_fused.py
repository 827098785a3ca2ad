"""The fused selection pass (sparsecomm.reducers.select.fused): the compiled CPU loop and the Triton
kernel (under TRITON_INTERPRET=1, on CPU tensors) against the torch reference, bit for bit;
the four threshold methods and the top-k methods (whose fused path is
sparsecomm.reducers.select.exact_topk, tested in tests/test_exact_topk.py) give the same results
with selection="torch" and "fused" across real gloo process groups of 1 to 4 workers; states
move between the two."""
import os
import subprocess
import sys

import pytest
import torch

import fused_scenarios as fs
from sparsecomm import reducers
from sparsecomm.reducers.select import fused

METHODS = ("exdyna", "micro", "thresh", "sage", "topk", "global_topk", "gtopk", "cltk", "legacy", "deft")
VARIANT = {"exdyna": {"warm_start": False}, "micro": {"warm_start": False}, "sage": {"warm_start": False},
           "thresh": {"exchange": "union"}, "topk": {"exchange": "union"}, "global_topk": {"exchange": "union"},
           "legacy": {"exchange": "union", "group_compressions": [0.2, 0.02]}}
CPU = torch.device("cpu")
HAS_TRITON = fused.triton_importable()


def cases():
    """(n, start, end, threshold, scale, special) covering empty ranges, nothing passing,
    everything passing, NaN and Inf, sizes not a multiple of a block or a group."""
    return [
        (0, 0, 0, 0.5, 1.0, None), (1, 0, 1, 0.0, 1.0, None), (5, 2, 2, 0.1, 1.0, None),
        (1000, 0, 1000, 2.0, 1.0, None), (1000, 0, 1000, 99.0, 1.0, None), (1000, 0, 1000, 0.0, 1.0, None),
        (4099, 17, 3001, 1.5, 1.0, "nan"), (4099, 0, 4099, 1.0, 1.0, "inf"), (2053, 1030, 2053, 0.7, 1.0, None),
        (3000, 0, 3000, None, 1.0, "nan"), (1025, 3, 1024, 0.0, 1e-30, "zeros"),
    ]


def make(n, scale, special, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed + n)
    g = (torch.randn(n, generator=gen) * scale).to(dtype)
    m = (torch.randn(n, generator=gen) * scale).to(dtype)
    if special == "nan" and n > 40:
        g[20], m[33] = float("nan"), float("nan")
    if special == "inf" and n > 40:
        g[21], m[38] = float("inf"), float("-inf")
    if special == "zeros":
        g[::2], m[::2] = 0.0, -0.0
    return g, m


def same(a, b):
    """Bit-identical tensors (NaN payloads included)."""
    if a.dtype.is_floating_point:
        view = {torch.float32: torch.int32, torch.float64: torch.int64}[a.dtype]
        return a.dtype == b.dtype and torch.equal(a.view(view), b.view(view))
    return a.dtype == b.dtype and torch.equal(a, b)


def check_against_reference(backend, kinds=((torch.float32, torch.int32), (torch.float32, torch.int64),
                                             (torch.float64, torch.int32), (torch.float64, torch.int64)),
                            capacities=(None, 1)):
    for dtype, index_dtype in kinds:
        if True:
            for n, start, end, thr, scale, special in cases():
                g, m = make(n, scale, special, dtype)
                for mode in ("g+m", "copy", "in place"):
                    mm = m if mode == "g+m" else None
                    ref_x = None if mode == "in place" else torch.empty(n, dtype=dtype)
                    x = None if mode == "in place" else torch.full((n,), 7.0, dtype=dtype)
                    xr, want = fused.reference(g, mm, ref_x, thr, start, end, index_dtype)
                    for capacity in capacities:
                        xf, got = fused.compensate_select(g, mm, x, thr, start, end, index_dtype, capacity, backend)
                        where = (backend, dtype, index_dtype, n, start, end, thr, special, mode, capacity)
                        assert same(xf, xr), where
                        assert same(got.indices, want.indices), where
                        assert same(got.values, want.values), where
                        assert bool(got.finite) == bool(want.finite), where


def test_compiled_cpu_loop_matches_the_torch_reference():
    assert fused.unavailable_reason(CPU, torch.float32, torch.int32) is None, "gcc is needed here"
    check_against_reference("c")


def test_threshold_is_compared_in_the_vectors_dtype_as_torch_does():
    x = torch.tensor([0.1, -0.1, 0.2], dtype=torch.float32)
    t = float(x[0]) + 1e-12  # above x[0] as a double, equal to it in float32
    for backend in ("c",):
        _, got = fused.compensate_select(x, None, None, t, 0, 3, torch.int32, backend=backend)
        assert got.indices.tolist() == [0, 1, 2]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernel_matches_the_torch_reference_under_the_interpreter():
    """The interpreter runs the kernel on CPU tensors; it must be switched on before triton
    compiles the kernel, hence a fresh process."""
    code = ("import test_fused as t, torch\n"
            "t.check_against_reference('triton', ((torch.float32, torch.int32), (torch.float64, torch.int64)))\n"
            "print('ok')\n")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(__file__), os.path.dirname(os.path.dirname(__file__)), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_selection_option_is_checked_and_listed():
    for name in METHODS:
        assert reducers.method_options(name)["selection"] == "auto"
        with pytest.raises(ValueError, match=r"selection must be one of \['auto', 'torch', 'fused'\]"):
            reducers.build(name, selection="fast")
    with pytest.raises(ValueError, match="scope='flat' or selection='torch'"):
        reducers.build("thresh", scope="layer", selection="fused")
    r = reducers.build("thresh", scope="layer")  # auto: torch, said so
    r.reduce([torch.randn(10), torch.randn(5)])
    assert r.describe() == {"selection": "torch"}


def test_fused_asked_for_where_it_cannot_run_is_an_error(monkeypatch):
    monkeypatch.setattr(fused, "unavailable_reason", lambda *a: "no C compiler found (set CC, or install gcc)")
    for name in METHODS:
        r = reducers.build(name, selection="fused")
        with pytest.raises(ValueError, match="selection='fused' cannot run here: no C compiler"):
            r.reduce([torch.randn(100)])
        auto = reducers.build(name)
        auto.reduce([torch.randn(100)])
        assert auto.describe()["selection"] == "torch"
    with pytest.raises(ValueError, match="cannot run here: fused selection handles float32 and float64"):
        monkeypatch.undo()
        reducers.build("exdyna", selection="fused").reduce([torch.randn(100).half()])


def same_number(a, b):
    return a == b or (a != a and b != b)  # NaN stats (e.g. a skipped step's) match NaN


def compare(results, label):
    for rank, res in enumerate(results):
        for layout in ("flat", "tensors"):
            torch_rows, fused_rows = res["torch", layout]["rows"], res["fused", layout]["rows"]
            assert res["fused", layout]["describe"]["selection"] == "fused"
            for t, ((a0, m0, s0), (a1, m1, s1)) in enumerate(zip(torch_rows, fused_rows)):
                where = f"{label} rank {rank} {layout} step {t}"
                assert same(a0, a1), where + ": average"
                assert same(m0, m1), where + ": residual"
                assert s0.keys() == s1.keys() and all(same_number(s0[k], s1[k]) for k in s0), \
                    where + f": stats {s0} != {s1}"


@pytest.mark.parametrize("P", (1, 2, 3, 4))
@pytest.mark.parametrize("name", METHODS)
def test_torch_and_fused_selection_agree_across_processes(clusters, name, P):
    compare(clusters(P).run(fs.both_paths, name), f"{name} P={P}")


@pytest.mark.parametrize("name", METHODS)
def test_torch_and_fused_agree_when_nothing_or_everything_passes_and_on_nan(clusters, name):
    c = clusters(2)
    compare(c.run(fs.both_paths, name, steps=3, scale=1e-9), f"{name} nothing passes")
    compare(c.run(fs.both_paths, name, steps=3, scale=100.0), f"{name} everything passes")
    compare(c.run(fs.both_paths, name, steps=4, nan_at=(1, 1)), f"{name} NaN on rank 1, step 1 (skipped)")
    compare(c.run(fs.both_paths, name, steps=3, error_feedback=False), f"{name} without error feedback")
    if name in VARIANT:
        compare(c.run(fs.both_paths, name, steps=3, options=VARIANT[name]), f"{name} variant")


@pytest.mark.parametrize("name", METHODS)
def test_state_saved_with_torch_selection_resumes_with_fused(clusters, name):
    assert all(clusters(2).run(fs.resume_across_paths, name))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernel_compiles_for_a_cuda_gpu_without_one():
    """Triton compiles for a named target without a device (its bundled ptxas): the kernel as
    the GPU runs it, for the main variant (x = g + m written, selection) and float64/int64."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from sparsecomm.reducers.select import fused_triton

    for fp, ip in (("fp32", "i32"), ("fp64", "i64")):
        signature = {"g": f"*{fp}", "m": f"*{fp}", "x": f"*{fp}", "n": "i32", "start": "i32", "end": "i32",
                     "thr_ptr": f"*{fp}", "idx": f"*{ip}", "val": f"*{fp}", "state": "*i64", "cap": "i32",
                     **dict.fromkeys(("HAS_M", "WRITE_X", "SELECT", "WIDE", "BLOCK"), "constexpr")}
        source = ASTSource(fn=fused_triton._select_kernel, signature=signature,
                           constexprs={"HAS_M": True, "WRITE_X": True, "SELECT": True, "WIDE": False,
                                       "BLOCK": fused_triton.BLOCK})
        try:
            kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        except RuntimeError as e:  # no bundled ptxas in this installation
            if "ptxas" in str(e):
                pytest.skip(f"triton cannot assemble for CUDA here: {e}")
            raise
        assert "cubin" in kernel.asm
