"""The evaluation harness the trainer calls: sample, re-extract, score, update the detector, log."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .detector import (
    DEFAULT_MILESTONES,
    DEFAULT_PATIENCE,
    DEFAULT_THRESHOLD,
    SuddenConvergenceDetector,
    _finite_or_none,
)

if TYPE_CHECKING:
    import torch

    from difftune_control.config import DetectorConfig


def _zero_output(controlnet) -> bool:
    """True when every output ("zero") convolution of a diffusers ControlNet is exactly zero, so its
    residuals are zero whatever the input: sampling with it equals sampling the UNet alone."""
    import torch

    blocks = getattr(controlnet, "controlnet_down_blocks", None)
    mid = getattr(controlnet, "controlnet_mid_block", None)
    if blocks is None or mid is None:
        return False
    with torch.no_grad():
        return all(not p.any() for p in [*blocks.parameters(), *mid.parameters()])


class ConvergenceMonitor:
    """The evaluation harness the trainer calls: samples, re-extracts, scores, logs to the run folder.

    Built once per run from the detector config, the run's extractor and K held-out
    (prompt embedding, hint, real image) triples. Every evaluation samples the same K prompts with
    the same hints and seeds, so the curve moves only because the ControlNet does.

    Args:
        config (`DetectorConfig`): detector settings (resolved: `convergence_every` and
            `convergence_samples` set; threshold / patience None mean 0.3 / 2).
        extractor (`Callable`): the run's condition extractor: float [B,3,H,W] in [0,1] -> hints
            [B,3,H,W] in [0,1], with `dissimilarity(hint, other) -> [B]`.
        prompt_embeds (`torch.Tensor`): text-encoder hidden states [N,L,D] of the held-out prompts.
        hints (`torch.Tensor`): their hints [N,3,H,W] in [0,1].
        images (`torch.Tensor`): their real images [N,3,H,W] in [0,1] (for d_floor).
        prompts (`Sequence[str]`, *optional*): the prompt texts, stored with the samples.
        seeds (`Sequence[int]`, *optional*): one seed per sample (default: 0..K-1).
        negative_prompt_embeds (`torch.Tensor`, *optional*): the empty prompt's embedding [1,L,D];
            needed when `convergence_guidance_scale` > 1.
        added_cond (`dict`, *optional*): the prompts' added conditioning [N,...] per name (SDXL:
            ``text_embeds``, ``time_ids``); negative_added_cond: the same for the negative prompt.
        run_dir (`str` or `Path`, *optional*): where `samples/eval-step{N:07d}.safetensors` go (None:
            nothing written).
        sampler (`str`, defaults to "ddim"): the detector's sampler.
        batch_size (`int`, *optional*): sampling chunk size (default: ``sampling_batch``: 8 at 512 px, 2 at 1024).
        milestones (`Sequence[float]`, defaults to (0.25, 0.5, 0.75)): progress levels whose first
            crossing is logged (a recipe's `[detector] milestones`).

    When N > K only the first K triples are used; when N < K all N are used (with a warning).
    """

    def __init__(
        self,
        config: DetectorConfig,
        extractor: Callable[[torch.Tensor], torch.Tensor],
        prompt_embeds: torch.Tensor,
        hints: torch.Tensor,
        images: torch.Tensor,
        *,
        prompts: Sequence[str] | None = None,
        seeds: Sequence[int] | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        added_cond: dict[str, torch.Tensor] | None = None,
        negative_added_cond: dict[str, torch.Tensor] | None = None,
        run_dir: str | Path | None = None,
        sampler: str = "ddim",
        batch_size: int | None = None,
        milestones: Sequence[float] = DEFAULT_MILESTONES,
    ) -> None:
        problems = []
        every, k = config.convergence_every, config.convergence_samples
        if not isinstance(every, int) or every < 1:
            problems.append(f"--convergence_every must be an int >= 1, got {every!r}")
        if not isinstance(k, int) or k < 1:
            problems.append(f"--convergence_samples must be an int >= 1, got {k!r}")
        if not hasattr(extractor, "dissimilarity"):
            problems.append(f"extractor {extractor!r} has no dissimilarity(hint, other) method")
        n = prompt_embeds.shape[0]
        if hints.shape[0] != n or images.shape[0] != n:
            problems.append(
                f"held-out set: got {n} prompt embeddings, {hints.shape[0]} hints, {images.shape[0]} images; "
                "they must pair up"
            )
        if hints.ndim != 4 or hints.shape[1] != 3 or images.shape[1:] != hints.shape[1:]:
            problems.append(
                f"hints and images must both be [N,3,H,W] of one size, got {tuple(hints.shape)} and "
                f"{tuple(images.shape)}"
            )
        if hints.shape[-1] != hints.shape[-2]:
            problems.append(
                f"hints must be square (the sampler makes square images), got {tuple(hints.shape)}"
            )
        if config.convergence_guidance_scale > 1.0 and negative_prompt_embeds is None:
            problems.append(
                f"--convergence_guidance_scale {config.convergence_guidance_scale} > 1 needs the empty "
                "prompt's embedding (negative_prompt_embeds)"
            )
        if n == 0:
            problems.append("held-out set is empty: the detector needs at least one prompt + hint + image")
        if problems:
            raise ValueError("convergence monitor: " + "; ".join(problems))
        if n < k:
            warnings.warn(
                f"--convergence_samples {k} but the held-out set has {n} samples; the detector uses {n}",
                stacklevel=2,
            )
        k = min(k, n)
        seeds = list(range(k)) if seeds is None else [int(s) for s in seeds][:k]
        if len(seeds) != k:
            raise ValueError(f"convergence monitor: got {len(seeds)} seeds for {k} samples")
        self.config = config
        self.every = int(every)
        self.extractor = extractor
        self.prompt_embeds = prompt_embeds[:k].detach()
        self.negative_prompt_embeds = (
            None if negative_prompt_embeds is None else negative_prompt_embeds.detach()
        )
        self.added_cond = {name: v[:k].detach() for name, v in (added_cond or {}).items()}
        self.negative_added_cond = {name: v.detach() for name, v in (negative_added_cond or {}).items()}
        self.hints = hints[:k].detach().float().cpu()
        self.images = images[:k].detach().float().cpu()
        self.prompts = [str(p) for p in prompts][:k] if prompts is not None else [""] * k
        self.seeds = seeds
        self.resolution = int(hints.shape[-1])
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.sampler = sampler
        self.batch_size = batch_size
        self.detector = SuddenConvergenceDetector(
            threshold=config.convergence_threshold or DEFAULT_THRESHOLD,
            patience=config.convergence_patience or DEFAULT_PATIENCE,
            milestones=milestones,
        )
        self.reference_info: dict[str, Any] = {}
        self._times: dict[int, float] = {}
        self._t0 = time.monotonic()
        self._pending_seconds = 0.0  # reference cost, charged to the next evaluation
        self._unconditioned: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def num_samples(self) -> int:
        """K, the number of validation samples per evaluation."""
        return len(self.seeds)

    def should_evaluate(self, step: int, final: bool = False) -> bool:
        """True when `step` is a multiple of `--convergence_every`, or the run's `final` step (so the progress
        curve reaches the end of the run and its AUCC covers the whole budget), not evaluated yet (step 0
        included)."""
        if not self.config.detect_convergence or (step % self.every and not final):
            return False
        last = self.detector.last_step
        return last is None or step > last

    # -- model calls -----------------------------------------------------------------------------
    def _sample(self, unet, vae, controlnet, scheduler_config) -> torch.Tensor:
        from difftune_control.validation import sample_images, sampling_batch

        cfg = self.config
        return sample_images(
            unet=unet,
            vae=vae,
            scheduler_config=scheduler_config,
            prompt_embeds=self.prompt_embeds,
            negative_prompt_embeds=self.negative_prompt_embeds,
            added_cond=self.added_cond,
            negative_added_cond=self.negative_added_cond,
            seeds=self.seeds,
            resolution=self.resolution,
            controlnet=controlnet,
            hints=None if controlnet is None else self.hints,
            num_inference_steps=cfg.convergence_num_inference_steps,
            guidance_scale=cfg.convergence_guidance_scale,
            sampler=self.sampler,
            batch_size=self.batch_size or sampling_batch(self.resolution),
        )

    def _score(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-extract a batch [K,3,H,W] in one call and score it against the hints -> (hints, d [K])."""
        reextracted = self.extractor(images.float().clamp(0.0, 1.0))
        d = self.extractor.dissimilarity(self.hints.to(reextracted.device), reextracted)
        return reextracted, d.float().cpu()

    def reference(self, unet, vae, controlnet, scheduler_config) -> dict[str, Any]:
        """Measure d0 and d_floor and set them on the detector.

        d0: samples made with the ControlNet's contribution switched off. A conditioning scale of 0
        multiplies every ControlNet residual by zero, which is exactly sampling the UNet alone (the
        residuals are added, and adding zeros changes nothing), so the ControlNet is not run; this is
        what a zero-initialised ControlNet produces, and stays right when training starts from an
        existing ControlNet. d_floor: the real images through the VAE (encode -> decode), re-extracted.

        Args:
            unet, vae, controlnet: the in-memory models (the ControlNet is not called).
            scheduler_config: the base model's scheduler config.

        Returns:
            `dict`: `d0`, `d_floor`, `d0_per_sample`, `d_floor_per_sample`, `seconds`.
        """
        import torch

        from difftune_control.validation import decode_latents, encode_images

        del controlnet  # see the docstring: conditioning_scale=0 == UNet alone, bit for bit
        start = time.perf_counter()
        with torch.no_grad(), self._sampling_mode(unet):
            unconditioned = self._sample(unet, vae, None, scheduler_config)
            reextracted, d0 = self._score(unconditioned)
        # kept for the first evaluation: a still zero-initialised ControlNet makes these same samples
        self._unconditioned = (unconditioned, reextracted, d0)
        with torch.no_grad(), self._sampling_mode(unet):
            roundtrip = decode_latents(vae, encode_images(vae, self.images.to(vae.device)))
            _, d_floor = self._score(roundtrip)
        self.detector.set_reference(float(d0.mean()), float(d_floor.mean()))
        seconds = time.perf_counter() - start
        self._pending_seconds += seconds
        self.reference_info = {
            "d0": float(d0.mean()),
            "d_floor": float(d_floor.mean()),
            "d0_per_sample": [float(x) for x in d0],
            "d_floor_per_sample": [float(x) for x in d_floor],
            "seconds": seconds,
        }
        return dict(self.reference_info)

    @staticmethod
    def _sampling_mode(unet):
        from difftune_control.validation import sampling_mode

        return sampling_mode(unet)

    def evaluate(
        self, step: int, unet, vae, controlnet, scheduler_config, *, elapsed: float | None = None
    ) -> list[dict[str, Any]]:
        """Run one evaluation and return the `metrics.jsonl` records it produces.

        Samples the K held-out prompts with their hints (fixed seeds, the detector's sampler, steps
        and CFG, batched), re-extracts the condition from all samples in one batch, scores them,
        updates the detector and writes `samples/eval-step{N:07d}.safetensors`. The models run under
        `torch.no_grad()`; the ControlNet is put in eval mode and back to its previous mode. The
        references (d0, d_floor) are measured first if they are not set yet; their cost is included
        in this evaluation's `eval_seconds`.

        Args:
            step (`int`): the optimizer step.
            unet, vae, controlnet: the in-memory models.
            scheduler_config: the base model's scheduler config.
            elapsed (`float`, *optional*): seconds since the start of training, for the records'
                `time` (default: seconds since this monitor was built).

        Returns:
            `list[dict]`: the `convergence_eval` record first, then any `milestone` and
            `convergence_event` records, exactly as they go to `metrics.jsonl`.
        """
        import torch

        start = time.perf_counter()
        now = time.monotonic() - self._t0 if elapsed is None else float(elapsed)
        if not self.detector.has_reference:
            self.reference(unet, vae, controlnet, scheduler_config)
            start = time.perf_counter()
        was_training = controlnet.training
        controlnet.eval()
        try:
            if self._unconditioned is not None and _zero_output(controlnet):
                samples, reextracted, d = self._unconditioned  # exactly what sampling would give
            else:
                with torch.no_grad(), self._sampling_mode(unet):
                    samples = self._sample(unet, vae, controlnet, scheduler_config)
                    reextracted, d = self._score(samples)
        finally:
            controlnet.train(was_training)
        self._unconditioned = None
        d_mean = float(d.mean())
        events = self.detector.update(step, d_mean)
        self._times[int(step)] = now
        rel_path = self._write_samples(step, samples, reextracted, d) if self.run_dir is not None else None
        seconds = time.perf_counter() - start + self._pending_seconds
        self._pending_seconds = 0.0
        p = self.detector.history[-1]["p"]
        record = {
            "type": "convergence_eval",
            "step": int(step),
            "time": now,
            "d": _finite_or_none(d_mean),
            "d_per_sample": [_finite_or_none(float(x)) for x in d],
            "p": p,
            "aucc": self.detector.aucc_so_far(),
            "d0": self.detector.d0,
            "d_floor": self.detector.d_floor,
            "eval_seconds": seconds,
            "samples": rel_path,
        }
        for event in events:
            event["time"] = self._times.get(int(event["step"]), now)
        return [record, *events]

    def _write_samples(self, step: int, samples, reextracted, d) -> str:
        import torch

        from difftune_control.utils import atomic_save_safetensors

        def to_u8(x: torch.Tensor) -> torch.Tensor:
            return (x.detach().float().cpu().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)

        rel = f"samples/eval-step{int(step):07d}.safetensors"
        p = self.detector.history[-1]["p"]
        atomic_save_safetensors(
            {"hint": to_u8(self.hints), "sample": to_u8(samples), "reextracted": to_u8(reextracted)},
            self.run_dir / rel,
            metadata={
                "prompts": json.dumps(self.prompts),
                "seeds": json.dumps(self.seeds),
                "step": str(int(step)),
                "p": json.dumps(p),
                "d_per_sample": json.dumps([_finite_or_none(float(x)) for x in d]),
            },
        )
        return rel

    # -- resume ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Detector state + references + evaluation times, JSON-serialisable (for trainer_state.json)."""
        return {
            "detector": self.detector.state_dict(),
            "reference": dict(self.reference_info),
            "times": [[s, t] for s, t in self._times.items()],
            "seeds": list(self.seeds),
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s output; refuses a state made with other seeds or another K."""
        if "detector" not in state:
            raise ValueError("not a convergence monitor state: missing key 'detector'")
        if state.get("seeds") is not None and list(state["seeds"]) != list(self.seeds):
            raise ValueError(
                f"resume: the convergence detector was built with seeds {state['seeds']} "
                f"(K = {state.get('num_samples')}), this run has {self.seeds} (K = {self.num_samples}); "
                "keep --convergence_samples and the validation set unchanged when resuming"
            )
        self.detector.load_state_dict(state["detector"])
        self.reference_info = dict(state.get("reference") or {})
        self._times = {int(s): float(t) for s, t in state.get("times", [])}
