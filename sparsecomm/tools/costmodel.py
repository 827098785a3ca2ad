"""A cost model of one training step: compute, selection and collectives in the alpha-beta form.

A step of data-parallel training with a reducer costs the forward and backward pass, the
method's selection (its ``t_select``) and its collectives. Each collective is priced by the
algorithm gloo and NCCL run for it, in the alpha-beta (Hockney) form of Thakur, Rabenseifner
and Gropp (2005), for P workers, n bytes per worker, ``alpha`` seconds per round and
``beta = 8 / (efficiency x rate) + gamma`` seconds per byte (``gamma``: what the hosts spend per
byte whatever the rate):

    ring all-reduce              2 (P - 1) alpha + 2 (P - 1) / P n beta
    ring all-gather              (P - 1) alpha + (P - 1) n beta
    binomial-tree broadcast      ceil(log2 P) (alpha + n beta)
    point-to-point exchange      alpha + n beta

``alpha``, ``efficiency`` (the share of the configured rate a bulk transfer achieves) and
``gamma``, per algorithm, are fitted (:func:`fit`) to collectives timed on real links
(``bench/network.py run``) and kept in a JSON file (:class:`Links`). Which collectives a method makes at P workers, of what sizes,
and how much it selects come from running the method itself, unchanged, on P virtual workers
fed real gradients (:func:`profile`): a method's traffic is never re-derived by hand. What the
model leaves out contention between workers sharing a host's link, and the latency of the
network itself beyond alpha (this machine's emulated links add none; give ``alpha`` of the
target network where it matters).

Overlap with backward (bucket scope, DDP's own all-reduce, PyTorch's hooks): the gradients are
cut into buckets from the last layer as DDP cuts them (:func:`~sparsecomm.reducers.buckets.cut_buckets`),
each bucket's method is profiled on that bucket alone (:func:`bucket_profiles`), and
:func:`overlapped_step_seconds` schedules the buckets on one link: a bucket starts when backward
has produced its last gradient (the share of backward measured on the model itself, see
``ready``) and the previous bucket has finished; what runs past the end of backward is the
exposed time, the rest is hidden. PyTorch's ``fp16_compress_hook`` and ``bf16_compress_hook``
are DDP's all-reduce at half the bytes (:func:`halved`); its ``powerSGD_hook`` is priced by this
project's ``powersgd`` in bucket scope (the same algorithm, rank 2: an all-reduce of the
P factors and one of the Q factors per bucket, the vectors uncompressed).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from .. import reducers
from ..reducers.buckets import DEFAULT_BUCKET_MB, cut_buckets, resolve_scope
from ..reducers.comm.virtual import VirtualCommunicator, VirtualWorld

__all__ = ["Cost", "Links", "Collective", "Profile", "Bucket", "BackwardClock", "PricedMethod", "TORCH_HOOKS",
           "collective_seconds", "fit", "profile", "bucket_profiles", "halved", "price_method", "step_seconds",
           "overlapped_step_seconds"]

KINDS = ("all_reduce", "all_gather", "broadcast", "exchange")
# PyTorch's own DDP hooks, and the method whose collectives price each (see the module)
TORCH_HOOKS = {"torch-fp16": "exact", "torch-bf16": "exact", "torch-powersgd": "powersgd"}


@dataclass(frozen=True)
class Cost:
    """One algorithm's link parameters: ``alpha`` seconds per round; ``efficiency``, the share of
    the link rate its bulk data achieves; ``gamma`` seconds per byte the hosts spend whatever
    the rate (copies, the network stack: what bounds an unlimited or very fast link)."""

    alpha: float
    efficiency: float
    gamma: float = 0.0

    def seconds(self, rounds: float, moved: float, rate_bps: float) -> float:
        return rounds * self.alpha + moved * (8.0 / (self.efficiency * rate_bps) + self.gamma)


@dataclass(frozen=True)
class Links:
    """Fitted link parameters per algorithm: the ring all-reduce's, and the ring all-gather's
    (which the point-to-point forms, broadcast and exchange, use as well)."""

    all_reduce: Cost
    all_gather: Cost
    fitted_on: str = ""

    def cost(self, kind: str) -> Cost:
        return self.all_reduce if kind == "all_reduce" else self.all_gather

    def replaced(self, alpha: float | None = None, gamma: float | None = None) -> "Links":
        """The same links with another latency per round and/or host cost per byte (a target
        network's, where this machine's would mislead); None keeps the fitted one."""
        def one(c: Cost) -> Cost:
            return Cost(c.alpha if alpha is None else alpha, c.efficiency, c.gamma if gamma is None else gamma)

        changes = [f"{name} set to {value:g} s" for name, value in (("alpha", alpha), ("gamma", gamma))
                   if value is not None]
        return Links(one(self.all_reduce), one(self.all_gather), "; ".join([self.fitted_on, *changes]))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Links":
        data = json.loads(Path(path).read_text())
        try:
            return cls(Cost(**data["all_reduce"]), Cost(**data["all_gather"]), data.get("fitted_on", ""))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not a links file of bench/network.py fit ({exc})") from None


@dataclass(frozen=True)
class Collective:
    """One collective a worker started: its kind and the bytes it contributed."""

    kind: str
    nbytes: int


def rounds_and_bytes(kind: str, nbytes: int, workers: int) -> tuple[float, float]:
    """(rounds, bytes each worker moves over its link) of one collective."""
    P = workers
    if P <= 1 or nbytes == 0:
        return 0.0, 0.0
    if kind == "all_reduce":
        return 2.0 * (P - 1), 2.0 * (P - 1) / P * nbytes
    if kind == "all_gather":
        return float(P - 1), float((P - 1) * nbytes)
    if kind == "broadcast":
        depth = math.ceil(math.log2(P))
        return float(depth), float(depth * nbytes)
    if kind == "exchange":
        return 1.0, float(nbytes)
    raise ValueError(f"unknown collective {kind!r}; known: {', '.join(KINDS)}")


def collective_seconds(kind: str, nbytes: int, workers: int, links: Links, rate_bps: float) -> float:
    rounds, moved = rounds_and_bytes(kind, nbytes, workers)
    return links.cost(kind).seconds(rounds, moved, rate_bps) if rounds else 0.0


def fit(points: Iterable[dict[str, Any]]) -> Links:
    """Least-squares link parameters per algorithm from timed collectives: dicts with
    ``collective`` (all_reduce or all_gather), ``bytes`` (per worker), ``hosts``, ``rate_bps``
    (None for an unlimited link) and ``seconds``. Relative errors are minimised, so small and
    large transfers count alike."""
    points = list(points)
    costs, names = {}, set()
    for kind in ("all_reduce", "all_gather"):
        rows = []
        for p in points:
            if p["collective"] != kind:
                continue
            rounds, moved = rounds_and_bytes(kind, int(p["bytes"]), int(p["hosts"]))
            if rounds == 0:
                continue
            t = float(p["seconds"])
            per_rate = 0.0 if p["rate_bps"] is None else moved * 8.0 / float(p["rate_bps"])
            # t = rounds alpha + moved 8 / rate (1 / efficiency) + moved gamma, divided by t
            rows.append([rounds / t, per_rate / t, moved / t])
            names.add(f"{p['hosts']} hosts at {p.get('rate', p['rate_bps'])}")
        if len(rows) < 3 or not any(r[1] for r in rows):
            raise ValueError(f"fitting the links needs at least three timed {kind}s, some on rate-limited links")
        a, b = np.array(rows), np.ones(len(rows))
        alpha, inverse, gamma = _nonnegative_lstsq(a, b)
        if inverse <= 0:
            raise ValueError(f"the timed {kind}s do not slow down on slower links; cannot fit an efficiency")
        if inverse < 1.0:  # no link carries more than its rate: efficiency 1, the rest refitted
            alpha, gamma = _nonnegative_lstsq(a[:, [0, 2]], b - a[:, 1])
            inverse = 1.0
        costs[kind] = Cost(alpha=alpha, efficiency=1.0 / inverse, gamma=gamma)
    return Links(costs["all_reduce"], costs["all_gather"], fitted_on=", ".join(sorted(names)))


def _nonnegative_lstsq(a: np.ndarray, b: np.ndarray) -> list[float]:
    """Least squares with every coefficient >= 0: the best over the subsets of coefficients
    left free (three coefficients: eight subsets)."""
    best, best_x = math.inf, [0.0] * a.shape[1]
    for mask in range(1, 1 << a.shape[1]):
        cols = [j for j in range(a.shape[1]) if mask >> j & 1]
        x, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
        if (x < 0).any():
            continue
        err = float(np.sum((a[:, cols] @ x - b) ** 2))
        if err < best:
            best, best_x = err, [0.0] * a.shape[1]
            for j, v in zip(cols, x):
                best_x[j] = float(v)
    return best_x


class _RecordingCommunicator(VirtualCommunicator):
    """A virtual worker's communicator that also lists the collectives it starts."""

    def __init__(self, world: VirtualWorld, rank: int) -> None:
        super().__init__(world, rank)
        self.log: list[Collective] = []

    def _all_reduce(self, tensor: torch.Tensor) -> Any:
        self.log.append(Collective("all_reduce", tensor.nbytes))
        return super()._all_reduce(tensor)

    def all_gather_async(self, tensor: torch.Tensor) -> Any:
        if self.size > 1 and tensor.numel() > 0:
            self.log.append(Collective("all_gather", tensor.nbytes))
        return super().all_gather_async(tensor)

    def _broadcast(self, tensor: torch.Tensor, src: int) -> None:
        self.log.append(Collective("broadcast", tensor.nbytes))
        super()._broadcast(tensor, src)

    def _exchange(self, send: torch.Tensor | None, recv: torch.Tensor | None, peer: int) -> None:
        if send is not None:  # a receive is the other half of someone's send
            self.log.append(Collective("exchange", send.nbytes))
        super()._exchange(send, recv, peer)


