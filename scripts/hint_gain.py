#!/usr/bin/env python
"""Where does the hint lower the loss? A trained ControlNet's gain over its own null hint, per timestep band.

    python scripts/hint_gain.py --controlnet runs/demo/controlnet            # toy world, normal
    python scripts/hint_gain.py --controlnet RUN/controlnet --out gain.json -- --condition depth \\
        --pretrained_model_name_or_path BASE

For each band of timesteps the same target rows (validation split by default), noise and timesteps pass
three times: the base alone, the ControlNet with an all-zero hint, and the ControlNet with the true
hint. The hint's gain is the drop in epsilon loss from the null hint to the true one: what following
the hint buys at that noise level. Printed per band, with the share of the summed gain each loss
weighting puts there (uniform t: vanilla's epsilon loss; inverse SNR: x0-supervision's, the default's
target rows; Min-SNR-5). The weightings' shares say where each objective's signal about the hint comes
from: a gain only at high noise, where the epsilon loss is small, is a small part of vanilla's objective.
Flags after ``--`` are ``difftune train`` flags (the base model, the condition, the data); with the toy
world, ``--toy_domain D`` takes the held-out rows of domain ``D``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

WEIGHTINGS = ("none", "inverse_snr", "min_snr")


def band_losses(trainer, batch: dict, t: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Per-row epsilon loss at timesteps ``t`` for the base alone, the null hint and the true hint (same noise)."""
    from difftune_control.methods.forgetting import BatchPlan

    n = t.numel()
    plan = BatchPlan(is_bank=torch.zeros(n, dtype=torch.bool), timesteps=t, weights=torch.full((n,), 1.0 / n))
    trainer.generator.manual_seed(seed)
    assembled = trainer.assemble(batch, plan)  # caption dropout is off: every row keeps its prompt
    controlnet, out = trainer.controlnet, {}
    hint = assembled["conditioning_pixel_values"]
    with torch.no_grad():
        for mode in ("base", "null_hint", "hint"):
            trainer.controlnet = None if mode == "base" else controlnet
            assembled["conditioning_pixel_values"] = torch.zeros_like(hint) if mode == "null_hint" else hint
            out[mode] = trainer.compute_loss(assembled).float().cpu()
    trainer.controlnet = controlnet
    return out


def measure(trainer, target, samples: int, bands: int, batch_size: int = 64, seed: int = 0) -> list[dict]:
    """Per band of timesteps: the mean losses, the hint's gain and each weighting's share of the summed gain."""
    from difftune_control.methods.forgetting import loss_weights

    n, T = min(samples, len(target)), trainer.num_train_timesteps
    edges = [round(i * T / bands) for i in range(bands + 1)]
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        parts: dict[str, list] = {"base": [], "null_hint": [], "hint": []}
        ts = torch.randint(lo, hi, (n,), generator=gen)
        for s in range(0, n, batch_size):
            idx = range(s, min(n, s + batch_size))
            batch = torch.utils.data.default_collate([target[i] for i in idx])
            for k, v in band_losses(trainer, batch, ts[s : s + len(idx)], seed * 1000 + b * 100 + s).items():
                parts[k].append(v)
        loss = {k: torch.cat(v).double() for k, v in parts.items()}
        gain = loss["null_hint"] - loss["hint"]
        a = trainer.alphas_cumprod_cpu[ts]
        w = {k: loss_weights(k, a, trainer.prediction_type, snr_gamma=5.0).double() for k in WEIGHTINGS}
        rows.append(
            {
                "band": f"t{lo}-{hi}",
                **{f"loss_{k}": float(v.mean()) for k, v in loss.items()},
                "gain": float(gain.mean()),
                "gain_sem": float(gain.std() / n**0.5) if n > 1 else float("nan"),
                "relative_gain": float(gain.mean() / loss["null_hint"].mean()),
                **{f"weighted_gain_{k}": float((w[k] * gain).mean()) for k in WEIGHTINGS},
            }
        )
    for k in WEIGHTINGS:
        total = sum(r[f"weighted_gain_{k}"] for r in rows)
        for r in rows:
            r[f"share_{k}"] = r[f"weighted_gain_{k}"] / total if total else float("nan")
    return rows


