"""The toy world's public renderer: scenes -> RGB, depth, normals, classes and captions."""

from __future__ import annotations

import torch

from .domains import get_domain
from .render import BACKGROUND_DEPTH, render_batch
from .scene import MAX_OBJECTS, SHAPES, Domain, make_caption, sample_scenes

TOY_CLASS_NAMES: tuple[str, ...] = ("background", "floor", *SHAPES)
"""Names of the class ids in ``classes`` maps: 0 background (sky), 1 floor, 2.. one per shape."""

VISIBLE_FRACTION = 0.005
"""An object is named in the caption when at least this share of the image shows it (20 px at 64x64)."""

_RAYS_PER_CHUNK = {"cpu": 32 * 64 * 64, "cuda": 8192 * 64 * 64}  # primary rays per ray-casting pass


def _resolve_device(device: str | torch.device | None) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def normalised_inverse_depth(depth: torch.Tensor) -> torch.Tensor:
    """Per-image min-max normalised inverse depth, as ControlNet depth hints (near = bright).

    Args:
        depth (`torch.Tensor`): float ``[N, 1, H, W]`` camera-space depth; background pixels hold
            ``BACKGROUND_DEPTH`` (their inverse depth counts as 0).

    Returns:
        `torch.Tensor`: float ``[N, 1, H, W]`` in [0, 1]: ``(1/d - min) / (max - min)`` per image.
    """
    inv = torch.where(depth < BACKGROUND_DEPTH, 1.0 / depth.clamp_min(1e-6), 0.0)
    lo = inv.amin(dim=(1, 2, 3), keepdim=True)
    hi = inv.amax(dim=(1, 2, 3), keepdim=True)
    return ((inv - lo) / (hi - lo).clamp_min(1e-8)).clamp(0.0, 1.0)


def normal_to_rgb(normal: torch.Tensor) -> torch.Tensor:
    """Colour camera-space normals as a ControlNet 1.1 normal hint (ScanNet / NormalBae convention).

    The toy world's normals are in OpenGL camera space (x right, y up, z towards the viewer); the
    hint shows red = facing left, green = facing up, blue = facing the camera.

    Args:
        normal (`torch.Tensor`): float ``[N, 3, H, W]`` unit normals.

    Returns:
        `torch.Tensor`: float ``[N, 3, H, W]`` in [0, 1]: ``((1 - x) / 2, (1 + y) / 2, (1 + z) / 2)``.
    """
    if normal.ndim != 4 or normal.shape[1] != 3:
        raise ValueError(f"normal must be [N, 3, H, W], got shape {tuple(normal.shape)}")
    sign = torch.tensor([-1.0, 1.0, 1.0], device=normal.device, dtype=normal.dtype)[None, :, None, None]
    return ((normal * sign + 1.0) * 0.5).clamp(0.0, 1.0)