@dataclass
class Profile:
    """What one method does per step at P workers: rank 0's collectives in each profiled step
    after the first, and its selection seconds and counters (means over those steps)."""

    method: str
    workers: int
    steps: list[list[Collective]]
    t_select: float
    density: float
    bytes_sent: float
    bytes_wire: float

    def comm_seconds(self, links: Links, rate_bps: float) -> float:
        """Mean over the steps of the collectives' seconds, one after another (as the reducers
        start and wait for them)."""
        return sum(collective_seconds(c.kind, c.nbytes, self.workers, links, rate_bps)
                   for step in self.steps for c in step) / max(1, len(self.steps))


def profile(method: str, gradients: Sequence[torch.Tensor], shapes: Sequence[torch.Size], density: float,
            steps: int = 3, seed: int = 0, **options: Any) -> Profile:
    """Run ``method`` on P = len(gradients) virtual workers for ``steps`` steps, worker r
    reducing ``gradients[r]`` (flat, one per worker) split into ``shapes``."""
    P = len(gradients)
    world = VirtualWorld(P, communicator=_RecordingCommunicator)
    try:
        rs = [reducers.build(method, density=density, seed=seed, group=world.communicator(r), **options)
              for r in range(P)]
        layout = reducers.Layout.of([torch.empty(s) for s in shapes])
        seen: list[dict[str, float]] = []
        logs: list[list[Collective]] = []
        comm = world.communicator(0)
        assert isinstance(comm, _RecordingCommunicator)
        for step in range(steps):
            comm.log = []
            world.run(lambda r: rs[r].reduce(layout.split(gradients[r].clone())))
            stats = rs[0].stats
            seen.append({k: float(stats.get(k, 0.0) or 0.0)
                         for k in ("t_select", "density", "bytes_sent", "bytes_wire")})
            logs.append(comm.log)
        kept, kept_logs = (seen[1:], logs[1:]) if steps > 1 else (seen, logs)
        mean = {k: sum(s[k] for s in kept) / len(kept) for k in kept[0]}
        return Profile(method, P, kept_logs, mean["t_select"], mean["density"], mean["bytes_sent"],
                       mean["bytes_wire"])
    finally:
        world.close()


