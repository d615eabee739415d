"""The convergence report from run folders written by hand (realistic config.json, metrics.jsonl, samples)."""

from __future__ import annotations

import base64
import io
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from difftune_control.convergence import SuddenConvergenceDetector
from difftune_control.report import build_report, load_run, main
from difftune_control.report.runs import dedupe_resumed
from difftune_control.utils import atomic_save_safetensors

RES, K = 32, 4


def _scene(k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A toy depth hint (discs on a floor gradient) and a matching colour image, [3,H,W] in [0,1]."""
    yy, xx = np.mgrid[0:RES, 0:RES] / RES
    depth = 0.15 + 0.35 * yy
    img = np.stack([0.55 + 0.2 * yy, 0.5 + 0.1 * yy, 0.45 + 0.0 * yy])
    for _ in range(2 + k % 2):
        cx, cy, r = rng.uniform(0.25, 0.75), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.2)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        depth = np.where(disc, rng.uniform(0.6, 0.95), depth)
        img = np.where(disc[None], rng.uniform(0, 1, size=(3, 1, 1)), img)
    return np.repeat(depth[None], 3, 0), img


def write_run(
    path: Path,
    *,
    method: str = "vanilla",
    split: str = "fixed",
    jump_at: int | None = 300,
    steps: int = 1000,
    every: int = 50,
    seed: int = 0,
    end: bool = True,
    truncate_last_line: bool = False,
    noise: float = 0.02,
    d0: float = 0.31,
    floor: float = 0.06,
    d_noise: float = 0.0,
) -> Path:
    """A realistic run folder: train records every 10 steps, detector evaluations every `every`
    steps run through the real detector (so events are what it would log), samples files."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    config = {
        "model": {"pretrained_model_name_or_path": None},
        "data": {"condition": "depth", "resolution": RES},
        "method": {"method": method, "split": split, "psi_power": 1.0, "bank_share": 0.2, "bank_weight": 0.1},
        "bank": {"bank_size": 2000},
        "detector": {
            "detect_convergence": True,
            "convergence_every": every,
            "convergence_samples": K,
            "convergence_num_inference_steps": 10,
            "convergence_guidance_scale": 1.0,
            "convergence_threshold": 0.3,
            "convergence_patience": 2,
            "stop_after_convergence": None,
        },
        "train": {"seed": seed, "train_batch_size": 64, "learning_rate": 1e-4, "max_train_steps": steps},
        "condition": {
            "name": "depth",
            "metric": {"name": "depth_rmse_aligned", "description": "RMSE after scale-and-shift alignment"},
            "detector": {"threshold": 0.3, "patience": 2, "milestones": [0.25, 0.5, 0.75]},
        },
        "version": "0.1.0",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    scenes = [_scene(k, rng) for k in range(K)]
    hints = np.stack([s[0] for s in scenes])
    reals = np.stack([s[1] for s in scenes])
    det = SuddenConvergenceDetector()
    det.set_reference(d0, floor)
    lines, t = [], 0.0
    for step in range(0, steps + 1):
        t += 0.1
        if step and step % 10 == 0:
            loss_t = 0.12 * math.exp(-step / 600) + 0.05 + float(rng.normal(0, 0.01))
            loss_b = None if method == "vanilla" else 0.08 + float(rng.normal(0, 0.008))
            lines.append(
                {"type": "train", "step": step, "time": t, "loss": loss_t, "loss_target": loss_t,
                 "loss_bank": loss_b, "bank_share": 0.0 if loss_b is None else 0.2, "lr": 1e-4,
                 "images_per_s": 640.0, "bank_weight": None if loss_b is None else (0.4 if step < 200 else 0.9)}
            )  # fmt: skip
        if step % every == 0:
            if jump_at is None:
                p_true = 0.05
            else:
                x = (step - jump_at) / 40.0
                p_true = 0.05 + 0.4 / (1 + math.exp(-x)) + 0.3 * max(0.0, (step - jump_at) / steps)
            d_per = [
                d0 - (p_true + float(rng.normal(0, noise))) * (d0 - floor) + float(rng.normal(0, d_noise))
                for _ in range(K)
            ]
            d = float(np.mean(d_per))
            events = det.update(step, d)
            p = det.history[-1]["p"]
            rel = f"samples/eval-step{step:07d}.safetensors"
            mix = float(np.clip(p_true, 0, 1))
            gray = rng.uniform(0.2, 0.8, size=(K, 1, RES, RES)).repeat(3, 1)
            sample = np.clip((1 - mix) * rng.uniform(0.3, 0.7, size=reals.shape) + mix * reals, 0, 1)
            reex = np.clip((1 - mix) * gray + mix * hints, 0, 1)
            u8 = {k: torch.from_numpy((v * 255).round().astype(np.uint8)) for k, v in
                  {"hint": hints, "sample": sample, "reextracted": reex}.items()}  # fmt: skip
            atomic_save_safetensors(
                u8, path / rel, metadata={"prompts": json.dumps([f"scene {i}" for i in range(K)])}
            )
            t += 0.4
            lines.append(
                {"type": "convergence_eval", "step": step, "time": t, "d": d, "d_per_sample": d_per, "p": p,
                 "d0": d0, "d_floor": floor, "eval_seconds": 0.4, "samples": rel}
            )  # fmt: skip
            for e in events:
                e["time"] = t
                lines.append(e)
        if step and step % 250 == 0:
            lines.append({"type": "checkpoint", "step": step, "time": t, "path": f"checkpoint-{step}"})
    if end:
        lines.append({"type": "end", "step": steps, "time": t, "reason": "max_steps", "images_per_s": 640.0})
    text = "".join(json.dumps(r) + "\n" for r in lines)
    if truncate_last_line:
        text = text + '{"type": "train", "step": 99'  # a run killed mid-write
    (path / "metrics.jsonl").write_text(text)
    return path


def records_of(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.endswith("}")]


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.imgs, self.errors, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs))
        elif tag not in {"meta", "br", "link"}:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unbalanced </{tag}> (open: {self.stack[-3:]})")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def check_html(path: Path) -> _Collector:
    """Parse the page: balanced tags, no external resource, every image a decodable embedded PNG."""
    from PIL import Image

    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>")
    parser = _Collector()
    parser.feed(text)
    parser.close()
    assert parser.errors == [] and parser.stack == []
    assert parser.imgs, "the report embeds its figures"
    for img in parser.imgs:
        src = img["src"]
        assert src.startswith("data:image/png;base64,")
        raw = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(io.BytesIO(raw)) as im:
            im.verify()
        assert img.get("alt")
    for needle in ("http://", "https://", "<script", "<link"):
        assert needle not in text
    return parser


