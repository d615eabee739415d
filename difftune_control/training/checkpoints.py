"""Checkpoints of a run: atomic writes, verification on resume, fallback, and a guard against diverged updates.

A checkpoint is written to ``.checkpoint-N.tmp`` and renamed when complete; ``trainer_state.json`` (a
:class:`TrainState`), written last, records every other file's size. Resume verifies the files first
(:func:`verify_checkpoint`); ``latest`` falls back to the newest intact one. :class:`WeightWatch` knows after
every step, without a host sync on CUDA, whether the update left every weight finite."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from difftune_control.utils import atomic_write_text, explain_os_error, read_jsonl

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


@dataclass
class TrainState:
    """Where a run stands: the loop's counters and the state dicts a resume restores.

    Saved as a checkpoint's ``trainer_state.json``: a JSON object with these fields as keys, in this
    order, plus ``files`` (every other file's size, written by :func:`save_checkpoint`). The model,
    optimizer and RNG states are accelerate's files beside it.

    Args:
        global_step (`int`): optimizer steps done.
        consumed_batches (`int`): micro-batches taken from the data stream (its position on resume).
        elapsed (`float`): training seconds so far, over every resume.
        stop_at (`int`, *optional*): the step ``--stop_after_convergence`` stops at, once converged.
        trainer (`dict`): ``ControlNetTrainer.state_dict()``.
        lr_scheduler (`dict`): the learning-rate schedule's ``state_dict()``.
        monitor (`dict`, *optional*): ``ConvergenceMonitor.state_dict()`` (None without a detector).
    """

    global_step: int = 0
    consumed_batches: int = 0
    elapsed: float = 0.0
    stop_at: int | None = None
    trainer: dict[str, Any] = field(default_factory=dict)
    lr_scheduler: dict[str, Any] = field(default_factory=dict)
    monitor: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``trainer_state.json`` (without ``files``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> TrainState:
        """Read a ``trainer_state.json`` object; older versions' lack the keys added since (defaults)."""
        missing = [k for k in ("global_step", "trainer", "lr_scheduler") if k not in saved]
        if missing:
            raise ValueError(f"keys {missing} missing")
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})

    @classmethod
    def load(cls, checkpoint: Path) -> TrainState:
        """The state saved in checkpoint folder ``checkpoint``."""
        return cls.from_dict(json.loads((checkpoint / STATE_FILE).read_text()))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete ``checkpoint-N`` folders of a run, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in run_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found) if (p / "trainer_state.json").is_file()]


