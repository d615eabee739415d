"""Shared bases of the annotator backends: the controlnet-aux detectors and the toy world's networks.

Each condition module (depth, normal, sketch, segmentation) combines its condition base with one of
these, so a backend states only what is its own: which detector or annotator it loads, how its
network is fed, and how the network's output becomes a hint.

- `ControlNetAuxExtractor`: loads a controlnet-aux detector from a local folder or hub id, runs its
  network batched on `device` at `detect_resolution` and resizes the output back to the input size.
- `ToyWorldExtractor`: loads the toy world's annotator for the condition (`difftune_control.toyworld`)
  and runs it batched at the input size.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from .base import Resolution
from .models import ModelExtractor, load_pretrained, multiple_of, run_at_multiple

if TYPE_CHECKING:
    import torch


def controlnet_aux_detector(cls_path: str, source: str, files: Sequence[str], **kwargs: Any) -> Any:
    """Load a controlnet-aux detector (`"module:Class"`) with `from_pretrained`, offline-friendly."""
    import importlib

    module_name, cls_name = cls_path.split(":")
    try:
        module = importlib.import_module(f"controlnet_aux.{module_name}")
    except ImportError as err:
        raise ImportError(f"this backend needs controlnet-aux (`pip install controlnet-aux`): {err}") from err
    detector_cls = getattr(module, cls_name)
    return load_pretrained(
        lambda s: detector_cls.from_pretrained(s, **kwargs), source, f"controlnet-aux {cls_name}", files
    )


def toyworld_annotator(
    kind: str, device: torch.device, dtype: torch.dtype, weights: str | None = None
) -> Any:
    """Load one of the toy world's annotators ("depth", "normal", "segmentation").

    Args:
        kind (`str`): the annotator.
        device (`torch.device`), dtype (`torch.dtype`): where and in which precision it runs.
        weights (`str`, *optional*): a `.safetensors` annotator file instead of the shipped one.
    """
    try:
        from difftune_control import toyworld
    except ImportError as err:
        raise ImportError(
            f"the toyworld backend needs difftune_control.toyworld, which could not be imported: {err}"
        ) from err
    if weights is None:
        model = toyworld.load_annotator(kind, device, dtype)
    else:
        model = toyworld.load_annotator(kind, device, dtype, path=weights)
    return model.eval()


class ControlNetAuxExtractor(ModelExtractor):
    """A controlnet-aux annotator, batched: its network sees the input at `detect_resolution`.

    `_run` resizes a micro-batch so its shorter side is `detect_resolution` (each side rounded to a
    multiple of `_detect_multiple`; bilinear, antialiased), feeds it to `_infer`, resizes the output
    back to the input size (`_upsample_mode`) and turns it into a hint with `_to_hint`.

    Subclasses set `_detector` (`"module:Class"` inside `controlnet_aux`) and `_files` (the weight
    files a local folder must hold) and implement `_infer` and `_to_hint`; they override `_place`
    when the network to run is not the detector's `model`.

    Args:
        resolution, device, dtype, batch_size: see `ModelExtractor`.
        model (`str`, defaults to `"lllyasviel/Annotators"`): folder holding `_files`, or a hub id.
        detect_resolution (`int`, defaults to 512): shorter side the network sees.
    """

    _detector: ClassVar[str] = ""
    """The controlnet-aux detector, `"module:Class"` (e.g. `"midas:MidasDetector"`)."""
    _files: tuple[str, ...] = ()
    """Weight files a local `model` folder must hold."""
    _detect_multiple: ClassVar[int] = 64
    """The network's input sides are rounded to multiples of this (as controlnet-aux does)."""
    _upsample_mode: ClassVar[Literal["bilinear", "bicubic"]] = "bilinear"
    """How the network's output is resized back to the input size."""
    _min_detect_resolution: ClassVar[int | None] = None
    """When set, `detect_resolution` must be an int of at least this (checked in `__init__`)."""

    def __init__(
        self,
        resolution: Resolution = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int = 16,
        model: str = "lllyasviel/Annotators",
        detect_resolution: int = 512,
    ) -> None:
        super().__init__(resolution=resolution, device=device, dtype=dtype, batch_size=batch_size)
        minimum = self._min_detect_resolution
        if minimum is not None and (not isinstance(detect_resolution, int) or detect_resolution < minimum):
            raise ValueError(
                f"{self.backend} detect_resolution must be an int >= {minimum}, got {detect_resolution!r}"
            )
        self.model_source = model
        self.detect_resolution = detect_resolution

    def _load(self) -> Any:
        return self._place(controlnet_aux_detector(self._detector, self.model_source, self._files))

    def _place(self, detector: Any) -> Any:
        """What `_infer` runs, taken from the loaded detector: by default its `model`, moved to
        `self.device` and `self.dtype`, in eval mode."""
        return detector.model.to(self.device, self.dtype).eval()

    def _run(self, model: Any, x: torch.Tensor) -> torch.Tensor:
        return self._to_hint(self._detect(model, x))

    def _detect(self, model: Any, x: torch.Tensor) -> torch.Tensor:
        """`_infer` on [b,3,H,W] resized to the detect resolution, its output resized back to
        float32 [b,C,H,W]."""
        import torch.nn.functional as F

        size = multiple_of(tuple(x.shape[-2:]), self.detect_resolution, self._detect_multiple)
        inp = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        out = self._infer(model, inp).float()  # [b,C,h,w]
        return F.interpolate(out, size=x.shape[-2:], mode=self._upsample_mode, align_corners=False)

    @abstractmethod
    def _infer(self, model: Any, x: torch.Tensor) -> torch.Tensor:
        """Run the network (what `_place` returned) on float32 [b,3,h,w] in [0,1] at the detect
        resolution; return [b,C,h,w] (any float dtype)."""

    @abstractmethod
    def _to_hint(self, out: torch.Tensor) -> torch.Tensor:
        """The network's output resized to the input size, float32 [b,C,H,W] -> hint [b,3,H,W] in [0,1]."""


class ToyWorldExtractor(ModelExtractor):
    """The toy world's annotator of the condition `name`, batched at the input size.

    Sides that are not multiples of 8 are resized for the network and its output resized back
    (see `run_at_multiple`). Subclasses implement `_to_hint`.

    Args:
        resolution, device, dtype, batch_size: see `ModelExtractor` (`batch_size` defaults to 256).
        weights (`str`, *optional*): an annotator `.safetensors` file instead of the shipped one.
    """

    def __init__(
        self,
        resolution: Resolution = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int = 256,
        weights: str | None = None,
    ) -> None:
        super().__init__(resolution=resolution, device=device, dtype=dtype, batch_size=batch_size)
        self.weights = weights

    def _load(self) -> Any:
        return toyworld_annotator(self.name, self.device, self.dtype, self.weights)

    def _run(self, model: Any, x: torch.Tensor) -> torch.Tensor:
        return self._to_hint(run_at_multiple(model, x.to(self.dtype), 8).float())

    @abstractmethod
    def _to_hint(self, out: torch.Tensor) -> torch.Tensor:
        """The annotator's output, float32 [b,C,H,W] -> hint [b,3,H,W] in [0,1]."""
