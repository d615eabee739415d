"""The one registry of condition extractors: condition name -> backend name -> class."""

from __future__ import annotations

import inspect
import re
from typing import Any

from .base import ConditionExtractor

_REGISTRY: dict[str, dict[str, type[ConditionExtractor]]] = {}
_DEFAULT_BACKEND: dict[str, str] = {}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def register_extractor(
    name: str, backend: str, cls: type[ConditionExtractor], *, default: bool = False
) -> type[ConditionExtractor]:
    """Register an extractor class under a condition name and a backend name.

    Args:
        name (`str`): condition name, lowercase (`[a-z][a-z0-9_]*`), e.g. `"depth"`.
        backend (`str`): backend name, lowercase, unique within the condition, e.g. `"dpt"`.
        cls (`type[ConditionExtractor]`): a concrete `ConditionExtractor` subclass.
        default (`bool`, defaults to `False`):
            Make this the backend `get_extractor(name)` uses when no backend is given. The first
            backend registered for a condition is the default until another one claims it.

    Returns:
        `type[ConditionExtractor]`: `cls`, so the function also works as a decorator helper.

    Example:
        ```python
        class MyDepth(DepthExtractor):
            backend = "mine"

            def _extract_batch(self, x):
                return x.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)


        register_extractor("depth", "mine", MyDepth)
        ```
    """
    for label, value in (("name", name), ("backend", backend)):
        if not isinstance(value, str) or not _NAME_RE.match(value):
            raise ValueError(
                f"extractor {label} must be a lowercase identifier ([a-z][a-z0-9_]*), got {value!r}"
            )
    if not (isinstance(cls, type) and issubclass(cls, ConditionExtractor)):
        raise ValueError(f"extractor class must subclass ConditionExtractor, got {cls!r}")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise ValueError(f"extractor class {cls.__name__} is abstract (missing: {missing})")
    backends = _REGISTRY.setdefault(name, {})
    if backend in backends:
        raise ValueError(
            f"extractor {name!r} backend {backend!r} is already registered ({backends[backend].__name__}); "
            f"pick another backend name"
        )
    backends[backend] = cls
    if default or name not in _DEFAULT_BACKEND:
        _DEFAULT_BACKEND[name] = backend
    return cls


def available_extractors() -> dict[str, list[str]]:
    """Return the registered conditions and their backends, default backend first.

    Returns:
        `dict[str, list[str]]`: condition name -> backend names, e.g.
        `{"canny": ["opencv"], "depth": ["dpt", "midas", "toyworld", "zoe"], ...}`.
    """
    result = {}
    for name in sorted(_REGISTRY):
        default = _DEFAULT_BACKEND[name]
        result[name] = [default] + sorted(b for b in _REGISTRY[name] if b != default)
    return result


def default_backend(name: str) -> str:
    """Return the backend `get_extractor(name)` uses when none is given."""
    _check_name(name)
    return _DEFAULT_BACKEND[name]


def get_extractor_class(name: str, backend: str | None = None) -> type[ConditionExtractor]:
    """Look up a registered extractor class; unknown names raise a `ValueError` listing the choices."""
    _check_name(name)
    backend = _DEFAULT_BACKEND[name] if backend is None else backend
    if backend not in _REGISTRY[name]:
        choices = ", ".join(available_extractors()[name])
        raise ValueError(
            f"--backend: unknown backend {backend!r} for condition {name!r}; available: {choices}"
        )
    return _REGISTRY[name][backend]


def get_extractor(name: str, backend: str | None = None, **params: Any) -> ConditionExtractor:
    """Build a condition extractor.

    Args:
        name (`str`): condition, one of `available_extractors()` (e.g. `"canny"`, `"depth"`).
        backend (`str`, *optional*): backend of that condition; its default backend when omitted.
        **params: passed to the extractor's constructor (e.g. `resolution=512`, `device="cuda"`,
            `low_threshold=100` for canny, `model="path/to/dpt"` for depth `dpt`).

    Returns:
        `ConditionExtractor`: the extractor (model backends load their weights on first use).

    Raises:
        `ValueError`: unknown condition, backend or parameter; the message lists the valid choices.
    """
    cls = get_extractor_class(name, backend)
    accepted = _accepted_params(cls)
    unknown = sorted(set(params) - accepted) if accepted is not None else []
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(unknown)} for extractor {name!r} backend {cls.backend!r}; "
            f"accepted: {', '.join(sorted(accepted or ()))}"
        )
    return cls(**params)


def _check_name(name: str) -> None:
    if name not in _REGISTRY:
        choices = ", ".join(sorted(_REGISTRY)) or "(none registered)"
        raise ValueError(f"--condition: unknown condition {name!r}; available: {choices}")


def _accepted_params(cls: type[ConditionExtractor]) -> set[str] | None:
    """Keyword parameters of `cls.__init__`, or `None` when it takes `**kwargs`."""
    parameters = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    return {
        n for n, p in parameters.items() if n != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL
    }
