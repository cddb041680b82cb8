"""Drawing one sample picture (a Shot of sample_shots.py) and its loss mask: the object's solids, the orthographic
camera, the studio backdrop, the painted deck, matte or glossy shading and the transparent reservoir (what it
draws and why it is deterministic: make_sample_data.py's docstring).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from sample_raycast import F32, FAR, Arr, Prim, Vec, dot, quadric, rounded, slab, solid, unit
from sample_shots import Shot

SS = 2  # supersampling factor (antialiasing)
COLORS = {
    "sage green": (143, 170, 138), "coral red": (222, 104, 86), "slate blue": (86, 110, 150),
    "cream white": (236, 228, 210), "charcoal gray": (64, 66, 70), "mustard yellow": (214, 168, 58),
    "dusty pink": (214, 160, 164), "teal": (36, 128, 132),
}
BACKGROUNDS = {
    "light gray": (224, 224, 222), "warm beige": (234, 222, 204), "pale blue": (214, 226, 238),
    "off white": (243, 241, 236), "mist green": (216, 230, 220), "blush": (240, 222, 220),
    "studio gray": (168, 168, 166),
}
# view -> (azimuth vector (sin, cos), elevation vector (cos, sin)); normalised with sqrt only.
VIEWS = {
    "front view": ((0, 1), (4, 1)),
    "three-quarter view": ((1, 1), (2, 1)),
    "side view": ((1, 0), (4, 1)),
    "top view": ((1, 8), (1, 5)),
}
TOP, LID_Z = 1.15, -0.22  # height of the body's top deck; depth of the lid's centre


Part = tuple[str, list[Prim], Vec, Vec]  # material, convex solid, bounding box corners (low, high)
MATERIALS = ("body", "lid", "accent")


def parts(top: str) -> list[Part]:
    """The opaque solids of the object, each with its material and bounding box."""
    solids: list[Part] = [
        ("body", rounded(0, 0, 1.1, 0.85, 0, TOP, 1.12), (-1.1, 0, -0.85), (1.1, TOP, 0.85)),
        ("accent", rounded(1.1, 0, 0.16, 0.34, 0.25, 0.95, 1.2), (0.9, 0.25, -0.34), (1.26, 0.95, 0.34)),  # side grip
    ]
    lid_lo, lid_hi = (-0.7, TOP, LID_Z - 0.5), (0.7, TOP + 0.5, LID_Z + 0.5)
    if top == "dome lid":
        solids += [("lid", [quadric((0, TOP, LID_Z), (0.62, 0.42, 0.45)), slab(1, TOP, TOP + 0.5)], lid_lo, lid_hi),
                   ("accent", [quadric((0, TOP + 0.42, LID_Z), (0.08, 0.08, 0.08))], lid_lo, lid_hi)]
    elif top == "flat lid":
        solids += [("lid", rounded(0, LID_Z, 0.66, 0.48, TOP, TOP + 0.14, 1.2), lid_lo, lid_hi),
                   ("accent", rounded(0, LID_Z, 0.3, 0.06, TOP + 0.1, TOP + 0.2, 1.3), lid_lo, lid_hi)]
    else:  # transparent reservoir: only its cap is opaque
        solids += [("lid", rounded(0, LID_Z, 0.53, 0.41, TOP + 0.85, TOP + 0.95, 1.15),
                    (-0.6, TOP + 0.8, LID_Z - 0.5), (0.6, TOP + 0.95, LID_Z + 0.5))]
    return solids


def mix(a: Arr, b: Arr | tuple, w: Arr | float) -> Arr:
    """a + (b - a) * w; a 2-D w is a per-pixel weight, spread over the color channels."""
    w = np.asarray(w, dtype=F32)
    return a + (np.asarray(b, dtype=F32) - a) * (w[..., None] if w.ndim == 2 else w)


def pow64(x: Arr) -> Arr:
    for _ in range(6):
        x = x * x
    return x


def rgb(value: tuple[float, float, float]) -> Arr:
    return np.asarray(value, dtype=F32) / F32(255)


@dataclass(frozen=True)
class Camera:
    """Orthographic camera: constant ray direction d; origins spread over the image plane (right, up)."""

    d: Vec
    right: Vec
    up: Vec
    target: Vec
    pixel: float  # world units per (supersampled) pixel
    width: int
    height: int

    @classmethod
    def for_shot(cls, shot: Shot) -> Camera:
        (sa, ca), (ce, se) = (unit(*v) for v in VIEWS[shot.view])
        sa = -sa if shot.mirror else sa
        right = (ca, 0.0, -sa)
        target = (-shot.shift * ca, 1.1 if shot.top == "transparent reservoir" else 0.9, shot.shift * sa)
        width, height = shot.size[0] * SS, shot.size[1] * SS
        return cls((-ce * sa, -se, -ce * ca), right, (-se * sa, ce, -se * ca), target, 3.4 / shot.zoom / height,
                   width, height)

    def origins(self, rows: slice, cols: slice) -> tuple[Arr, Arr, Arr]:
        u = (np.arange(cols.start, cols.stop, dtype=F32) + F32(0.5 - self.width / 2)) * F32(self.pixel)
        v = (F32(self.height / 2 - 0.5) - np.arange(rows.start, rows.stop, dtype=F32)) * F32(self.pixel)
        return tuple(F32(self.target[k] - 20 * self.d[k]) + u[None, :] * F32(self.right[k])
                     + v[:, None] * F32(self.up[k]) for k in range(3))

    def box(self, lo: Vec, hi: Vec) -> tuple[slice, slice]:
        """The pixel rectangle a world-space box can cover: its corners, projected, plus a margin."""
        us, vs = [], []
        for corner in ((x, y, z) for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])):
            rel = [corner[k] - self.target[k] for k in range(3)]
            us.append(sum(rel[k] * self.right[k] for k in range(3)) / self.pixel)
            vs.append(sum(rel[k] * self.up[k] for k in range(3)) / self.pixel)
        c0, c1 = int(min(us) + self.width / 2) - 4, int(max(us) + self.width / 2) + 4
        r0, r1 = int(self.height / 2 - max(vs)) - 4, int(self.height / 2 - min(vs)) + 4
        return slice(max(r0, 0), min(r1, self.height)), slice(max(c0, 0), min(c1, self.width))


def backdrop(cam: Camera, shot: Shot, light: Vec) -> Arr:
    """Plain studio background: a vertical gradient, a soft shadow and a contact shadow on the floor."""
    bg = rgb(BACKGROUNDS[shot.background])
    rows = np.linspace(0, 1, cam.height, dtype=F32)[:, None, None]
    cols = np.linspace(-0.04 * shot.key, 0.04 * shot.key, cam.width, dtype=F32)[None, :, None]  # lit from the key side
    image = mix(bg * F32(1.03), bg * F32(0.9), rows) * (F32(1) + cols)
    o = cam.origins(slice(0, cam.height), slice(0, cam.width))
    t_floor = -o[1] / F32(cam.d[1])
    fx, fz = o[0] + t_floor * F32(cam.d[0]), o[2] + t_floor * F32(cam.d[2])
    sx, sz = (fx + F32(light[0] / light[1] * 0.3)) / F32(1.5), (fz + F32(light[2] / light[1] * 0.3)) / F32(1.2)
    cx, cz = fx / F32(1.2), fz / F32(0.95)
    soft = np.clip((F32(1.2) - sx * sx - sz * sz) * F32(0.5), 0, 1) * F32(0.2)
    contact = np.clip((F32(1.1) - cx * cx - cz * cz) * F32(4), 0, 1) * F32(0.12)
    return image * (F32(1) - soft - contact)[..., None]


def key_light(cam: Camera, shot: Shot) -> Vec:
    return unit(*(0.45 * shot.key * cam.right[k] + 0.8 * cam.up[k] - 0.5 * cam.d[k] for k in range(3)))


def object_mask(shot: Shot, image: Image.Image) -> Image.Image:
    """The loss mask of a rendered shot: white where the object is (the picture differs from its bare
    backdrop, floor shadow included in the backdrop), black elsewhere."""
    cam = Camera.for_shot(shot)
    bare = np.clip(backdrop(cam, shot, key_light(cam, shot)) * F32(255) + F32(0.5), 0, 255).astype(np.uint8)
    background = np.asarray(Image.fromarray(bare, "RGB").reduce(SS), dtype=np.int16)
    diff = np.abs(np.asarray(image, dtype=np.int16) - background).max(axis=2)
    return Image.fromarray(np.where(diff > 8, 255, 0).astype(np.uint8), "L")


def render(shot: Shot) -> Image.Image:
    cam = Camera.for_shot(shot)
    d = cam.d
    light = key_light(cam, shot)
    half_vec = unit(*(light[k] - d[k] for k in range(3)))
    image = backdrop(cam, shot, light)
    solids = parts(shot.top)
    boxes = [cam.box(lo, hi) for *_, lo, hi in solids]
    glass_box = cam.box((-0.6, TOP, LID_Z - 0.5), (0.6, TOP + 0.9, LID_Z + 0.5))
    rows = slice(min(b[0].start for b in [*boxes, glass_box]), max(b[0].stop for b in [*boxes, glass_box]))
    cols = slice(min(b[1].start for b in [*boxes, glass_box]), max(b[1].stop for b in [*boxes, glass_box]))
    o = cam.origins(rows, cols)

    base = rgb(COLORS[shot.color])
    light_body = float(base[0] * 0.3 + base[1] * 0.59 + base[2] * 0.11) > 0.5
    tones = {"body": base, "lid": mix(base, (0.12, 0.12, 0.13) if light_body else (0.96, 0.96, 0.94), 0.3),
             "accent": rgb((58, 60, 64) if light_body else (232, 232, 226))}
    t_near = np.full(o[0].shape, FAR, dtype=F32)
    which = np.zeros(o[0].shape, dtype=np.uint8)  # 1 + index into MATERIALS; 0 where nothing is hit
    normal = [np.zeros_like(t_near) for _ in range(3)]
    for (material, prims, _, _), (r, c) in zip(solids, boxes, strict=True):  # the nearest opaque hit wins
        sub = (slice(r.start - rows.start, r.stop - rows.start), slice(c.start - cols.start, c.stop - cols.start))
        t, n = solid(tuple(a[sub] for a in o), d, prims)
        nearer = t < t_near[sub]
        t_near[sub] = np.where(nearer, t, t_near[sub])
        which[sub] = np.where(nearer, np.uint8(1 + MATERIALS.index(material)), which[sub])
        for k in range(3):
            normal[k][sub] = np.where(nearer, n[k], normal[k][sub])
    hit = which > 0
    color = np.where(hit[..., None], np.stack([base, *(tones[m] for m in MATERIALS)])[which], image[rows, cols])
    p = [o[k] + np.where(hit, t_near, F32(0)) * F32(d[k]) for k in range(3)]
    color, emissive = decorate(shot, color, p, normal, which == 1, tones["accent"])

    ndl = np.clip(dot(normal, light), 0, 1)
    if shot.finish == "matte":  # flat shading: three tone bands, no highlight
        lit = color * np.where(ndl > 0.55, F32(1.0), np.where(ndl > 0.2, F32(0.84), F32(0.7)))[..., None]
    else:  # glossy: smooth shading, a rim reflection of the backdrop and a specular highlight
        lit = color * (F32(0.5) + F32(0.5) * ndl)[..., None]
        rim = F32(1) - np.abs(dot(normal, d))
        rim = rim * rim
        lit = mix(lit, rgb(BACKGROUNDS[shot.background]) * F32(1.05), rim * rim * F32(0.6))
        lit = mix(lit, (1.0, 1.0, 1.0), pow64(np.clip(dot(normal, half_vec), 0, 1)) * F32(0.9))
    out = np.where((hit & ~emissive)[..., None], lit, color)
    if shot.top == "transparent reservoir":
        out = reservoir(o, d, t_near, out, half_vec)
    image[rows, cols] = out
    pixels = np.clip(image * F32(255) + F32(0.5), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB").reduce(SS)


def decorate(shot: Shot, color: Arr, p: list[Arr], n: list[Arr], body: Arr, accent: Arr) -> tuple[Arr, Arr]:
    """Seam, base band, screen and buttons painted onto the body; returns colors and the lit-screen mask."""
    x, y, z = p
    deck = body & (n[1] > F32(0.98))
    side = body & (np.abs(n[1]) < F32(0.8))
    factor = np.where(side & (np.abs(y - F32(0.4)) < F32(0.012)), F32(0.55), F32(1))  # seam around the body
    factor = np.where(body & (y < F32(0.05)), F32(0.6), factor)  # dark base band
    lit_screen, round_screen = shot.screen.startswith("lit"), "round" in shot.screen
    dx, dz = x - F32(-0.24), z - F32(0.43)
    if round_screen:
        dist = np.sqrt(dx * dx + dz * dz)
        bezel, glass = dist < F32(0.21), dist < F32(0.17)
        mark = (np.abs(dist - F32(0.09)) < F32(0.014)) | (dist < F32(0.03))
    else:
        ex = np.maximum(np.abs(dx) - F32(0.26), F32(0))
        ez = np.maximum(np.abs(dz) - F32(0.09), F32(0))
        corner = ex * ex + ez * ez
        bezel, glass = corner < F32(0.06 * 0.06), corner < F32(0.03 * 0.03)
        mark = (np.abs(np.abs(dz) - F32(0.045)) < F32(0.014)) & (np.abs(dx + F32(0.05)) < F32(0.18))
    # paint index into the palette below; later strokes cover earlier ones
    paint = np.where(deck & bezel, np.uint8(1), np.uint8(0))
    paint = np.where(deck & glass, np.uint8(2), paint)
    if lit_screen:
        paint = np.where(deck & glass & mark, np.uint8(3), paint)
    for bx, bz in [(0.3, 0.46), (0.5, 0.34), (0.13, 0.55)][: shot.buttons]:
        r2 = (x - F32(bx)) * (x - F32(bx)) + (z - F32(bz)) * (z - F32(bz))
        paint = np.where(deck & (r2 < F32(0.08 * 0.08)), np.uint8(1), paint)
        paint = np.where(deck & (r2 < F32(0.062 * 0.062)), np.uint8(4), paint)
    screen = rgb((150, 236, 214) if lit_screen else (28, 30, 34))
    palette = np.stack([np.zeros(3, F32), rgb((36, 38, 42)), screen, screen * F32(0.55), accent])
    color = np.where((paint > 0)[..., None], palette[paint], color * factor[..., None])
    return color, (paint == 2) | (paint == 3) if lit_screen else np.zeros_like(deck)


def reservoir(o: tuple[Arr, Arr, Arr], d: Vec, t_opaque: Arr, image: Arr, half_vec: Vec) -> Arr:
    """A clear tank on the lid position, part filled with water, composited over what lies behind it."""
    t_glass, n = solid(o, d, [quadric((0, 0, LID_Z), (0.5, 0.38)), slab(1, TOP, TOP + 0.85)])
    t_water, nw = solid(o, d, [quadric((0, 0, LID_Z), (0.47, 0.355)), slab(1, TOP, TOP + 0.45)])
    water = t_water < t_opaque
    out = np.where(water[..., None], mix(image, (0.44, 0.68, 0.86), 0.45), image)
    out = np.where((water & (nw[1] > F32(0.99)))[..., None], mix(out, (0.8, 0.92, 1.0), 0.5), out)
    edge = F32(1) - np.abs(dot(n, d))
    edge = edge * edge * edge
    glassy = mix(mix(out, (1.0, 1.0, 1.0), F32(0.15) + edge * F32(0.6)), (1.0, 1.0, 1.0),
                 pow64(np.clip(dot(n, half_vec), 0, 1)) * F32(0.9))
    return np.where((t_glass < t_opaque)[..., None], glassy, out)
