#!/usr/bin/env python
"""Where an SDXL ControlNet step's peak GPU memory goes, phase by phase (one CUDA GPU).

    python scripts/profile_sdxl_memory.py --model-dir /tmp/sdxl-random --method difftuning --out OUT

Our trainer as ``scripts/bench_sdxl.py`` runs it at batch 1 (gradient checkpointing, ``--speed``
adafactor+fused by default, synthetic rows shaped like the SDXL latent cache; the model folder is built
when missing). Phases, each with its own peak (``torch.cuda.max_memory_allocated``): setup, lambda's
measurement (``--bank_weight auto``, Diff-Tuning only), a step on a target row, a step on a bank row,
steady steps, then what the detector and the validation grids do between steps: sampling with the
ControlNet as they call it (``sampling_batch`` images per call, guided, under ``sampling_mode``) and a
VAE decode of one image. With allocation history recorded per phase, the allocations made in a phase and
alive at its peak are grouped by the innermost frame of this project (else the innermost Python frame);
the largest groups of the overall peak's phase are printed, ``memory.json`` in --out holds every phase's.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sdxl import build_sdxl, sdxl_rows  # noqa: E402
from bench_throughput import make_ours  # noqa: E402

GIB = 2**30


def live_at_peak(snapshot: dict) -> tuple[int, dict[str, int]]:
    """Replay the allocation trace: the peak of live bytes and the live bytes at it, per allocating frame."""
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for trace in snapshot["device_traces"]:
        for e in trace:
            if e["action"] == "alloc":
                live[e["addr"]] = (e["size"], _where(e.get("frames", [])))
                total += e["size"]
                if total > peak:
                    peak, at_peak = total, dict(live)
            elif e["action"] in ("free_completed",) and e["addr"] in live:
                total -= live.pop(e["addr"])[0]
    groups: dict[str, int] = defaultdict(int)
    for size, where in at_peak.values():
        groups[where] += size
    return peak, dict(sorted(groups.items(), key=lambda kv: -kv[1]))


def _where(frames: list[dict]) -> str:
    ours = [f for f in frames if "difftune_control" in f["filename"] or "scripts/" in f["filename"]]
    py = [f for f in frames if f["filename"].endswith(".py")]
    chain = (ours or py or frames)[:2]
    return " <- ".join(f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in chain) or "?"


def sampling_phases(phase, trainer, acc, steps: int) -> None:
    """The detector's and validation grids' work with the trainer's in-memory models: one guided sampling
    call of ``sampling_batch`` images with the ControlNet, then a VAE decode of one image, each under
    ``sampling_mode`` and ``no_grad`` as the run makes them."""
    from difftune_control.validation import decode_latents, sample_images, sampling_batch, sampling_mode

    base, net = trainer.base, acc.unwrap_model(trainer.controlnet)
    rows = trainer.target
    res = rows.hints.shape[-1]
    n = sampling_batch(res)
    batch = torch.utils.data.default_collate([rows[i] for i in range(n)])
    added = {k: batch[k] for k in ("text_embeds", "time_ids")}
    net.eval()

    def sample() -> None:
        with torch.no_grad(), sampling_mode(base.unet):
            sample_images(
                unet=base.unet,
                vae=base.vae,
                scheduler_config=base.scheduler_config,
                prompt_embeds=batch["encoder_hidden_states"],
                negative_prompt_embeds=torch.zeros_like(batch["encoder_hidden_states"][:1]),
                added_cond=added,
                negative_added_cond={k: torch.zeros_like(v[:1]) for k, v in added.items()},
                seeds=list(range(n)),
                resolution=res,
                controlnet=net,
                hints=batch["conditioning_pixel_values"].float() / 255,
                num_inference_steps=steps,
                guidance_scale=7.5,
                batch_size=n,
            )

    def decode() -> None:
        z = torch.randn(1, 4, res // 8, res // 8, device=acc.device)
        with torch.no_grad(), sampling_mode(base.unet):
            decode_latents(base.vae, z)

    phase(f"sampling {n} images", sample)
    phase("VAE decode, 1 image", decode)
    net.train()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/sdxl-random"))
    p.add_argument("--method", default="difftuning", choices=["vanilla", "difftuning"])
    p.add_argument("--speed", default="adafactor+fused")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=4, help="steady steps after the phase steps")
    p.add_argument("--sample-steps", type=int, default=2, help="denoising steps of the sampling phase")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", type=Path, default=Path("bench/sdxl-memory"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_sdxl_memory needs a CUDA GPU")
    from diffusers import UNet2DConditionModel

    from difftune_control.methods.forgetting import BatchPlan

    model = build_sdxl(args.model_dir, device="cuda")
    unet_config = dict(UNet2DConditionModel.load_config(model, subfolder="unet"))
    rows = lambda n: sdxl_rows(n, unet_config)  # noqa: E731
    phases: dict[str, dict] = {}
    groups_of: dict[str, dict[str, int]] = {}

    def phase(name: str, fn) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(max_entries=500_000)
        fn()
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        groups_of[name] = live_at_peak(snap)[1]
        phases[name] = {
            "before_gib": before / GIB,
            "peak_gib": torch.cuda.max_memory_allocated() / GIB,
            "after_gib": torch.cuda.memory_allocated() / GIB,
        }
        print(f"{name:>24}: " + ", ".join(f"{k} {v:.2f}" for k, v in phases[name].items()), flush=True)

    made = {}
    phase("setup", lambda: made.update(zip(("trainer", "opt", "acc"), make_ours(
        model, args.batch, args.method, True, args.speed, rows))))  # fmt: skip
    trainer, opt, acc = made["trainer"], made["opt"], made["acc"]
    batch = torch.utils.data.default_collate([trainer.target[i] for i in range(args.batch)])

    def step(plan=None) -> None:
        trainer.training_step(batch, plan)
        acc.clip_grad_norm_(trainer.controlnet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if getattr(trainer, "auto_weight", False):
        phase("lambda measurement", lambda: trainer.calibrate_bank_weight(batch))
    n = args.batch
    for name, bank in (("target-row step", False), ("bank-row step", True)):
        if bank and trainer.bank is None:
            continue
        plan = BatchPlan(
            is_bank=torch.full((n,), bank),
            timesteps=torch.full((n,), 500),
            weights=torch.full((n,), 1.0 / n),
            bank_weight=0.1 if bank else 0.0,
        )
        phase(name, lambda plan=plan: step(plan))
    phase(f"{args.steps} run steps", lambda: [step() for _ in range(args.steps)])
    sampling_phases(phase, trainer, acc, args.sample_steps)
    worst = max(phases, key=lambda k: phases[k]["peak_gib"])
    print(
        f"\nhighest peak: {worst}, {phases[worst]['peak_gib']:.2f} GiB; largest groups made in it (allocating frame):"
    )
    for where, size in list(groups_of[worst].items())[: args.top]:
        print(f"  {size / GIB:8.3f} GiB  {where}")
    args.out.mkdir(parents=True, exist_ok=True)
    groups = {k: {w: v / GIB for w, v in list(g.items())[:30]} for k, g in groups_of.items()}
    (args.out / "memory.json").write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "phases": phases,
                "peak_phase": worst,
                "groups_gib": groups,
            },
            indent=1,
        )  # fmt: skip
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