def latest_run(output_dir: Path, prefix: str) -> Path | None:
    """The run that ``--resume_from_checkpoint latest`` continues when no ``--run_name`` is given.

    The newest (by the timestamp in its name) of the runs named ``<prefix><YYYYmmdd-HHMMSS>`` (the default
    name of a run of this condition and method) that have a checkpoint; logged. None when ``output_dir``
    holds no run with a checkpoint (a new run starts). Runs with checkpoints but other names are
    ambiguous: a ValueError lists them.
    """
    runs = (
        sorted(d for d in output_dir.iterdir() if d.is_dir() and list_checkpoints(d))
        if output_dir.is_dir()
        else []
    )
    pattern = re.compile(re.escape(prefix) + r"\d{8}-\d{6}")
    mine = [d for d in runs if pattern.fullmatch(d.name)]
    if mine:
        logger.warning(
            "--resume_from_checkpoint latest without --run_name: resuming %s, the newest of %d run(s) named "
            "%s* in %s (pass --run_name to choose another)", mine[-1], len(mine), prefix, output_dir,
        )  # fmt: skip
        return mine[-1]
    if runs:
        raise ValueError(
            f"--resume_from_checkpoint latest without --run_name: {output_dir} has no run named {prefix}<time>, "
            f"but these runs have checkpoints: {', '.join(d.name for d in runs)}; pass --run_name NAME"
        )
    logger.info(
        "--resume_from_checkpoint latest: no run with a checkpoint in %s, starting a new one", output_dir
    )
    return None


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from, its files verified first (:func:`verify_checkpoint`).

    ``latest``: the newest intact checkpoint of ``run_dir`` (None if the run has none yet); a damaged
    newer one is skipped with a warning that names the file. An explicit folder must be intact, else
    the error names the damaged file and the intact checkpoints there are.
    """
    if resume is None:
        return None
    if resume == "latest":
        damaged = []
        checkpoints = list_checkpoints(run_dir)
        for path in reversed(checkpoints):
            problems = verify_checkpoint(path)
            if not problems:
                if damaged:
                    logger.warning(
                        "resuming from %s, the newest intact checkpoint; skipped:\n  - %s",
                        path.name, "\n  - ".join(damaged),
                    )  # fmt: skip
                return path
            damaged.append(f"{path.name}: {'; '.join(problems)}")
        if checkpoints:
            raise ValueError(
                f"--resume_from_checkpoint latest: no intact checkpoint in {run_dir}:\n  - "
                + "\n  - ".join(damaged)
            )
        return None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {resume}: not a complete checkpoint folder (no trainer_state.json); "
            f"available: {[p.name for p in list_checkpoints(path.parent)] or 'none'}"
        )
    problems = verify_checkpoint(path)
    if problems:
        intact = [p.name for p in list_checkpoints(path.parent) if p != path and not verify_checkpoint(p)]
        raise ValueError(
            f"--resume_from_checkpoint {resume}: the checkpoint is damaged: {'; '.join(problems)}; "
            f"intact checkpoints in {path.parent}: {intact or 'none'} (--resume_from_checkpoint latest "
            "takes the newest intact one)"
        )
    return path


def _checkpoint_files(folder: Path) -> dict[str, int]:
    """Size of every file under a checkpoint folder, by relative path (what verification compares)."""
    return {
        str(f.relative_to(folder)): f.stat().st_size
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.name != "trainer_state.json"
    }


def verify_checkpoint(path: Path) -> list[str]:
    """Problems with a checkpoint's files, each naming the file (empty when intact).

    Cheap checks that catch truncated and damaged files without loading the optimizer: the sizes
    recorded in ``trainer_state.json`` when it was written (checkpoints of older versions have none),
    every ``.safetensors`` header against its file size, the weights' finiteness, the zip directory
    of every ``torch.save`` file (optimizer, RNG states), and the JSON files.
    """
    problems: list[str] = []
    try:
        state = json.loads((path / STATE_FILE).read_text())
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
        TrainState.from_dict(state)
    except (OSError, ValueError, TypeError) as err:
        return [f"{STATE_FILE} is unreadable ({err})"]
    recorded = state.get("files")
    if isinstance(recorded, dict):
        for name, size in recorded.items():
            f = path / name
            if not f.is_file():
                problems.append(f"{name} is missing")
            elif f.stat().st_size != size:
                problems.append(
                    f"{name} is {f.stat().st_size} bytes, {size} when written (truncated or damaged)"
                )
    weights = sorted(path.glob("model*.safetensors")) + sorted(path.glob("pytorch_model*.bin"))
    if not weights:
        problems.append("no model weights (model.safetensors)")
    if not sorted(path.glob("optimizer*.bin")):
        problems.append("no optimizer state (optimizer.bin)")
    if not sorted(path.glob("random_states_*.pkl")):
        problems.append("no random states (random_states_0.pkl)")
    for f in sorted(path.rglob("*")):
        name = str(f.relative_to(path))
        if any(p.startswith(name + " ") for p in problems) or not f.is_file():
            continue
        problem = _file_problem(f)
        if problem:
            problems.append(f"{name} {problem}")
    return problems


def _file_problem(f: Path) -> str | None:
    """Why one checkpoint file is unusable, or None."""
    import zipfile

    try:
        if f.suffix == ".safetensors":
            return safetensors_problem(f, check_finite=f.parent.name != "controlnet")
        if f.suffix in (".bin", ".pkl", ".pt") and zipfile.is_zipfile(f):
            with zipfile.ZipFile(f) as z:
                z.infolist()
        elif f.suffix in (".bin", ".pkl", ".pt"):
            with open(f, "rb") as fh:
                if not fh.read(2):
                    return "is empty"
        elif f.suffix == ".json":
            json.loads(f.read_text())
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        return f"is unreadable ({err})"
    return None


def safetensors_problem(path: Path, check_finite: bool = False) -> str | None:
    """Why a ``.safetensors`` file is unusable (truncated, bad header, non-finite weights), or None."""
    import struct

    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"is truncated ({size} bytes)"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"is truncated (header of {n} bytes, file of {size})"
        try:
            header = json.loads(fh.read(n))
        except ValueError as err:
            return f"has a damaged header ({err})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if 8 + n + max(ends, default=0) != size:
        return f"is truncated or damaged ({size} bytes, its header describes {8 + n + max(ends, default=0)})"
    if check_finite:
        from safetensors import safe_open

        bad = []
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if t.is_floating_point() and not bool(t.isfinite().all()):
                    bad.append(key)
        if bad:
            return f"holds non-finite weights ({len(bad)} tensors, e.g. {bad[0]})"
    return None


def last_finite_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of ``run_dir`` whose ControlNet weights are all finite (None if there is none)."""
    for path in reversed(list_checkpoints(run_dir)):
        weights = sorted(path.glob("model*.safetensors"))
        if weights and all(safetensors_problem(w, check_finite=True) is None for w in weights):
            return path
    return None