def test_single_converged_run(tmp_path):
    run_dir = write_run(tmp_path / "depth-vanilla", jump_at=300)
    out = build_report([run_dir])
    assert out == run_dir / "report"
    for name in ("convergence.png", "samples.png", "report.md", "report.html", "summary.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())["runs"][0]
    recs = records_of(run_dir)
    event = next(r for r in recs if r["type"] == "convergence_event")
    evals = [r for r in recs if r["type"] == "convergence_eval"]
    assert summary["converged"] is True
    assert (
        summary["convergence_step"] == event["step"] and summary["confirmed_step"] == event["confirmed_step"]
    )
    assert 250 <= event["step"] <= 350  # the synthetic jump is at 300
    for r in recs:
        if r["type"] == "milestone":
            assert summary["milestones"][f"{r['level']:g}"] == r["step"]
    assert summary["final_p"] == pytest.approx(evals[-1]["p"]) and summary["final_d"] == pytest.approx(
        evals[-1]["d"]
    )
    assert summary["d0"] == 0.31 and summary["d_floor"] == 0.06
    assert summary["steps_trained"] == 1000 and summary["in_progress"] is False
    assert summary["eval_cost_share"] == pytest.approx(
        sum(r["eval_seconds"] for r in evals) / recs[-1]["time"]
    )
    assert summary["label"] == "vanilla" and summary["condition"] == "depth"
    md = (out / "report.md").read_text()
    assert (
        f"sudden convergence at step {event['step']}" in md and "![convergence curves](convergence.png)" in md
    )
    page = check_html(out / "report.html")
    assert len(page.imgs) == 2
    assert f"sudden convergence at step {event['step']}" in "".join(page.text)


def test_a_diff_tuning_run_lists_its_bank_settings_and_measured_lambdas(tmp_path):
    run = write_run(tmp_path / "dt", method="difftuning")
    md = (build_report([run]) / "report.md").read_text()
    assert "- bank weight lambda, as logged: 0.4 at step 10, 0.9 at step 200" in md
    plain = (build_report([write_run(tmp_path / "v")], tmp_path / "v-report") / "report.md").read_text()
    assert "lambda" not in plain and "Diff-Tuning:" not in plain


def test_not_converged_and_in_progress(tmp_path):
    run_dir = write_run(tmp_path / "flat", jump_at=None, steps=400, end=False, truncate_last_line=True)
    out = build_report([run_dir], tmp_path / "out")
    summary = json.loads((out / "summary.json").read_text())["runs"][0]
    evals = [r for r in records_of(run_dir) if r["type"] == "convergence_eval"]
    assert summary["converged"] is False and summary["convergence_step"] is None
    assert summary["in_progress"] is True
    assert summary["status"].startswith(f"not converged by step 400, p = {evals[-1]['p']:.2f}")
    assert "in progress" in summary["status"]
    assert (out / "samples.png").is_file()
    check_html(out / "report.html")


def test_several_runs_overlaid_with_speedup(tmp_path):
    vanilla = write_run(tmp_path / "runs" / "depth-vanilla", jump_at=350, seed=0)
    fixed = write_run(tmp_path / "runs" / "depth-fixed", method="difftuning", jump_at=250, seed=0)
    slow = write_run(
        tmp_path / "runs" / "depth-mixture", method="difftuning", split="mixture", jump_at=None, seed=0
    )
    out = build_report([vanilla, fixed, slow])
    assert out.parent == (tmp_path / "runs").resolve() and out.name.startswith("report-")
    runs = {s["name"]: s for s in json.loads((out / "summary.json").read_text())["runs"]}
    v, f, m = runs["depth-vanilla"], runs["depth-fixed"], runs["depth-mixture"]
    assert v["vs_vanilla"] is None and f["label"] == "difftuning (fixed)"
    conv = f["vs_vanilla"]["convergence"]
    assert f["vs_vanilla"]["reference"] == "depth-vanilla"
    assert conv["speedup"] == pytest.approx(v["convergence_step"] / f["convergence_step"])
    assert conv["percent_sooner"] == pytest.approx(100 * (1 - f["convergence_step"] / v["convergence_step"]))
    assert conv["speedup"] > 1.0
    quarter = f["vs_vanilla"]["milestones"]["0.25"]
    assert quarter["vanilla_steps"] == v["milestones"]["0.25"] and quarter["steps"] == f["milestones"]["0.25"]
    assert m["vs_vanilla"]["convergence"]["speedup"] is None
    assert "not there by step 1000" in m["vs_vanilla"]["convergence"]["note"]
    html_text = (out / "report.html").read_text()
    assert "Speed-up against vanilla" in html_text and f"{conv['speedup']:.2f}×" in html_text
    check_html(out / "report.html")


def test_caveat_when_the_reference_gap_is_within_noise(tmp_path):
    noisy = write_run(tmp_path / "noisy", jump_at=None, steps=200, d0=0.31, floor=0.30, d_noise=0.05)
    clean = write_run(tmp_path / "clean", jump_at=None, steps=200)
    s_noisy = json.loads((build_report([noisy]) / "summary.json").read_text())["runs"][0]
    s_clean = json.loads((build_report([clean]) / "summary.json").read_text())["runs"][0]
    assert s_clean["caveats"] == []
    assert len(s_noisy["caveats"]) == 1 and "sampling noise" in s_noisy["caveats"][0]
    assert "caveat: d0 - d_floor" in (noisy / "report" / "report.html").read_text()


def test_resumed_log_reads_as_one_run():
    recs = [
        {"type": "train", "step": 10},
        {"type": "convergence_eval", "step": 50, "p": 0.1},
        {"type": "checkpoint", "step": 50},
        {"type": "convergence_eval", "step": 100, "p": 0.4},
        {"type": "milestone", "step": 100, "level": 0.25, "p": 0.4},
        {"type": "train", "step": 60},  # resumed from checkpoint-50
        {"type": "convergence_eval", "step": 100, "p": 0.41},
        {"type": "milestone", "step": 100, "level": 0.25, "p": 0.41},
    ]
    out = dedupe_resumed(recs)
    assert [r["type"] for r in out] == [
        "train",
        "convergence_eval",
        "checkpoint",
        "train",
        "convergence_eval",
        "milestone",
    ]
    assert out[-1]["p"] == 0.41


def test_not_a_run_folder_errors_name_the_file(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="run folder not found"):
        load_run(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="not a run folder: missing metrics.jsonl"):
        load_run(tmp_path / "half")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="missing config.json and metrics.jsonl"):
        build_report([tmp_path / "empty"])
    assert main([str(tmp_path / "half")]) == 2
    assert "missing metrics.jsonl" in capsys.readouterr().err


