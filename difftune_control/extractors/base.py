"""The `ConditionExtractor` abstract base class and the input/output contract every extractor obeys.

An extractor turns an image into a ControlNet hint and scores how far two hints are apart:

```python
ext = get_extractor("depth", backend="toyworld", resolution=64, device="cpu")
hint = ext(image)  # PIL / uint8 HWC ndarray / float [3,H,W] -> float32 [3,H,W] in [0,1], CPU
hints = ext(batch)  # float [B,3,H,W] in [0,1] -> float32 [B,3,H,W] in [0,1], batch's device
d = ext.dissimilarity(hints, others)  # -> float32 [B], 0 for identical inputs
```

Subclasses override two methods only: `_extract_batch` (a normalised float batch in, a hint batch
out) and `_dissimilarity` (usually one of the pure functions in `extractors.metrics`). Everything
else -- input conversion, resizing, device and dtype handling, output checks -- lives here, so all
extractors behave the same whatever the input type.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Union

import numpy as np

from difftune_control.utils import hint_to_float

if TYPE_CHECKING:
    import torch
    from PIL import Image

ImageInput = Union["Image.Image", np.ndarray, "torch.Tensor", Sequence[Any]]
"""What `ConditionExtractor.__call__` accepts: a PIL image, a uint8 HWC (or HW) array, a float
[3,H,W] / [B,3,H,W] tensor in [0,1] (uint8 tensors are divided by 255), or a list of PIL images /
uint8 arrays (returned as one batch)."""

Resolution = int | tuple[int, int] | None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Turn a device argument into a `torch.device`: `None` means CUDA when available, else CPU."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"--device: cannot parse {device!r} as a torch device (e.g. 'cpu', 'cuda:0')"
        ) from err


def check_resolution(resolution: Any) -> int | tuple[int, int] | None:
    """Validate a resolution argument (`None`, a positive int, or a `(height, width)` pair)."""
    if resolution is None:
        return None
    if isinstance(resolution, (int, np.integer)) and not isinstance(resolution, bool) and resolution > 0:
        return int(resolution)
    if (
        isinstance(resolution, (tuple, list))
        and len(resolution) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in resolution)
    ):
        return (int(resolution[0]), int(resolution[1]))
    raise ValueError(
        f"--resolution: expected None, a positive int or a (height, width) pair of positive ints, "
        f"got {resolution!r}"
    )


def _array_to_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 HW / HWC array -> float32 [1,3,H,W] in [0,1]."""
    import torch

    if array.dtype != np.uint8:
        raise ValueError(
            f"image arrays must be uint8 HWC in [0, 255], got dtype {array.dtype}; convert with "
            f"(array * 255).round().astype(np.uint8) or pass a float tensor [3,H,W] in [0,1]"
        )
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"image arrays must be HW or HWC with 1, 3 or 4 channels, got shape {array.shape}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    array = np.array(array[:, :, :3], copy=True, order="C")  # drop alpha; own, writable memory
    tensor = torch.from_numpy(array).permute(2, 0, 1)[None]  # [1,3,H,W]
    return tensor.float().div_(255.0)


def _pil_to_tensor(image: Image.Image) -> torch.Tensor:
    return _array_to_tensor(np.asarray(image.convert("RGB")))


def _tensor_to_batch(tensor: torch.Tensor) -> tuple[torch.Tensor, bool]:
    import torch

    single = tensor.ndim == 3
    if tensor.ndim not in (3, 4):
        raise ValueError(f"image tensors must be [3,H,W] or [B,3,H,W], got shape {tuple(tensor.shape)}")
    batch = tensor[None] if single else tensor
    if batch.shape[1] == 1:
        batch = batch.expand(-1, 3, -1, -1)
    if batch.shape[1] != 3:
        raise ValueError(
            f"image tensors must be channels-first RGB ([3,H,W] or [B,3,H,W]), got shape "
            f"{tuple(tensor.shape)}; for HWC data pass a uint8 numpy array instead"
        )
    if batch.dtype == torch.uint8:
        return batch.float().div(255.0), single
    if not batch.is_floating_point():
        raise ValueError(f"image tensors must be float in [0,1] or uint8, got dtype {batch.dtype}")
    if batch.numel() > 0:
        low, high = batch.aminmax()
        if low < -1e-3 or high > 1.0 + 1e-3:
            raise ValueError(
                f"float image tensors must lie in [0, 1], got values in [{float(low):.3f}, {float(high):.3f}]; "
                f"for [-1, 1] tensors pass (x + 1) / 2"
            )
    return batch.float().clamp(0.0, 1.0), single


