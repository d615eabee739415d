"""Export a trained ControlNet for AUTOMATIC1111 / Forge / ComfyUI (or diffusers).

Same as ``difftune export``:

    python scripts/export_webui.py runs/depth-difftuning                    # WebUI file, fp16
    python scripts/export_webui.py runs/depth-difftuning/checkpoint-1000 --format diffusers --dtype bf16
"""

import sys

from difftune_control.export.cli import main

if __name__ == "__main__":
    sys.exit(main())