def step_seconds(compute: float, prof: Profile, links: Links, rate_bps: float,
                 select: float | None = None) -> dict[str, float]:
    """Predicted seconds of one step: compute (forward and backward), select (the profile's
    unless given), communicate; and their sum."""
    t_select = prof.t_select if select is None else select
    t_comm = prof.comm_seconds(links, rate_bps)
    return {"compute": compute, "select": t_select, "comm": t_comm, "step": compute + t_select + t_comm}


@dataclass
class Bucket:
    """One bucket of a step reduced bucket by bucket: ``ready``, the share of backward done when
    its last gradient exists (0 to 1), what its method does on it, and its elements."""

    ready: float
    profile: Profile
    size: int


def bucket_profiles(method: str, gradients: Sequence[torch.Tensor], shapes: Sequence[torch.Size],
                    ready: Sequence[float], density: float, bucket_mb: float = DEFAULT_BUCKET_MB,
                    steps: int = 3, seed: int = 0, **options: Any) -> list[Bucket]:
    """``method`` profiled on each bucket DDP would cut from ``shapes`` (``bucket_mb``, float32
    gradients), in the order backward makes them ready; ``ready[i]`` is the share of backward
    done when parameter i's gradient exists."""
    sizes = [math.prod(s) for s in shapes]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    out = []
    for group in cut_buckets([4 * n for n in sizes], bucket_mb):
        lo, hi = offsets[group[0]], offsets[group[-1] + 1]
        prof = profile(method, [g[lo:hi] for g in gradients], [shapes[i] for i in group], density,
                       steps=steps, seed=seed, **options)
        out.append(Bucket(max(ready[i] for i in group), prof, hi - lo))
    return sorted(out, key=lambda b: b.ready)


