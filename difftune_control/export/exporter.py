"""``export_controlnet``: a trained ControlNet to a WebUI single file or a diffusers folder, verified."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from difftune_control import __version__
from difftune_control.export.diffusers_folder import verify_diffusers_folder, write_diffusers_folder
from difftune_control.export.keymap import sd_version_tag
from difftune_control.export.source import ExportSource, resolve_source
from difftune_control.export.verify import VerificationError
from difftune_control.export.webui import (
    DTYPES,
    UI_SUPPORT,
    clean_name,
    verify_webui_file,
    webui_filename,
    write_webui_file,
)

logger = logging.getLogger(__name__)

FORMATS = ("webui", "diffusers")


def provenance(source: ExportSource, condition: str, sd_tag: str, dtype: str) -> dict[str, str]:
    """String metadata that travels with an export (safetensors metadata, model card).

    Keys: ``base_model``, ``condition``, ``method``, ``optimizer_steps``, ``convergence_step``
    (``not reached`` when the run logged no event up to the exported step), ``training_config``
    (the run's config.json as JSON), ``sd_version``, ``dtype``, ``exporter``.
    """
    convergence = source.convergence_step
    if convergence is None:
        convergence = "not reached" if source.run_dir is not None else "unknown"
    return {
        "base_model": source.base_model or "unknown",
        "condition": condition,
        "method": source.method or "unknown",
        "optimizer_steps": str(source.step) if source.step is not None else "unknown",
        "convergence_step": str(convergence),
        "training_config": json.dumps(source.run_config or {}, sort_keys=True),
        "sd_version": sd_tag,
        "dtype": dtype,
        "exporter": f"difftune-control {__version__}",
    }


def default_name(source: ExportSource) -> str:
    """The run's name, with ``-step<N>`` when exporting a checkpoint rather than the final ControlNet."""
    name = source.run_name
    if source.controlnet_dir.parent.name.startswith("checkpoint-") and source.step is not None:
        name = f"{name}-step{source.step}"
    return name


def default_out_dir(source: ExportSource) -> Path:
    """``<run>/export``, or ``export/`` beside a ControlNet folder that is not part of a run."""
    return (source.run_dir or source.controlnet_dir.parent) / "export"


def ensure_writable_dir(path: Path) -> None:
    """Create ``path`` if needed and prove it writable, or raise an error naming ``--out``."""
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--out {str(path)!r} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise PermissionError(
            f"--out {str(path)!r} is not a writable folder: {err.strerror or err}"
        ) from None


def _check_choices(format: str, dtype: str) -> None:
    problems = []
    if format not in FORMATS:
        problems.append(f"--format {format!r} is not one of {FORMATS}")
    if dtype not in DTYPES:
        problems.append(f"--dtype {dtype!r} is not one of {DTYPES}")
    if problems:
        raise ValueError("; ".join(problems))


def export_controlnet(
    source: str | os.PathLike,
    format: Literal["webui", "diffusers"],
    out_dir: str | os.PathLike | None = None,
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16",
    name: str | None = None,
    verify: bool = True,
    *,
    condition: str | None = None,
) -> Path:
    """Export a trained ControlNet for AUTOMATIC1111 / Forge / ComfyUI or for diffusers.

    Args:
        source (`str` or `os.PathLike`):
            A run folder (its ``controlnet/``, else the latest checkpoint), a ``checkpoint-N`` folder,
            or a diffusers ControlNet folder.
        format (`str`):
            ``webui``: one ``control_<name>_<sd>_<condition>_<dtype>.safetensors`` in the original LDM
            key layout (``control_model.`` prefix, as the released ControlNet 1.1 files) with
            provenance metadata. ``diffusers``: a ``save_pretrained`` folder of the same name (without
            extension) with a model card and the run's report figures.
        out_dir (`str` or `os.PathLike`, *optional*): Output folder; default ``<run>/export``.
        dtype (`str`, *optional*, defaults to `"fp16"`): ``fp16``, ``bf16`` or ``fp32``.
        name (`str`, *optional*): Name part of the file name; default the run name
            (``<run>-step<N>`` for a checkpoint).
        verify (`bool`, *optional*, defaults to `True`):
            Reload the export offline and check that weights and outputs on a fixed input match the
            trained model (within the dtype's rounding).
        condition (`str`, *optional*): Condition for the file name; default the run config's
            ``condition.name``. Required for a ControlNet folder outside a run.

    Returns:
        `Path`: The written file (webui) or folder (diffusers).

    Raises:
        ValueError: Unknown format or dtype, a path that is not a run/checkpoint/ControlNet folder,
            an unknown condition, or a name a WebUI would misread.
        FileNotFoundError: ``source`` does not exist.
        PermissionError, NotADirectoryError: The output folder cannot be written.
        VerificationError: The reloaded export does not reproduce the trained ControlNet.
    """
    _check_choices(format, dtype)
    src = resolve_source(source)
    condition = condition or src.condition
    if condition is None:
        raise ValueError(
            f"{src.controlnet_dir} is not inside a run whose config.json names the condition; pass --condition "
            "(e.g. depth, canny, normal, segmentation, sketch)"
        )
    out = Path(out_dir).expanduser() if out_dir is not None else default_out_dir(src)
    ensure_writable_dir(out)
    # torch and diffusers only now: a wrong path or flag answers without their seconds of import.
    import torch
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_pretrained(src.controlnet_dir, torch_dtype=torch.float32).eval()
    tag = sd_version_tag(controlnet.config)
    filename = webui_filename(
        name or default_name(src), clean_name(condition, "condition"), controlnet.config, dtype
    )
    info = provenance(src, condition, tag, dtype)
    logger.info(
        "exporting %s (%s, %s steps) as %s %s",
        src.controlnet_dir,
        tag,
        info["optimizer_steps"],
        format,
        dtype,
    )

    if format == "webui":
        path = write_webui_file(controlnet, out / filename, dtype, info)
        verifier = verify_webui_file
    else:
        path = out / filename.removesuffix(".safetensors")
        path = write_diffusers_folder(controlnet, path, dtype, info, src.run_config, src.report_dir, tag)
        verifier = verify_diffusers_folder
    if verify:
        try:
            result = verifier(path, controlnet, dtype)
        except VerificationError as err:
            # Never leave an export that failed its check under the name the WebUIs pick up.
            aside = path.with_name(path.name + ".unverified")
            if aside.is_dir():
                shutil.rmtree(aside)
            os.replace(path, aside)
            raise VerificationError(f"{err}; the export was moved to {aside}") from None
        logger.info(
            "verified %s with %s: relative output error %.1e vs the trained float32 model, %.1e vs its %s rounding",
            path.name,
            result.loader,
            result.max_rel_error_vs_fp32,
            result.max_rel_error_vs_rounded,
            dtype,
        )
    else:
        logger.info("wrote %s without verification (--no-verify)", path)
    if format == "webui":
        logger.info("%s: %s", path.name, UI_SUPPORT[tag])
    return path
