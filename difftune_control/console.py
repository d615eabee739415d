"""What the command line prints: the logging setup and the one-paragraph summary of a resolved run.

The full resolved configuration goes to the run's ``config.json``; the console gets the few facts a
person checks before a run takes its time: model, data, method, steps and batch, where the run goes.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from difftune_control.flags import describe_default

QUIET_LOGGERS = ("accelerate",)
"""Libraries whose INFO lines (e.g. four per checkpoint saved) only ``-v`` shows."""


class _ConsoleFormatter(logging.Formatter):
    """``HH:MM:SS message`` for information, ``HH:MM:SS WARNING: message`` for what needs attention."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{self.formatTime(record, self.datefmt)} {record.levelname}: {text}"
        return f"{self.formatTime(record, self.datefmt)} {text}"


def setup_logging(verbose: bool = False) -> None:
    """Console logging of the ``difftune`` command: short lines; with ``verbose``, debug and logger names."""
    if verbose:
        logging.basicConfig(
            level=logging.DEBUG,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ConsoleFormatter("%(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _method_line(cfg: Any) -> str:
    m, b = cfg.method, cfg.bank
    weighting = "" if m.loss_weighting in (None, "none") else f", loss weighted by {m.loss_weighting}"
    if m.method == "vanilla":
        return f"vanilla ControlNet (uniform t, target data only{weighting})"
    if m.method != "difftuning":
        return f"method {m.method} (registered{weighting})"
    if not cfg.uses_bank:
        return f"Diff-Tuning, {m.split} split (t skewed by psi, no memory bank{weighting})"
    weight = f"auto (pull {m.bank_pull:g}x the data's)" if m.bank_weight == "auto" else f"{m.bank_weight:g}"
    share = f", bank rows {m.bank_share:.0%} of each batch, weight {weight}" if m.split == "fixed" else ""
    retention = "" if m.retention == "renoise" else f", retention {m.retention}"
    return (
        f"Diff-Tuning, {m.split} split{share}{retention}{weighting}; memory bank of {b.bank_size} images, "
        f"{b.bank_hint} hints"
    )


def _data_line(cfg: Any, toy: bool) -> str:
    d = cfg.data
    source = (
        d.train_data_dir or d.dataset_name or ("the toy world's rendered scenes" if toy else "(none given)")
    )
    count = f"first {d.max_train_samples} samples" if d.max_train_samples else "all samples"
    return f"{count} of {source}, {Path(d.condition).stem} hints, {d.resolution} px"


def run_summary(
    cfg: Any,
    *,
    run_dir: str | Path,
    toy: bool,
    device: str,
    precision: str,
    world_size: int = 1,
    resumed_step: int | None = None,
) -> str:
    """A few lines on the resolved run for the console (the full config goes to ``run_dir/config.json``).

    Printed before the data, cache and bank are prepared, so everything comes from the configuration.

    Args:
        cfg (`RunConfig`): The resolved configuration.
        run_dir (`str` or `Path`): The run folder.
        toy (`bool`): The base model is the shipped toy world.
        device (`str`), precision (`str`): Where and in which precision the frozen parts run.
        world_size (`int`, defaults to 1): Processes.
        resumed_step (`int`, *optional*): The optimizer step a resumed run continues from.

    Returns:
        `str`: The summary, one fact per line.
    """
    t, det = cfg.train, cfg.detector
    model = "the shipped toy world (a 64 px demo model)" if toy else cfg.model.pretrained_model_name_or_path
    batch = f"batch {t.train_batch_size}"
    if world_size > 1:
        batch += f" per process x {world_size} processes"
    if t.gradient_accumulation_steps > 1:
        batch += f" x {t.gradient_accumulation_steps} accumulated"
    steps = f"{t.max_train_steps} optimizer steps"
    detector = (
        f"every {det.convergence_every} steps on {det.convergence_samples} held-out samples"
        if det.detect_convergence
        else "off"
    )
    header = (
        f"resuming {run_dir} at step {resumed_step}" if resumed_step is not None else f"new run in {run_dir}"
    )
    lines = [
        f"{header} (resolved config: {Path(run_dir) / 'config.json'})",
        f"  model     {model}",
        f"  data      {_data_line(cfg, toy)}",
        f"  method    {_method_line(cfg)}",
        f"  training  {steps}, {batch}, learning rate {describe_default(t.learning_rate)}, on {device} "
        f"({'fp32' if precision in (None, 'no') else precision}){_compile_text(t, device)}",
        f"  detector  {detector}",
    ]
    return "\n".join(lines)


def _compile_text(t, device: str = "cuda") -> str:
    """``--torch_compile`` as the summary's training line says it (``auto`` only where it weighs compiling)."""
    scope = "" if t.torch_compile_scope == "blocks" else f", whole {t.torch_compile_scope}"
    if t.torch_compile == "auto":
        if not str(device).startswith("cuda"):
            return ""
        mode = f"mode {t.torch_compile_mode}" if t.torch_compile_mode else "CUDA graphs or not"
        return f", torch.compile auto ({mode}{scope}: decided before the first step)"
    return (
        f", torch.compile (mode {t.torch_compile_mode or 'default'}{scope})"
        if t.torch_compile is True
        else ""
    )


def already_finished_message(run_dir: str | Path, step: int, max_train_steps: int) -> str:
    """What a resumed run that has nothing left to train says, and how to train it longer."""
    return (
        f"{run_dir} already finished: its last checkpoint is at optimizer step {step} and --max_train_steps is "
        f"{max_train_steps}, so there is nothing to train. To train it longer, run the same command with a "
        f"larger --max_train_steps (e.g. {max(step, max_train_steps) * 2}) and --resume_from_checkpoint latest."
    )
