"""Export trained ControlNets for AUTOMATIC1111 / Forge / ComfyUI and diffusers; import WebUI files.

- `export_controlnet`: run folder -> ``control_<name>_<sd>_<condition>_<dtype>.safetensors`` (LDM keys)
  or a diffusers folder with a model card, reloaded and verified.
- `load_controlnet`: diffusers folder, hub id, run folder or single WebUI/LDM file -> ``ControlNetModel``.
- `diffusers_to_ldm` / `ldm_to_diffusers`: the key mapping, pure functions of the ControlNet config.
- `add_cli` / `run`: the ``difftune export`` subcommand.
"""

from difftune_control.export.cli import add_cli, run
from difftune_control.export.exporter import FORMATS, export_controlnet
from difftune_control.export.keymap import LDM_PREFIX, diffusers_to_ldm, ldm_to_diffusers, sd_version_tag
from difftune_control.export.loading import load_controlnet
from difftune_control.export.source import ExportSource, resolve_source
from difftune_control.export.verify import VerificationError
from difftune_control.export.webui import DTYPES, webui_filename

__all__ = [
    "DTYPES",
    "FORMATS",
    "LDM_PREFIX",
    "ExportSource",
    "VerificationError",
    "add_cli",
    "diffusers_to_ldm",
    "export_controlnet",
    "ldm_to_diffusers",
    "load_controlnet",
    "resolve_source",
    "run",
    "sd_version_tag",
    "webui_filename",
]
