"""The diffusers export: a ``ControlNetModel.save_pretrained`` folder plus a model card (README.md)."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difftune_control.export.verify import VerifyResult, cast_, verify_reload
from difftune_control.utils import current_umask

if TYPE_CHECKING:
    from diffusers import ControlNetModel

logger = logging.getLogger(__name__)

REPORT_FIGURES = {"convergence.png": "Convergence", "samples.png": "Samples"}
"""Figures of ``<run>/report/`` that go into the model card, with their section titles."""
_METHODS = {
    "vanilla": "vanilla ControlNet training (uniform timesteps, target data only)",
    "difftuning": "Diff-Tuning (Zhong et al., NeurIPS 2024): retain at low noise, adapt at high noise",
}
_PIPELINES = {"xl": "StableDiffusionXLControlNetPipeline"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def model_card(
    title: str,
    info: Mapping[str, str],
    figures: list[str],
    run_config: Mapping[str, Any] | None,
    sd_tag: str,
    run_dir: Path | None = None,
) -> str:
    """The README.md of a diffusers export.

    Args:
        title (`str`): Heading (the export's name).
        info (`Mapping[str, str]`): Provenance: ``base_model``, ``condition``, ``method``,
            ``optimizer_steps``, ``convergence_step``, ``dtype``, ``sd_version``.
        figures (`list[str]`): Report figures copied next to the card (names in `REPORT_FIGURES`).
        run_config (`Mapping[str, Any]`, *optional*): The training config, shown folded.
        sd_tag (`str`): ``sd15``, ``sd21``, ``xl`` or ``toy``.
        run_dir (`Path`, *optional*): The run folder, named in the hint on how to make missing figures.

    Returns:
        `str`: Markdown with a YAML header that the Hugging Face hub reads.
    """
    base, condition = info.get("base_model", "unknown"), info.get("condition", "unknown")
    method = info.get("method", "unknown")
    header = ["---", "library_name: diffusers"]
    if _HUB_ID.match(base):  # the hub's metadata takes repo ids only, not local paths
        header.append(f"base_model: {base}")
    header += ["tags:", "- controlnet", "- diffusers", "- difftune-control", f"- {condition}", "---", ""]
    rows = [
        ("condition", condition),
        (
            "base model",
            base + (" (the toy world shipped with difftune-control)" if base == "toyworld" else ""),
        ),
        ("method", _METHODS.get(method, method)),
        ("optimizer steps", info.get("optimizer_steps", "unknown")),
        ("sudden convergence at step", info.get("convergence_step", "unknown")),
        ("weights dtype", info.get("dtype", "unknown")),
        ("SD family", sd_tag),
    ]
    lines = header + [f"# {title}", ""]
    lines += [f"A ControlNet for **{condition}** hints on **{base}**, trained with difftune-control.", ""]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    for name, section in REPORT_FIGURES.items():
        if name in figures:
            lines += [f"## {section}", "", f"![{section.lower()}]({name})", ""]
    if not figures:
        lines += [
            f"No report figures were found: run `difftune report {run_dir or 'RUN'}` to make them, "
            "then export again.",
            "",
        ]
    pipeline = _PIPELINES.get(sd_tag, "StableDiffusionControlNetPipeline")
    lines += [
        "## Usage",
        "",
        "```python",
        "import torch",
        f"from diffusers import ControlNetModel, {pipeline}",
        "",
        'controlnet = ControlNetModel.from_pretrained("path/to/this/folder", torch_dtype=torch.float16)',
        f'pipe = {pipeline}.from_pretrained("{base}", controlnet=controlnet, torch_dtype=torch.float16)',
        f"image = pipe(prompt, image={condition}_hint).images[0]  # hint: RGB, values in [0, 1]",
        "```",
        "",
    ]
    if run_config is not None:
        lines += [
            "<details><summary>Training config</summary>",
            "",
            "```json",
            json.dumps(run_config, indent=2, sort_keys=True),
            "```",
            "",
            "</details>",
            "",
        ]
    return "\n".join(lines)


def write_diffusers_folder(
    controlnet: ControlNetModel,
    folder: str | os.PathLike,
    dtype: str,
    info: Mapping[str, str],
    run_config: Mapping[str, Any] | None,
    report_dir: Path | None,
    sd_tag: str,
) -> Path:
    """Save ``controlnet`` in ``dtype`` with ``save_pretrained``, add the model card and report figures.

    The folder is written next to its final place and renamed when complete, so an interrupted
    export never leaves a half-written folder under the final name.

    Returns:
        `Path`: ``folder``.
    """
    import torch

    folder = Path(folder)
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700: follow the umask like mkdir does
    try:
        # A cast copy: casting the trained model in place and back would round its weights.
        cast_(copy.deepcopy(controlnet), torch_dtype).save_pretrained(tmp, safe_serialization=True)
        figures = []
        for name in REPORT_FIGURES:
            source = report_dir / name if report_dir is not None else None
            if source is not None and source.is_file():
                shutil.copy2(source, tmp / name)
                figures.append(name)
        (tmp / "README.md").write_text(
            model_card(
                folder.name, info, figures, run_config, sd_tag, report_dir.parent if report_dir else None
            )
        )
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def verify_diffusers_folder(folder: Path, controlnet: ControlNetModel, dtype: str) -> VerifyResult:
    """Reload ``folder`` with ``ControlNetModel.from_pretrained`` and compare with ``controlnet``."""
    import torch
    from diffusers import ControlNetModel

    reloaded = ControlNetModel.from_pretrained(folder, torch_dtype=torch.float32)
    loader = "diffusers ControlNetModel.from_pretrained"
    logger.info("verifying %s: reloaded with %s", folder.name, loader)
    return verify_reload(controlnet, reloaded, dtype, loader)
