"""The registries of training methods (``--method``) and retention sources (``--retention``)."""

from __future__ import annotations

from difftune_control.config import RunConfig
from difftune_control.methods.base import ControlNetTrainer
from difftune_control.methods.difftuning import DiffTuningTrainer

_METHODS: dict[str, type[ControlNetTrainer]] = {}


def register_method(name: str, cls: type[ControlNetTrainer]) -> None:
    """Register a training method (``--method NAME``): a :class:`ControlNetTrainer` subclass."""
    if name != name.lower() or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"method name must be lowercase letters, digits, '-' or '_': {name!r}")
    if name in _METHODS:
        raise ValueError(f"method {name!r} is already registered ({_METHODS[name].__name__})")
    if not (isinstance(cls, type) and issubclass(cls, ControlNetTrainer)):
        raise TypeError(f"method {name!r}: {cls!r} is not a ControlNetTrainer subclass")
    _METHODS[name] = cls


def available_methods() -> list[str]:
    return sorted(_METHODS)


register_method("vanilla", ControlNetTrainer)
register_method("difftuning", DiffTuningTrainer)


_RETENTION_SOURCES: dict[str, type[ControlNetTrainer]] = {}


def register_retention(name: str, cls: type[ControlNetTrainer]) -> None:
    """Register a retention source: the trainer whose bank slots distil instead of re-noising.

    ``name`` is a ``--retention`` value, or ``"teacher"`` for re-noised slots with a teacher ControlNet's
    targets (``--teacher_controlnet``). Re-noising (``renoise``) is Diff-Tuning's own and not registered.
    """
    if name in _RETENTION_SOURCES:
        raise ValueError(
            f"retention source {name!r} is already registered ({_RETENTION_SOURCES[name].__name__})"
        )
    if not (isinstance(cls, type) and issubclass(cls, DiffTuningTrainer)):
        raise TypeError(f"retention source {name!r}: {cls!r} is not a DiffTuningTrainer subclass")
    _RETENTION_SOURCES[name] = cls


def retention_source(cfg: RunConfig) -> str | None:
    """The retention source a configuration uses, or None when bank slots are re-noised (no distillation)."""
    if cfg.method.retention != "renoise":
        return cfg.method.retention
    return "teacher" if cfg.method.teacher_controlnet is not None else None


def trainer_class(cfg: RunConfig) -> type[ControlNetTrainer]:
    """The trainer of a configuration: its retention source's when bank slots distil, else its method's.

    Retention sources register on import of their module (:mod:`difftune_control.distill.trainer`).
    """
    source = retention_source(cfg)
    if source is not None:
        if source not in _RETENTION_SOURCES:
            raise ValueError(
                f"retention source {source!r} is not registered; registered: {sorted(_RETENTION_SOURCES)}"
            )
        return _RETENTION_SOURCES[source]
    if cfg.method.method not in _METHODS:
        raise ValueError(f"--method: got {cfg.method.method!r}; choose one of {available_methods()}")
    return _METHODS[cfg.method.method]
