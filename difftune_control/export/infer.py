"""Rebuild a ControlNet config from LDM-keyed tensors (SD1.5 / SD2.1 / SDXL) or from a UNet.

A single WebUI file carries no ``config.json``. Layer widths, depths and the hint encoder can be
read off the tensor shapes; the number of attention heads cannot (it only changes how the
projections are split). SD1.5 uses 8 heads everywhere, SD2.x and SDXL 64-channel heads, so for those
the shapes determine the config (SDXL's time-id embedding width, 256, is its architecture's; the
shapes give only its sum with the pooled text width); any other architecture needs ``config=`` or
the base ``unet``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from difftune_control.export.keymap import sd_version_tag

_SD_CHANNELS = [320, 640, 1280, 1280]
_SDXL_CHANNELS = [320, 640, 1280]
_SDXL_TIME_EMBED_DIM = 256


def _shape(state_dict: Mapping[str, Any], key: str) -> tuple[int, ...]:
    return tuple(state_dict[key].shape)


def _indices(state_dict: Mapping[str, Any], pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state_dict if (m := regex.match(k))})


def shape_config(ldm: Mapping[str, Any]) -> dict[str, Any]:
    """Every ControlNet config field that the LDM tensor shapes determine.

    Args:
        ldm (`Mapping[str, Any]`): LDM-keyed tensors without the ``control_model.`` prefix.

    Returns:
        `dict[str, Any]`: ``in_channels``, ``conditioning_channels``, ``conditioning_embedding_out_channels``,
        ``block_out_channels``, ``layers_per_block``, ``down_block_types``, ``mid_block_type``,
        ``transformer_layers_per_block``, ``cross_attention_dim`` (None without attention),
        ``use_linear_projection`` and ``addition_embed_type`` (``"text_time"`` when ``label_emb`` is present).

    Raises:
        ValueError: A tensor the layout requires is missing (the file is not an LDM ControlNet).
    """
    required = ["input_blocks.0.0.weight", "input_hint_block.0.weight", "zero_convs.0.0.weight"]
    missing = [k for k in required if k not in ldm]
    if missing:
        raise ValueError(f"not an LDM ControlNet state dict: missing {missing}")
    model_channels, in_channels = _shape(ldm, "input_blocks.0.0.weight")[:2]

    hint = _indices(ldm, r"input_hint_block\.(\d+)\.weight$")
    # conv_in, then (same width, strided to the next width) pairs, then conv_out.
    cond_channels = [_shape(ldm, "input_hint_block.0.weight")[0]]
    cond_channels += [_shape(ldm, f"input_hint_block.{i}.weight")[0] for i in hint[2:-1:2]]

    blocks = _indices(ldm, r"input_blocks\.(\d+)\.")
    downsamplers = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in ldm]
    layers = (downsamplers[0] if downsamplers else len(blocks)) - 1
    levels = len(downsamplers) + 1
    block_out, down_types, depths = [], [], []
    cross_dim, linear = None, False
    for level in range(levels):
        first = 1 + level * (layers + 1)
        block_out.append(_shape(ldm, f"input_blocks.{first}.0.out_layers.3.weight")[0])
        if f"input_blocks.{first}.1.proj_in.weight" in ldm:
            down_types.append("CrossAttnDownBlock2D")
            depths.append(len(_indices(ldm, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.")))
            cross_dim = _shape(ldm, f"input_blocks.{first}.1.transformer_blocks.0.attn2.to_k.weight")[1]
            linear = len(_shape(ldm, f"input_blocks.{first}.1.proj_in.weight")) == 2
        else:
            down_types.append("DownBlock2D")
            depths.append(1)
    mid_attention = "middle_block.1.proj_in.weight" in ldm
    if mid_attention:
        mid_depth = len(_indices(ldm, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
        cross_dim = cross_dim or _shape(ldm, "middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1]
        depths[-1] = mid_depth if down_types[-1] == "DownBlock2D" else depths[-1]
    if block_out[0] != model_channels:
        raise ValueError(f"conv_in width {model_channels} differs from the first block's {block_out[0]}")
    config: dict[str, Any] = {
        "in_channels": in_channels,
        "conditioning_channels": _shape(ldm, "input_hint_block.0.weight")[1],
        "conditioning_embedding_out_channels": cond_channels,
        "block_out_channels": block_out,
        "layers_per_block": layers,
        "down_block_types": down_types,
        "mid_block_type": "UNetMidBlock2DCrossAttn" if mid_attention else "UNetMidBlock2D",
        "transformer_layers_per_block": depths if len(set(depths)) > 1 else depths[0],
        "cross_attention_dim": cross_dim,
        "use_linear_projection": linear,
    }
    if "label_emb.0.0.weight" in ldm:
        config["addition_embed_type"] = "text_time"
    return config


def infer_sd_config(ldm: Mapping[str, Any]) -> dict[str, Any]:
    """A full ``ControlNetModel`` config for an SD1.5, SD2.x or SDXL ControlNet given as LDM tensors.

    Args:
        ldm (`Mapping[str, Any]`): LDM-keyed tensors without the ``control_model.`` prefix.

    Returns:
        `dict[str, Any]`: Config for ``ControlNetModel.from_config``.

    Raises:
        ValueError: The tensors are not an SD1.5 / SD2.x / SDXL ControlNet (heads cannot be inferred).
    """
    config = shape_config(ldm)
    tag = sd_version_tag(config) if config["block_out_channels"] == _SD_CHANNELS else "toy"
    if (
        config.get("addition_embed_type") == "text_time"
        and config["block_out_channels"] == _SDXL_CHANNELS
        and config["cross_attention_dim"] == 2048
    ):
        tag = "xl"
    if tag not in ("sd15", "sd21", "xl") or config["layers_per_block"] != 2:
        raise ValueError(
            "the file is not an SD1.5, SD2.x or SDXL ControlNet (found block_out_channels "
            f"{config['block_out_channels']}, cross_attention_dim {config['cross_attention_dim']}, "
            f"layers_per_block {config['layers_per_block']}); the number of attention heads cannot be read "
            "from the tensors: pass config= (a folder with config.json, or a config.json) or unet="
        )
    if tag == "xl":
        # SDXL: 64-channel heads; label_emb takes 6 time ids x 256 + the pooled text embedding
        config.update(
            attention_head_dim=[c // 64 for c in _SDXL_CHANNELS],
            addition_time_embed_dim=_SDXL_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=_shape(ldm, "label_emb.0.0.weight")[1],
            upcast_attention=False,
        )
    elif tag == "sd15":
        config.update(attention_head_dim=8, upcast_attention=False)
    else:
        # SD2.x: 64-channel heads; upcast as the SD2.1 UNet does, so fp16 attention cannot overflow.
        config.update(attention_head_dim=[c // 64 for c in _SD_CHANNELS], upcast_attention=True)
    return config


def config_from_unet(unet: Any, ldm: Mapping[str, Any]) -> dict[str, Any]:
    """The config ``ControlNetModel.from_unet`` would build, with the hint encoder read from ``ldm``.

    Args:
        unet (`UNet2DConditionModel`): The base model's UNet; only its config is used.
        ldm (`Mapping[str, Any]`): LDM-keyed tensors without the ``control_model.`` prefix.

    Returns:
        `dict[str, Any]`: Config for ``ControlNetModel.from_config``.
    """
    import torch
    from diffusers import ControlNetModel

    shapes = shape_config(ldm)
    with torch.device("meta"):  # only the config is wanted: no memory, no init cost
        controlnet = ControlNetModel.from_unet(
            unet,
            conditioning_embedding_out_channels=tuple(shapes["conditioning_embedding_out_channels"]),
            conditioning_channels=shapes["conditioning_channels"],
            load_weights_from_unet=False,
        )
    return dict(controlnet.config)
