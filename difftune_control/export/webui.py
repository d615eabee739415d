"""The WebUI single file: LDM keys under ``control_model.``, one dtype, provenance in the metadata.

File name: ``control_<name>_<sd>_<condition>_<dtype>.safetensors``. sd-webui-controlnet reads the
SD family from the name (``sd14/15/16`` -> SD1.x, else ``sd21`` / ``2.1`` -> SD2.x, else ``xl`` ->
SDXL) and filters models by control type through substrings (``depth``, ``canny``, ``normal``,
``seg``, ``sketch`` for scribble); ComfyUI and sd-webui-controlnet switch on global average pooling
for names containing / ending in ``shuffle``. So the name part and the condition must not contain
another family's marker (``xl`` in an SD1.5 name, ``sd15`` in an SD2.1 one...) or ``shuffle``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difftune_control.export.keymap import LDM_PREFIX, diffusers_to_ldm, sd_version_tag
from difftune_control.export.loading import CONFIG_METADATA_KEY, config_dict, load_controlnet
from difftune_control.export.verify import (
    VerificationError,
    VerifyResult,
    verify_reload,
    webui_layout_problems,
)
from difftune_control.utils import current_umask

if TYPE_CHECKING:
    from diffusers import ControlNetModel

logger = logging.getLogger(__name__)

DTYPES = ("fp16", "bf16", "fp32")
# Substrings by which sd-webui-controlnet guesses the SD family of a model file (after `clean_name`,
# which removes the dot of "2.1"), by the family they denote.
_FAMILY_MARKERS = {"sd14": "sd15", "sd15": "sd15", "sd16": "sd15", "sd21": "sd21", "xl": "xl"}


def clean_name(name: str, what: str = "--name") -> str:
    """Lower-case ``name`` and turn every run of characters other than ``a-z0-9-`` into ``-``.

    Underscores separate the fields of a WebUI file name, so they cannot appear inside one.

    Raises:
        ValueError: Nothing is left after cleaning.
    """
    cleaned = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if not cleaned:
        raise ValueError(f"{what} {name!r} has no letters or digits; use e.g. 'my-depth'")
    return cleaned


def webui_filename(name: str, condition: str, config: Mapping[str, Any], dtype: str = "fp16") -> str:
    """``control_<name>_<sd>_<condition>_<dtype>.safetensors`` with the SD family from the architecture.

    Args:
        name (`str`): Name part (cleaned with `clean_name`).
        condition (`str`): Condition (``depth``, ``canny``, ``normal``, ``segmentation``, ``sketch``...).
        config (`Mapping[str, Any]`): The ControlNet config; decides ``sd15`` / ``sd21`` / ``xl`` / ``toy``.
        dtype (`str`, *optional*, defaults to `"fp16"`): ``fp16``, ``bf16`` or ``fp32``.

    Returns:
        `str`: The file name.

    Raises:
        ValueError: ``dtype`` unknown, or the name/condition would make a WebUI misread the file
            (another SD family's marker, or ``shuffle``), listing every problem.
    """
    name, cond = clean_name(name, "--name"), clean_name(condition, "condition")
    tag = sd_version_tag(config)
    problems = []
    if dtype not in DTYPES:
        problems.append(f"--dtype {dtype!r} is not one of {DTYPES}")
    for label, value in (("--name", name), ("condition", cond)):
        markers = [m for m, family in _FAMILY_MARKERS.items() if m in value and family != tag]
        if markers:
            problems.append(
                f"{label} {value!r} contains {markers}, which sd-webui-controlnet reads as an SD family "
                f"(the architecture says {tag!r}); rename it"
            )
        if "shuffle" in value and not (label == "condition" and value == "shuffle"):
            problems.append(
                f"{label} {value!r} contains 'shuffle', which turns on global pooling in the WebUIs"
            )
    if problems:
        raise ValueError("; ".join(problems))
    return f"control_{name}_{tag}_{cond}_{dtype}.safetensors"


def _torch_dtype(dtype: str) -> Any:
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]


def webui_state_dict(controlnet: ControlNetModel, dtype: str) -> dict[str, Any]:
    """The ControlNet's tensors under ``control_model.<LDM key>``, cast to ``dtype``, contiguous."""
    torch_dtype = _torch_dtype(dtype)
    ldm = diffusers_to_ldm(controlnet.state_dict(), controlnet.config, prefix=LDM_PREFIX)
    return {k: v.detach().to("cpu", torch_dtype).contiguous() for k, v in ldm.items()}


def write_webui_file(
    controlnet: ControlNetModel, path: str | os.PathLike, dtype: str, metadata: Mapping[str, str]
) -> Path:
    """Write the WebUI file atomically (temporary file + rename) and check its key layout.

    Args:
        controlnet (`ControlNetModel`): The trained ControlNet.
        path (`str` or `os.PathLike`): Target file.
        dtype (`str`): ``fp16``, ``bf16`` or ``fp32``.
        metadata (`Mapping[str, str]`): safetensors metadata (the diffusers config is added).

    Returns:
        `Path`: ``path``.

    Raises:
        VerificationError: The keys would miss the WebUIs' native LDM path.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors = webui_state_dict(controlnet, dtype)
    problems = webui_layout_problems(list(tensors), controlnet.config)
    if problems:
        raise VerificationError(f"{path.name} would not load natively in the WebUIs: " + "; ".join(problems))
    meta = {**metadata, CONFIG_METADATA_KEY: json.dumps(config_dict(controlnet)), "format": "pt"}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={k: str(v) for k, v in meta.items()})
        os.chmod(tmp, 0o666 & ~current_umask())  # 0644 under umask 022: a UI running as another user reads it
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


UI_SUPPORT: dict[str, str] = {
    "sd15": "loads in AUTOMATIC1111 (sd-webui-controlnet), Forge and ComfyUI: put it in the UI's ControlNet "
    "models folder",
    "sd21": "loads in ComfyUI and Forge (put it in their ControlNet models folder); AUTOMATIC1111's "
    "sd-webui-controlnet builds every non-SDXL ControlNet with 8 attention heads, while SD2.x attention "
    "has 64 channels per head, so this file runs there but computes wrong outputs",
    "xl": "loads in ComfyUI, Forge and AUTOMATIC1111 (sd-webui-controlnet): put it in the UI's ControlNet "
    "models folder",
    "toy": "a toy-world ControlNet, for the demo: it goes with the toy world's 64 px base model and loads in "
    "no UI (AUTOMATIC1111, Forge and ComfyUI build only SD1.x/2.x/XL-sized ControlNets); read it back with "
    "difftune_control.export.load_controlnet, or train on a Stable Diffusion model for a file the UIs load",
}
"""Which UIs load a WebUI file of each SD family (``sd_version_tag``), as their loaders read it:
sd-webui-controlnet (``scripts/controlnet_model_guess.py``) builds SD1.x/2.x files from a fixed config with
``num_heads=8``, taking only the context width from the tensors; ComfyUI (``comfy/controlnet.py``) and Forge
(``ldm_patched/modules/controlnet.py``, the same code) take the whole architecture, heads included, from the
model detection of the base models they support, which a toy architecture matches none of."""


def diffusers_single_file_limit(config: Mapping[str, Any]) -> str | None:
    """Why diffusers' ``from_single_file`` converter cannot read this architecture, or None if it can.

    Its ControlNet converter expects the SD hint encoder (``conv_out`` at ``input_hint_block.14``,
    i.e. four embedding widths), a cross-attention mid block, and no ``label_emb``.
    """
    if len(config["conditioning_embedding_out_channels"]) != 4:
        widths = tuple(config["conditioning_embedding_out_channels"])
        return f"its converter expects 4 hint-embedding widths (conv_out at input_hint_block.14), this has {widths}"
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        return "its converter expects a cross-attention mid block"
    if config.get("addition_embed_type") or config.get("class_embed_type") or config.get("num_class_embeds"):
        return "its ControlNet converter does not map label_emb"
    return None


def reload_webui_file(path: Path, controlnet: ControlNetModel) -> tuple[ControlNetModel, str]:
    """Read the written file back, with diffusers' ``from_single_file`` where it can, else `load_controlnet`.

    ``from_single_file`` gets a local folder holding only ``config.json`` and ``local_files_only``,
    so nothing is downloaded.

    Returns:
        `tuple[ControlNetModel, str]`: The reloaded model and the loader used (for the log).
    """
    from diffusers import ControlNetModel

    limit = diffusers_single_file_limit(controlnet.config)
    if limit is None:
        with tempfile.TemporaryDirectory() as config_dir:
            Path(config_dir, "config.json").write_text(json.dumps(config_dict(controlnet)))
            model = ControlNetModel.from_single_file(str(path), config=config_dir, local_files_only=True)
        return model, "diffusers ControlNetModel.from_single_file"
    loader = f"difftune_control load_controlnet (diffusers from_single_file cannot: {limit})"
    with tempfile.TemporaryDirectory() as config_dir:
        # The config from a separate file, not the metadata, so the check does not trust what it checks.
        Path(config_dir, "config.json").write_text(json.dumps(config_dict(controlnet)))
        return load_controlnet(path, config=config_dir), loader


def verify_webui_file(path: Path, controlnet: ControlNetModel, dtype: str) -> VerifyResult:
    """Reload ``path`` offline and check weights and outputs against ``controlnet`` (see `verify_reload`)."""
    reloaded, loader = reload_webui_file(
        path, controlnet
    )  # the loader is named once, in the exporter's result
    names = {k: k for k in controlnet.state_dict()}
    file_keys = diffusers_to_ldm(names, controlnet.config, prefix=LDM_PREFIX)  # file key -> diffusers key
    return verify_reload(controlnet, reloaded, dtype, loader, {d: f for f, d in file_keys.items()})
