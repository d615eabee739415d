"""Batched ray casting of toy-world scenes in plain torch (the same code on the CPU and the GPU).

Each pixel casts analytic rays against the floor and the scene's objects (spheres, cylinders and
cones as bounded quadrics, boxes as slabs), keeps the nearest hit, and shades it with a
directional light (of the scene's colour), hard shadows (a second ray towards the light), coloured
ambient light, a specular highlight, distance haze on the floor and a sky gradient. RGB is
supersampled on an S x S grid inside each pixel; depth, normals and classes are exact values at
the pixel centre.

Camera space is OpenGL's: x right, y up, z towards the viewer (the camera looks along -z).
"""

from __future__ import annotations

import torch

from .scene import MAX_OBJECTS, SceneBatch

BACKGROUND_DEPTH = 1000.0
"""Depth written for background (sky) pixels; every surface is nearer than 100 world units."""

FLOOR_RADIUS = 40.0
"""The floor is a disc of this radius around the origin; beyond it lies the sky."""

_EPS = 1e-4
_INF = float("inf")
_SPHERE, _BOX, _CYLINDER, _CONE = 0, 1, 2, 3


def _quadric_t(ox, oy, oz, dx, dy, dz, a, b, c, height):
    """Nearest t > 0 where the ray meets x^2 + z^2 + a y^2 + b y + c = 0 with 0 <= y <= height."""
    qa = dx * dx + dz * dz + a * dy * dy
    qb = 2.0 * (ox * dx + oz * dz + a * oy * dy) + b * dy
    qc = ox * ox + oz * oz + a * oy * oy + b * oy + c
    disc = qb * qb - 4.0 * qa * qc
    root = disc.clamp_min(0.0).sqrt()
    inv = 0.5 / torch.where(qa.abs() > 1e-12, qa, torch.full_like(qa, 1e-12))
    t1, t2 = (-qb - root) * inv, (-qb + root) * inv
    t_lo, t_hi = torch.minimum(t1, t2), torch.maximum(t1, t2)
    y_lo, y_hi = oy + t_lo * dy, oy + t_hi * dy
    ok = disc >= 0.0
    ok_lo = ok & (t_lo > _EPS) & (y_lo >= 0.0) & (y_lo <= height)
    ok_hi = ok & (t_hi > _EPS) & (y_hi >= 0.0) & (y_hi <= height)
    return torch.where(ok_lo, t_lo, torch.where(ok_hi, t_hi, _INF))


def _cap_t(ox, oy, oz, dx, dy, dz, radius_sq, height):
    """t where the ray meets the disc of squared radius ``radius_sq`` at y = ``height`` (a cylinder's top)."""
    t = (height - oy) / torch.where(dy.abs() > 1e-12, dy, torch.full_like(dy, 1e-12))
    x, z = ox + t * dx, oz + t * dz
    return torch.where((t > _EPS) & (x * x + z * z <= radius_sq), t, _INF)


def _box_t(ox, oy, oz, dx, dy, dz, ex, ey, ez):
    """Slab test against the box |x| <= ex, 0 <= y <= 2 ey, |z| <= ez."""
    t_near, t_far = None, None
    for o, d, lo, hi in ((ox, dx, -ex, ex), (oy, dy, 0.0 * ey, 2.0 * ey), (oz, dz, -ez, ez)):
        inv = 1.0 / torch.where(d.abs() > 1e-12, d, torch.full_like(d, 1e-12))
        t0, t1 = (lo - o) * inv, (hi - o) * inv
        near, far = torch.minimum(t0, t1), torch.maximum(t0, t1)
        t_near = near if t_near is None else torch.maximum(t_near, near)
        t_far = far if t_far is None else torch.minimum(t_far, far)
    return torch.where((t_near <= t_far) & (t_near > _EPS), t_near, _INF)