def save_checkpoint(
    accelerator, run_dir: Path, step: int, controlnet, state: TrainState, limit: int | None
) -> Path:
    """Write ``checkpoint-<step>`` atomically (a temp folder renamed at the end), then prune old ones.

    ``trainer_state.json`` is written last and records every other file's size, so a resume can tell
    a damaged checkpoint (:func:`verify_checkpoint`). A kill at any moment leaves every complete
    checkpoint intact: a checkpoint being replaced or pruned is first renamed out of the way.
    """
    final = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:  # a full disk: the partial folder goes, the checkpoints already written stay
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            accelerator.unwrap_model(controlnet).save_pretrained(tmp / "controlnet", safe_serialization=True)
            saved = {**state.to_dict(), "files": _checkpoint_files(tmp)}
            atomic_write_text(tmp / STATE_FILE, json.dumps(saved, indent=1))
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise explain_os_error(final, err) from err
    if accelerator.is_main_process:
        if final.exists():
            _remove(final)
        os.replace(tmp, final)
        if limit is not None:
            for old in list_checkpoints(run_dir)[:-limit]:
                _remove(old)
                logger.info("removed old checkpoint %s (--checkpoints_total_limit %d)", old.name, limit)
    accelerator.wait_for_everyone()
    return final


def restore_checkpoint(accelerator, checkpoint: Path, trainer, lr_scheduler, monitor=None) -> TrainState:
    """Load what :func:`save_checkpoint` wrote into the run's objects; returns the saved :class:`TrainState`.

    Model, optimizer and RNG states through ``accelerator``, then the trainer's, the LR schedule's and the
    convergence monitor's state dicts (``monitor`` may be None, or saved as None)."""
    try:
        accelerator.load_state(str(checkpoint))
    except ValueError as err:  # e.g. an optimizer state of another --optimizer or --fused_backward_pass
        why = f"{checkpoint}: its state does not fit this run ({err}); resume with the --optimizer and "
        raise ValueError(why + "--fused_backward_pass it was saved with") from err
    state = TrainState.load(checkpoint)
    trainer.load_state_dict(state.trainer)
    lr_scheduler.load_state_dict(state.lr_scheduler)
    if monitor is not None and state.monitor is not None:
        monitor.load_state_dict(state.monitor)
    return state


def _remove(folder: Path) -> None:
    """Delete a checkpoint folder so that a kill half-way never leaves a damaged ``checkpoint-N``."""
    trash = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def checkpoint_step(checkpoint: Path | None) -> int | None:
    """The optimizer step in a ``checkpoint-N`` folder name (None for no checkpoint or another name)."""
    match = CHECKPOINT_RE.match(checkpoint.name) if checkpoint is not None else None
    return int(match.group(1)) if match else None


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after the checkpoint being resumed, so the log reads as one run."""
    if path.exists():
        # an event is written when confirmed: keep it only if confirmed by the checkpoint
        kept = [r for r in read_jsonl(path) if r.get("confirmed_step", r.get("step", 0)) <= step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