def test_cli_entry_point(tmp_path, capsys):
    run_dir = write_run(tmp_path / "r", jump_at=200, steps=500)
    assert main([str(run_dir), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "sudden convergence at step" in out and str(tmp_path / "rep" / "report.html") in out


@pytest.mark.slow
@pytest.mark.skipif(
    not Path("/usr/bin/chromium").exists(), reason="needs Debian's chromium (apt install chromium)"
)
def test_html_renders_in_headless_chromium(tmp_path):
    """Chromium, offline, renders the page with its embedded figures (the curves' blue shows up)."""
    import subprocess

    from PIL import Image

    out = build_report([write_run(tmp_path / "run", jump_at=300)])
    shot = tmp_path / "shot.png"
    cmd = [
        "/usr/bin/chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--window-size=1200,2200",
        f"--screenshot={shot}",
        (out / "report.html").as_uri(),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=180, env={"HOME": str(tmp_path)})
    with Image.open(shot) as im:
        rgb = np.asarray(im.convert("RGB")).astype(int)
    assert rgb.shape[:2] == (2200, 1200)
    blue = (np.abs(rgb - np.array([31, 119, 180])).sum(-1) < 30).sum()  # the d and p curves
    red = (np.abs(rgb - np.array([214, 39, 40])).sum(-1) < 30).sum()  # the convergence line
    assert blue > 500 and red > 200, (blue, red)


def test_progress_that_rounds_to_zero_reads_0_00_not_minus_0_00():
    from difftune_control.report.runs import _fmt

    assert [_fmt(-0.001), _fmt(-0.004), _fmt(-0.05), _fmt(0.304), _fmt(None)] == [
        "0.00",
        "0.00",
        "-0.05",
        "0.30",
        "n/a",
    ]


def test_the_report_names_the_gpu_memory_peak_of_each_part_of_the_run(tmp_path):
    run = write_run(tmp_path / "gpu", steps=300)
    records = records_of(run)
    for r in records:
        if r["type"] == "train":
            r["gpu_peak_gib"] = 13.5 if r["step"] < 60 else 16.0
        elif r["type"] == "convergence_eval":
            r["gpu_peak_gib"] = 16.0 if r["step"] == 50 else 12.25
        elif r["type"] == "checkpoint":
            r["gpu_peak_gib"] = 11.0
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    md = (build_report([run]) / "report.md").read_text()
    assert (
        "- GPU memory, peak allocated: the run 16.0 GiB, detector evaluations 16.0 GiB, checkpoints 11.0 GiB"
        in md
    )
    plain = (build_report([write_run(tmp_path / "cpu")], tmp_path / "cpu-report") / "report.md").read_text()
    assert "GPU memory" not in plain
