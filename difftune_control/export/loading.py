"""Load a ControlNet from a diffusers folder, a hub id, a run folder or a WebUI/LDM single file.

This is what ``--controlnet_model_name_or_path`` goes through, so users can continue training a
released ControlNet (e.g. ``control_v11f1p_sd15_depth.pth``) or one of our own WebUI exports.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difftune_control.export.infer import config_from_unet, infer_sd_config
from difftune_control.export.keymap import LDM_PREFIX, ldm_to_diffusers, strip_ldm_prefix

if TYPE_CHECKING:
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

logger = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt", ".bin")
CONFIG_METADATA_KEY = "controlnet_config"
"""safetensors metadata key under which our WebUI export stores the diffusers config (JSON)."""
_DIFFUSERS_MARKER = "controlnet_cond_embedding.conv_in.weight"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_UNSUPPORTED_MARKERS = {
    "lora_controlnet": "a Control-LoRA",
    "difference": "a 'difference' ControlNet (weights relative to a base UNet)",
}


def config_dict(model: ControlNetModel) -> dict[str, Any]:
    """``model``'s config as plain JSON types, without the local ``_name_or_path`` it was loaded from."""
    config = json.loads(model.to_json_string())
    config.pop("_name_or_path", None)
    return config


def read_single_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read the tensors and (safetensors) metadata of a single checkpoint file.

    Args:
        path (`str` or `os.PathLike`): A ``.safetensors``, ``.ckpt``, ``.pth``, ``.pt`` or ``.bin`` file.

    Returns:
        `tuple[dict[str, torch.Tensor], dict[str, str]]`: Tensors by key, and the metadata (empty
        for pickled files). Pickled files are read with ``weights_only=True``; a top-level
        ``state_dict`` entry is unwrapped.
    """
    import torch

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a state dict of tensors")
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    return tensors, {}


def _controlnet_tensors(tensors: dict[str, Any], path: Path) -> tuple[dict[str, Any], str]:
    """Select the ControlNet tensors of a file; return them with their layout (``ldm`` or ``diffusers``)."""
    for marker, what in _UNSUPPORTED_MARKERS.items():
        if marker in tensors:
            raise ValueError(f"{path} is {what}; only full ControlNet weights can be loaded")
    if _DIFFUSERS_MARKER in tensors:
        return tensors, "diffusers"
    prefixed = {k: v for k, v in tensors.items() if k.startswith(LDM_PREFIX)}
    if prefixed and len(prefixed) != len(tensors):
        # ControlNet 1.0 checkpoints bundle the SD weights; only control_model.* is ours.
        logger.info(
            "%s: using %d control_model.* tensors, ignoring %d others",
            path,
            len(prefixed),
            len(tensors) - len(prefixed),
        )
        tensors = prefixed
    ldm = strip_ldm_prefix(tensors)
    if "input_hint_block.0.weight" not in ldm or "zero_convs.0.0.weight" not in ldm:
        raise ValueError(
            f"{path} does not hold a ControlNet: expected LDM keys such as 'input_hint_block.0.weight' and "
            f"'zero_convs.0.0.weight' (optionally prefixed {LDM_PREFIX!r}) or diffusers keys such as "
            f"{_DIFFUSERS_MARKER!r}; found e.g. {sorted(tensors)[:5]}"
        )
    return ldm, "ldm"


def _config_from_arg(config: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    path = Path(config)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"config= {str(config)!r}: expected a folder with config.json or a config.json file"
        )
    return json.loads(file.read_text())


def _resolve_config(
    ldm: dict[str, Any] | None,
    metadata: Mapping[str, str],
    config: str | os.PathLike | Mapping[str, Any] | None,
    unet: UNet2DConditionModel | None,
    path: Path,
) -> tuple[dict[str, Any], str]:
    if config is not None:
        return _config_from_arg(config), "config="
    if CONFIG_METADATA_KEY in metadata:
        return json.loads(metadata[CONFIG_METADATA_KEY]), "the file's metadata"
    if ldm is None:
        raise ValueError(
            f"{path} holds diffusers-keyed tensors without a config: pass config= (folder or config.json)"
        )
    if unet is not None:
        return config_from_unet(unet, ldm), "unet.config"
    try:
        return infer_sd_config(ldm), "the tensor shapes"
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _fit_projection_shapes(state_dict: dict[str, Any], expected: Mapping[str, Any]) -> None:
    """Reshape transformer proj_in/proj_out between Linear [o, i] and 1x1 Conv [o, i, 1, 1] as the model needs.

    SD1.5 uses 1x1 convolutions there and SD2.x linear layers; files converted by other tools do
    not always agree with the config, and the two are the same map.
    """
    for key, value in state_dict.items():
        target = expected.get(key)
        if target is None or tuple(value.shape) == tuple(target.shape) or "proj_" not in key:
            continue
        if value.dim() == 4 and target.dim() == 2 and value.shape[2:] == (1, 1):
            state_dict[key] = value[:, :, 0, 0]
        elif value.dim() == 2 and target.dim() == 4 and tuple(target.shape[2:]) == (1, 1):
            state_dict[key] = value[:, :, None, None]


def controlnet_from_state_dict(
    state_dict: Mapping[str, Any], config: Mapping[str, Any], torch_dtype: torch.dtype | None = None
) -> ControlNetModel:
    """Build a ``ControlNetModel`` from ``config`` and load diffusers-keyed tensors strictly.

    Args:
        state_dict (`Mapping[str, Any]`): Diffusers-keyed tensors.
        config (`Mapping[str, Any]`): The ControlNet config.
        torch_dtype (`torch.dtype`, *optional*): Parameter dtype; float32 when None.

    Returns:
        `ControlNetModel`: In eval mode, on the CPU.

    Raises:
        ValueError: Keys missing or unexpected, or shapes that do not fit the config.
    """
    import torch
    from diffusers import ControlNetModel

    with torch.device("meta"):  # skip the random init that the loaded tensors overwrite anyway
        model = ControlNetModel.from_config(dict(config))
    expected = model.state_dict()
    state_dict = dict(state_dict)
    _fit_projection_shapes(state_dict, expected)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            "the weights do not fit the ControlNet config: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(wrong)} with other shapes (e.g. {wrong[:3]}); pass the config the weights were trained with"
        )
    dtype = torch_dtype or torch.float32
    model.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=True, assign=True)
    return model.eval()


def load_controlnet(
    path_or_id: str | os.PathLike,
    *,
    unet: UNet2DConditionModel | None = None,
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    torch_dtype: torch.dtype | None = None,
) -> ControlNetModel:
    """Load a ControlNet from a diffusers folder, a hub id, a run folder or a single WebUI/LDM file.

    Args:
        path_or_id (`str` or `os.PathLike`):
            A diffusers ``save_pretrained`` folder; a run folder or ``checkpoint-N`` folder (its
            ``controlnet/``); a hub id; or a single ``.safetensors``/``.ckpt``/``.pth`` file in the
            original LDM layout (``input_blocks.N...``, with or without ``control_model.``), such as
            ``control_v11f1p_sd15_depth.pth`` or a file written by ``difftune export --format webui``.
        unet (`UNet2DConditionModel`, *optional*):
            For a single file without ``config=``: the base UNet whose architecture the ControlNet
            copies (only its config is used; the weights come from the file).
        config (`str`, `os.PathLike` or `Mapping`, *optional*):
            For a single file: a folder with ``config.json``, a ``config.json`` path or a config dict.
            Without it the config comes from the file's metadata (our exports), from ``unet``, or from
            the tensor shapes (SD1.5 / SD2.x only), in that order.
        torch_dtype (`torch.dtype`, *optional*): Parameter dtype; float32 when None.

    Returns:
        `ControlNetModel`: The loaded model in eval mode on the CPU.

    Raises:
        FileNotFoundError: A local-looking path that does not exist.
        ValueError: A file that holds no ControlNet, or whose config cannot be determined.
    """
    import torch
    from diffusers import ControlNetModel

    path = Path(path_or_id)
    dtype = torch_dtype or torch.float32
    if path.is_dir():
        from difftune_control.export.source import resolve_source

        folder = resolve_source(path).controlnet_dir
        return ControlNetModel.from_pretrained(folder, torch_dtype=dtype).eval()
    if path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise ValueError(
                f"{path}: unsupported file type {path.suffix!r}; expected one of {SINGLE_FILE_SUFFIXES}"
            )
        tensors, metadata = read_single_file(path)
        tensors, layout = _controlnet_tensors(tensors, path)
        ldm = tensors if layout == "ldm" else None
        cfg, origin = _resolve_config(ldm, metadata, config, unet, path)
        logger.info("loading %s (%s layout) with the ControlNet config from %s", path, layout, origin)
        state_dict = ldm_to_diffusers(ldm, cfg) if ldm is not None else tensors
        return controlnet_from_state_dict(state_dict, cfg, dtype)
    name = str(path_or_id)
    if path.suffix in SINGLE_FILE_SUFFIXES or not _HUB_ID.match(name) or Path(name.split("/")[0]).exists():
        raise FileNotFoundError(
            f"ControlNet {str(path_or_id)!r} not found: expected a diffusers folder, a run folder, a single "
            f"{'/'.join(SINGLE_FILE_SUFFIXES)} file or a hub id (owner/name)"
        )
    return ControlNetModel.from_pretrained(str(path_or_id), torch_dtype=dtype).eval()