def halved(prof: Profile, name: str) -> Profile:
    """``prof`` with every collective carrying half its bytes and no selection: a dense
    all-reduce sent in 16 bits (PyTorch's fp16 and bf16 compress hooks)."""
    steps = [[Collective(c.kind, c.nbytes // 2) for c in step] for step in prof.steps]
    return Profile(name, prof.workers, steps, 0.0, prof.density, prof.bytes_sent / 2, prof.bytes_wire / 2)


def overlapped_step_seconds(forward: float, backward: float, buckets: Sequence[Bucket], links: Links,
                            rate_bps: float) -> dict[str, float]:
    """Predicted seconds of one step whose buckets are reduced during backward, one at a time on
    the link, each starting when backward has made it and the previous one is done (its
    selection included, as the worker thread runs it): compute, select, comm, ``exposed`` (what
    runs past backward's end), ``hidden`` (the share of select + comm behind backward) and step."""
    free = 0.0
    select = comm = 0.0
    for b in buckets:
        s, c = b.profile.t_select, b.profile.comm_seconds(links, rate_bps)
        free = max(b.ready * backward, free) + s + c
        select += s
        comm += c
    exposed = max(0.0, free - backward)
    work = select + comm
    return {"compute": forward + backward, "select": select, "comm": comm, "exposed": exposed,
            "hidden": 1.0 - exposed / work if work > 0 else 1.0, "step": forward + backward + exposed}


class BackwardClock:
    """Times backward passes of a model's ``params`` and, with post-accumulate-grad hooks, the
    share of each backward done when each parameter's gradient exists (1 for one it does not
    reach). :meth:`close` removes the hooks."""

    def __init__(self, params: Sequence[torch.nn.Parameter]) -> None:
        self._stamps: dict[int, float] = {}
        self._count = len(params)
        self._handles = [p.register_post_accumulate_grad_hook(
            lambda _, i=i: self._stamps.__setitem__(i, time.perf_counter())) for i, p in enumerate(params)]

    def backward(self, loss: torch.Tensor) -> tuple[float, list[float]]:
        """``loss.backward()``; its seconds and the parameters' ready shares."""
        self._stamps.clear()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        return t2 - t1, [(self._stamps.get(i, t2) - t1) / (t2 - t1) for i in range(self._count)]

    def close(self) -> None:
        for h in self._handles:
            h.remove()


@dataclass
class PricedMethod:
    """A method, or one of PyTorch's hooks (:data:`TORCH_HOOKS`), profiled once for one model
    and P workers, to be priced at any link rate: in model scope one reduce after backward, by
    bucket each bucket on the link during backward. ``profile``: the step's (the buckets'
    summed: selection and bytes, density weighted by size)."""

    name: str
    scope: str
    profile: Profile
    buckets: list[Bucket] | None = None

    def seconds(self, forward: float, backward: float, links: Links, rate_bps: float,
                select: float | None = None) -> dict[str, float]:
        """The predicted step (compute, select, comm, exposed, hidden, step); ``select``: another
        device's selection seconds instead of the profiled ones (shared by the buckets by size)."""
        if self.buckets is None:
            t = step_seconds(forward + backward, self.profile, links, rate_bps, select=select)
            return {**t, "exposed": t["select"] + t["comm"], "hidden": 0.0}
        buckets = self.buckets
        if select is not None:
            d = sum(b.size for b in buckets)
            buckets = [replace(b, profile=replace(b.profile, t_select=select * b.size / d)) for b in buckets]
        return overlapped_step_seconds(forward, backward, buckets, links, rate_bps)


def price_method(name: str, gradients: Sequence[torch.Tensor], shapes: Sequence[torch.Size], ready: Sequence[float],
                 density: float, scope: str = "auto", bucket_mb: float = DEFAULT_BUCKET_MB, steps: int = 3,
                 seed: int = 0) -> PricedMethod:
    """Profile method ``name`` (``exact`` at density 1) on P = len(gradients) virtual workers in
    ``scope`` (``auto``: by bucket where its result on a tensor depends on that tensor alone);
    PyTorch's hooks always by bucket, the 16-bit ones as DDP's all-reduces at half the bytes."""
    ran = TORCH_HOOKS.get(name, name)
    c = 1.0 if ran == "exact" else density
    scope = "bucket" if name in TORCH_HOOKS else resolve_scope(scope, ran)
    if scope == "model":
        return PricedMethod(name, scope, profile(ran, gradients, shapes, c, steps=steps, seed=seed))
    buckets = bucket_profiles(ran, gradients, shapes, ready, c, bucket_mb, steps=steps, seed=seed)
    if ran == "exact" and name in TORCH_HOOKS:
        buckets = [replace(b, profile=halved(b.profile, name)) for b in buckets]
    p0, d = buckets[0].profile, sum(b.size for b in buckets)
    summed = Profile(name, p0.workers, [], sum(b.profile.t_select for b in buckets),
                     sum(b.profile.density * b.size for b in buckets) / d,
                     sum(b.profile.bytes_sent for b in buckets), sum(b.profile.bytes_wire for b in buckets))
    return PricedMethod(name, scope, summed, buckets)
