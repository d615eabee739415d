"""Typed configuration, one dataclass per concern.

Every field is also a command-line flag of the same name (``--train_batch_size``), with the
field's ``help`` metadata as its help text; flag names follow diffusers'
``examples/controlnet/train_controlnet.py`` where the meaning is the same. Fields left at
``None`` are *model-dependent defaults*, filled by :func:`resolve_defaults` from the base
model (the shipped toy world or a Stable Diffusion checkpoint) and printed in the resolved
config. :meth:`RunConfig.validate` checks everything up front and reports every problem in
one :class:`ConfigError`.

The modules: ``sections`` (the dataclasses and their field types), ``validation`` (the checks),
``run`` (:class:`RunConfig`) and ``presets`` (``--preset``, model-dependent defaults, flags -> config).
Import the names from this package.
"""

from difftune_control.config.presets import PRESETS, apply_preset, config_from_args, resolve_defaults
from difftune_control.config.run import RunConfig
from difftune_control.config.sections import (
    SECTIONS,
    BankConfig,
    ConfigError,
    DataConfig,
    DetectorConfig,
    ExportConfig,
    MethodConfig,
    ModelConfig,
    TrainConfig,
    _unwrap_optional,
    field_types,
)

__all__ = [
    "PRESETS",
    "SECTIONS",
    "BankConfig",
    "ConfigError",
    "DataConfig",
    "DetectorConfig",
    "ExportConfig",
    "MethodConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "_unwrap_optional",
    "apply_preset",
    "config_from_args",
    "field_types",
    "resolve_defaults",
]
