"""Scene graphs of the toy world: what is where, drawn from a counter-based hash.

Every random number of scene ``i`` of seed ``s`` is a pure function of ``(s, i, slot)``
(:func:`hash_uniform`), so a scene is the same whether it is drawn in a batch of 10 or 1000,
on the CPU or on the GPU, and datasets can be split by index without overlap.

World frame: y up, the floor is the plane y = 0, objects stand on it around the origin and the
camera looks at them from the +z side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MAX_OBJECTS = 4

SHAPES: tuple[str, ...] = ("sphere", "box", "cylinder", "cone")
"""Object shapes; shape ``k`` has class id ``k + 2`` in the class map."""

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.10, 0.08),
    "orange": (0.95, 0.48, 0.05),
    "yellow": (0.92, 0.84, 0.10),
    "green": (0.12, 0.68, 0.16),
    "cyan": (0.08, 0.72, 0.78),
    "blue": (0.10, 0.22, 0.88),
    "purple": (0.52, 0.16, 0.78),
    "pink": (0.96, 0.42, 0.68),
}
"""Object colours (albedo, display RGB); their hues are at least ~30 degrees apart."""

FLOOR_COLOURS: dict[str, tuple[float, float, float]] = {
    "grey": (0.50, 0.50, 0.50),
    "white": (0.86, 0.86, 0.83),
    "brown": (0.46, 0.31, 0.18),
    "black": (0.13, 0.13, 0.14),
}

# Probability of 1, 2, 3, 4 objects: one- and two-object scenes dominate, since those are the
# prompts whose text following is measured.
_N_OBJECT_PROBS = (0.30, 0.35, 0.20, 0.15)
_ROW_WIDTH = 3.2  # objects are spread over x in [-1.6, 1.6] (world units), one bin each
_DEPTH_SPREAD = 2.4  # and over z in [-1.2, 1.2]
_MASK32 = 0xFFFFFFFF
_N_SLOTS = 64  # random numbers per scene; append new parameters at the end to keep old scenes


def vocabulary() -> list[str]:
    """Return the toy world's word list, from which its CLIP tokenizer is built.

    Returns:
        `list[str]`: every word a caption can contain (lowercase, punctuation as its own word),
        without duplicates, in a fixed order.
    """
    words = ["a", "an", *COLOURS, *SHAPES, *[c for c in FLOOR_COLOURS if c not in COLOURS]]
    words += ["to", "the", "left", "right", "of", "in", "front", "behind", "and", "on", "floor", ","]
    return list(dict.fromkeys(words))


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for ``x`` in ``[0, 2**32)`` without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser: a bijective avalanche mix on int64 tensors in ``[0, 2**32)``."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def hash_uniform(seed: int, index: torch.Tensor, slot: int | torch.Tensor) -> torch.Tensor:
    """Counter-based uniform numbers in ``[0, 1)``: a pure function of ``(seed, index, slot)``.

    Args:
        seed (`int`): the stream (any non-negative integer; folded to 64 bits).
        index (`torch.Tensor`): int64 scene indices, any shape.
        slot (`int` or `torch.Tensor`): which random number of the scene; a tensor broadcasts
            against ``index`` (e.g. ``index[:, None]`` and ``slots[None, :]`` give a table).

    Returns:
        `torch.Tensor`: float32 of the broadcast shape, on ``index``'s device; the same numbers on
        every device.
    """
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    h = _fmix32(torch.full_like(index, (seed & _MASK32) ^ 0x9E3779B9) ^ (seed >> 32))
    h = _fmix32(h ^ (index & _MASK32))
    h = _fmix32(h ^ ((index >> 32) & _MASK32))
    h = _fmix32(h ^ ((torch.as_tensor(slot, device=index.device) * 0x61C88647 + 0x7F4A7C15) & _MASK32))
    return (h.double() / 2.0**32).float()


def split_seed(seed: int, split: str) -> int:
    """Derive the seed stream of a dataset split, so train and validation scenes never coincide.

    Args:
        seed (`int`): the user's seed.
        split (`str`): split name, e.g. ``"train"`` or ``"validation"``.

    Returns:
        `int`: a 64-bit seed; ``"train"`` keeps ``seed`` itself.
    """
    if split == "train":
        return int(seed)
    code = sum((i + 1) * 131 * ord(ch) for i, ch in enumerate(split)) & _MASK32
    mixed = _fmix32(torch.tensor([code ^ (int(seed) & _MASK32)], dtype=torch.int64)).item()
    return (int(mixed) << 32) | (int(seed) & _MASK32)


@dataclass
class SceneBatch:
    """Parameters of ``N`` scenes (tensors on one device; ``K = MAX_OBJECTS`` object slots each)."""

    index: torch.Tensor  # [N] int64 scene indices
    active: torch.Tensor  # [N, K] bool: slot holds an object
    shape: torch.Tensor  # [N, K] int64 index into SHAPES
    colour: torch.Tensor  # [N, K] int64 index into COLOURS
    albedo: torch.Tensor  # [N, K, 3]
    centre: torch.Tensor  # [N, K, 3] foot point on the floor (y = 0)
    yaw: torch.Tensor  # [N, K] rotation about the vertical axis, radians
    dims: torch.Tensor  # [N, K, 3] sphere (r, r, r); box half-extents; cylinder/cone (r, height, r)
    cam_pos: torch.Tensor  # [N, 3]
    cam_target: torch.Tensor  # [N, 3]
    tan_half_fov: torch.Tensor  # [N]
    light_dir: torch.Tensor  # [N, 3] unit vector towards the light
    ambient: torch.Tensor  # [N]
    floor_colour: torch.Tensor  # [N] int64 index into FLOOR_COLOURS
    floor_albedo: torch.Tensor  # [N, 3]
    sky_horizon: torch.Tensor  # [N, 3]
    sky_zenith: torch.Tensor  # [N, 3]
    phrasing: torch.Tensor  # [N] uniform numbers that choose between equivalent caption phrasings

    def __len__(self) -> int:
        return int(self.index.shape[0])


def sample_scenes(seed: int, index: torch.Tensor) -> SceneBatch:
    """Draw the scene graphs of the scenes ``index`` of stream ``seed``.

    Args:
        seed (`int`): the stream.
        index (`torch.Tensor`): int64 ``[N]`` scene indices (on the device to draw on).

    Returns:
        [`SceneBatch`]: the scenes' objects, camera, light, floor and sky.
    """
    k = MAX_OBJECTS
    dev = index.device
    table = hash_uniform(seed, index[:, None], torch.arange(_N_SLOTS, device=dev)[None, :])  # [N, S]
    used = 0

    def u(*shape: int) -> torch.Tensor:  # [N, *shape] uniforms from the next unused slots
        nonlocal used
        count = math.prod(shape)
        draws = table[:, used : used + count]
        used += count
        return draws.reshape(index.shape[0], *shape)

    cum = torch.tensor(_N_OBJECT_PROBS, device=dev).cumsum(0)
    n_obj = 1 + (u()[:, None] > cum[None, :-1]).sum(dim=1)  # [N] in 1..4
    slots = torch.arange(k, device=dev)
    active = slots[None, :] < n_obj[:, None]  # [N, K]
    shape = (u(k) * len(SHAPES)).long().clamp_max(len(SHAPES) - 1)
    colour = (u(k) * len(COLOURS)).long().clamp_max(len(COLOURS) - 1)
    palette = torch.tensor(list(COLOURS.values()), device=dev)
    albedo = palette[colour]

    # One x-bin per object, in random order, so objects never interpenetrate.
    keys = torch.where(active, u(k), torch.full((len(index), k), 2.0, device=dev))
    rank = keys.argsort(dim=1).argsort(dim=1).float()  # [N, K] rank of each slot's key
    bin_w = _ROW_WIDTH / n_obj.float()[:, None]  # [N, 1]
    footprint = torch.minimum(0.32 + 0.30 * u(k), 0.46 * bin_w)
    bin_centre = -_ROW_WIDTH / 2 + (rank + 0.5) * bin_w
    x = bin_centre + (u(k) - 0.5) * 1.6 * (bin_w / 2 - footprint).clamp_min(0.0)
    z = (u(k) - 0.5) * _DEPTH_SPREAD
    centre = torch.stack([x, torch.zeros_like(x), z], dim=-1)
    yaw = u(k) * (math.pi / 2)
    hfac = u(k)
    box_he = footprint / math.sqrt(2.0)  # a yawed box stays inside its footprint circle
    dims = torch.stack(
        [
            torch.stack([footprint, footprint, footprint], -1),  # sphere
            torch.stack([box_he, box_he * (0.7 + 0.6 * hfac), box_he], -1),  # box
            torch.stack([0.85 * footprint, footprint * (1.2 + 1.2 * hfac), 0.85 * footprint], -1),
            torch.stack([footprint, footprint * (1.6 + 1.0 * hfac), footprint], -1),  # cone
        ],
        dim=2,
    )  # [N, K, 4 shapes, 3]
    dims = dims.gather(2, shape[:, :, None, None].expand(-1, -1, 1, 3)).squeeze(2)

    azim = (u() - 0.5) * math.radians(50.0)
    elev = math.radians(12.0) + u() * math.radians(20.0)
    dist = 4.3 + 1.3 * u()
    target = torch.stack([(u() - 0.5) * 0.6, 0.35 + 0.25 * u(), (u() - 0.5) * 0.6], dim=-1)
    offset = torch.stack(
        [torch.sin(azim) * torch.cos(elev), torch.sin(elev), torch.cos(azim) * torch.cos(elev)], -1
    )
    cam_pos = target + dist[:, None] * offset
    tan_half_fov = torch.tan(torch.deg2rad(18.0 + 4.0 * u()))

    l_azim = u() * 2 * math.pi
    l_elev = math.radians(35.0) + u() * math.radians(35.0)
    light_dir = torch.stack(
        [torch.cos(l_elev) * torch.sin(l_azim), torch.sin(l_elev), torch.cos(l_elev) * torch.cos(l_azim)], -1
    )
    ambient = 0.22 + 0.16 * u()
    floor_colour = (u() * len(FLOOR_COLOURS)).long().clamp_max(len(FLOOR_COLOURS) - 1)
    floor_albedo = torch.tensor(list(FLOOR_COLOURS.values()), device=dev)[floor_colour]
    tint = u(3)
    sky_horizon = 0.80 + 0.12 * tint
    sky_zenith = torch.stack(
        [0.30 + 0.20 * tint[:, 0], 0.50 + 0.15 * tint[:, 1], 0.85 + 0.10 * tint[:, 2]], -1
    )
    return SceneBatch(
        index=index,
        active=active,
        shape=shape,
        colour=colour,
        albedo=albedo,
        centre=centre,
        yaw=yaw,
        dims=dims,
        cam_pos=cam_pos,
        cam_target=target,
        tan_half_fov=tan_half_fov,
        light_dir=light_dir,
        ambient=ambient,
        floor_colour=floor_colour,
        floor_albedo=floor_albedo,
        sky_horizon=sky_horizon,
        sky_zenith=sky_zenith,
        phrasing=u(),
    )


def _noun_phrase(colour: str, shape: str) -> str:
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape}"


def make_caption(objects: list[dict], floor: str, phrasing: float, margin: float = 0.1) -> str:
    """Caption one scene from its visible objects.

    Args:
        objects (`list[dict]`): visible objects with keys ``colour``, ``shape``, ``x`` (centroid of
            the visible pixels, fraction of the image width) and ``depth`` (mean depth of them).
        floor (`str`): floor colour name.
        phrasing (`float`): uniform number in [0, 1) choosing between equivalent phrasings.
        margin (`float`, defaults to 0.1): two objects closer than this in ``x`` are related by
            depth ("in front of" / "behind") instead of "to the left of" / "to the right of".

    Returns:
        `str`: e.g. ``"a red sphere to the left of a blue box on a grey floor"``.
    """
    objs = sorted(objects, key=lambda o: o["x"])
    names = [_noun_phrase(o["colour"], o["shape"]) for o in objs]
    tail = f"on {_noun_phrase(floor, 'floor')}"
    if not objs:
        return _noun_phrase(floor, "floor")
    if len(objs) == 1:
        return f"{names[0]} {tail}"
    if len(objs) == 2:
        a, b = objs
        flip = phrasing >= 0.5
        if b["x"] - a["x"] >= margin:
            relation = (
                f"{names[1]} to the right of {names[0]}" if flip else f"{names[0]} to the left of {names[1]}"
            )
        else:
            near, far = (0, 1) if a["depth"] <= b["depth"] else (1, 0)
            relation = (
                f"{names[far]} behind {names[near]}" if flip else f"{names[near]} in front of {names[far]}"
            )
        return f"{relation} {tail}"
    return f"{', '.join(names[:-1])} and {names[-1]} {tail}"
