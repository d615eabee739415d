"""Key mapping between diffusers' ``ControlNetModel`` and the original ControlNet (LDM) layout.

The original ControlNet (Zhang, Rao, Agrawala, "Adding Conditional Control to Text-to-Image
Diffusion Models", ICCV 2023; ``cldm/cldm.py`` of lllyasviel/ControlNet) stores its weights in
the LDM layout that AUTOMATIC1111's sd-webui-controlnet, Forge and ComfyUI load natively:

    time_embed.0 / time_embed.2           <- time_embedding.linear_1 / linear_2
    label_emb.0.0 / label_emb.0.2         <- add_embedding.linear_1 / linear_2 (SDXL)
    input_hint_block.0, 2, 4, ...         <- controlnet_cond_embedding.conv_in, blocks.i, conv_out
    input_blocks.0.0                      <- conv_in
    input_blocks.N.0 (ResBlock)           <- down_blocks.i.resnets.j
    input_blocks.N.1 (SpatialTransformer) <- down_blocks.i.attentions.j
    input_blocks.N.0.op                   <- down_blocks.i.downsamplers.0.conv
    zero_convs.N.0                        <- controlnet_down_blocks.N
    middle_block.0 / .1 / .2              <- mid_block.resnets.0 / attentions.0 / resnets.1
    middle_block_out.0                    <- controlnet_mid_block

with ``N = 1 + i * (layers_per_block + 1) + j``. Inside a ResBlock the names differ
(``norm1 -> in_layers.0``, ``conv1 -> in_layers.2``, ``time_emb_proj -> emb_layers.1``,
``norm2 -> out_layers.0``, ``conv2 -> out_layers.3``, ``conv_shortcut -> skip_connection``);
inside a transformer they are identical. Released files prefix every key with
``control_model.`` (ControlNet 1.1); readers accept both.

Everything here is a pure function of the ControlNet config, so the same code maps the tiny test
models, the toy world's ControlNet, SD1.5, SD2.1 and SDXL ControlNets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

LDM_PREFIX = "control_model."
"""Prefix of every key in the released ControlNet 1.1 files (and in our WebUI export)."""

SdVersionTag = Literal["sd15", "sd21", "xl", "toy"]

_SD_CHANNELS = (320, 640, 1280, 1280)

# ResBlock sub-modules: (diffusers name, LDM name).
_RESNET_PARTS = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)
_DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")


def _get(config: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)
    return default if value is None and default is not None else value


def module_pairs(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Module-level correspondence between a diffusers ControlNet and the LDM ControlNet.

    Every parameter ``<diffusers module>.<rest>`` maps to ``<LDM module>.<rest>``; no module in
    either column is an ancestor of another, so the mapping of keys is a bijection.

    Args:
        config (`Mapping[str, Any]`):
            A ``ControlNetModel`` config (``controlnet.config`` or the ``config.json`` dict). Uses
            ``block_out_channels``, ``layers_per_block``, ``down_block_types``, ``mid_block_type``,
            ``conditioning_embedding_out_channels``, ``addition_embed_type`` and the class embedding.

    Returns:
        `list[tuple[str, str]]`: ``(diffusers_module, ldm_module)`` pairs, in model order.

    Raises:
        ValueError: The config uses a block or embedding that has no LDM counterpart.
    """
    channels = tuple(_get(config, "block_out_channels", _SD_CHANNELS))
    layers = int(_get(config, "layers_per_block", 2))
    down_types = tuple(_get(config, "down_block_types", ()))
    mid_type = _get(config, "mid_block_type", "UNetMidBlock2DCrossAttn")
    cond_channels = tuple(_get(config, "conditioning_embedding_out_channels", (16, 32, 96, 256)))
    problems = []
    if len(down_types) != len(channels):
        problems.append(
            f"down_block_types {down_types} must have one entry per block_out_channels {channels}"
        )
    bad = [t for t in down_types if t not in _DOWN_BLOCK_TYPES]
    if bad:
        problems.append(f"down_block_types {bad} have no LDM counterpart (supported: {_DOWN_BLOCK_TYPES})")
    if mid_type not in _MID_BLOCK_TYPES:
        problems.append(f"mid_block_type {mid_type!r} has no LDM counterpart (supported: {_MID_BLOCK_TYPES})")
    if _get(config, "encoder_hid_dim_type") is not None:
        problems.append("encoder_hid_dim_type is set; the LDM ControlNet has no encoder_hid_proj")
    add_type = _get(config, "addition_embed_type")
    class_type = _get(config, "class_embed_type")
    if add_type not in (None, "text_time"):
        problems.append(f"addition_embed_type {add_type!r} is not supported (supported: None, 'text_time')")
    if class_type not in (None, "timestep", "projection", "identity"):
        problems.append(f"class_embed_type {class_type!r} is not supported")
    if add_type is not None and (class_type not in (None, "identity") or _get(config, "num_class_embeds")):
        problems.append("both a class embedding and an addition embedding would map to label_emb")
    if not cond_channels:
        problems.append("conditioning_embedding_out_channels is empty")
    if problems:
        raise ValueError("cannot map this ControlNet to the LDM layout: " + "; ".join(problems))

    pairs = [
        ("time_embedding.linear_1", "time_embed.0"),
        ("time_embedding.linear_2", "time_embed.2"),
    ]
    if add_type == "text_time":
        pairs += [("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2")]
    elif class_type in ("timestep", "projection"):
        pairs += [
            ("class_embedding.linear_1", "label_emb.0.0"),
            ("class_embedding.linear_2", "label_emb.0.2"),
        ]
    elif class_type is None and _get(config, "num_class_embeds"):
        pairs.append(("class_embedding", "label_emb"))

    # Hint encoder: conv_in, 2 convs per extra width (the second strided), conv_out; SiLUs sit at
    # the odd indices of the LDM nn.Sequential, so the convs land on the even ones.
    n_blocks = 2 * (len(cond_channels) - 1)
    pairs.append(("controlnet_cond_embedding.conv_in", "input_hint_block.0"))
    pairs += [
        (f"controlnet_cond_embedding.blocks.{i}", f"input_hint_block.{2 * (i + 1)}") for i in range(n_blocks)
    ]
    pairs.append(("controlnet_cond_embedding.conv_out", f"input_hint_block.{2 * (n_blocks + 1)}"))

    pairs.append(("conv_in", "input_blocks.0.0"))
    index = 1
    for i, block_type in enumerate(down_types):
        for j in range(layers):
            pairs += _resnet_pairs(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{index}.0")
            if block_type == "CrossAttnDownBlock2D":
                pairs.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{index}.1"))
            index += 1
        if i < len(down_types) - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{index}.0.op"))
            index += 1
    pairs += [(f"controlnet_down_blocks.{k}", f"zero_convs.{k}.0") for k in range(index)]

    pairs += _resnet_pairs("mid_block.resnets.0", "middle_block.0")
    if mid_type == "UNetMidBlock2DCrossAttn":
        pairs.append(("mid_block.attentions.0", "middle_block.1"))
        pairs += _resnet_pairs("mid_block.resnets.1", "middle_block.2")
    pairs.append(("controlnet_mid_block", "middle_block_out.0"))
    return pairs


def _resnet_pairs(diffusers_prefix: str, ldm_prefix: str) -> list[tuple[str, str]]:
    return [(f"{diffusers_prefix}.{d}", f"{ldm_prefix}.{o}") for d, o in _RESNET_PARTS]


def num_zero_convs(config: Mapping[str, Any]) -> int:
    """Number of ``zero_convs`` (= controlnet_down_blocks) of a ControlNet: 12 for SD1.5/SD2.1, 9 for SDXL."""
    levels = len(tuple(_get(config, "block_out_channels", _SD_CHANNELS)))
    return 1 + levels * int(_get(config, "layers_per_block", 2)) + levels - 1


def _translate(state_dict: Mapping[str, Any], table: dict[str, str], direction: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    unmatched = []
    for key, value in state_dict.items():
        parts = key.split(".")
        # Longest module prefix first; modules in the table never nest, so at most one matches.
        for cut in range(len(parts) - 1, 0, -1):
            target = table.get(".".join(parts[:cut]))
            if target is not None:
                out[target + "." + ".".join(parts[cut:])] = value
                break
        else:
            unmatched.append(key)
    if unmatched:
        shown = ", ".join(unmatched[:8]) + (f" ... ({len(unmatched)} in all)" if len(unmatched) > 8 else "")
        raise ValueError(
            f"{direction}: {len(unmatched)} key(s) have no counterpart for this ControlNet config: {shown}. "
            "Is the config the one this state dict was trained with?"
        )
    return out


def diffusers_to_ldm(
    state_dict: Mapping[str, Any], config: Mapping[str, Any], *, prefix: str = ""
) -> dict[str, Any]:
    """Rename a diffusers ``ControlNetModel`` state dict to the original LDM ControlNet keys.

    Args:
        state_dict (`Mapping[str, Any]`):
            ``controlnet.state_dict()`` (tensors are passed through untouched, shapes included).
        config (`Mapping[str, Any]`):
            The ControlNet's config (``controlnet.config`` or its ``config.json`` dict).
        prefix (`str`, *optional*, defaults to `""`):
            Prepended to every LDM key; the WebUI export uses ``"control_model."``.

    Returns:
        `dict[str, Any]`: The same tensors under LDM keys (``input_blocks.N...``, ``zero_convs.N.0``, ...).

    Raises:
        ValueError: A key has no LDM counterpart under this config (listing the keys).
    """
    table = dict(module_pairs(config))
    return {prefix + k: v for k, v in _translate(state_dict, table, "diffusers -> LDM").items()}


def strip_ldm_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the optional ``control_model.`` prefix (all keys or none must carry it).

    Raises:
        ValueError: Some keys carry the prefix and others do not (e.g. a full SD + ControlNet
            checkpoint); select the ``control_model.`` keys first.
    """
    prefixed = [k for k in state_dict if k.startswith(LDM_PREFIX)]
    if not prefixed:
        return dict(state_dict)
    if len(prefixed) != len(state_dict):
        others = [k for k in state_dict if not k.startswith(LDM_PREFIX)]
        raise ValueError(
            f"{len(others)} key(s) lack the {LDM_PREFIX!r} prefix that the other {len(prefixed)} carry "
            f"(first: {others[:3]}); keep only the {LDM_PREFIX!r} keys"
        )
    return {k[len(LDM_PREFIX) :]: v for k, v in state_dict.items()}


def ldm_to_diffusers(state_dict: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """Rename an original LDM ControlNet state dict to diffusers ``ControlNetModel`` keys.

    Args:
        state_dict (`Mapping[str, Any]`):
            LDM-keyed tensors, with or without the ``control_model.`` prefix (all keys alike).
        config (`Mapping[str, Any]`):
            The diffusers config of the ControlNet these weights belong to.

    Returns:
        `dict[str, Any]`: The same tensors under diffusers keys, loadable with ``load_state_dict``.

    Raises:
        ValueError: A key has no diffusers counterpart under this config, or the prefix is mixed.
    """
    table = {ldm: diffusers for diffusers, ldm in module_pairs(config)}
    return _translate(strip_ldm_prefix(state_dict), table, "LDM -> diffusers")


def sd_version_tag(config: Mapping[str, Any]) -> SdVersionTag:
    """The SD family tag that goes into a WebUI file name, read from the ControlNet's architecture.

    ``xl`` when ``addition_embed_type == "text_time"``; ``sd15`` / ``sd21`` for the SD UNet widths
    (320, 640, 1280, 1280) with ``cross_attention_dim`` 768 / 1024. Anything else (the toy world's
    base with ``cross_attention_dim`` 128, tiny test models) is ``toy``: the WebUIs build SD-sized
    ControlNets from the file name and key layout, so such a file must never pass for an SD one.

    Args:
        config (`Mapping[str, Any]`): The ControlNet config.

    Returns:
        `str`: One of ``"sd15"``, ``"sd21"``, ``"xl"``, ``"toy"``.
    """
    if _get(config, "addition_embed_type") == "text_time":
        return "xl"
    if tuple(_get(config, "block_out_channels", ())) == _SD_CHANNELS:
        cross = _get(config, "cross_attention_dim")
        if cross == 768:
            return "sd15"
        if cross == 1024:
            return "sd21"
    return "toy"
