"""What ``difftune export`` reads: a run folder, a ``checkpoint-N`` folder or a diffusers ControlNet folder.

Run folder layout (docs/internals.md): ``config.json`` (resolved run config), ``metrics.jsonl``,
``controlnet/`` (final ControlNet), ``checkpoint-N/controlnet/``, ``report/``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class ExportSource:
    """A ControlNet to export and what is known about the run that trained it."""

    controlnet_dir: Path
    """The diffusers ``save_pretrained`` folder (config.json + weights)."""
    run_dir: Path | None = None
    """The run folder, when the ControlNet came from one."""
    step: int | None = None
    """Optimizer steps the ControlNet was trained for (None when unknown)."""
    run_config: dict[str, Any] | None = None
    """The run's resolved ``config.json``."""
    metrics: list[dict[str, Any]] = field(default_factory=list)
    """Records of the run's ``metrics.jsonl``."""

    @property
    def run_name(self) -> str:
        """The run folder's name, else the ControlNet folder's."""
        return (self.run_dir or self.controlnet_dir).name

    @property
    def condition(self) -> str | None:
        """Condition name from the run config (``condition.name``, else ``data.condition``)."""
        config = self.run_config or {}
        return (config.get("condition") or {}).get("name") or (config.get("data") or {}).get("condition")

    @property
    def method(self) -> str | None:
        """``vanilla``, ``difftuning``, ... from the run config (``method.method``)."""
        return ((self.run_config or {}).get("method") or {}).get("method")

    @property
    def base_model(self) -> str | None:
        """The base model the run trained on; ``toyworld`` for the shipped toy-world base."""
        if self.run_config is None:
            return None
        given = (self.run_config.get("model") or {}).get("pretrained_model_name_or_path")
        resolved = self.run_config.get("base_model") or {}  # {"id": ..., "is_toy": ...} from the trainer
        if given:
            return str(given)
        if resolved.get("is_toy") or not resolved.get("id"):
            return "toyworld"
        return str(resolved["id"])

    @property
    def convergence_step(self) -> int | None:
        """Optimizer step of the first sudden-convergence event at or before ``step``, if any."""
        for record in self.metrics:
            if record.get("type") == "convergence_event" and record.get("step") is not None:
                if self.step is None or record["step"] <= self.step:
                    return int(record["step"])
        return None

    @property
    def report_dir(self) -> Path | None:
        """``<run>/report`` (where ``difftune report`` writes its figures)."""
        return self.run_dir / "report" if self.run_dir is not None else None


def _is_controlnet_dir(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("_class_name") == "ControlNetModel"
    except (json.JSONDecodeError, AttributeError):
        return False


def _is_run_dir(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file() or _is_controlnet_dir(path):
        return False
    try:
        data = json.loads(config.read_text())
    except json.JSONDecodeError:
        return False
    return isinstance(data, dict) and ("model" in data or "method" in data)


def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for child in run_dir.iterdir():
        match = _CHECKPOINT.match(child.name)
        if match and child.is_dir() and _is_controlnet_dir(child / "controlnet"):
            found.append((int(match.group(1)), child))
    return sorted(found)


def _read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            # A run killed mid-write leaves a truncated last line; anything else is damage.
            if i != len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
    return records


def _final_step(metrics: list[dict[str, Any]]) -> int | None:
    steps = [r["step"] for r in metrics if r.get("type") in ("train", "end") and r.get("step") is not None]
    return int(max(steps)) if steps else None


def resolve_source(path: str | os.PathLike) -> ExportSource:
    """Find the ControlNet folder and run context of a run, checkpoint or diffusers folder.

    Args:
        path (`str` or `os.PathLike`):
            A run folder (uses ``controlnet/``, else the latest ``checkpoint-N/controlnet/``), a
            ``checkpoint-N`` folder, or a diffusers ``ControlNetModel`` folder (when it sits inside
            a run, e.g. ``runs/x/controlnet``, the run's config and metrics are used too).

    Returns:
        `ExportSource`: The folder to load and the run's config, metrics and step.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is none of the three kinds of folder.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"RUN_OR_CHECKPOINT {str(path)!r} does not exist")
    if not path.is_dir():
        raise ValueError(
            f"RUN_OR_CHECKPOINT {str(path)!r} is a file; expected a run folder, a checkpoint-N folder or a "
            "diffusers ControlNet folder (to read a WebUI/LDM file use load_controlnet)"
        )
    checkpoint = _CHECKPOINT.match(path.name)
    if _is_controlnet_dir(path):
        controlnet_dir = path
        parent = path.parent
        if _CHECKPOINT.match(parent.name) and _is_run_dir(parent.parent):
            run_dir, step = parent.parent, int(_CHECKPOINT.match(parent.name).group(1))
        elif _is_run_dir(parent):
            run_dir, step = parent, None
        else:
            return ExportSource(controlnet_dir=controlnet_dir)
    elif checkpoint and _is_controlnet_dir(path / "controlnet"):
        controlnet_dir, step = path / "controlnet", int(checkpoint.group(1))
        run_dir = path.parent if _is_run_dir(path.parent) else None
    elif _is_controlnet_dir(path / "controlnet"):
        controlnet_dir, run_dir, step = path / "controlnet", path, None
    elif _checkpoints(path):
        step, checkpoint_dir = _checkpoints(path)[-1]
        controlnet_dir, run_dir = checkpoint_dir / "controlnet", path
        logger.info("%s has no final controlnet/; using the latest checkpoint %s", path, checkpoint_dir.name)
    else:
        raise ValueError(
            f"RUN_OR_CHECKPOINT {str(path)!r} is not a run folder (with controlnet/ or checkpoint-N/controlnet/), "
            "a checkpoint-N folder or a diffusers ControlNet folder (config.json with _class_name ControlNetModel)"
        )
    metrics = _read_metrics(run_dir) if run_dir is not None else []
    run_config = json.loads((run_dir / "config.json").read_text()) if run_dir is not None else None
    if step is None:
        step = _final_step(metrics)
    return ExportSource(controlnet_dir, run_dir, step, run_config, metrics)