def rgb_to_normal(rgb: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normal_to_rgb`: a normal hint ``[N, 3, H, W]`` in [0, 1] -> unit normals."""
    sign = torch.tensor([-1.0, 1.0, 1.0], device=rgb.device, dtype=rgb.dtype)[None, :, None, None]
    return torch.nn.functional.normalize((rgb * 2.0 - 1.0) * sign, dim=1)


def _visible_objects(out: dict, scenes, res: int, colours: list[str]) -> list[list[dict]]:
    """Per scene: the objects that cover at least ``VISIBLE_FRACTION`` of the image."""
    n, k = len(scenes), MAX_OBJECTS
    slot = out["slot"].reshape(n, -1)  # [N, P], -1 where no object
    hit = slot >= 0
    idx = slot.clamp_min(0)
    xs = (torch.arange(res, device=slot.device, dtype=torch.float32) + 0.5) / res
    px = xs[None, :].expand(res, res).reshape(1, -1).expand(n, -1)
    depth = out["depth"].reshape(n, -1)
    zeros = torch.zeros(n, k, device=slot.device)
    count = zeros.scatter_add(1, idx, hit.float())
    sum_x = zeros.scatter_add(1, idx, px * hit)
    sum_d = zeros.scatter_add(1, idx, depth * hit)
    stats = torch.stack([count, sum_x, sum_d], -1).cpu()
    shape, colour = scenes.shape.cpu(), scenes.colour.cpu()
    shapes = list(SHAPES)
    result = []
    for i in range(n):
        objs = []
        for j in range(k):
            c, sx, sd = stats[i, j].tolist()
            if c >= VISIBLE_FRACTION * res * res:
                objs.append(
                    {
                        "shape": shapes[int(shape[i, j])],
                        "colour": colours[int(colour[i, j])],
                        "x": sx / c,
                        "depth": sd / c,
                        "pixels": int(c),
                    }
                )
        result.append(sorted(objs, key=lambda o: o["x"]))
    return result


def render_scenes(
    n: int,
    seed: int,
    resolution: int = 64,
    device: str | torch.device | None = None,
    *,
    start: int = 0,
    supersample: int = 2,
    chunk: int | None = None,
    domain: str | Domain = "default",
) -> dict:
    """Render ``n`` toy-world scenes with exact depth, normals, classes and captions.

    Scene ``i`` (global index ``start + i``) of ``seed`` is the same whatever ``n``, ``start``,
    ``chunk`` or the device, so datasets can be rendered piecewise and split by index.

    Args:
        n (`int`): number of scenes.
        seed (`int`): scene stream.
        resolution (`int`, defaults to 64): square image size in pixels (e.g. 64 or 128).
        device (`str` or `torch.device`, *optional*): where to render; CPU when omitted.
        start (`int`, defaults to 0): global index of the first scene.
        supersample (`int`, defaults to 2): RGB samples per pixel along each axis (antialiasing).
        chunk (`int`, *optional*): scenes per ray-casting pass (memory vs speed); when omitted,
            32 (CPU) or 8192 (GPU) at 64 px, fewer at higher resolutions.
        domain (`str` or [`Domain`], defaults to `"default"`): which world to draw from
            (:func:`~.domains.domain_names`); ``"default"`` is the base model's own world.

    Returns:
        `dict` with
        - ``rgb``: float ``[N, 3, H, W]`` in [0, 1];
        - ``depth``: float ``[N, 1, H, W]`` camera-space depth along the view axis
          (``BACKGROUND_DEPTH`` = 1000 for sky);
        - ``inv_depth``: float ``[N, 1, H, W]`` per-image min-max normalised inverse depth in
          [0, 1] (near = bright; sky = 0 when visible), the ControlNet depth-hint convention;
        - ``normal``: float ``[N, 3, H, W]`` unit normals in OpenGL camera space (x right, y up,
          z towards the viewer; sky = (0, 0, 1)); :func:`normal_to_rgb` makes the hint;
        - ``classes``: int64 ``[N, H, W]`` ids into :data:`TOY_CLASS_NAMES`;
        - ``captions``: `list[str]` generated from the visible objects;
        - ``objects``: per scene, the visible objects left to right as dicts with ``shape``,
          ``colour``, ``x`` (centroid, fraction of the width), ``depth`` and ``pixels``;
        - ``floor``: `list[str]` floor colour names.
    """
    problems = []
    if not isinstance(n, int) or n < 0:
        problems.append(f"n must be a non-negative int, got {n!r}")
    if not isinstance(resolution, int) or resolution < 8 or resolution % 8:
        problems.append(f"resolution must be a positive multiple of 8 (e.g. 64 or 128), got {resolution!r}")
    if not isinstance(supersample, int) or supersample < 1:
        problems.append(f"supersample must be an int >= 1, got {supersample!r}")
    if not isinstance(start, int) or start < 0:
        problems.append(f"start must be a non-negative int, got {start!r}")
    try:
        dom = get_domain(domain)
    except ValueError as err:
        problems.append(str(err))
    if problems:
        raise ValueError("render_scenes: " + "; ".join(problems))
    dev = _resolve_device(device)
    chunk = chunk or max(1, _RAYS_PER_CHUNK.get(dev.type, 1024 * 64 * 64) // (resolution * resolution))
    index = torch.arange(start, start + n, dtype=torch.int64, device=dev)
    parts: dict[str, list] = {k: [] for k in ("rgb", "depth", "normal", "classes", "objects")}
    captions, floors = [], []
    floor_names, colour_names = list(dom.floor_colours), list(dom.colours)
    for lo in range(0, n, chunk):
        scenes = sample_scenes(seed, index[lo : lo + chunk], dom)
        out = render_batch(scenes, resolution, supersample)
        objects = _visible_objects(out, scenes, resolution, colour_names)
        phrasing = scenes.phrasing.tolist()
        for i, floor in enumerate(scenes.floor_colour.tolist()):
            floors.append(floor_names[floor])
            captions.append(make_caption(objects[i], floor_names[floor], phrasing[i]))
        for key in ("rgb", "depth", "normal", "classes"):
            parts[key].append(out[key])
        parts["objects"].extend(objects)
    empty = {
        "rgb": (3, torch.float32),
        "depth": (1, torch.float32),
        "normal": (3, torch.float32),
    }
    result: dict = {}
    for key, (c, dt) in empty.items():
        result[key] = (
            torch.cat(parts[key]) if n else torch.zeros(0, c, resolution, resolution, dtype=dt, device=dev)
        )
    result["classes"] = (
        torch.cat(parts["classes"])
        if n
        else torch.zeros(0, resolution, resolution, dtype=torch.long, device=dev)
    )
    result["inv_depth"] = normalised_inverse_depth(result["depth"])
    result["captions"] = captions
    result["objects"] = parts["objects"]
    result["floor"] = floors
    return result
