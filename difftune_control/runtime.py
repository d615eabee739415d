"""What a training run stands on: base-model loading, the run folder, checkpoints, data order."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from difftune_control.config import ModelConfig
from difftune_control.utils import atomic_write_text, derive_seed

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class BaseModel:
    """The frozen Stable Diffusion parts a ControlNet trains against."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    model_id: str
    is_toy: bool

    @property
    def scheduler_config(self) -> dict:
        return dict(self.noise_scheduler.config)


def is_toy_model(path: str | None) -> bool:
    """True when ``path`` is None (the default) or the shipped toy-world pipeline folder."""
    if path is None:
        return True
    toy_root = Path(__file__).resolve().parent / "toyworld"
    try:
        return Path(path).resolve().is_relative_to(toy_root)
    except OSError:
        return False


def resolve_model_path(cfg: ModelConfig) -> str:
    if cfg.pretrained_model_name_or_path is not None:
        return cfg.pretrained_model_name_or_path
    from difftune_control.toyworld import default_base_model_path

    return str(default_base_model_path())


def load_base_model(cfg: ModelConfig, device: torch.device, weight_dtype: torch.dtype) -> BaseModel:
    """Load UNet, VAE, text encoder, tokenizer and noise scheduler through ``from_pretrained``.

    Works for a local diffusers folder or a hub id (hub ids need network or a filled HF cache).
    All parts are frozen, in eval mode, on ``device`` in ``weight_dtype``.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = resolve_model_path(cfg)
    local = Path(path)
    if (local.is_absolute() or path.startswith(".")) and not local.exists():
        raise FileNotFoundError(f"--pretrained_model_name_or_path: folder not found: {path}")
    if local.is_dir() and not (local / "unet").is_dir():
        raise FileNotFoundError(
            f"--pretrained_model_name_or_path: {path} is not a diffusers pipeline folder (no unet/ inside); "
            "convert a single-file checkpoint with diffusers' StableDiffusionPipeline.from_single_file(...).save_pretrained(DIR)"
        )
    kw = {"revision": cfg.revision, "variant": cfg.variant, "torch_dtype": weight_dtype}
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=cfg.revision)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
        noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    except OSError as err:
        raise FileNotFoundError(
            f"--pretrained_model_name_or_path {path!r}: could not load the base model ({err}). "
            "Offline, pass a local diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)."
        ) from err
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
        m.eval()
        m.to(device=device)
    return BaseModel(
        unet,
        vae,
        text_encoder,
        tokenizer,
        noise_scheduler,
        path,
        is_toy_model(cfg.pretrained_model_name_or_path),
    )


def make_controlnet(cfg: ModelConfig, unet) -> Any:
    """A trainable ControlNet: copied from the UNet's encoder, or loaded from ``controlnet_model_name_or_path``."""
    from diffusers import ControlNetModel

    if cfg.controlnet_model_name_or_path:
        from difftune_control.export import load_controlnet

        controlnet = load_controlnet(cfg.controlnet_model_name_or_path, unet=unet, torch_dtype=torch.float32)
    else:
        controlnet = ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=tuple(cfg.conditioning_embedding_out_channels)
        )
    controlnet.to(dtype=torch.float32)
    controlnet.train()
    controlnet.requires_grad_(True)
    return controlnet


class IndexStream:
    """Deterministic, resumable order of dataset indices: a fresh seeded permutation per epoch.

    Batch ``k`` of the stream depends only on ``k`` (epoch ``k // batches_per_epoch``), so the
    state to save is the number of batches consumed. Each process takes every
    ``world_size``-th index of the permutation, so processes see disjoint data.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if num_items < batch_size * world_size:
            raise ValueError(
                f"dataset has {num_items} samples, fewer than one global batch "
                f"({batch_size} x {world_size} processes); lower --train_batch_size"
            )
        self.n, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world = rank, world_size
        self.batches_per_epoch = num_items // (batch_size * world_size)
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def batch(self, k: int) -> list[int]:
        epoch, pos = divmod(k, self.batches_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(self.n, generator=g)[
                : self.batches_per_epoch * self.batch_size * self.world
            ]
            self._epoch, self._perm = epoch, perm[self.rank :: self.world]
        return self._perm[pos * self.batch_size : (pos + 1) * self.batch_size].tolist()

    def keys(self, k: int) -> list[tuple[int, int]]:
        """Batch ``k`` as dataset keys ``(index, draw seed)``: the seed derives from (seed, epoch, index).

        A dataset draws everything random about an item (posterior sample, random crop, flip) from a
        generator seeded with it, so an item's values depend on where it sits in the stream, never on
        what ran before (a resume, a model initialised at random in between, a DataLoader worker).
        """
        epoch = k // self.batches_per_epoch
        return [(i, derive_seed(self.seed, "sample", epoch, i)) for i in self.batch(k)]


class StreamBatchSampler(torch.utils.data.Sampler):
    """Batches ``start, start+1, ...`` of an :class:`IndexStream` as dataset keys, forever (for a DataLoader)."""

    def __init__(self, stream: IndexStream, start: int = 0):
        self.stream, self.start = stream, start

    def __iter__(self):
        k = self.start
        while True:
            yield self.stream.keys(k)
            k += 1


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
        state = json.loads((path / "trainer_state.json").read_text())
        if not isinstance(state, dict) or not {"global_step", "trainer", "lr_scheduler"} <= set(state):
            raise ValueError("keys global_step, trainer, lr_scheduler missing")
    except (OSError, ValueError) as err:
        return [f"trainer_state.json is unreadable ({err})"]
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
    accelerator, run_dir: Path, step: int, controlnet, trainer_state: dict, limit: int | None
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
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        accelerator.unwrap_model(controlnet).save_pretrained(tmp / "controlnet", safe_serialization=True)
        state = {**trainer_state, "files": _checkpoint_files(tmp)}
        atomic_write_text(tmp / "trainer_state.json", json.dumps(state, indent=1))
        if final.exists():
            _remove(final)
        os.replace(tmp, final)
        if limit is not None:
            for old in list_checkpoints(run_dir)[:-limit]:
                _remove(old)
                logger.info("removed old checkpoint %s (--checkpoints_total_limit %d)", old.name, limit)
    accelerator.wait_for_everyone()
    return final


def _remove(folder: Path) -> None:
    """Delete a checkpoint folder so that a kill half-way never leaves a damaged ``checkpoint-N``."""
    trash = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)
