#!/usr/bin/env python
"""Generative distillation on the toy world: retention sources, and continual adaptation.

    python scripts/bench_distill.py --out bench/distill                       # both parts, seeds 0 1 2
    python scripts/bench_distill.py --out bench/distill --parts retention      # one part
    python scripts/bench_distill.py --out DIR --aggregate-only                # tables from finished runs

Part ``retention`` (condition ``--condition``, default depth): vanilla, Diff-Tuning with
``--retention renoise`` (as published), ``trajectory`` (NIGD) and ``snr`` (SGGD); steps to sudden
convergence, final controllability, and the retention score of scripts/bench_convergence.py
(text following with an all-zero hint, Frechet distance to real renders).

Part ``continual``: ControlNet A = the ``--first_variant`` run (vanilla) on ``--condition`` (depth); each variant
then adapts A to ``--second`` (segmentation) starting from A's weights, with Diff-Tuning and no
teacher, or distilling A (``--teacher_controlnet A``, renoise or snr retention), and plain vanilla
fine-tuning for reference. Measured: how much of A's controllability survives (A's metric on A's
held-out hints, progress p relative to the base alone and the annotator floor, before vs after),
and B's controllability.

Every run is an ordinary ``difftune train`` subprocess; several share one GPU (functions of
scripts/bench_convergence.py). CPU smoke test on the tiny pipeline of tests/conftest.py::

    python scripts/bench_distill.py --out /tmp/bd --seeds 0 --max_train_steps 4 --adapt_steps 4 \\
        --convergence_every 2 --parallel 2 --eval_samples 2 --no-retention --condition canny \\
        --second sketch --device cpu --second_flags "--train_data_dir DATA2" -- \\
        --pretrained_model_name_or_path PIPE --train_data_dir DATA \\
        --resolution 16 --conditioning_embedding_out_channels 8 16 --train_batch_size 4 \\
        --bank_size 8 --bank_num_inference_steps 4 --trajectory_states 2 --convergence_samples 2 --device cpu
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_convergence as bc  # noqa: E402

RETENTION = {  # label -> (method, extra flags)
    "vanilla": ("vanilla", []),
    "renoise": ("difftuning", []),
    "trajectory": ("difftuning", ["--retention", "trajectory"]),
    "snr": ("difftuning", ["--retention", "snr"]),
}
ADAPT = {  # label -> (method, extra flags, distils A)
    "vanilla": ("vanilla", [], False),
    "renoise": ("difftuning", [], False),
    "teacher": ("difftuning", [], True),
    "teacher-snr": ("difftuning", ["--retention", "snr"], True),
}


def run_all(args, jobs: list[tuple[str, list[str]]]) -> None:
    """Run ``(name, command)`` jobs, ``--parallel`` at a time, logs in ``<out>/logs``."""
    t0 = time.time()
    with ThreadPoolExecutor(args.parallel) as pool:
        futs = {name: pool.submit(bc.run_cmd, cmd, args.out / "logs" / f"{name}.log") for name, cmd in jobs}
        for name, fut in futs.items():
            print(f"{name}: rc={fut.result()} ({time.time() - t0:.0f}s)", flush=True)


def retention_jobs(args) -> list[tuple[str, list[str]]]:
    labels = args.variants or list(RETENTION)
    return [
        (
            f"{args.condition}-{label}-s{s}",
            bc.train_cmd(args, f"{args.condition}-{label}-s{s}", args.condition, m, s, x),
        )
        for label, (m, x) in RETENTION.items()
        if label in labels
        for s in args.seeds
    ]


def teacher_name(args, seed: int) -> str:
    return f"{args.condition}-{args.first_variant}-s{seed}"


def adapt_jobs(args) -> list[tuple[str, list[str]]]:
    out = []
    for label, (method, extra, distils) in ADAPT.items():
        for s in args.seeds:
            name = f"adapt-{args.second}-{label}-s{s}"
            teacher = str(args.out / "runs" / teacher_name(args, s))
            flags = ["--controlnet_model_name_or_path", teacher, *extra, *args.second_args]
            if distils:
                flags += ["--teacher_controlnet", teacher, "--teacher_condition", args.condition]
            cmd = bc.train_cmd(args, name, args.second, method, s, flags)
            steps = cmd.index("--max_train_steps") + 1
            cmd[steps] = str(args.adapt_steps)
            for flag in ("--checkpointing_steps", "--validation_steps"):
                cmd[cmd.index(flag) + 1] = str(args.adapt_steps)
            out.append((name, cmd))
    return out


# -- controllability of a finished ControlNet on a condition's held-out hints ----------------------
class Evaluator:
    """Progress p of ControlNets on one condition's K held-out (prompt, hint) pairs, as the detector measures it."""

    def __init__(self, args, condition: str, device: str, extra: list[str] | None = None):
        import torch

        from difftune_control import assembly
        from difftune_control.cli import build_parser
        from difftune_control.config import config_from_args, resolve_defaults
        from difftune_control.extractors import load_recipe
        from difftune_control.training.runtime import is_toy_model, load_base_model
        from difftune_control.validation import decode_latents, encode_images, encode_prompts

        ns = build_parser().parse_args(["train", *args.train_args, *(extra or []), "--condition", condition])
        cfg = config_from_args(ns)
        toy = is_toy_model(cfg.model.pretrained_model_name_or_path)
        self.cfg = cfg = resolve_defaults(cfg, toy=toy, recipe=load_recipe(condition))
        self.device = torch.device(device)
        self.base = load_base_model(cfg.model, self.device, torch.float32)
        _, self.extractor = assembly.load_condition(cfg, toy, self.device)
        self.val = assembly.load_validation(cfg, self.base, self.extractor, args.eval_samples)
        self.empty = encode_prompts(self.base.text_encoder, self.base.tokenizer, [""])
        self.d0 = self.score(None)
        with torch.no_grad():
            real = decode_latents(
                self.base.vae, encode_images(self.base.vae, self.val.images.to(self.device))
            )
            self.d_floor = self._d(real)

    def _d(self, images) -> float:
        import torch

        with torch.no_grad():
            re = self.extractor(images.float().clamp(0, 1))
            return float(self.extractor.dissimilarity(self.val.hints.to(re.device), re).mean())

    def score(self, controlnet) -> float:
        from difftune_control.validation import sample_images

        d = self.cfg.detector
        images = sample_images(
            unet=self.base.unet,
            vae=self.base.vae,
            scheduler_config=self.base.scheduler_config,
            prompt_embeds=self.val.prompt_embeds,
            negative_prompt_embeds=self.empty,
            seeds=self.val.seeds,
            resolution=self.cfg.data.resolution,
            controlnet=controlnet,
            hints=None if controlnet is None else self.val.hints,
            num_inference_steps=d.convergence_num_inference_steps,
            guidance_scale=d.convergence_guidance_scale,
        )
        return self._d(images)

    def __call__(self, run_dir: Path) -> dict:
        from diffusers import ControlNetModel

        net = ControlNetModel.from_pretrained(run_dir / "controlnet").to(self.device).eval()
        d = self.score(net)
        span = self.d0 - self.d_floor
        return {
            "d": d,
            "p": (self.d0 - d) / span if span > 0 else None,
            "d0": self.d0,
            "d_floor": self.d_floor,
        }