def resize_batch(batch: torch.Tensor, resolution: int | tuple[int, int] | None) -> torch.Tensor:
    """Resize a float batch [B,C,H,W] to a resolution, the way diffusers' ControlNet example does.

    Args:
        batch (`torch.Tensor`): float [B,C,H,W].
        resolution (`int`, `tuple[int, int]` or `None`):
            `None` keeps the size; an int resizes the shorter side to it (bilinear, antialiased) and
            centre-crops a square, as `transforms.Resize(r) + transforms.CenterCrop(r)` in diffusers'
            `train_controlnet.py`; a `(height, width)` pair resizes to exactly that size.

    Returns:
        `torch.Tensor`: the resized batch, same dtype and device.
    """
    import torch.nn.functional as F

    if resolution is None:
        return batch
    height, width = batch.shape[-2:]
    if isinstance(resolution, tuple):
        target_h, target_w = resolution
        if (height, width) == (target_h, target_w):
            return batch
        return F.interpolate(
            batch, size=(target_h, target_w), mode="bilinear", antialias=True, align_corners=False
        )
    if min(height, width) != resolution:
        scale = resolution / min(height, width)
        size = (max(resolution, round(height * scale)), max(resolution, round(width * scale)))
        batch = F.interpolate(batch, size=size, mode="bilinear", antialias=True, align_corners=False)
        height, width = size
    top = int(round((height - resolution) / 2.0))
    left = int(round((width - resolution) / 2.0))
    return batch[..., top : top + resolution, left : left + resolution]


def to_batch(image: ImageInput, resolution: int | tuple[int, int] | None = None) -> tuple[torch.Tensor, bool]:
    """Convert any accepted image input to a float32 batch [B,3,H,W] in [0,1] at `resolution`.

    Args:
        image (`ImageInput`): see `ImageInput`.
        resolution (`int`, `tuple[int, int]` or `None`): see `resize_batch`.

    Returns:
        `tuple[torch.Tensor, bool]`: the batch (on the input tensor's device, CPU otherwise) and
        whether the input was a single image.
    """
    import torch
    from PIL import Image

    if isinstance(image, Image.Image):
        return resize_batch(_pil_to_tensor(image), resolution), True
    if isinstance(image, np.ndarray):
        return resize_batch(_array_to_tensor(image), resolution), True
    if isinstance(image, torch.Tensor):
        batch, single = _tensor_to_batch(image)
        return resize_batch(batch, resolution), single
    if isinstance(image, Sequence) and not isinstance(image, (str, bytes)) and len(image) > 0:
        items = [to_batch(item, resolution)[0] for item in image]
        sizes = {tuple(item.shape[-2:]) for item in items}
        if len(sizes) > 1:
            raise ValueError(
                f"images in a list must share one size after resizing, got sizes {sorted(sizes)}; "
                f"set a resolution so they are resized to a common size"
            )
        return torch.cat(items, dim=0), False
    raise ValueError(
        f"expected a PIL image, a uint8 HWC numpy array, a float tensor [3,H,W] / [B,3,H,W] in [0,1] or a "
        f"non-empty list of images, got {type(image).__name__}"
    )


