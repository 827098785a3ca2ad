"""Time a research repository's reducers beside ours: ``bench/reducers.py --compare-with PATH``.

PATH is a folder of a research repository's checkout holding its ``gradient_reducers.py`` (the
ExDyna authors' code, https://github.com/kljp/exdyna, keeps it in ``cnn-lstm/`` and ``ncf/``). It
is fetched by the user and never copied into this repository; this module imports it from its
file path and runs its reducer classes in the benchmark's own processes, on the same gradients
as ours, alternating theirs and ours step by step (theirs first on even steps, ours first on odd
ones) so that drift in the machine's load falls on both alike.

Their contract (the research code's ``train.py``): ``R(random_seed, device, timer,
compression=c)``, then per step ``send = g + m`` (error feedback, done by the training loop)
and ``R.reduce(send, grads, memories)``, which puts the average into the list ``grads`` and the
residual into ``memories`` (it rebinds the list entries). A step of theirs as timed here is that
compensation (one ``torch.add`` per tensor into preallocated buffers; with
``--no-error-feedback`` nothing) plus ``reduce``: the same work as one ``reduce`` of ours, which
compensates inside. Their phases are read from the ``timer`` they are given (a documented
constructor argument): ``reduce.gather``/``reduce.reduce``/``reduce.mean.*`` (the collectives
and what surrounds them: unions, indexing) and ``reduce.combine`` (building the average) count as
comm, as our ``t_comm`` counts the exchange and building the average; the rest (compensation,
flatten, selection, partitioning, residual) as select.

What is adapted, and said in the output:
  - ``device``: the device of the benchmark's processes, passed as their constructor argument;
  - their base ``Reducer.__init__`` draws a 128 Mi-value float64 random buffer
    (``precalc_numbers``, 1 GiB in numpy, 512 MiB as float32 on the device) that none of
    their reducers reads; when their source names it nowhere else, the draw is replaced, during
    construction only, by an empty array (a stand-in for ``numpy`` in their module while the
    constructor runs). Otherwise it is drawn as written;
  - their ``print`` of progress (every 50th step) is sent to a buffer, outside the timed region;
  - Python's ``random`` (SAGE's sampling) is seeded with ``seed + rank``.
Nothing else of theirs is changed.

Checks (untimed, on the first timed step of each side): conservation, ``sum_w (x_w - m_w) =
P avg`` over all workers (x the vector the step started from, m the residual it left), as
max |difference| / max |P avg|; both sides' achieved density (coordinates of the average that
got a value) is reported beside the times, since a time at another density is another amount
of work.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import os
import random
import statistics
import subprocess
import sys
import time
import traceback
import types
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from sparsecomm import reducers
from sparsecomm.reducers.timing import PhaseTimer

FILE = "gradient_reducers.py"

# Their class -> (our method, our options matching their algorithm, what both do).
MAPPING: dict[str, tuple[str, dict[str, Any], str]] = {
    "ExactReducer": ("exact", {}, "dense all-reduce"),
    "TopKReducer": ("global_topk", {"exchange": "union"},
                    "top-k of the flat vector, union of indices, all-reduce of values there"),
    "GlobalTopKReducer": ("global_topk", {"exchange": "gather"},
                          "top-k of the flat vector, all-gather of values and positions"),
    "ThreshReducer": ("thresh", {"exchange": "union"}, "hard threshold 1/(2 sqrt k), union all-reduce"),
    "SageReducer": ("sage", {"exchange": "union", "controller": "paper", "warm_start": False},
                    "SAGE's rescaled threshold as published, union all-reduce"),
    "MicroReducer": ("micro", {"controller": "paper", "warm_start": False},
                     "MiCRO as published: threshold in rotating partitions"),
    "ExDynaReducer": ("exdyna", {"controller": "paper", "warm_start": False},
                      "ExDyna as published: threshold in rotating balanced block partitions"),
    "DeftReducer": ("deft", {}, "DEFT: layer top-k bin-packed onto workers"),
    "CLTKReducer": ("cltk", {}, "cyclic local top-k"),
}
NOT_ADAPTED = {
    "AccordionTopKReducer": "its reduce() takes the training loop's norms, learning rates and epoch",
}
COMM_LABELS = ("reduce.gather", "reduce.reduce", "reduce.combine", "reduce.mean.")


class ResearchCodeError(Exception):
    """A problem with --compare-with PATH, as one line."""


class ConstructError(Exception):
    """Their class cannot be constructed here (the same on every rank)."""


class StepError(Exception):
    """A reducer raised inside a step: other ranks may be waiting in a collective it never joined."""


def locate(path: str) -> str:
    """The path of ``gradient_reducers.py`` in the folder ``path``, or a one-line error."""
    if not os.path.exists(path):
        raise ResearchCodeError(f"--compare-with {path}: no such folder")
    if not os.path.isdir(path):
        raise ResearchCodeError(f"--compare-with {path}: not a folder (give the folder holding {FILE})")
    file = os.path.join(path, FILE)
    if os.path.isfile(file):
        return file
    below = sorted(d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, FILE)))
    hint = f" (found in {', '.join(os.path.join(path, d) for d in below)}: pass one of those)" if below else ""
    raise ResearchCodeError(f"--compare-with {path}: no {FILE} in it{hint}")


def load(path: str, name: str = "research_gradient_reducers") -> types.ModuleType:
    """Import the research code's ``gradient_reducers.py`` from its file (its folder first on
    sys.path while it imports, for its own sibling modules)."""
    file = locate(path)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(os.path.abspath(file)))
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ResearchCodeError(f"--compare-with {path}: importing {FILE} failed: {type(e).__name__}: {e}") from None
    finally:
        sys.path.pop(0)
    return module


def commit_of(path: str) -> str | None:
    """The git commit of the checkout holding ``path``, when it is one."""
    try:
        out = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def pairs(module: types.ModuleType, wanted: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """Their reducer classes that have a counterpart here (in MAPPING's order), filtered by
    ``wanted`` (their class names or our method names); and the ones left out, with why."""
    theirs = {n for n, v in vars(module).items()
              if isinstance(v, type) and n.endswith("Reducer") and n != "Reducer" and v.__module__ == module.__name__}
    chosen = [n for n in MAPPING if n in theirs]
    skipped = {n: NOT_ADAPTED.get(n, "no counterpart here") for n in sorted(theirs - set(MAPPING))}
    if wanted:
        chosen = [n for n in chosen if n in wanted or MAPPING[n][0] in wanted]
    return chosen, skipped


def _big_randn_skippable(module: types.ModuleType) -> bool:
    try:
        with open(module.__file__) as f:
            source = f.read()
    except OSError:
        return False
    return source.count("precalc_numbers") == 1


class _SmallRandomState(np.random.RandomState):
    def randn(self, *dims):  # the 128 Mi-value buffer nobody reads: empty
        if dims and math.prod(dims) >= 1 << 20:
            return np.empty(0)
        return super().randn(*dims)


def construct(module: types.ModuleType, cls_name: str, *, seed: int, device: torch.device, timer: Any,
              density: float) -> tuple[Any, list[str]]:
    """An instance of their class ``cls_name`` at ``density``, and what was adapted."""
    cls = getattr(module, cls_name)
    kwargs: dict[str, Any] = {"random_seed": seed, "device": device, "timer": timer}
    if cls_name != "ExactReducer":
        kwargs["compression"] = density
    adapted = [f"device={device}"]
    real_np = getattr(module, "np", None)
    if real_np is np and _big_randn_skippable(module):
        stand_in = types.ModuleType("numpy")
        stand_in.__dict__.update(np.__dict__)
        stand_in.random = types.ModuleType("numpy.random")
        stand_in.random.__dict__.update(np.random.__dict__)
        stand_in.random.RandomState = _SmallRandomState
        module.np = stand_in
        adapted.append("unused 128Mi-value precalc_numbers buffer not drawn")
    try:
        r = cls(**kwargs)
    finally:
        if real_np is not None:
            module.np = real_np
    return r, adapted


class TheirTimer(PhaseTimer):
    """The ``timer`` their reducers are given: ``timer(label, epoch=-1.0, verbosity=1)`` as a
    context manager. Times every label (their verbosity levels aside), exclusive of nested
    labels, synchronising CUDA at every boundary (as ours do with ``sync_timing``)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(sync=True)
        self.device = device
        self.reset(device)

    def clear(self) -> None:
        """Forget the totals (between steps)."""
        self.reset(self.device)

    def __call__(self, label: str, epoch: float = -1.0, verbosity: int = 1):  # type: ignore[override]
        return super().__call__(label)

    def split(self) -> tuple[float, float]:
        comm = sum(v for k, v in self.totals.items() if k.startswith(COMM_LABELS))
        return sum(self.totals.values()) - comm, comm


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _conservation(x: torch.Tensor, m: torch.Tensor, avg: torch.Tensor) -> float:
    """max |sum_w (x_w - m_w) - P avg| / max |P avg| (a collective)."""
    world = dist.get_world_size()
    s = (x - m).double()
    dist.all_reduce(s)
    p_avg = avg.double() * world
    scale = float(p_avg.abs().max()) or 1.0
    return float((s - p_avg).abs().max()) / scale


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def compare_method(module, cls_name: str, grad_sets, args, device: torch.device) -> dict:
    """Their ``cls_name`` and our counterpart, alternating step by step on the same gradients.
    Raises on every rank alike when theirs or ours cannot be built."""
    rank = dist.get_rank()
    ours_name, ours_opts, what = MAPPING[cls_name]
    ef = args.error_feedback and cls_name != "ExactReducer"
    timer = TheirTimer(device)
    random.seed(args.seed + rank)
    try:
        theirs, adapted = construct(module, cls_name, seed=args.seed, device=device, timer=timer, density=args.density)
    except Exception as e:
        raise ConstructError(f"their {cls_name} cannot be constructed: {type(e).__name__}: {e}") from e
    ours = reducers.build(ours_name, density=args.density, error_feedback=args.error_feedback, seed=args.seed,
                          sync_timing=device.type == "cuda", **ours_opts)
    shapes_like = grad_sets[0]
    # ours: the training loop's form (views of one flat buffer, reduced in place) unless --layouts tensors
    flat_layout = "flat" in args.layouts
    if flat_layout:
        flat = torch.empty(sum(g.numel() for g in shapes_like), device=device)
        views = reducers.Layout.of(shapes_like).split(flat)
    else:
        ours_out = [torch.empty_like(g) for g in shapes_like]
    # theirs: their train.py's buffers (separate tensors)
    send = [torch.zeros_like(g) for g in shapes_like]
    their_out = [torch.zeros_like(g) for g in shapes_like]
    memories = [torch.zeros_like(g) for g in shapes_like]
    rows = {k: [] for k in ("theirs_step", "theirs_reduce", "theirs_select", "theirs_comm", "theirs_density",
                            "ours_reduce", "ours_select", "ours_comm", "ours_density")}
    checks: dict[str, float | None] = {"theirs": None, "ours": None}
    printed = io.StringIO()

    def run_theirs(grads, check: bool) -> None:
        nonlocal memories
        if not ef:
            torch._foreach_copy_(send, grads)  # untimed: their reduce reads send (not written)
        out = list(their_out)
        mem = list(memories)
        timer.clear()
        _sync(device)
        dist.barrier()
        with contextlib.redirect_stdout(printed):
            t0 = time.perf_counter()
            if ef:
                with timer("accumulate"):
                    for s, g, m in zip(send, grads, mem):
                        torch.add(g, m, out=s)
            t1 = time.perf_counter()
            _, params = theirs.reduce(send, out, mem)
            _sync(device)
            t2 = time.perf_counter()
        if ef:
            memories = mem  # their loop keeps the rebound list
        if not measured:
            return
        sel, comm = timer.split()
        rows["theirs_step"].append(t2 - t0)
        rows["theirs_reduce"].append(t2 - t1)
        rows["theirs_select"].append(sel)
        rows["theirs_comm"].append(comm)
        avg = _flat(out)
        rows["theirs_density"].append(float((avg != 0).sum()) / avg.numel())
        if check:
            checks["theirs"] = _conservation(_flat(send), _flat(mem), avg)

    def run_ours(grads, check: bool) -> None:
        check = check and (args.error_feedback or not type(ours).compensates)  # else no residual to check
        x_before = None
        if check:
            m = ours.residual
            x_before = _flat(grads) + (_flat(m) if m else 0)
        if flat_layout:
            torch._foreach_copy_(views, grads)  # untimed, as backward would write them
            inp = out = views
        else:
            inp, out = grads, ours_out
        _sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        ours.reduce(inp, out=out)
        _sync(device)
        elapsed = time.perf_counter() - t0
        if not measured:
            return
        st = ours.stats
        rows["ours_reduce"].append(elapsed)
        rows["ours_select"].append(st.get("t_select"))
        rows["ours_comm"].append(st.get("t_comm"))
        rows["ours_density"].append(st.get("density"))
        if check:
            m = ours.residual
            checks["ours"] = _conservation(x_before, _flat(m) if m else torch.zeros_like(x_before), _flat(out))

    for step in range(args.warmup + args.steps):
        measured = step >= args.warmup
        grads = grad_sets[step % len(grad_sets)]
        check = step == args.warmup
        order = (run_theirs, run_ours) if step % 2 == 0 else (run_ours, run_theirs)
        for fn in order:
            try:
                fn(grads, check)
            except Exception as e:
                side = f"their {cls_name}" if fn is run_theirs else f"our {ours_name}"
                raise StepError(f"{side} raised on rank {rank} at step {step}: {type(e).__name__}: {e}") from e
    res = {"ours": ours_name, "ours_options": ours_opts, "what": what, "adapted": adapted,
           "error_feedback": ef, "check": checks, "printed_lines": printed.getvalue().count("\n")}
    res.update({k: _median(v) for k, v in rows.items()})
    res["per_step"] = rows
    ts, to = res["theirs_step"], res["ours_reduce"]
    res["ratio"] = ts / to if ts and to else None
    return res


def compare_model(module, grad_sets, args, device: torch.device, log=print) -> dict:
    """Every mapped class of theirs against ours on one model's gradients (rank 0 logs)."""
    chosen, skipped = pairs(module, args.compare_methods)
    entry: dict[str, Any] = {"methods": {}, "not_compared": skipped}
    for name in chosen:
        if dist.get_rank() == 0:
            log(f"  {name} vs {MAPPING[name][0]} ...")
        try:
            entry["methods"][name] = compare_method(module, name, grad_sets, args, device)
        except Exception as e:
            message = str(e) if isinstance(e, (StepError, ConstructError)) else f"{type(e).__name__}: {e}"
            entry["methods"][name] = {"ours": MAPPING[name][0], "error": message, "traceback": traceback.format_exc()}
            if isinstance(e, StepError) and dist.get_world_size() > 1:
                # a step can fail on one rank only (their ExDyna divides by zero where its partition
                # is empty); the others then wait inside a collective forever: stop the run
                print(entry["methods"][name]["traceback"], file=sys.stderr)
                print(f"bench/reducers.py --compare-with: {message}; the other ranks may be waiting in a "
                      f"collective, so the run stops here (leave {name} out with --methods)", file=sys.stderr, flush=True)
                os._exit(3)
            if dist.get_rank() == 0:  # construction fails on every rank alike (same code, same inputs)
                log(f"  {name}: ERROR {message}")
        dist.barrier()
    return entry


def _ms(x, spec="8.2f") -> str:
    return "-" if x is None else format(x * 1e3, spec)


def table(results: dict, source: str, commit: str | None) -> str:
    """The comparison as text: per method their step and ours, the ratio, the phase split."""
    head = (f"{'model':<9} {'theirs':<18} {'ours':<12} {'theirs ms':>9} {'ours ms':>8} {'ratio':>6}  "
            f"{'sel t/o ms':>15} {'comm t/o ms':>15}  {'density t/o':>17}  {'conservation t/o':>17}")
    lines = [f"research code: {source} (commit {commit or 'unknown'})",
             "theirs ms: their step (error-feedback add + reduce), ours ms: our reduce (compensates inside); "
             "ratio = theirs / ours (medians)", head, "-" * len(head)]
    for model, e in results.items():
        c = e.get("compare", {})
        for name, m in c.get("methods", {}).items():
            if "error" in m:
                lines.append(f"{model:<9} {name:<18} {m['ours']:<12} ERROR: {m['error'].splitlines()[0]}")
                continue
            chk = m["check"]
            cons = "/".join("-" if chk[k] is None else f"{chk[k]:.0e}" for k in ("theirs", "ours"))
            dens = "/".join("-" if m[k] is None else f"{m[k]:.5f}" for k in ("theirs_density", "ours_density"))
            lines.append(
                f"{model:<9} {name:<18} {m['ours']:<12} {_ms(m['theirs_step'], '9.1f')} {_ms(m['ours_reduce'], '8.1f')} "
                f"{'-' if m['ratio'] is None else format(m['ratio'], '6.2f')}  "
                f"{_ms(m['theirs_select'], '7.1f')}/{_ms(m['ours_select'], '<7.1f')} "
                f"{_ms(m['theirs_comm'], '7.1f')}/{_ms(m['ours_comm'], '<7.1f')}  {dens:>17}  {cons:>17}")
        for name, why in c.get("not_compared", {}).items():
            lines.append(f"{model:<9} {name:<18} not compared: {why}")
    adapted = sorted({a for e in results.values() for m in e.get("compare", {}).get("methods", {}).values()
                      for a in m.get("adapted", [])})
    if adapted:
        lines.append("adapted in their code (by this harness, not in their file): " + "; ".join(adapted)
                     + "; their progress prints captured")
    opts = sorted({f"{m['ours']}{m['ours_options']}" for e in results.values()
                   for m in e.get("compare", {}).get("methods", {}).values() if m.get("ours_options")})
    if opts:
        lines.append("ours configured as their algorithm: " + ", ".join(o.replace("'", "") for o in opts))
    return "\n".join(lines)