def evaluate_continual(args, device: str) -> None:
    """A's and B's controllability of A and of every adapted ControlNet -> ``<out>/continual/*.json``."""
    folder = args.out / "continual"
    folder.mkdir(exist_ok=True)
    names = [teacher_name(args, s) for s in args.seeds] + [n for n, _ in adapt_jobs(args)]
    for key, condition, extra in (("first", args.condition, []), ("second", args.second, args.second_args)):
        ev = Evaluator(args, condition, device, extra)
        for name in names:
            if (args.out / "runs" / name / "controlnet").is_dir():
                path = folder / f"{name}.json"
                entry = json.loads(path.read_text()) if path.exists() else {}
                entry[key] = ev(args.out / "runs" / name)
                path.write_text(json.dumps(entry))


def _ms(values: list) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.2f} ± {sd:.2f}"


def continual_table(args, rows: dict) -> tuple[str, dict]:
    folder = args.out / "continual"
    agg: dict[str, dict] = {}
    for label in ADAPT:
        cells: dict[str, list] = {
            "p_first_before": [],
            "p_first": [],
            "survival": [],
            "p_second": [],
            "event": [],
        }
        for s in args.seeds:
            name = f"adapt-{args.second}-{label}-s{s}"
            a_path, b_path = folder / f"{teacher_name(args, s)}.json", folder / f"{name}.json"
            if not (a_path.exists() and b_path.exists()):
                continue
            a, b = json.loads(a_path.read_text()), json.loads(b_path.read_text())
            before, after = a["first"]["p"], b["first"]["p"]
            cells["p_first_before"].append(before)
            cells["p_first"].append(after)
            cells["survival"].append(after / before if before and after is not None and before > 0 else None)
            cells["p_second"].append(b["second"]["p"])
            cells["event"].append((rows.get(name) or {}).get("convergence_step"))
        agg[label] = cells
    lines = [
        f"Continual: {args.condition} ControlNet A, then adapted to {args.second} from A's weights "
        f"({args.adapt_steps} steps). p = progress on held-out hints ({args.eval_samples} samples, "
        "0 = base alone, 1 = annotator floor), mean ± sd over seeds.",
        "",
        f"| adaptation | {args.condition} p before | {args.condition} p after | survival (after / before) | "
        f"{args.second} p | {args.second} convergence step |",
        "|---|---|---|---|---|---|",
    ]
    for label, c in agg.items():
        ev = [v for v in c["event"] if v is not None]
        lines.append(
            f"| {label} | {_ms(c['p_first_before'])} | {_ms(c['p_first'])} | {_ms(c['survival'])} | "
            f"{_ms(c['p_second'])} | {statistics.mean(ev):.0f} ({len(ev)}/{len(c['event'])}) |"
            if ev
            else f"| {label} | {_ms(c['p_first_before'])} | {_ms(c['p_first'])} | {_ms(c['survival'])} | "
            f"{_ms(c['p_second'])} | not reached |"
        )
    return "\n".join(lines), agg


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/distill"))
    p.add_argument(
        "--parts", nargs="+", default=["retention", "continual"], choices=["retention", "continual"]
    )
    p.add_argument(
        "--condition", default="depth", help="retention part's condition, and A of the continual part"
    )
    p.add_argument(
        "--first_variant",
        default="vanilla",
        choices=list(RETENTION),
        help="which retention-part run is ControlNet A of the continual part (default vanilla: on the toy "
        "world it is the one that has converged on depth by 1,000 steps)",
    )
    p.add_argument("--second", default="segmentation", help="B of the continual part (a condition)")
    p.add_argument(
        "--second_flags",
        default="",
        help='extra flags of the B runs and B evaluation, one string, e.g. "--train_data_dir OTHER" (a second domain)',
    )
    p.add_argument(
        "--variants",
        nargs="+",
        choices=list(RETENTION),
        default=None,
        help="retention part: only these sources (all by default)",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--max_train_steps", type=int, default=1000)
    p.add_argument("--adapt_steps", type=int, default=1000)
    p.add_argument("--convergence_every", type=int, default=25)
    p.add_argument(
        "--eval_samples", type=int, default=64, help="held-out samples of the continual evaluation"
    )
    p.add_argument("--parallel", type=int, default=8, help="training processes at once")
    p.add_argument("--aggregate-only", action="store_true")
    p.add_argument("--no-retention", action="store_true", help="skip the text-following / Frechet score")
    p.add_argument("--device", default=None)
    p.add_argument("train_args", nargs="*", help="extra flags for every run (after --)")
    args = p.parse_args()
    args.ablations = False  # bench_convergence.curves reads it
    args.second_args = shlex.split(args.second_flags)
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    continual = "continual" in args.parts
    if not args.aggregate_only:
        t0 = time.time()
        bc.limit_threads(args.parallel)
        labels = args.variants or list(RETENTION)
        flag_sets = {tuple(RETENTION[label][1]) for label in labels}
        bc.prepare(args, {args.condition}, [list(f) for f in sorted(flag_sets)])
        if continual:
            bc.prepare(args, {args.second}, [args.second_args])
        first = retention_jobs(args) if "retention" in args.parts else []
        if continual and not first:  # A alone
            first = [j for j in retention_jobs(args) if f"-{args.first_variant}-" in j[0]]
        run_all(args, first)
        if continual:
            run_all(args, adapt_jobs(args))
            evaluate_continual(args, device)
        print(f"all runs: {time.time() - t0:.0f}s", flush=True)
        if not args.no_retention:
            (args.out / "retention").mkdir(exist_ok=True)
            base = args.out / "retention" / "_base.json"
            if not base.exists():
                base.write_text(json.dumps(bc.retention(None, device)))
            for name, _ in retention_jobs(args) + (adapt_jobs(args) if continual else []):
                run_dir, path = args.out / "runs" / name, args.out / "retention" / f"{name}.json"
                if (run_dir / "controlnet").is_dir() and not path.exists():
                    path.write_text(json.dumps(bc.retention(run_dir, device)))
    rows = bc.summarize(args)
    first_rows = {k: v for k, v in rows.items() if k.startswith(f"{args.condition}-")}
    md, agg = bc.tables(first_rows) if first_rows else ("(no retention-part runs)", {})
    md = f"## Retention sources ({args.condition})\n\n{md}"
    base_ret = args.out / "retention" / "_base.json"
    if base_ret.exists():
        b = json.loads(base_ret.read_text())
        md += (
            f"\n\nBase model alone (no ControlNet): text-following single {b['single_correct']:.2f}, "
            f"two L-R {b['two_left_right']:.2f}, Frechet {b['frechet']:.2f}."
        )
    cont_agg = {}
    if continual:
        cmd, cont_agg = continual_table(args, rows)
        md += f"\n\n## Continual adaptation ({args.condition} -> {args.second})\n\n{cmd}"
    (args.out / "results.md").write_text(md + "\n")
    payload = {"runs": rows, "groups": agg, "continual": cont_agg}
    (args.out / "results.json").write_text(json.dumps(payload, indent=1, default=str))
    if first_rows:
        bc.curves(args, first_rows, args.out / "curves.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
