#!/usr/bin/env python
"""Does the memory bank's retention loss drown the target's signal? A check at step 0, on a CPU.

    python scripts/diagnose_bank.py                                   # toy world, depth, 128 samples
    python scripts/diagnose_bank.py --out docs/bench/bank-diagnosis.json -- --condition canny
    python scripts/diagnose_bank.py -- --pretrained_model_name_or_path DIR --train_data_dir DATA \\
        --condition depth --device cuda

A fresh ControlNet outputs zero, so at step 0 the base model alone predicts the noise, and the
gradient reaching the ControlNet (its zero convolutions) measures how much each part of the loss
wants it to change. Diff-Tuning's ``renoise`` retention asks the ControlNet to predict the true
noise of the base model's *own* re-noised samples; if the base denoises its samples no better than
real data, or errs on them in one coherent direction, that gradient can outweigh the target's,
and the ControlNet spends itself correcting the base instead of learning the hint. Printed, for a
batch at one timestep each: the loss and the gradient norm of target rows and of bank rows, and
for the run's own batch plan the target part against the weighted bank part. Also the per-channel
spread of target and bank latents. The bank is built (or reused) as ``difftune train`` would.
Flags after ``--`` are ``difftune train`` flags.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=64, help="target rows per measurement (and bank rows)")
    p.add_argument("--timesteps", nargs="+", type=int, default=[10, 100, 300, 600, 900])
    p.add_argument(
        "--probe_t",
        type=int,
        default=300,
        help="timestep of the probe: bank rows against target latents with the bank's prompts and hints "
        "(does the pull come from the bank's latents?). Hints cannot matter at step 0: the hint "
        "encoder's last convolution starts at zero too",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON")
    p.add_argument("train_args", nargs="*", help="difftune train flags (after --)")
    args = p.parse_args()

    from difftune_control.cli import build_parser
    from difftune_control.config import RunConfig, apply_preset, config_from_args
    from difftune_control.training.diagnostics import bank_pull, per_timestep_pull
    from difftune_control.training.setup import setup

    flags = ["--method", "difftuning", "--device", "cpu", "--max_train_samples", str(max(128, args.samples))]
    parsed = build_parser().parse_args(["train", *flags, *args.train_args])
    run = setup(config_from_args(parsed, apply_preset(RunConfig(), parsed.preset)))
    cfg, trainer, target, bank = run.cfg, run.trainer, run.target, run.bank
    base, bank_dir = run.base, run.bank_dir
    cfg.data.proportion_empty_prompts = 0.0  # every row with its caption: the measurement, not the recipe

    n = args.samples
    batch = torch.utils.data.default_collate([target[i] for i in range(n)])
    rows = per_timestep_pull(trainer, batch, args.timesteps)
    trainer.generator.manual_seed(cfg.train.seed)
    whole = {
        **bank_pull(trainer, batch),
        "split": cfg.method.split,
        "bank_share": cfg.method.bank_share,
        "bank_weight": cfg.method.bank_weight,
    }
    tl = torch.stack([target[i]["latents"] for i in range(n)]).float()
    own = bank.batch
    swaps = {
        "bank rows": lambda rows: rows,
        "target latents, bank prompts and hints": lambda rows: {
            **rows,
            "latents": tl[: len(rows["latents"])].to(rows["latents"]),
        },
    }
    probe = {}
    for name, swap in swaps.items():
        bank.batch = lambda idx, device=None, swap=swap, **kw: swap(own(idx, device, **kw))
        probe[name] = per_timestep_pull(trainer, batch, [args.probe_t])[0]["bank_grad"]
    bank.batch = own
    draw = torch.Generator().manual_seed(0) if cfg.method.bank_latents == "sample" else None
    bl = bank.batch(torch.arange(len(bank)), posterior_generator=draw)["latents"]  # as training sees them
    spread = {"target_latent_std": tl.std((0, 2, 3)).tolist(), "bank_latent_std": bl.std((0, 2, 3)).tolist()}

    print(f"condition {cfg.data.condition}, model {base.model_id}, bank {bank_dir}")
    print("\n| t | target loss | target grad | bank loss | bank grad | bank / target grad |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['t']} | {r['target_loss']:.4f} | {r['target_grad']:.4g} | {r['bank_loss']:.4f} | "
            f"{r['bank_grad']:.4g} | {r['ratio']:.1f}x |"
        )
    print(
        f"\nOne batch of the run's plan ({whole['split']}, r = {whole['bank_share']}, lambda = "
        f"{whole['bank_weight']}): target part {whole['target_grad']:.4g}, weighted bank part "
        f"{whole['bank_grad']:.4g} ({whole['ratio']:.2f}x)"
    )
    fmt = lambda v: "[" + ", ".join(f"{x:.2f}" for x in v) + "]"  # noqa: E731
    print(
        f"latent std per channel: target {fmt(spread['target_latent_std'])}, "
        f"bank {fmt(spread['bank_latent_std'])}"
    )
    print(f"\nwhat pulls (bank-row gradient norm at t = {args.probe_t}):")
    for name, value in probe.items():
        print(f"  {name}: {value:.4g}")
    if whole["ratio"] > 1.0:
        from difftune_control.training.diagnostics import BANK_ADVICE

        print(
            f"\nThe weighted bank part pulls harder than the target part ({whole['ratio']:.2f}x). {BANK_ADVICE}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "condition": cfg.data.condition,
            "bank_guidance_scale": cfg.bank.bank_guidance_scale,
            "per_t": rows,
            "plan": whole,
            "probe_t": args.probe_t,
            "bank_latents": cfg.method.bank_latents,
            "probe": probe,
            **spread,
        }
        args.out.write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
