"""Quality measures of the toy world's models on held-out renders.

- VAE: PSNR of reconstructions;
- annotators: RMSE of normalised inverse depth, mean angular error of normals, mIoU of classes;
- base model: text following, scored on generated images with the segmentation annotator (which
  shape is where) and hue statistics (which colour it has).

Held-out scenes come from the ``validation`` seed stream (:func:`scene.split_seed`), which never
meets the training stream.
"""

from __future__ import annotations

import math
import random

import torch

from .scene import COLOURS, FLOOR_COLOURS, SHAPES, _noun_phrase, split_seed
from .world import render_scenes


def rgb_to_hsv(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[N, 3, H, W]`` RGB in [0, 1] -> hue in degrees [0, 360), saturation and value, each [N, H, W]."""
    r, g, b = rgb.unbind(dim=1)
    v, _ = rgb.max(dim=1)
    mn, _ = rgb.min(dim=1)
    delta = v - mn
    safe = delta.clamp_min(1e-8)
    h = torch.where(
        v == r, ((g - b) / safe) % 6.0, torch.where(v == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)
    )
    h = torch.where(delta > 0, h * 60.0, 0.0) % 360.0
    s = torch.where(v > 0, delta / v.clamp_min(1e-8), 0.0)
    return h, s, v


_COLOUR_HUES = rgb_to_hsv(torch.tensor(list(COLOURS.values()))[:, :, None, None])[0].reshape(-1)


def colour_ids(rgb: torch.Tensor, min_saturation: float = 0.3, min_value: float = 0.12) -> torch.Tensor:
    """Name each pixel's colour by the nearest hue of :data:`scene.COLOURS` (-1 for greys and darks).

    Args:
        rgb (`torch.Tensor`): float ``[N, 3, H, W]`` in [0, 1].
        min_saturation (`float`, defaults to 0.3): less saturated pixels (floor, sky, highlights) get -1.
        min_value (`float`, defaults to 0.12): darker pixels get -1.

    Returns:
        `torch.Tensor`: int64 ``[N, H, W]`` indices into ``COLOURS`` or -1.
    """
    h, s, v = rgb_to_hsv(rgb.float())
    ref = _COLOUR_HUES.to(rgb.device)
    dist = (h[..., None] - ref).abs()
    dist = torch.minimum(dist, 360.0 - dist)  # circular hue distance
    ids = dist.argmin(dim=-1)
    return torch.where((s >= min_saturation) & (v >= min_value), ids, -1)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of ``[N, C, H, W]`` images in [0, 1]."""
    mse = (x.float() - y.float()).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-12)
    return 10.0 * torch.log10(1.0 / mse)


def depth_rmse(pred: torch.Tensor, target: torch.Tensor) -> float:
    """RMSE over all pixels of normalised inverse depth maps ``[N, 1, H, W]``."""
    return float((pred.float() - target.float()).pow(2).mean().sqrt())


