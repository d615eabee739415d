"""Condition recipes: which extractor makes the hints, with which parameters, scored by which metric,
and the sudden-convergence detector's defaults for that condition.

A recipe is a TOML (or YAML) file; the five bundled ones live in `conditions/` of a source
checkout and in `difftune_control/conditions/` of the installed wheel. Schema:

```toml
name = "depth"                      # the condition (a registered extractor name)
description = "Normalised inverse depth (near = white), as ControlNet's depth models expect."
toy_backend = "toyworld"            # backend used when the base model is the shipped toy world
toy_hint_column = "depth"           # ground-truth hint column of the toy dataset (optional)

[extractor]                         # hints for real images
backend = "dpt"
params = { model = "Intel/dpt-hybrid-midas" }
toy_params = {}                     # parameters of toy_backend (optional)

[metric]                            # documentation of what `dissimilarity` computes
name = "depth_rmse_aligned"
description = "RMSE after per-image least-squares scale-and-shift alignment"
range = [0.0, 1.0]

[detector]                          # defaults of the sudden-convergence detector
threshold = 0.3
patience = 2
milestones = [0.25, 0.5, 0.75]
```
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .registry import available_extractors, get_extractor, get_extractor_class

if TYPE_CHECKING:
    import torch

    from .base import ConditionExtractor

_TOP_KEYS = {"name", "description", "toy_backend", "toy_hint_column", "extractor", "metric", "detector"}
_EXTRACTOR_KEYS = {"backend", "params", "toy_params"}
_RECIPE_SUFFIXES = (".toml", ".yaml", ".yml")


class FrozenDict(dict):
    """A dict that refuses changes (recipe tables); still a dict for `json` and `dataclasses.asdict`."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            "recipe tables are read-only; build a new recipe or pass overrides to build_extractor"
        )

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]
    __ior__ = _refuse  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:  # copy / deepcopy / pickle rebuild through __init__
        return (type(self), (dict(self),))

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted((k, repr(v)) for k, v in self.items())))


