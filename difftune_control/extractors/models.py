"""Shared machinery of the model backends: lazy loading, offline-friendly errors, batching, dtypes.

Model backends (DPT, UperNet, OneFormer, the controlnet-aux annotators, the toy world's
annotators) load their weights on first use, run batched on `device` (CUDA when available), and
turn "weights not found" into a `FileNotFoundError` that says how to provide them offline. The
bases of the controlnet-aux and toy-world backends live in `annotators`.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from .base import ConditionExtractor, Resolution, resolve_device

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

_DTYPES = ("float32", "float16", "bfloat16")


def offline_help(source: str, files: Sequence[str] = (), flag: str = "model") -> str:
    """The advice appended to every "weights not found" error."""
    wanted = f" holding {', '.join(files)}" if files else ""
    if looks_like_path(source) or os.path.isdir(source):
        where = f"Point `{flag}` at a folder{wanted} (a `save_pretrained` folder or a hub snapshot)"
    else:
        where = (
            f"No network is needed if the weights are on disk: on a machine with internet run "
            f"`huggingface-cli download {source} --local-dir ./weights/{source.rsplit('/', 1)[-1]}`, copy "
            f"the folder over and point `{flag}` at it{wanted}"
        )
    return (
        f'{where}: recipe `[extractor] params = {{ {flag} = "./weights/..." }}`, '
        f"`difftune extract --extractor_param {flag}=PATH`, or `get_extractor(..., {flag}=PATH)`."
    )


def looks_like_path(source: str) -> bool:
    """True for strings that can only be a local path (a hub id is "name" or "owner/name")."""
    return source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") > 1


def load_pretrained(loader: Callable[[str], T], source: str, what: str, files: Sequence[str] = ()) -> T:
    """Call `loader(source)` and turn any "not found / offline" failure into a teaching error.

    Args:
        loader (`Callable[[str], T]`): e.g. `lambda s: DPTForDepthEstimation.from_pretrained(s)`.
        source (`str`): a local folder or a Hugging Face hub id.
        what (`str`): human name of the weights, e.g. "DPT depth model".
        files (`Sequence[str]`): files a local folder must contain (checked before loading).

    Returns:
        `T`: whatever the loader returns.

    Raises:
        `FileNotFoundError`: the folder or a required file is missing, or the hub id cannot be
            resolved (no network, no cache); the message explains the offline route.
    """
    if os.path.isdir(source):
        missing = [name for name in files if not os.path.exists(os.path.join(source, name))]
        if missing:
            raise FileNotFoundError(
                f"{what}: folder {source!r} lacks {', '.join(missing)}. " + offline_help(source, files)
            )
    elif looks_like_path(source):
        raise FileNotFoundError(f"{what}: folder {source!r} does not exist. " + offline_help(source, files))
    try:
        return loader(source)
    except (OSError, ValueError, ConnectionError) as err:
        # from_pretrained raises OSError (or an OSError subclass) when neither a local folder nor a
        # reachable / cached hub repo provides the files; huggingface_hub raises a ValueError
        # subclass (HFValidationError) for strings that are neither.
        raise FileNotFoundError(
            f"{what}: could not load weights from {source!r} ({type(err).__name__}: {err}). "
            + offline_help(source, files)
        ) from err


def load_processor_and_model(
    processor_cls: Any,
    model_cls: Any,
    source: str,
    what: str,
    device: torch.device,
    dtype: torch.dtype,
    local_files_only: bool = False,
) -> tuple[Any, Any]:
    """Load a transformers processor and model from one folder or hub id, offline-friendly.

    Args:
        processor_cls (`Any`): e.g. `AutoImageProcessor`; anything with `from_pretrained`.
        model_cls (`Any`): e.g. `AutoModelForDepthEstimation`.
        source (`str`): a local folder (with `config.json`) or a Hugging Face hub id.
        what (`str`): human name of the weights for errors, e.g. "depth model (dpt)".
        device (`torch.device`), dtype (`torch.dtype`): where and in which precision the model runs.
        local_files_only (`bool`, defaults to `False`): never contact the hub.

    Returns:
        `tuple[Any, Any]`: the processor and the model (on `device`, in `dtype`, eval mode).

    Raises:
        `FileNotFoundError`: see `load_pretrained`.
    """

    def load(folder_or_id: str) -> tuple[Any, Any]:
        kw = {"local_files_only": local_files_only}
        processor = processor_cls.from_pretrained(folder_or_id, **kw)
        network = model_cls.from_pretrained(folder_or_id, **kw)
        return processor, network.to(device, dtype).eval()

    return load_pretrained(load, source, what, ("config.json",))


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """`None` -> float16 on CUDA, float32 elsewhere; else one of float32 / float16 / bfloat16."""
    import torch

    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"extractor dtype: expected one of {', '.join(_DTYPES)}, got {dtype!r}")
    return getattr(torch, dtype)


class ModelExtractor(ConditionExtractor):
    """A `ConditionExtractor` backed by a neural network that is loaded on first use.

    Subclasses implement `_load() -> Any` (returns the model, already on `self.device` and in
    `self.dtype`) and `_run(model, x) -> Tensor` (a micro-batch [b,3,H,W] in [0,1] on `self.device`
    -> hint [b,3,H,W] in [0,1]). `_extract_batch` splits large batches into micro-batches of
    `batch_size` so memory stays bounded.

    Args:
        resolution (`int`, `tuple[int, int]` or `None`): output size, see `ConditionExtractor`.
        device (`str` or `torch.device`, *optional*): where the model runs; CUDA when available.
        dtype (`str`, *optional*): "float32", "float16" or "bfloat16"; default float16 on CUDA
            (float32 for networks that need it, see `default_dtype`), float32 on CPU.
        batch_size (`int`, defaults to 16): largest micro-batch sent to the model at once.
    """

    default_dtype: str | None = None
    """dtype used when none is given (`None`: float16 on CUDA, float32 on CPU); networks that break
    in half precision set "float32"."""

    def __init__(
        self,
        resolution: Resolution = None,
        device: str | torch.device | None = None,
        dtype: str | None = None,
        batch_size: int = 16,
    ) -> None:
        device = resolve_device(device)
        super().__init__(resolution=resolution, device=device)
        self.dtype = resolve_dtype(self.default_dtype if dtype is None else dtype, device)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"extractor batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size
        self._model: Any = None

    @property
    def model(self) -> Any:
        """The network, loaded on first access."""
        if self._model is None:
            self._model = self._load()
        return self._model

    def _extract_batch(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        model = self.model
        outs = [self._run(model, chunk).float() for chunk in x.split(self.batch_size)]
        return torch.cat(outs, dim=0)

    @abstractmethod
    def _load(self) -> Any:
        """Load the model (on `self.device`, in `self.dtype`, eval mode); called on first use."""

    @abstractmethod
    def _run(self, model: Any, x: torch.Tensor) -> torch.Tensor:
        """A micro-batch [b,3,H,W] in [0,1] on `self.device` -> hint [b,3,H,W] in [0,1]."""


def normalize_per_image(x: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each image of [B,C,H,W] to [0,1] (constant images become 0), as ControlNet
    does with MiDaS output (`depth -= min; depth /= max`)."""
    flat = x.flatten(1)
    low = flat.min(dim=1).values.view(-1, *([1] * (x.ndim - 1)))
    high = flat.max(dim=1).values.view(-1, *([1] * (x.ndim - 1)))
    return (x - low) / (high - low).clamp(min=1e-8)


def multiple_of(size: tuple[int, int], base: int, multiple: int) -> tuple[int, int]:
    """Scale (h, w) so the shorter side is `base`, each side rounded to a multiple of `multiple`."""
    h, w = size
    scale = base / min(h, w)
    return (
        max(multiple, int(round(h * scale / multiple)) * multiple),
        max(multiple, int(round(w * scale / multiple)) * multiple),
    )


def run_at_multiple(network: Any, x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Run a fully convolutional `network` on [B,3,H,W] whose sides must be multiples of `multiple`:
    other sizes are resized up to the next multiple and the output resized back (bilinear)."""
    import torch.nn.functional as F

    height, width = x.shape[-2:]
    size = (-(-height // multiple) * multiple, -(-width // multiple) * multiple)
    if size == (height, width):
        return network(x)
    out = network(F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False))
    return F.interpolate(out.float(), size=(height, width), mode="bilinear", align_corners=False)
