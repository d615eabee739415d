"""Training methods: the objective and batch plan of one micro-batch.

``forgetting`` (pure math of the chain of forgetting), ``base.ControlNetTrainer`` (vanilla),
``difftuning.DiffTuningTrainer``, and ``registry`` (``register_method``, ``register_retention``,
``trainer_class``). Retention sources that distil live in :mod:`difftune_control.distill.trajectory` and
register themselves on import.
"""

from difftune_control.methods.base import ControlNetTrainer
from difftune_control.methods.difftuning import DiffTuningTrainer
from difftune_control.methods.registry import (
    available_methods,
    register_method,
    register_retention,
    retention_source,
    trainer_class,
)

__all__ = [
    "ControlNetTrainer",
    "DiffTuningTrainer",
    "available_methods",
    "register_method",
    "register_retention",
    "retention_source",
    "trainer_class",
]