def _frozen(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return FrozenDict({k: _frozen(v) if isinstance(v, Mapping) else v for k, v in (mapping or {}).items()})


@dataclass(frozen=True)
class ConditionRecipe:
    """A loaded, validated condition recipe (see the module docstring for the file schema)."""

    name: str
    """The condition, e.g. "depth"."""
    description: str
    """One line on what the hints look like."""
    backend: str
    """Extractor backend for real images."""
    params: Mapping[str, Any] = field(default_factory=dict)
    """Parameters of `backend`."""
    toy_backend: str | None = None
    """Backend used when the base model is the shipped toy world (None: same as `backend`)."""
    toy_params: Mapping[str, Any] = field(default_factory=dict)
    """Parameters of `toy_backend`."""
    toy_hint_column: str | None = None
    """Ground-truth hint column of the toy dataset (None: hints are extracted)."""
    metric: Mapping[str, Any] = field(default_factory=dict)
    """What the dissimilarity measures (name, description, range)."""
    detector: Mapping[str, Any] = field(default_factory=dict)
    """Detector defaults: threshold, patience, milestones."""
    path: str | None = None
    """The file the recipe came from."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for the run's config.json)."""
        return {
            "name": self.name,
            "description": self.description,
            "backend": self.backend,
            "params": _plain(self.params),
            "toy_backend": self.toy_backend,
            "toy_params": _plain(self.toy_params),
            "toy_hint_column": self.toy_hint_column,
            "metric": _plain(self.metric),
            "detector": _plain(self.detector),
            "path": self.path,
        }


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def recipe_dirs() -> list[Path]:
    """Folders searched for bundled recipes: the wheel's `difftune_control/conditions/`, then the
    source checkout's `<repo>/conditions/`."""
    package = Path(__file__).resolve().parents[1]
    return [package / "conditions", package.parent / "conditions"]


def available_recipes() -> dict[str, Path]:
    """Bundled recipes by name (first folder of `recipe_dirs` wins)."""
    found: dict[str, Path] = {}
    for folder in recipe_dirs():
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                if path.suffix in _RECIPE_SUFFIXES and path.stem not in found:
                    found[path.stem] = path
    return found


def _read(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            return tomllib.loads(text)
        import yaml

        data = yaml.safe_load(text)
    except Exception as err:  # a syntax error: say which file
        raise ValueError(f"--condition: cannot parse recipe {str(path)!r}: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"--condition: recipe {str(path)!r} must be a mapping at the top level")
    return data


def parse_recipe(data: Mapping[str, Any], path: str | None = None) -> ConditionRecipe:
    """Validate a recipe mapping and build a `ConditionRecipe`; every problem is reported at once.

    Args:
        data (`Mapping[str, Any]`): the parsed file.
        path (`str`, *optional*): where it came from (for messages).

    Returns:
        `ConditionRecipe`
    """
    where = f"recipe {path!r}" if path else "recipe"
    problems: list[str] = []
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        problems.append(f"unknown key(s) {unknown}; allowed: {sorted(_TOP_KEYS)}")
    extractor = data.get("extractor") or {}
    if not isinstance(extractor, Mapping):
        problems.append("[extractor] must be a table")
        extractor = {}
    unknown = sorted(set(extractor) - _EXTRACTOR_KEYS)
    if unknown:
        problems.append(f"unknown key(s) in [extractor]: {unknown}; allowed: {sorted(_EXTRACTOR_KEYS)}")
    name = data.get("name")
    backends = available_extractors()
    if name not in backends:
        problems.append(f"name: unknown condition {name!r}; available: {sorted(backends)}")
    backend = extractor.get("backend")
    toy_backend = data.get("toy_backend")
    params = extractor.get("params") or {}
    toy_params = extractor.get("toy_params") or {}
    for label, value, prm in (
        ("[extractor] backend", backend, params),
        ("toy_backend", toy_backend, toy_params),
    ):
        if value is None and label == "toy_backend":
            continue
        if name in backends and value not in backends[name]:
            problems.append(f"{label}: unknown backend {value!r} for {name!r}; available: {backends[name]}")
        elif name in backends:
            problems.extend(f"{label}: {msg}" for msg in _param_problems(name, value, prm))
    for label, table in (("params", params), ("toy_params", toy_params)):
        if not isinstance(table, Mapping):
            problems.append(f"[extractor] {label} must be a table, got {table!r}")
    detector = data.get("detector") or {}
    problems.extend(_detector_problems(detector))
    metric = data.get("metric") or {}
    if not isinstance(metric, Mapping) or "name" not in metric:
        problems.append("[metric] must be a table with at least a name")
    column = data.get("toy_hint_column")
    if column is not None and not isinstance(column, str):
        problems.append(f"toy_hint_column must be a string, got {column!r}")
    if problems:
        raise ValueError(f"--condition: invalid {where}:\n  - " + "\n  - ".join(problems))
    return ConditionRecipe(
        name=name,
        description=str(data.get("description", "")),
        backend=backend,
        params=_frozen(params),
        toy_backend=toy_backend,
        toy_params=_frozen(toy_params),
        toy_hint_column=column,
        metric=_frozen(metric),
        detector=_frozen(detector),
        path=path,
    )


def _param_problems(name: str, backend: str, params: Any) -> list[str]:
    import inspect

    if not isinstance(params, Mapping):
        return []
    cls = get_extractor_class(name, backend)
    accepted = {
        p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "resolution", "device")
    }
    unknown = sorted(set(params) - accepted)
    return (
        [f"unknown parameter(s) {unknown} for backend {backend!r}; accepted: {sorted(accepted)}"]
        if unknown
        else []
    )


def _detector_problems(detector: Any) -> list[str]:
    if not isinstance(detector, Mapping):
        return ["[detector] must be a table"]
    problems = []
    threshold = detector.get("threshold", 0.3)
    if not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        problems.append(f"[detector] threshold must be a number in (0, 1), got {threshold!r}")
    patience = detector.get("patience", 2)
    if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
        problems.append(f"[detector] patience must be an int >= 1, got {patience!r}")
    milestones = detector.get("milestones", [0.25, 0.5, 0.75])
    if not isinstance(milestones, list) or not all(
        isinstance(m, (int, float)) and 0 < m < 1 for m in milestones
    ):
        problems.append(f"[detector] milestones must be a list of numbers in (0, 1), got {milestones!r}")
    return problems


def load_recipe(name_or_path: str | os.PathLike[str] | ConditionRecipe) -> ConditionRecipe:
    """Load a condition recipe by bundled name (`"depth"`) or from a `.toml` / `.yaml` path.

    Args:
        name_or_path (`str`, `os.PathLike` or `ConditionRecipe`): a bundled recipe name, a file
            path, or an already loaded recipe (returned as is).

    Returns:
        `ConditionRecipe`: the validated recipe.

    Raises:
        `ValueError`: unknown name (the message lists the bundled names) or an invalid recipe.
        `FileNotFoundError`: a path that does not exist.
    """
    if isinstance(name_or_path, ConditionRecipe):
        return name_or_path
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    looks_like_file = path.suffix in _RECIPE_SUFFIXES or os.sep in text or "/" in text
    if looks_like_file:
        if not path.is_file():
            raise FileNotFoundError(f"--condition: recipe file {text!r} does not exist")
        return parse_recipe(_read(path), str(path))
    bundled = available_recipes()
    if text not in bundled:
        raise ValueError(
            f"--condition: unknown condition {text!r}; bundled recipes: {', '.join(sorted(bundled)) or '(none)'} "
            f"(searched {', '.join(str(d) for d in recipe_dirs())}); a path to a .toml recipe also works"
        )
    return parse_recipe(_read(bundled[text]), str(bundled[text]))


def build_extractor(
    recipe: str | os.PathLike[str] | ConditionRecipe,
    backend: str | None = None,
    resolution: int | tuple[int, int] | None = None,
    device: str | torch.device | None = None,
    toy: bool = False,
    **overrides: Any,
) -> ConditionExtractor:
    """Build the extractor a recipe describes.

    Args:
        recipe (`str`, `os.PathLike` or `ConditionRecipe`): recipe name, path or object.
        backend (`str`, *optional*): override the backend; otherwise `toy_backend` when `toy`, else
            the recipe's `[extractor] backend`. With `toy`, the toy backend gets `toy_params`; the
            real-image backend gets `params`; any other backend starts from its defaults.
        resolution (`int`, `tuple[int, int]` or `None`): hint size, see `ConditionExtractor`.
        device (`str` or `torch.device`, *optional*): where model backends run.
        toy (`bool`, defaults to `False`): the base model is the shipped toy world.
        **overrides: parameters that replace the recipe's for the chosen backend.

    Returns:
        `ConditionExtractor`: the extractor (model weights load on first use).
    """
    recipe = load_recipe(recipe)
    if backend is None:
        backend = recipe.toy_backend if toy and recipe.toy_backend else recipe.backend
    if toy and backend == recipe.toy_backend:
        params = dict(recipe.toy_params)
    elif backend == recipe.backend:
        params = dict(recipe.params)
    elif backend == recipe.toy_backend:
        params = dict(recipe.toy_params)
    else:
        params = {}
    params.update(overrides)
    params["resolution"] = resolution
    if device is not None:
        params["device"] = device
    return get_extractor(recipe.name, backend, **params)
