"""Checks that an exported ControlNet is the trained one: same weights, same outputs, native WebUI layout."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from difftune_control.export.keymap import LDM_PREFIX, num_zero_convs, sd_version_tag

if TYPE_CHECKING:
    import torch
    from diffusers import ControlNetModel

logger = logging.getLogger(__name__)

OUTPUT_TOLERANCE: dict[str, float] = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 5e-2}
"""Largest relative output error (max |a - b| / max |a| per output) allowed between the trained
fp32 ControlNet and its export, by export dtype: the cost of rounding the weights."""
RELOAD_TOLERANCE = 1e-5
"""Between the reloaded export and the trained model with its weights rounded to the export dtype
the weights are identical, so only float32 summation-order noise is allowed."""


class VerificationError(RuntimeError):
    """The exported ControlNet does not reproduce the trained one."""


@dataclass
class VerifyResult:
    """What the reload check measured."""

    loader: str
    """Which loader read the export back (e.g. ``diffusers ControlNetModel.from_single_file``)."""
    max_rel_error_vs_rounded: float
    """Output error against the trained model with weights rounded to the export dtype (should be ~0)."""
    max_rel_error_vs_fp32: float
    """Output error against the trained float32 model (the dtype's rounding cost)."""
    outputs_all_zero: bool
    """True when the trained ControlNet's outputs are all zero (zero convolutions untouched), so only
    the weight comparison is informative."""


def fixed_inputs(config: Mapping[str, Any], seed: int = 0, latent_size: int | None = None) -> dict[str, Any]:
    """A fixed ControlNet input: latent sample, timestep, text embeddings, hint (and SDXL extras).

    Args:
        config (`Mapping[str, Any]`): The ControlNet config (sizes come from it).
        seed (`int`, *optional*, defaults to 0): Seed of the CPU generator.
        latent_size (`int`, *optional*): Latent height/width; default twice the total downsampling.

    Returns:
        `dict[str, Any]`: Keyword arguments for ``ControlNetModel.forward`` (float32, CPU).
    """
    import torch

    levels = len(config["block_out_channels"])
    hint_scale = 2 ** (len(config["conditioning_embedding_out_channels"]) - 1)
    size = latent_size or 2 * 2 ** (levels - 1)
    gen = torch.Generator("cpu").manual_seed(seed)
    inputs: dict[str, Any] = {
        "sample": torch.randn(1, config["in_channels"], size, size, generator=gen),
        "timestep": torch.tensor([437]),
        "encoder_hidden_states": torch.randn(1, 8, config["cross_attention_dim"], generator=gen),
        "controlnet_cond": torch.rand(
            1, config.get("conditioning_channels", 3), size * hint_scale, size * hint_scale, generator=gen
        ),
    }
    if config.get("addition_embed_type") == "text_time":
        time_ids = 6 * config["addition_time_embed_dim"]
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(
                1, config["projection_class_embeddings_input_dim"] - time_ids, generator=gen
            ),
            "time_ids": torch.tensor([[512.0, 512.0, 0.0, 0.0, 512.0, 512.0]]),
        }
    return inputs


