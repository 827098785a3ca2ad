"""Model names to builders, and ``build_model`` with option checking."""
from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, TypeVar

from torch import nn

__all__ = ["register_model", "available_models", "model_options", "check_model_options", "build_model"]

log = logging.getLogger(__name__)

Builder = Callable[..., nn.Module]
B = TypeVar("B", bound=Builder)

_REGISTRY: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[B], B]:
    """Decorator: make a model class or factory function buildable as ``name``.

    Its keyword arguments are the model's options; ``build_model`` checks them by name.
    """
    def decorate(builder: B) -> B:
        if name in _REGISTRY and _REGISTRY[name] is not builder:
            raise ValueError(f"model name {name!r} is already registered by {_REGISTRY[name].__name__}")
        _REGISTRY[name] = builder
        return builder
    return decorate


def available_models() -> list[str]:
    """Names of all registered models."""
    return sorted(_REGISTRY)


def _lookup(name: str) -> Builder:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available_models())}") from None


def model_options(name: str) -> dict[str, Any]:
    """The options of model ``name`` with their defaults (``inspect.Parameter.empty`` for
    required ones, such as ``vocab_size`` of ``lstm_lm``)."""
    params = inspect.signature(_lookup(name)).parameters
    return {p.name: p.default for p in params.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_model_options(name: str, keys: Any) -> dict[str, Any]:
    """The options of model ``name``; raises ``ValueError`` for an unknown name or for keys
    it does not take, naming them and the allowed ones."""
    options = model_options(name)
    unknown = sorted(set(keys) - set(options))
    if unknown:
        raise ValueError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                         f"for model {name!r}; allowed: {', '.join(options) or '(none)'}")
    return options


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the model registered as ``name`` with the given options.

    Raises ``ValueError`` for an unknown name, an unknown option or a missing required one,
    naming it and the allowed ones.
    """
    builder = _lookup(name)
    options = check_model_options(name, kwargs)
    missing = [k for k, default in options.items() if default is inspect.Parameter.empty and k not in kwargs]
    if missing:
        raise ValueError(f"model {name!r} needs {', '.join(missing)}")
    model = builder(**kwargs)
    log.debug("built model %s(%s): %d parameters", name, kwargs, sum(p.numel() for p in model.parameters()))
    return model
