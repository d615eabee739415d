"""The whole run config (:class:`RunConfig`): its sections, JSON form and up-front validation."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difftune_control.config.sections import (
    SECTIONS,
    BankConfig,
    ConfigError,
    DataConfig,
    DetectorConfig,
    MethodConfig,
    ModelConfig,
    TrainConfig,
)
from difftune_control.config.validation import config_problems


@dataclass
class RunConfig:
    """Everything a training run needs; saved as ``config.json`` in the run folder."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def uses_bank(self) -> bool:
        return self.method.method == "difftuning" and self.method.split != "psi-only"

    @property
    def distills(self) -> bool:
        """True when bank slots distil (trajectory/snr retention or a teacher ControlNet)."""
        return self.method.retention != "renoise" or self.method.teacher_controlnet is not None

    def to_dict(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        problems = []
        kwargs = {}
        for name, section_cls in SECTIONS.items():
            values = dict(d.get(name) or {})
            known = {f.name for f in dataclasses.fields(section_cls)}
            unknown = sorted(set(values) - known)
            if unknown:
                problems.append(
                    f"config section '{name}': unknown keys {unknown}; valid keys: {sorted(known)}"
                )
            kwargs[name] = section_cls(**{k: v for k, v in values.items() if k in known})
        if problems:
            raise ConfigError(problems)
        return cls(**kwargs)

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        from difftune_control.utils import atomic_write_text

        payload = self.to_dict()
        payload.update(extra or {})
        atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")

    def validate(self) -> None:
        """Check every field and cross-field rule; raise one ConfigError listing all problems."""
        problems = config_problems(self)
        if problems:
            raise ConfigError(problems)
