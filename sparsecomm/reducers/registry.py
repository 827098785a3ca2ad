"""Method names to reducer classes, and ``build`` with option checking."""
from __future__ import annotations

import inspect
from typing import Any

from .base import Reducer

__all__ = ["register", "available", "build", "lookup", "method_options", "COMMON_OPTIONS", "is_per_tensor"]

_REGISTRY: dict[str, type[Reducer]] = {}

# Accepted by every method (keyword arguments of Reducer.__init__ beyond build's own).
COMMON_OPTIONS = ("nonfinite", "sync_timing", "residual_dtype", "keep_buffers")
_BUILD_ARGS = ("density", "error_feedback", "group", "seed")


def register(cls: type[Reducer]) -> type[Reducer]:
    """Class decorator: make ``cls`` buildable under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if "per_tensor" not in vars(cls):
        raise TypeError(f"{cls.__name__} ({cls.name!r}) does not declare per_tensor in its class body: True when "
                        f"its result on a tensor depends on that tensor alone, False when it selects over the "
                        f"whole vector (see Reducer.per_tensor)")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"reducer name {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    """Names of all registered methods."""
    return sorted(_REGISTRY)


def lookup(name: str) -> type[Reducer]:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown reducer {name!r}; available: {', '.join(available())}") from None


def method_options(name: str) -> dict[str, Any]:
    """The method-specific options of ``name`` with their defaults (common ones excluded): the
    keyword-only parameters of its ``__init__`` and, as long as each passes ``**common`` on,
    those of its base classes' (a shared base's options, e.g. the sparse wire formats)."""
    options: dict[str, Any] = {}
    for klass in lookup(name).__mro__:
        if klass is Reducer or not issubclass(klass, Reducer):
            break
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        for p in params:
            if p.kind is p.KEYWORD_ONLY and p.name not in _BUILD_ARGS + COMMON_OPTIONS:
                options.setdefault(p.name, p.default)
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return options


def build(name: str, density: float = 0.001, error_feedback: bool = True, group: Any = None,
          seed: int = 0, **options: Any) -> Reducer:
    """Build the reducer registered as ``name``.

    ``density`` is the target fraction of coordinates to send (0 < density <= 1); ``group``
    a ``torch.distributed`` process group, a :class:`~sparsecomm.reducers.comm.communicator.Communicator`,
    or None (the default group when initialized, else a single worker). ``options`` are the
    method's own (see ``method_options(name)``) plus ``nonfinite`` ("raise" or "skip"),
    ``sync_timing`` (synchronise CUDA at phase boundaries for a true time split),
    ``residual_dtype`` (the error-feedback residual kept in "float16" or "bfloat16": half the
    bytes of a float32 residual, what the rounding drops is lost; None: the gradients' dtype)
    and ``keep_buffers`` (False: the compensated vector's and the scratch buffers are dropped
    after each reduce, for sharded training where only the residual should stay).
    """
    cls = lookup(name)
    allowed = sorted(method_options(name)) + list(COMMON_OPTIONS)
    for key in options:
        if key not in allowed:
            raise ValueError(f"unknown option {key!r} for reducer {name!r}; allowed: {', '.join(allowed)}")
    return cls(density=density, error_feedback=error_feedback, group=group, seed=seed, **options)


def is_per_tensor(name: str, **options: Any) -> bool:
    """Whether method ``name`` with ``options`` has a result on each tensor that depends on that
    tensor alone (``Reducer.per_tensor``; some methods decide by their options)."""
    cls = lookup(name)
    declared = vars(cls)["per_tensor"] if "per_tensor" in vars(cls) else cls.per_tensor
    if isinstance(declared, property):
        return bool(build(name, group=_solo(), **options).per_tensor)
    return bool(declared)


def _solo() -> Any:
    from .comm.communicator import SoloCommunicator
    return SoloCommunicator()