def normal_angle_error(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean angle in degrees between unit normal maps ``[N, 3, H, W]`` over all pixels."""
    cos = (torch.nn.functional.normalize(pred.float(), dim=1) * target.float()).sum(dim=1).clamp(-1.0, 1.0)
    return float(torch.rad2deg(torch.acos(cos)).mean())


def mean_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int = 6) -> float:
    """Mean intersection-over-union over the classes present in ``target`` or ``pred`` ([N, H, W] ids)."""
    ious = []
    for c in range(num_classes):
        p, t = pred == c, target == c
        union = (p | t).sum()
        if union > 0:
            ious.append(float((p & t).sum()) / float(union))
    return sum(ious) / max(len(ious), 1)


def text_following_prompts(seed: int = 0, n_single_repeats: int = 4, n_two: int = 128) -> list[dict]:
    """Prompts whose outcome can be scored: every colour x shape alone, and two-object relations.

    Args:
        seed (`int`, defaults to 0): choice of floors, pairs and phrasing.
        n_single_repeats (`int`, defaults to 4): samples of each of the 32 single-object prompts.
        n_two (`int`, defaults to 128): two-object prompts (distinct shapes and colours).

    Returns:
        `list[dict]`: ``{"prompt", "objects": [(colour, shape), ...] left to right, "kind"}``.
    """
    rng = random.Random(seed)
    floors = list(FLOOR_COLOURS)
    specs = []
    for colour in COLOURS:
        for shape in SHAPES:
            for _ in range(n_single_repeats):
                floor = rng.choice(floors)
                prompt = f"{_noun_phrase(colour, shape)} on {_noun_phrase(floor, 'floor')}"
                specs.append({"prompt": prompt, "objects": [(colour, shape)], "kind": "single"})
    for _ in range(n_two):
        c1, c2 = rng.sample(list(COLOURS), 2)
        s1, s2 = rng.sample(list(SHAPES), 2)
        a, b = _noun_phrase(c1, s1), _noun_phrase(c2, s2)
        floor = _noun_phrase(rng.choice(floors), "floor")
        relation = f"{a} to the left of {b}" if rng.random() < 0.5 else f"{b} to the right of {a}"
        specs.append({"prompt": f"{relation} on {floor}", "objects": [(c1, s1), (c2, s2)], "kind": "two"})
    return specs


def score_text_following(images: torch.Tensor, classes: torch.Tensor, specs: list[dict]) -> dict:
    """Score images against their prompts' objects.

    Args:
        images (`torch.Tensor`): float ``[N, 3, H, W]`` in [0, 1].
        classes (`torch.Tensor`): int64 ``[N, H, W]`` toy class ids (from the segmentation annotator).
        specs (`list[dict]`): from :func:`text_following_prompts`.

    Returns:
        `dict`: ``single_correct`` (share of single-object images whose dominant object shape and
        colour are right), ``two_both_present``, ``two_left_right`` (both present and in the right
        order, over all two-object prompts), ``two_left_right_given_present``, and counts.
    """
    colours, shapes = list(COLOURS), list(SHAPES)
    col = colour_ids(images)
    min_px = max(4, round(12 * images.shape[-1] * images.shape[-2] / 4096))
    xs = torch.arange(images.shape[-1], device=images.device, dtype=torch.float32)[None, :]
    single, both, order = [], [], []
    for i, spec in enumerate(specs):
        cls_i, col_i = classes[i], col[i]
        if spec["kind"] == "single":
            colour, shape = spec["objects"][0]
            obj = cls_i >= 2
            if int(obj.sum()) < min_px:
                single.append(False)
                continue
            shape_ok = int(torch.bincount(cls_i[obj], minlength=6).argmax()) == shapes.index(shape) + 2
            coloured = col_i[obj & (col_i >= 0)]
            colour_ok = coloured.numel() > 0 and int(
                torch.bincount(coloured, minlength=8).argmax()
            ) == colours.index(colour)
            single.append(bool(shape_ok and colour_ok))
            continue
        centroids = []
        for colour, shape in spec["objects"]:
            mask = (cls_i == shapes.index(shape) + 2) & (col_i == colours.index(colour))
            count = int(mask.sum())
            centroids.append(float((mask.float() * xs).sum()) / count if count >= min_px else None)
        present = all(c is not None for c in centroids)
        both.append(present)
        order.append(present and centroids[0] < centroids[1])
    mean = lambda v: sum(v) / len(v) if v else float("nan")  # noqa: E731
    n_present = sum(both)
    return {
        "single_correct": mean(single),
        "two_both_present": mean(both),
        "two_left_right": mean(order),
        "two_left_right_given_present": sum(order) / n_present if n_present else float("nan"),
        "n_single": len(single),
        "n_two": len(both),
    }


def ground_truth_specs(out: dict) -> tuple[list[int], list[dict]]:
    """Specs for rendered scenes with one object or two objects side by side (scorer calibration)."""
    keep, specs = [], []
    for i, objs in enumerate(out["objects"]):
        if len(objs) == 1:
            keep.append(i)
            specs.append({"objects": [(objs[0]["colour"], objs[0]["shape"])], "kind": "single"})
        elif len(objs) == 2 and objs[1]["x"] - objs[0]["x"] >= 0.1 and objs[0]["shape"] != objs[1]["shape"]:
            if objs[0]["colour"] != objs[1]["colour"]:
                keep.append(i)
                specs.append({"objects": [(o["colour"], o["shape"]) for o in objs], "kind": "two"})
    return keep, specs


@torch.no_grad()
def evaluate_vae(vae, n: int = 512, seed: int = 0, device: str = "cpu", resolution: int = 64) -> dict:
    """PSNR (dB, images in [0, 1]) of ``decode(encode(x).mode())`` on held-out renders."""
    out = render_scenes(n, split_seed(seed, "validation"), resolution, device=device)
    values = []
    dtype = next(vae.parameters()).dtype
    for x in out["rgb"].split(128):
        lat = vae.encode((x * 2 - 1).to(dtype)).latent_dist.mode()
        rec = (vae.decode(lat).sample.float().clamp(-1, 1) + 1) / 2
        values.append(psnr(rec, x))
    v = torch.cat(values)
    return {"psnr_mean": float(v.mean()), "psnr_min": float(v.min()), "n": n}


@torch.no_grad()
def evaluate_annotators(
    models: dict,
    n: int = 512,
    seed: int = 0,
    device: str = "cpu",
    resolution: int = 64,
    domain: str = "default",
) -> dict:
    """Depth RMSE, normal angular error (degrees) and segmentation mIoU on held-out renders of ``domain``."""
    out = render_scenes(n, split_seed(seed, "validation"), resolution, device=device, domain=domain)
    result = {}
    for kind, model in models.items():
        dtype = next(model.parameters()).dtype
        pred = torch.cat([model(x.to(dtype)).float() for x in out["rgb"].split(64)])
        if kind == "depth":
            result["depth_rmse"] = depth_rmse(pred, out["inv_depth"])
        elif kind == "normal":
            result["normal_angle_deg"] = normal_angle_error(pred, out["normal"])
        else:
            result["segmentation_miou"] = mean_iou(pred.argmax(dim=1), out["classes"])
    return {f"{k}@{resolution}": round(v, 5) for k, v in result.items()}


@torch.no_grad()
def generate(
    pipe,
    prompts: list[str],
    seed: int = 0,
    steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 256,
):
    """Sample one image per prompt with the pipeline; image ``i`` uses generator seed ``seed + i``."""
    device = pipe.device
    images = []
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo : lo + batch_size]
        gens = [torch.Generator(device).manual_seed(seed + lo + i) for i in range(len(chunk))]
        out = pipe(
            chunk, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gens, output_type="pt"
        )
        images.append(out.images.float().cpu())
    return torch.cat(images)


@torch.no_grad()
def evaluate_text_following(
    pipe, segmenter, seed: int = 0, steps: int = 25, guidance_scale: float = 7.5, **kw
) -> dict:
    """Generate the :func:`text_following_prompts` and score them (see :func:`score_text_following`)."""
    specs = text_following_prompts(seed, **kw)
    images = generate(
        pipe, [s["prompt"] for s in specs], seed=seed, steps=steps, guidance_scale=guidance_scale
    )
    dtype = next(segmenter.parameters()).dtype
    dev = next(segmenter.parameters()).device
    classes = torch.cat([segmenter(x.to(dev, dtype)).argmax(dim=1).cpu() for x in images.split(128)])
    scores = score_text_following(images, classes, specs)
    scores.update(steps=steps, guidance_scale=guidance_scale)
    return {k: (round(v, 4) if isinstance(v, float) and not math.isnan(v) else v) for k, v in scores.items()}


GRID_PROMPTS: tuple[str, ...] = (
    "a red sphere on a grey floor",
    "a blue box on a white floor",
    "a green cylinder on a brown floor",
    "a yellow cone on a black floor",
    "a purple sphere to the left of an orange box on a grey floor",
    "a cyan cone to the right of a pink cylinder on a white floor",
    "a red box in front of a blue sphere on a brown floor",
    "a green sphere, a yellow box and a purple cone on a grey floor",
)


@torch.no_grad()
def save_sample_grid(pipe, path, prompts: tuple[str, ...] = GRID_PROMPTS, per_prompt: int = 4, seed: int = 0, scale: int = 2,
                     steps: int = 25, guidance_scale: float = 7.5) -> None:  # fmt: skip
    """Write a PNG grid: one row per prompt (its text, then ``per_prompt`` samples)."""
    from PIL import Image, ImageDraw

    flat = [p for p in prompts for _ in range(per_prompt)]
    images = generate(pipe, flat, seed=seed, steps=steps, guidance_scale=guidance_scale)
    size = images.shape[-1] * scale
    label_w, pad = 330, 4
    grid = Image.new("RGB", (label_w + per_prompt * (size + pad), len(prompts) * (size + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for r, prompt in enumerate(prompts):
        y = r * (size + pad)
        words, lines = prompt.split(), [""]
        for w in words:  # wrap the prompt to the label column
            lines[-1] = f"{lines[-1]} {w}".strip() if len(lines[-1]) + len(w) < 44 else lines[-1]
            if not lines[-1].endswith(w):
                lines.append(w)
        for j, line in enumerate(lines):
            draw.text((4, y + 4 + 12 * j), line, fill=(0, 0, 0))
        for c in range(per_prompt):
            arr = (
                (images[r * per_prompt + c].permute(1, 2, 0).clamp(0, 1).numpy() * 255)
                .round()
                .astype("uint8")
            )
            tile = Image.fromarray(arr).resize((size, size), Image.NEAREST)
            grid.paste(tile, (label_w + c * (size + pad), y))
    grid.save(path)