def hint_pair(hint: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate two hint tensors for a dissimilarity and return them as float32 batches on one device.

    Args:
        hint (`torch.Tensor`): [B,C,H,W] or [C,H,W], float in [0,1] or uint8.
        other (`torch.Tensor`): same shape as `hint`.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: both as float32 [B,C,H,W] in [0,1] on `hint`'s device.
    """
    import torch

    if not isinstance(hint, torch.Tensor) or not isinstance(other, torch.Tensor):
        raise ValueError(
            f"dissimilarity expects two tensors, got {type(hint).__name__} and {type(other).__name__}; "
            f"run the extractor first"
        )
    if hint.shape != other.shape or hint.ndim not in (3, 4):
        raise ValueError(
            f"dissimilarity expects two tensors of one shape [B,C,H,W] or [C,H,W], got "
            f"{tuple(hint.shape)} and {tuple(other.shape)}"
        )
    pair = []
    for tensor in (hint, other):
        tensor = tensor[None] if tensor.ndim == 3 else tensor
        pair.append(hint_to_float(tensor).to(hint.device))
    return pair[0], pair[1]


class ConditionExtractor(ABC):
    """Base class of every condition extractor (one subclass per condition and backend).

    Contract of `__call__`: a PIL image, a uint8 HWC array, a float tensor [3,H,W] / [B,3,H,W] in
    [0,1] (uint8 tensors are divided by 255) or a list of images in; float32 [3,H,W] (single image,
    on the CPU) or [B,3,H,W] (batch tensor: on the batch's device; list: on the CPU) in [0,1] out,
    at `self.resolution` (`None` = input size), whatever the input type. The input is resized
    first (see `resize_batch`) and the hint is computed at that size.

    Subclasses set the class attributes `name` (the condition, e.g. `"depth"`) and `backend`
    (e.g. `"dpt"`), and override:

    - `_extract_batch(x)`: float32 [B,3,H,W] in [0,1] (already resized, on `self.device` when it is
      set, else on the input's device) -> float [B,3,H,W] in [0,1] of the same size.
    - `_dissimilarity(hint, other)`: two float32 [B,3,H,W] hint batches -> float32 [B], 0 when equal.

    Args:
        resolution (`int`, `tuple[int, int]` or `None`, defaults to `None`):
            Output size; see `resize_batch`.
        device (`str` or `torch.device`, *optional*):
            Where `_extract_batch` runs. `None` keeps each batch where it is (weight-free backends);
            model backends resolve `None` to CUDA when available.
    """

    name: ClassVar[str] = ""
    """The condition this extractor produces (lowercase), e.g. `"canny"`."""
    backend: ClassVar[str] = ""
    """The backend (lowercase), e.g. `"opencv"`."""
    channels: ClassVar[int] = 3
    """Channels of the hint (always 3: ControlNet hints are RGB)."""

    _NOT_IDENTITY: ClassVar[frozenset[str]] = frozenset({"device", "batch_size"})

    def __new__(cls, *args: Any, **kwargs: Any) -> ConditionExtractor:
        obj = super().__new__(cls)
        # Record the constructor arguments (defaults filled in) for `params`.
        try:
            bound = inspect.signature(cls.__init__).bind(obj, *args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
        except TypeError:  # __init__ will raise the real error
            arguments = dict(kwargs)
        arguments.pop("self", None)
        extra = arguments.pop("kwargs", None)
        if isinstance(extra, dict):
            arguments.update(extra)
        obj._init_params = arguments
        return obj

    @property
    def params(self) -> dict[str, Any]:
        """The constructor arguments that shape the hints (defaults included; device and batch size
        left out), e.g. for cache and memory-bank manifests."""
        return {k: v for k, v in self._init_params.items() if k not in self._NOT_IDENTITY}

    def __init__(self, resolution: Resolution = None, device: str | torch.device | None = None) -> None:
        import torch

        self.resolution = check_resolution(resolution)
        self.device: torch.device | None = None if device is None else resolve_device(device)
        self._torch = torch

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, backend={self.backend!r}, resolution={self.resolution!r})"

    def __call__(self, image: ImageInput) -> torch.Tensor:
        """Extract the hint of one image or a batch.

        Args:
            image (`ImageInput`): see the class docstring.

        Returns:
            `torch.Tensor`: float32 [3,H,W] or [B,3,H,W] in [0,1].
        """
        torch = self._torch
        batch, single = to_batch(image, self.resolution)
        home = batch.device
        work = batch if self.device is None else batch.to(self.device)
        # no_grad, not inference_mode: hints feed the ControlNet during training, and inference
        # tensors cannot be saved for backward.
        with torch.no_grad():
            out = self._extract_batch(work)
        if out.shape != (batch.shape[0], self.channels, batch.shape[2], batch.shape[3]):
            raise RuntimeError(
                f"{type(self).__name__}._extract_batch broke the contract: expected "
                f"{(batch.shape[0], self.channels, batch.shape[2], batch.shape[3])}, got {tuple(out.shape)}"
            )
        out = out.to(device=home, dtype=torch.float32).clamp(0.0, 1.0)
        if single:
            return out[0].cpu()
        return out

    def dissimilarity(self, hint: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """Score how far `other` is from the reference `hint` with this condition's metric.

        Args:
            hint (`torch.Tensor`): reference hints, [B,3,H,W] or [3,H,W] in [0,1] (or uint8).
            other (`torch.Tensor`): hints to compare (e.g. re-extracted from generated images).

        Returns:
            `torch.Tensor`: float32 [B] (one value per image, [1] for single images); 0 for identical
            inputs, larger is more different.
        """
        hint_b, other_b = hint_pair(hint, other)
        return self._dissimilarity(hint_b, other_b).float()

    @abstractmethod
    def _extract_batch(self, x: torch.Tensor) -> torch.Tensor:
        """float32 [B,3,H,W] in [0,1] -> float [B,3,H,W] in [0,1] of the same size."""

    @abstractmethod
    def _dissimilarity(self, hint: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """Two float32 [B,3,H,W] hint batches in [0,1] -> float32 [B], 0 for identical inputs."""
