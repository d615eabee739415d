"""Scene graphs of the toy world: what is where, drawn from a counter-based hash.

Every random number of scene ``i`` of seed ``s`` is a pure function of ``(s, i, slot)``
(:func:`hash_uniform`), so a scene is the same whether it is drawn in a batch of 10 or 1000,
on the CPU or on the GPU, and datasets can be split by index without overlap.

World frame: y up, the floor is the plane y = 0, objects stand on it around the origin and the
camera looks at them from the +z side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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

_ROW_WIDTH = 3.2  # objects are spread over x in [-1.6, 1.6] (world units), one bin each
_MASK32 = 0xFFFFFFFF
_N_SLOTS = 64  # random numbers per scene; append new parameters at the end to keep old scenes


RGB = tuple[float, float, float]


@dataclass(frozen=True)
class Domain:
    """A parameterisation of the scene sampler and the renderer's lights: one toy-world domain.

    The defaults are the world the shipped base model was trained on (``"default"``); a shifted
    domain (:mod:`.domains`) changes some of them. Every field enters the same code path, so a
    domain changes what is drawn, never how a scene is drawn, and the default domain's scenes are
    the same as before domains existed. Ranges are ``(low, span)``: the value is
    ``low + span * u`` with ``u`` uniform in [0, 1).
    """

    name: str = "default"
    """Registry name (lowercase)."""
    description: str = "the world the shipped base model was trained on"
    """One line for listings and docs."""
    n_object_probs: tuple[float, ...] = (0.30, 0.35, 0.20, 0.15)
    """Probability of 1, 2, 3, 4 objects (one- and two-object scenes dominate by default, since
    those are the prompts whose text following is measured)."""
    depth_spread: float = 2.4
    """Objects stand at z in [-depth_spread / 2, depth_spread / 2] (world units)."""
    colours: dict[str, RGB] = field(default_factory=lambda: dict(COLOURS))
    """Object colours (name -> albedo); names are what captions say."""
    floor_colours: dict[str, RGB] = field(default_factory=lambda: dict(FLOOR_COLOURS))
    """Floor colours (name -> albedo)."""
    camera_distance: tuple[float, float] = (4.3, 1.3)
    """Distance of the camera from its target, ``(low, span)``."""
    light_elevation: tuple[float, float] = (35.0, 35.0)
    """Elevation of the directional light in degrees, ``(low, span)``; low light casts long shadows."""
    light_colour: RGB = (1.0, 1.0, 1.0)
    """Colour (and intensity) of the directional light, multiplied into its diffuse and specular terms."""
    ambient: tuple[float, float] = (0.22, 0.16)
    """Share of ambient light, ``(low, span)``."""
    ambient_colour: RGB = (1.0, 1.0, 1.0)
    """Colour of the ambient light."""
    sky_horizon: tuple[RGB, RGB] = ((0.80, 0.80, 0.80), (0.12, 0.12, 0.12))
    """Sky colour at the horizon (also the haze colour), per channel ``(low, span)``."""
    sky_zenith: tuple[RGB, RGB] = ((0.30, 0.50, 0.85), (0.20, 0.15, 0.10))
    """Sky colour overhead, per channel ``(low, span)``."""

    def problems(self) -> list[str]:
        """Every inconsistency of the parameters (empty when the domain is valid)."""
        out = []
        if not self.name or self.name != self.name.lower() or not self.name.replace("_", "a").isalnum():
            out.append(f"name must be lowercase letters, digits and '_', got {self.name!r}")
        probs = self.n_object_probs
        if len(probs) != MAX_OBJECTS or min(probs) < 0 or abs(sum(probs) - 1.0) > 1e-6:
            out.append(f"n_object_probs must be {MAX_OBJECTS} probabilities summing to 1, got {probs}")
        if not self.colours or not self.floor_colours:
            out.append("colours and floor_colours must name at least one colour each")
        for what, table in (("colours", self.colours), ("floor_colours", self.floor_colours)):
            for cname, rgb in table.items():
                if len(rgb) != 3 or not all(0.0 <= c <= 1.0 for c in rgb):
                    out.append(f"{what}[{cname!r}] must be 3 values in [0, 1], got {rgb}")
        lo, span = self.light_elevation
        if not (0.0 < lo and span >= 0.0 and lo + span <= 90.0):
            out.append(f"light_elevation must stay within (0, 90] degrees, got {self.light_elevation}")
        if self.depth_spread < 0 or self.camera_distance[0] <= 2.0:
            out.append("depth_spread must be >= 0 and camera_distance's low end > 2 world units")
        return out


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
    colour: torch.Tensor  # [N, K] int64 index into the domain's object colours
    albedo: torch.Tensor  # [N, K, 3]
    centre: torch.Tensor  # [N, K, 3] foot point on the floor (y = 0)
    yaw: torch.Tensor  # [N, K] rotation about the vertical axis, radians
    dims: torch.Tensor  # [N, K, 3] sphere (r, r, r); box half-extents; cylinder/cone (r, height, r)
    cam_pos: torch.Tensor  # [N, 3]
    cam_target: torch.Tensor  # [N, 3]
    tan_half_fov: torch.Tensor  # [N]
    light_dir: torch.Tensor  # [N, 3] unit vector towards the light
    ambient: torch.Tensor  # [N]
    light_colour: torch.Tensor  # [N, 3] colour of the directional light
    ambient_colour: torch.Tensor  # [N, 3] colour of the ambient light
    floor_colour: torch.Tensor  # [N] int64 index into the domain's floor colours
    floor_albedo: torch.Tensor  # [N, 3]
    sky_horizon: torch.Tensor  # [N, 3]
    sky_zenith: torch.Tensor  # [N, 3]
    phrasing: torch.Tensor  # [N] uniform numbers that choose between equivalent caption phrasings

    def __len__(self) -> int:
        return int(self.index.shape[0])


def sample_scenes(seed: int, index: torch.Tensor, domain: Domain | None = None) -> SceneBatch:
    """Draw the scene graphs of the scenes ``index`` of stream ``seed``.

    Args:
        seed (`int`): the stream.
        index (`torch.Tensor`): int64 ``[N]`` scene indices (on the device to draw on).
        domain ([`Domain`], *optional*): the sampler's parameters; the default world when omitted.
            Every domain draws the same random numbers in the same order, so scene ``i`` of a
            shifted domain is scene ``i`` of the default world with the domain's changes.

    Returns:
        [`SceneBatch`]: the scenes' objects, camera, light, floor and sky.
    """
    dom = domain if domain is not None else Domain()
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

    cum = torch.tensor(dom.n_object_probs, device=dev).cumsum(0)
    n_obj = 1 + (u()[:, None] > cum[None, :-1]).sum(dim=1)  # [N] in 1..4
    slots = torch.arange(k, device=dev)
    active = slots[None, :] < n_obj[:, None]  # [N, K]
    shape = (u(k) * len(SHAPES)).long().clamp_max(len(SHAPES) - 1)
    colour = (u(k) * len(dom.colours)).long().clamp_max(len(dom.colours) - 1)
    palette = torch.tensor(list(dom.colours.values()), device=dev)
    albedo = palette[colour]

    # One x-bin per object, in random order, so objects never interpenetrate.
    keys = torch.where(active, u(k), torch.full((len(index), k), 2.0, device=dev))
    rank = keys.argsort(dim=1).argsort(dim=1).float()  # [N, K] rank of each slot's key
    bin_w = _ROW_WIDTH / n_obj.float()[:, None]  # [N, 1]
    footprint = torch.minimum(0.32 + 0.30 * u(k), 0.46 * bin_w)
    bin_centre = -_ROW_WIDTH / 2 + (rank + 0.5) * bin_w
    x = bin_centre + (u(k) - 0.5) * 1.6 * (bin_w / 2 - footprint).clamp_min(0.0)
    z = (u(k) - 0.5) * dom.depth_spread
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
    dist = dom.camera_distance[0] + dom.camera_distance[1] * u()
    target = torch.stack([(u() - 0.5) * 0.6, 0.35 + 0.25 * u(), (u() - 0.5) * 0.6], dim=-1)
    offset = torch.stack(
        [torch.sin(azim) * torch.cos(elev), torch.sin(elev), torch.cos(azim) * torch.cos(elev)], -1
    )
    cam_pos = target + dist[:, None] * offset
    tan_half_fov = torch.tan(torch.deg2rad(18.0 + 4.0 * u()))

    l_azim = u() * 2 * math.pi
    l_elev = math.radians(dom.light_elevation[0]) + u() * math.radians(dom.light_elevation[1])
    light_dir = torch.stack(
        [torch.cos(l_elev) * torch.sin(l_azim), torch.sin(l_elev), torch.cos(l_elev) * torch.cos(l_azim)], -1
    )
    ambient = dom.ambient[0] + dom.ambient[1] * u()
    floors = dom.floor_colours
    floor_colour = (u() * len(floors)).long().clamp_max(len(floors) - 1)
    floor_albedo = torch.tensor(list(floors.values()), device=dev)[floor_colour]
    tint = u(3)
    (h_lo, h_span), (z_lo, z_span) = dom.sky_horizon, dom.sky_zenith
    sky_horizon = torch.stack([h_lo[c] + h_span[c] * tint[:, c] for c in range(3)], -1)
    sky_zenith = torch.stack([z_lo[c] + z_span[c] * tint[:, c] for c in range(3)], -1)
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
        light_colour=torch.tensor(dom.light_colour, device=dev).expand(len(index), 3),
        ambient_colour=torch.tensor(dom.ambient_colour, device=dev).expand(len(index), 3),
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
