"""Sudden-convergence detection: a pure state machine and the evaluation harness that feeds it.

A ControlNet starts from zero convolutions and ignores its hint, then within a few hundred steps
"suddenly" starts to follow it (Zhang, Rao, Agrawala, "Adding Conditional Control to Text-to-Image
Diffusion Models", ICCV 2023, section 4; measured as controllability as in ControlNet++, Li et al.,
ECCV 2024). Diff-Tuning (Zhong et al., NeurIPS 2024) claims to reach it sooner; this module makes it
observable:

- `SuddenConvergenceDetector` turns a sequence of mean dissimilarities d (hint vs the hint
  re-extracted from a generated image) into progress p = (d0 - d) / (d0 - d_floor) and events.
  It does no I/O and survives resume through `state_dict` / `load_state_dict`.
- `ConvergenceMonitor` is what the trainer calls every `--convergence_every` optimizer steps: it
  samples K held-out prompt + hint pairs with fixed seeds and the models already in memory,
  re-extracts the condition in one batch, scores it, updates the detector, writes the samples to
  the run folder and returns the `metrics.jsonl` records (docs/internals.md).
- `area_under_progress` is the AUCC (x0-supervision, Sangare et al., CVPR 2026): the area under
  p(step), clipped to [0, 1], normalised over a fixed step budget.
"""

from .aucc import area_under_progress
from .detector import (
    DEFAULT_MILESTONES,
    DEFAULT_PATIENCE,
    DEFAULT_THRESHOLD,
    SuddenConvergenceDetector,
    progress,
)
from .monitor import ConvergenceMonitor

__all__ = [
    "DEFAULT_MILESTONES",
    "DEFAULT_PATIENCE",
    "DEFAULT_THRESHOLD",
    "ConvergenceMonitor",
    "SuddenConvergenceDetector",
    "area_under_progress",
    "progress",
]