def summary(rows: list[dict], below: int = 500) -> dict:
    """The summed gain over the bands and, per weighting, the share of it in the bands that end at or below
    timestep ``below`` (the low- and middle-noise half at SD's 1,000 steps)."""
    low = [r for r in rows if int(r["band"].split("-")[1]) <= below]
    return {
        "summed_gain": sum(r["gain"] for r in rows),
        "below": below,
        **{f"share_below_{k}": sum(r[f"share_{k}"] for r in low) for k in WEIGHTINGS},
    }


def data_flags(train_args: list[str], split: str, samples: int) -> tuple[list[str], list[str]]:
    """The rows to measure on: the given ``difftune train`` data flags, else the toy world's ``split`` (at least
    ``samples`` scenes) of the domain ``--toy_domain`` names (default: the default domain). Returns the flags to
    add and ``train_args`` without ``--toy_domain`` (a run given ``--train_data_dir`` refuses it)."""
    train_args = list(train_args)
    if "--train_data_dir" in train_args or "--dataset_name" in train_args:
        return [], train_args
    from difftune_control.toyworld.dataset import default_dataset_dir

    domain = "default"
    if "--toy_domain" in train_args:
        at = train_args.index("--toy_domain")
        if at + 1 == len(train_args):
            raise SystemExit("hint_gain: --toy_domain needs a domain name")
        domain = train_args[at + 1]
        del train_args[at : at + 2]
    return ["--train_data_dir", str(default_dataset_dir(split, n=samples, domain=domain))], train_args


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--controlnet", type=Path, required=True, help="a trained ControlNet folder (RUN/controlnet)"
    )
    p.add_argument("--samples", type=int, default=256, help="target rows per band")
    p.add_argument("--bands", type=int, default=10, help="equal bands of the 1000 training timesteps")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--split", default="validation", help="toy world split of the rows (when no data is given)"
    )
    p.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON")
    p.add_argument("train_args", nargs="*", help="difftune train flags (after --)")
    args = p.parse_args()
    if not (args.controlnet / "config.json").is_file():
        p.error(f"--controlnet {args.controlnet}: no config.json there (give the run's controlnet/ folder)")

    from difftune_control.cli import build_parser
    from difftune_control.config import RunConfig, apply_preset, config_from_args
    from difftune_control.training.setup import setup

    flags = ["--method", "vanilla", "--loss_weighting", "none", "--device", "cpu", "--no-detect_convergence"]
    flags += [
        "--controlnet_model_name_or_path",
        str(args.controlnet),
        "--max_train_samples",
        str(args.samples),
    ]
    data, train_args = data_flags(args.train_args, args.split, args.samples)
    flags += data
    scratch = tempfile.TemporaryDirectory(
        prefix="hint-gain-"
    )  # the run folder setup() makes; nothing is kept
    flags += ["--output_dir", scratch.name]
    parsed = build_parser().parse_args(["train", *flags, *train_args])
    run = setup(config_from_args(parsed, apply_preset(RunConfig(), parsed.preset)))
    trainer, target, cfg = run.trainer, run.target, run.cfg
    cfg.data.proportion_empty_prompts = 0.0
    trainer.controlnet.eval()

    rows = measure(trainer, target, args.samples, args.bands, args.batch, args.seed)
    n = min(args.samples, len(target))
    print(
        f"hint gain per timestep band ({n} rows each; condition {cfg.data.condition}; ControlNet {args.controlnet})"
    )
    print(
        "| band | base loss | null hint | hint | gain (+- sem) | gain / null-hint loss | share: uniform | inverse SNR | Min-SNR-5 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['band']} | {r['loss_base']:.4f} | {r['loss_null_hint']:.4f} | {r['loss_hint']:.4f} | "
            f"{r['gain']:.4f} +- {r['gain_sem']:.4f} | {r['relative_gain']:.1%} | {r['share_none']:.1%} | "
            f"{r['share_inverse_snr']:.1%} | {r['share_min_snr']:.1%} |"
        )
    total = summary(rows)
    print(
        f"\nsummed gain {total['summed_gain']:.4f}; its share below t = {total['below']}: uniform "
        f"{total['share_below_none']:.1%}, inverse SNR {total['share_below_inverse_snr']:.1%}, Min-SNR-5 "
        f"{total['share_below_min_snr']:.1%}"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "summary": total,
            "controlnet": str(args.controlnet),
            "condition": cfg.data.condition,
            "samples": n,
            "bands": rows,
        }
        result["base"] = str(cfg.model.pretrained_model_name_or_path or "the toy world base")
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