def controlnet_outputs(model: ControlNetModel, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
    """Run ``model`` on ``inputs`` in float32 and return the 12+1 (SD) residuals as a list."""
    import torch

    with torch.no_grad():
        down, mid = model(**inputs, conditioning_scale=1.0, return_dict=False)
    return [t.float() for t in (*down, mid)]


def max_relative_error(reference: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    """Max over outputs of ``max |ref - other| / max |ref|`` (absolute error where ``ref`` is all zero)."""
    worst = 0.0
    for ref, out in zip(reference, other, strict=True):
        scale = float(ref.abs().max())
        err = float((ref - out).abs().max())
        worst = max(worst, err / scale if scale > 0 else err)
    return worst


def cast_(model: ControlNetModel, dtype: torch.dtype) -> ControlNetModel:
    """Cast ``model``'s parameters and buffers to ``dtype`` in place and return it.

    Goes tensor by tensor rather than through ``ModelMixin.to``, which warns on every dtype cast.
    """
    for tensor in (*model.parameters(), *model.buffers()):
        tensor.data = tensor.data.to(dtype)
    return model


def rounded_copy(model: ControlNetModel, dtype: torch.dtype) -> ControlNetModel:
    """A float32 copy of ``model`` whose weights went through ``dtype`` (what the export holds)."""
    import torch

    return cast_(cast_(copy.deepcopy(model), dtype), torch.float32).eval()


def compare_weights(reference: ControlNetModel, reloaded: ControlNetModel, dtype: torch.dtype) -> list[str]:
    """Keys whose tensors differ between ``reference`` rounded to ``dtype`` and ``reloaded`` (bit-exact)."""
    import torch

    ref, new = reference.state_dict(), reloaded.state_dict()
    problems = sorted(set(ref) ^ set(new))
    for key in set(ref) & set(new):
        if new[key].is_meta or not torch.equal(ref[key].to(dtype), new[key].to(dtype)):
            problems.append(key)
    return problems


def verify_reload(
    trained: ControlNetModel,
    reloaded: ControlNetModel,
    dtype_name: str,
    loader: str,
    file_keys: Mapping[str, str] | None = None,
) -> VerifyResult:
    """Check that ``reloaded`` (an export read back) reproduces ``trained`` on a fixed input.

    Args:
        trained (`ControlNetModel`): The trained ControlNet, float32.
        reloaded (`ControlNetModel`): The export read back (any dtype; compared in float32).
        dtype_name (`str`): Export dtype, ``fp16``, ``bf16`` or ``fp32``.
        loader (`str`): Which loader produced ``reloaded`` (reported).
        file_keys (`Mapping[str, str]`, *optional*): Diffusers key -> key in the exported file, to
            name mismatching tensors as they appear in the file.

    Returns:
        `VerifyResult`: The measured errors.

    Raises:
        VerificationError: Weights differ, or outputs differ beyond the tolerances.
    """
    import torch

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    reloaded = cast_(reloaded, torch.float32).eval()
    bad = compare_weights(trained, reloaded, dtype)
    if bad:
        bad = [f"{k} ({file_keys[k]} in the file)" if file_keys and k in file_keys else k for k in bad]
        raise VerificationError(
            f"reloaded with {loader}: {len(bad)} tensor(s) differ from the trained ControlNet (e.g. {bad[:5]})"
        )
    inputs = fixed_inputs(dict(trained.config))
    reference = controlnet_outputs(trained.eval(), inputs)
    rounded = controlnet_outputs(rounded_copy(trained, dtype), inputs)
    outputs = controlnet_outputs(reloaded, inputs)
    result = VerifyResult(
        loader=loader,
        max_rel_error_vs_rounded=max_relative_error(rounded, outputs),
        max_rel_error_vs_fp32=max_relative_error(reference, outputs),
        outputs_all_zero=all(float(t.abs().max()) == 0.0 for t in reference),
    )
    if (
        result.max_rel_error_vs_rounded > RELOAD_TOLERANCE
        or result.max_rel_error_vs_fp32 > OUTPUT_TOLERANCE[dtype_name]
    ):
        raise VerificationError(
            f"reloaded with {loader}: outputs differ from the trained ControlNet (relative error "
            f"{result.max_rel_error_vs_rounded:.2e} vs the {dtype_name}-rounded model, tolerance {RELOAD_TOLERANCE:.0e}; "
            f"{result.max_rel_error_vs_fp32:.2e} vs float32, tolerance {OUTPUT_TOLERANCE[dtype_name]:.0e})"
        )
    if result.outputs_all_zero:
        logger.warning(
            "the ControlNet's outputs are all zero (untrained zero convolutions): only the weights were compared"
        )
    return result


def webui_layout_problems(keys: list[str], config: Mapping[str, Any]) -> list[str]:
    """Ways in which a WebUI file's keys would miss the WebUIs' native LDM loading path.

    sd-webui-controlnet (``controlnet_model_guess.py``), Forge and ComfyUI (``comfy/controlnet.py``)
    recognise an LDM ControlNet by ``(control_model.)zero_convs.0.0.weight`` /
    ``input_hint_block.0.weight``, pick SD1.x/2.x vs SDXL by the presence of ``label_emb``, read the
    context width from ``input_blocks.5.1...attn2.to_k.weight`` (SD1.x/2.x) and load with
    ``strict=False``, so a wrong key would be silently left at zero: every key must be right.

    Args:
        keys (`list[str]`): Keys of the written file.
        config (`Mapping[str, Any]`): The ControlNet config.

    Returns:
        `list[str]`: Problems found (empty when the file takes the native path).
    """
    problems = []
    unprefixed = [k for k in keys if not k.startswith(LDM_PREFIX)]
    if unprefixed:
        problems.append(f"{len(unprefixed)} key(s) without the {LDM_PREFIX!r} prefix, e.g. {unprefixed[:3]}")
    bare = {k[len(LDM_PREFIX) :] for k in keys if k.startswith(LDM_PREFIX)}
    for needed in (
        "zero_convs.0.0.weight",
        "input_hint_block.0.weight",
        "time_embed.0.weight",
        "middle_block_out.0.weight",
    ):
        if needed not in bare:
            problems.append(f"missing {LDM_PREFIX}{needed}")
    diffusers_keys = [
        k for k in bare if k.split(".")[0] in ("controlnet_cond_embedding", "down_blocks", "mid_block")
    ]
    if diffusers_keys:
        problems.append(
            f"diffusers-style keys would send the file down the conversion path: {diffusers_keys[:3]}"
        )
    zero_convs = {k.split(".")[1] for k in bare if k.startswith("zero_convs.")}
    if len(zero_convs) != num_zero_convs(config):
        problems.append(f"{len(zero_convs)} zero_convs, the architecture has {num_zero_convs(config)}")
    tag = sd_version_tag(config)
    has_label_emb = any(k.startswith("label_emb.") for k in bare)
    if tag in ("sd15", "sd21"):
        if has_label_emb:
            problems.append("label_emb present: the WebUIs would build an SDXL ControlNet")
        if "input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight" not in bare:
            problems.append("missing input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight (context width)")
    if tag == "xl" and not has_label_emb:
        problems.append("SDXL ControlNet without label_emb: the WebUIs would build an SD1.x ControlNet")
    return problems
