#!/usr/bin/env python
"""Entry point for ``accelerate launch``: train a ControlNet (vanilla or Diff-Tuning).

    accelerate launch scripts/train_controlnet.py --condition depth
    accelerate launch --num_processes 2 scripts/train_controlnet.py --pretrained_model_name_or_path SD15_DIR \\
        --train_data_dir DATA --condition canny --resolution 512 --mixed_precision bf16

Flags are those of ``difftune train`` (see ``--help``), named as in diffusers'
``examples/controlnet/train_controlnet.py`` where the meaning is the same.
"""

import sys

from difftune_control.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]], program=True))