def _bounds(scenes: SceneBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounding spheres of the object slots: centres [N, K, 3] and squared radii [N, K] (-inf if empty)."""
    shape, dims = scenes.shape, scenes.dims
    r, h = dims[..., 0], dims[..., 1]
    half_h = torch.where(shape == _SPHERE, r, torch.where(shape == _BOX, h, 0.5 * h))
    radius_xz_sq = torch.where(shape == _BOX, dims[..., 0] ** 2 + dims[..., 2] ** 2, r * r)
    radius_sq = torch.where(shape == _SPHERE, r * r, radius_xz_sq + half_h * half_h)
    centre = scenes.centre.clone()
    centre[..., 1] = half_h
    return centre, torch.where(scenes.active, radius_sq, -_INF)


def _object_t(scenes: SceneBatch, orig: tuple, dirs: tuple) -> torch.Tensor:
    """Ray parameter of the first hit with each object slot: ``[N, K, P]`` (inf where missed).

    ``orig`` and ``dirs`` are world-space (x, y, z) component tensors broadcastable to ``[N, P]``.
    A bounding-sphere test over all (slot, ray) pairs selects the few pairs that can hit; only
    those run the exact test of their shape (a bounded quadric with a cap, or a slab test).
    """
    n, p = dirs[0].shape
    k = MAX_OBJECTS
    centre, radius_sq = _bounds(scenes)
    oc = [orig[i][:, None, :] - centre[:, :, i, None] for i in range(3)]  # [N, K, P or 1]
    b = sum(dirs[i][:, None, :] * oc[i] for i in range(3))  # [N, K, P]
    cc = oc[0] * oc[0] + oc[1] * oc[1] + oc[2] * oc[2] - radius_sq[:, :, None]
    cand = (b * b >= cc) & ((b < 0.0) | (cc < 0.0))  # the ray meets the sphere ahead of its origin
    t_all = torch.full((n * k * p,), _INF, device=dirs[0].device)
    scene, slot, pix = cand.nonzero(as_tuple=True)
    if scene.numel() == 0:
        return t_all.reshape(n, k, p)
    row = scene * k + slot

    def per_ray(v: torch.Tensor) -> torch.Tensor:  # [N, P] or [N, 1] -> one value per pair
        return v[scene, pix] if v.shape[1] == p else v[scene, 0]

    def per_obj(v: torch.Tensor) -> torch.Tensor:  # [N, K] -> one value per pair
        return v.reshape(-1)[row]

    ox, oy, oz = (per_ray(o.expand(n, -1) if o.shape[0] != n else o) for o in orig)
    dx, dy, dz = (per_ray(d) for d in dirs)
    # World -> object frame: translate to the foot point, rotate by -yaw about y.
    ox, oz = ox - per_obj(scenes.centre[..., 0]), oz - per_obj(scenes.centre[..., 2])
    yaw = per_obj(scenes.yaw)
    c, s = yaw.cos(), yaw.sin()
    lx, lz = c * ox - s * oz, s * ox + c * oz
    ldx, ldz = c * dx - s * dz, s * dx + c * dz
    shape = per_obj(scenes.shape)
    r, h, ez = per_obj(scenes.dims[..., 0]), per_obj(scenes.dims[..., 1]), per_obj(scenes.dims[..., 2])
    kk = (r / h) ** 2  # cone: x^2 + z^2 = (r/h)^2 (h - y)^2
    a = torch.where(shape == _SPHERE, 1.0, torch.where(shape == _CONE, -kk, 0.0))
    bq = torch.where(shape == _SPHERE, -2.0 * r, torch.where(shape == _CONE, 2.0 * kk * h, 0.0))
    q = torch.where(shape == _SPHERE, 0.0, torch.where(shape == _CONE, -kk * h * h, -r * r))
    height = torch.where(shape == _SPHERE, 2.0 * r, h)
    t = _quadric_t(lx, oy, lz, ldx, dy, ldz, a, bq, q, height)
    cap_r_sq = torch.where(shape == _CYLINDER, r * r, -1.0)  # no cap on spheres and cones
    t = torch.minimum(t, _cap_t(lx, oy, lz, ldx, dy, ldz, cap_r_sq, h))
    is_box = shape == _BOX
    if bool(is_box.any()):
        t = torch.where(is_box, _box_t(lx, oy, lz, ldx, dy, ldz, r, h, ez), t)
    t_all[row * p + pix] = t
    return t_all.reshape(n, k, p)


def _gather_slot(values: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """Per-pixel value of the hit slot: ``values`` [N, K], ``slot`` [N, P] -> [N, P]."""
    return values.gather(1, slot)


def _object_normals(scenes: SceneBatch, is_obj: torch.Tensor, slot: torch.Tensor, p: tuple) -> tuple:
    """World-space unit normals [N, P] per component: objects' normals where ``is_obj``, the
    floor's (0, 1, 0) elsewhere. Only object pixels are evaluated."""
    n, npix = slot.shape
    out = [torch.zeros(n * npix, device=slot.device), torch.ones(n * npix, device=slot.device)]
    out.append(torch.zeros(n * npix, device=slot.device))
    flat = is_obj.reshape(-1).nonzero().squeeze(1)
    if flat.numel() == 0:
        return tuple(v.reshape(n, npix) for v in out)
    row = (flat // npix) * MAX_OBJECTS + slot.reshape(-1)[flat]

    def per_obj(v: torch.Tensor) -> torch.Tensor:
        return v.reshape(-1)[row]

    px, py, pz = (v.reshape(-1)[flat] for v in p)
    shape = per_obj(scenes.shape)
    d0, d1 = per_obj(scenes.dims[..., 0]), per_obj(scenes.dims[..., 1])
    yaw = per_obj(scenes.yaw)
    c, s = yaw.cos(), yaw.sin()
    x, z = px - per_obj(scenes.centre[..., 0]), pz - per_obj(scenes.centre[..., 2])
    lx, lz, y = c * x - s * z, s * x + c * z, py
    # sphere: centre (0, r, 0); box: half-extents (d0, d1, d2); cylinder/cone: radius d0, height d1.
    d2 = per_obj(scenes.dims[..., 2])
    n_sph = (lx, y - d0, lz)
    bx, by, bz = lx.abs() / d0, (y - d1).abs() / d1, lz.abs() / d2
    ax = (bx >= by) & (bx >= bz)
    ay = ~ax & (by >= bz)
    az = ~ax & ~ay
    n_box = (ax * lx.sign(), ay * (y - d1).sign(), az * lz.sign())
    on_cap = y >= d1 * (1.0 - 1e-3)
    n_cyl = (torch.where(on_cap, 0.0, lx), on_cap.float(), torch.where(on_cap, 0.0, lz))
    kk = (d0 / d1) ** 2
    n_cone = (lx, kk * (d1 - y), lz)
    comps = []
    for i in range(3):
        v = torch.where(shape == _SPHERE, n_sph[i], n_box[i].float())
        v = torch.where(shape == _CYLINDER, n_cyl[i], v)
        comps.append(torch.where(shape == _CONE, n_cone[i], v))
    nx_l, ny, nz_l = comps
    norm = (nx_l * nx_l + ny * ny + nz_l * nz_l).clamp_min(1e-12).rsqrt()
    # Object frame -> world: rotate by +yaw.
    values = ((c * nx_l + s * nz_l) * norm, ny * norm, (-s * nx_l + c * nz_l) * norm)
    for o, v in zip(out, values):
        o[flat] = v
    return tuple(v.reshape(n, npix) for v in out)


def _camera(scenes: SceneBatch):
    """Orthonormal camera basis (right, up, forward), each [N, 3]."""
    fwd = torch.nn.functional.normalize(scenes.cam_target - scenes.cam_pos, dim=-1)
    world_up = torch.tensor([0.0, 1.0, 0.0], device=fwd.device).expand_as(fwd)
    right = torch.nn.functional.normalize(torch.linalg.cross(fwd, world_up, dim=-1), dim=-1)
    up = torch.linalg.cross(right, fwd, dim=-1)
    return right, up, fwd


def _ray_dirs(scenes: SceneBatch, res: int, px: torch.Tensor, py: torch.Tensor):
    """Unit world ray directions through image points ``(px, py)`` (pixel units, [N or 1, P]).

    ``(0, 0)`` is the top-left corner of the image, ``(res, res)`` the bottom-right one.
    Returns the (x, y, z) direction components [N, P] and the camera basis (right, up, fwd).
    """
    right, up, fwd = _camera(scenes)
    f = scenes.tan_half_fov[:, None]
    sx = (2.0 * px / res - 1.0) * f  # [N, P]
    sy = (1.0 - 2.0 * py / res) * f
    dirs = [fwd[:, i : i + 1] + sx * right[:, i : i + 1] + sy * up[:, i : i + 1] for i in range(3)]
    inv_norm = (dirs[0] ** 2 + dirs[1] ** 2 + dirs[2] ** 2).rsqrt()
    return tuple(d * inv_norm for d in dirs), (right, up, fwd)


def _pixel_centres(res: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres of the ``res x res`` pixels in row-major order, as [1, P] x and y coordinates."""
    coords = torch.arange(res, device=device, dtype=torch.float32) + 0.5
    return coords[None, :].expand(res, res).reshape(1, -1), coords[:, None].expand(res, res).reshape(1, -1)


def _edges(values: torch.Tensor, res: int) -> torch.Tensor:
    """Pixels whose value differs from a 4-neighbour's: ``values`` [N, P] -> bool [N, P]."""
    v = values.reshape(-1, res, res)
    edge = torch.zeros_like(v, dtype=torch.bool)
    dx = v[:, :, 1:] != v[:, :, :-1]
    dy = v[:, 1:, :] != v[:, :-1, :]
    edge[:, :, 1:] |= dx
    edge[:, :, :-1] |= dx
    edge[:, 1:, :] |= dy
    edge[:, :-1, :] |= dy
    return edge.reshape(values.shape)


def _cast(scenes: SceneBatch, dirs: tuple):
    """Primary rays from the camera: returns t [N, P], kind [N, P] (0 sky, 1 floor, 2 object),
    slot [N, P] (hit object slot, 0 where none) and the hit point and world normal components."""
    orig = tuple(scenes.cam_pos[:, i : i + 1] for i in range(3))
    t_obj, slot = _object_t(scenes, orig, dirs).min(dim=1)
    dy = dirs[1]
    t_floor = -orig[1] / torch.where(dy < -1e-9, dy, torch.full_like(dy, -1e-9))
    fx, fz = orig[0] + t_floor * dirs[0], orig[2] + t_floor * dirs[2]
    floor_ok = (dy < -1e-9) & (fx * fx + fz * fz <= FLOOR_RADIUS**2)
    t_floor = torch.where(floor_ok, t_floor, _INF)
    is_obj = t_obj < t_floor
    t = torch.minimum(t_obj, t_floor)
    kind = torch.where(is_obj, 2, torch.where(torch.isfinite(t_floor), 1, 0))
    t_safe = torch.where(torch.isfinite(t), t, 0.0)
    p = tuple(o + t_safe * d for o, d in zip(orig, dirs))
    return t, kind, slot, p, _object_normals(scenes, is_obj, slot, p)


def _shade(scenes: SceneBatch, dirs, kind, slot, p, n) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour of each sample [N, 3, P] and whether the light reaches it [N, P]."""
    light = tuple(scenes.light_dir[:, i : i + 1] for i in range(3))
    lit = kind > 0
    shadow_orig = tuple(pc + 2e-3 * nc for pc, nc in zip(p, n))
    t_shadow = _object_t(scenes, shadow_orig, tuple(lc.expand_as(p[0]) for lc in light)).amin(dim=1)
    visible = (lit & torch.isinf(t_shadow)).float()
    n_dot_l = (n[0] * light[0] + n[1] * light[1] + n[2] * light[2]).clamp_min(0.0) * visible
    half = [lc - dc for lc, dc in zip(light, dirs)]
    half_norm = (half[0] ** 2 + half[1] ** 2 + half[2] ** 2).clamp_min(1e-12).rsqrt()
    n_dot_h = ((n[0] * half[0] + n[1] * half[1] + n[2] * half[2]) * half_norm).clamp_min(0.0)
    is_obj = kind == 2
    spec = torch.where(is_obj, 0.35 * n_dot_h.pow(24.0) * visible, 0.0)
    ambient = scenes.ambient[:, None]
    direct = (1.0 - ambient) * n_dot_l  # [N, P]
    out = []
    dist = (p[0] - scenes.cam_pos[:, 0:1]) ** 2 + (p[2] - scenes.cam_pos[:, 2:3]) ** 2
    haze = 1.0 - torch.exp(-dist.sqrt() / 30.0)
    sky_t = dirs[1].clamp(0.0, 1.0).pow(0.6)
    for i in range(3):
        obj_albedo = _gather_slot(scenes.albedo[..., i], slot)
        floor_c = scenes.floor_albedo[:, i : i + 1]
        horizon, zenith = scenes.sky_horizon[:, i : i + 1], scenes.sky_zenith[:, i : i + 1]
        light_c, ambient_c = scenes.light_colour[:, i : i + 1], scenes.ambient_colour[:, i : i + 1]
        light_amount = ambient * ambient_c + direct * light_c  # [N, P]; white light: ambient + direct
        surface = torch.where(is_obj, obj_albedo, floor_c) * light_amount + spec * light_c
        surface = torch.where(is_obj, surface, surface + (horizon - surface) * haze)
        sky = horizon + (zenith - horizon) * sky_t
        out.append(torch.where(lit, surface, sky))
    return torch.stack(out, dim=1).clamp(0.0, 1.0), visible > 0


def _supersample_edges(scenes: SceneBatch, res: int, s: int, rgb: torch.Tensor, edge: torch.Tensor) -> None:
    """Replace ``rgb`` [N, 3, P] at ``edge`` pixels by the mean of an ``s x s`` grid of samples.

    Only silhouette and shadow edges are supersampled: elsewhere the shading is smooth and the
    centre sample is already the pixel's colour. Each scene's result depends on its own pixels only.
    """
    n = rgb.shape[0]
    count = edge.sum(dim=1)  # [N]
    width = int(count.max())
    if width == 0:
        return
    order = (~edge).to(torch.int8).argsort(dim=1, stable=True)[:, :width]  # edge pixels first
    valid = torch.arange(width, device=rgb.device)[None, :] < count[:, None]  # [N, W]
    cx = (order % res).float() + 0.5
    cy = (order // res).float() + 0.5
    offs = [((i + 0.5) / s - 0.5, (j + 0.5) / s - 0.5) for j in range(s) for i in range(s)]
    px = torch.cat([cx + ox for ox, _ in offs], dim=1)  # [N, S*S*W]
    py = torch.cat([cy + oy for _, oy in offs], dim=1)
    dirs, _ = _ray_dirs(scenes, res, px, py)
    _, kind, slot, p, nrm = _cast(scenes, dirs)
    colour, _ = _shade(scenes, dirs, kind, slot, p, nrm)
    colour = colour.reshape(n, 3, s * s, width).mean(dim=2)  # [N, 3, W]
    current = rgb.gather(2, order[:, None, :].expand(-1, 3, -1))
    rgb.scatter_(2, order[:, None, :].expand(-1, 3, -1), torch.where(valid[:, None], colour, current))


def render_batch(scenes: SceneBatch, resolution: int, supersample: int) -> dict[str, torch.Tensor]:
    """Render ``scenes`` (all on one device) at ``resolution``; see :func:`render_scenes`.

    Returns:
        `dict`: ``rgb``, ``depth``, ``normal``, ``classes`` as in :func:`render_scenes` (without
        ``inv_depth`` and captions) plus ``slot`` [N, H, W] (hit object slot, -1 where none).
    """
    n, res = len(scenes), resolution
    px, py = _pixel_centres(res, scenes.cam_pos.device)
    dirs, (right, up, fwd) = _ray_dirs(scenes, res, px, py)
    t, kind, slot, p, nrm = _cast(scenes, dirs)
    z_axis = tuple(fwd[:, i : i + 1] for i in range(3))
    depth = t * (dirs[0] * z_axis[0] + dirs[1] * z_axis[1] + dirs[2] * z_axis[2])
    depth = torch.where(kind > 0, depth, BACKGROUND_DEPTH)
    cam_n = [sum(nrm[i] * basis[:, i : i + 1] for i in range(3)) for basis in (right, up, fwd)]
    normal = torch.stack([cam_n[0], cam_n[1], -cam_n[2]], dim=1)  # OpenGL camera: z towards viewer
    normal = torch.where((kind > 0)[:, None], normal, torch.tensor([0.0, 0.0, 1.0], device=t.device)[:, None])
    shape = _gather_slot(scenes.shape, slot)
    classes = torch.where(kind == 2, shape + 2, kind)
    object_id = torch.where(kind == 2, slot + 2, kind)
    rgb, lit = _shade(scenes, dirs, kind, slot, p, nrm)
    if supersample > 1:
        edge = _edges(object_id, res) | _edges(lit, res)
        _supersample_edges(scenes, res, supersample, rgb, edge)
    return {
        "rgb": rgb.reshape(n, 3, res, res),
        "depth": depth.reshape(n, 1, res, res),
        "normal": normal.reshape(n, 3, res, res),
        "classes": classes.reshape(n, res, res).long(),
        "slot": torch.where(kind == 2, slot, -1).reshape(n, res, res),
    }
