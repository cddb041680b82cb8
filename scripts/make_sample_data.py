"""Draw the committed sample sources: small stylised renders of one hardware object family.

The story is the field note on copy-only data prep: a product-image team's training data arrives as
separate handoffs that are never edited, and every dataset version copies from them.

    curated-2026-10/              8 finished views (PNG), each with a literal sidecar caption
                                  -> hardware-design-aesthetic-v1
    turntable-renders-2026-11/    a raw turntable export: 3 colorways x 4 view angles (PNG) and the
                                  render tool's attributes.csv, no captions
                                  -> hardware-design-aesthetic-v2 (v1 plus these, captions built from attributes)
    promoted-candidates-2026-11/  6 generated candidates (JPEG) promoted after review, with sidecars
                                  -> hardware-promoted-merge-v1 (a deliberate merge)
    masked-closeups-2026-12/      3 close-ups, each with sidecar and `<stem>.mask.png` (white on
                                  the object: the loss counts only the object)
    class-images-2026-12/         3 plain class images (regularisation), no captions
                                  -> hardware-masked-reg-v1 (v1's batch, the close-ups with masks: file, and the
                                  class images with role: regularisation)

What it draws: a rounded body (an elliptic cylinder with rounded shoulders, a seam around it and a grip on
one side) on a plain studio background with a soft floor shadow. On its top deck sit a screen (round or wide,
lit or dark) and buttons, in front of the top component: a dome lid, a flat lid, or a transparent reservoir
with water in it. An orthographic camera looks from one of four view angles (front, side, three-quarter,
top). A matte finish is flat banded shading; a glossy finish adds a specular highlight and a rim reflection.
Framing (zoom, offset, which side the camera and the key light are on) varies from picture to picture, so no
two pictures are near-duplicates. Captions name only what the picture shows, trigger first, in one tag
schema (view, body color, finish, top component, screen, buttons) and with no category words.

Deterministic by construction: fixed tables, no randomness, and only IEEE-exact arithmetic (+ - * / sqrt;
no transcendental functions, no reductions), so the pixels are bit-identical on any CPU, and the files are
byte-identical from run to run (PNG bytes may differ under another zlib build, so the tests compare the
committed images by their pixels). Sources are immutable: an existing batch is refused unless
--force. A batch is written into a hidden folder beside it, renamed into place, and `_READY` is written last.

    python scripts/make_sample_data.py [--out DATA_ROOT/sources] [--force]
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lora_pipeline.core.fileio import atomic_write_text
from lora_pipeline.core.paths import READY_MARKER, DataRoot

TRIGGER = "hdaesth"
SS = 2  # supersampling factor (antialiasing)
F32 = np.float32
FAR = F32(1e9)
Arr = np.ndarray
Vec = tuple[float, float, float]

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
NUMBERS = {1: "one", 2: "two", 3: "three"}
TOP, LID_Z = 1.15, -0.22  # height of the body's top deck; depth of the lid's centre


@dataclass(frozen=True)
class Shot:
    """One picture: what the object looks like, and how it is framed."""

    file: str
    view: str
    color: str
    finish: str  # matte | glossy
    top: str  # dome lid | flat lid | transparent reservoir
    screen: str  # "<lit|dark> <round|wide> screen"
    buttons: int
    background: str
    size: tuple[int, int] = (512, 512)  # width, height
    zoom: float = 1.0
    mirror: bool = False  # look from the left instead of the right
    shift: float = 0.0  # horizontal offset of the object, in world units
    key: int = -1  # the key light comes from the left (-1) or the right (1)

    @property
    def caption(self) -> str:
        return (f"{TRIGGER}, {self.view}, {self.color} body, {self.finish} finish, {self.top}, {self.screen}, "
                f"{NUMBERS[self.buttons]} buttons")


def _unit(*v: float) -> tuple[float, ...]:
    n = math.sqrt(sum(x * x for x in v))
    return tuple(x / n for x in v)


# ---- ray casting: convex solids as intersections of ellipsoids, elliptic cylinders and y-slabs -------------
Prim = Callable[[tuple[Arr, Arr, Arr], Vec], tuple[Arr, Arr, Callable]]


def quadric(center: Vec, radii: Vec | tuple[float, float]) -> Prim:
    """Ellipsoid (three radii) or vertical elliptic cylinder (radii for x and z)."""
    axes = (0, 1, 2) if len(radii) == 3 else (0, 2)
    rad = dict(zip(axes, radii, strict=True))

    def hit(o: tuple[Arr, Arr, Arr], d: Vec) -> tuple[Arr, Arr, Callable]:
        q = [(o[k] - F32(center[k])) / F32(rad[k]) for k in axes]
        e = [d[k] / rad[k] for k in axes]
        a = sum(x * x for x in e)
        b = q[0] * F32(e[0])
        c = q[0] * q[0]
        for qk, ek in zip(q[1:], e[1:], strict=True):
            b = b + qk * F32(ek)
            c = c + qk * qk
        disc = b * b - F32(a) * (c - F32(1))
        root = np.sqrt(np.maximum(disc, F32(0)))
        ok = disc >= 0
        tin = np.where(ok, (-b - root) / F32(a), FAR)
        tout = np.where(ok, (-b + root) / F32(a), -FAR)

        def normal(p: tuple[Arr, Arr, Arr]) -> list[Arr]:
            zero = np.zeros_like(p[0])
            return [(p[k] - F32(center[k])) / F32(rad[k] * rad[k]) if k in rad else zero for k in range(3)]

        return tin, tout, normal

    return hit


def slab(axis: int, lo: float, hi: float) -> Prim:
    """Between two planes across one axis (0 = x, 1 = y, 2 = z)."""

    def hit(o: tuple[Arr, Arr, Arr], d: Vec) -> tuple[Arr, Arr, Callable]:
        sign = F32(1 if d[axis] < 0 else -1)  # the plane a ray enters through faces back along it

        def normal(p: tuple[Arr, Arr, Arr]) -> list[Arr]:
            return [np.full_like(p[0], sign if k == axis else F32(0)) for k in range(3)]

        if d[axis] == 0:  # parallel: inside for every t, or never
            inside = (o[axis] > F32(lo)) & (o[axis] < F32(hi))
            return np.where(inside, -FAR, FAR), np.where(inside, FAR, -FAR), normal
        t_lo, t_hi = (F32(lo) - o[axis]) / F32(d[axis]), (F32(hi) - o[axis]) / F32(d[axis])
        return (t_hi, t_lo, normal) if d[axis] < 0 else (t_lo, t_hi, normal)

    return hit


def solid(o: tuple[Arr, Arr, Arr], d: Vec, prims: list[Prim]) -> tuple[Arr, list[Arr]]:
    """Entry distance (FAR on a miss) and unit normal of a convex intersection of primitives."""
    hits = [p(o, d) for p in prims]
    tin, tout = hits[0][0], hits[0][1]
    for t0, t1, _ in hits[1:]:
        tin, tout = np.maximum(tin, t0), np.minimum(tout, t1)
    tin = np.where(tin < tout, tin, FAR)
    p = tuple(o[k] + np.minimum(tin, F32(100)) * F32(d[k]) for k in range(3))
    n = hits[0][2](p)
    for t0, _, nf in hits[1:]:  # the normal of whichever surface the ray entered last
        n = [np.where(t0 == tin, a, b) for a, b in zip(nf(p), n, strict=True)]
    length = np.sqrt(n[0] * n[0] + n[1] * n[1] + n[2] * n[2]) + F32(1e-12)
    return tin, [x / length for x in n]


def rounded(cx: float, cz: float, rx: float, rz: float, y0: float, y1: float, bulge: float) -> list[Prim]:
    """A vertical elliptic cylinder whose top and bottom edges are rounded off by an ellipsoid."""
    mid, half = (y0 + y1) / 2, (y1 - y0) / 2
    return [quadric((cx, 0, cz), (rx, rz)), slab(1, y0, y1),
            quadric((cx, mid, cz), (rx * bulge, half * 1.5, rz * bulge))]


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


def dot(n: list[Arr], v: Vec) -> Arr:
    return n[0] * F32(v[0]) + n[1] * F32(v[1]) + n[2] * F32(v[2])


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
        (sa, ca), (ce, se) = (_unit(*v) for v in VIEWS[shot.view])
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
    return _unit(*(0.45 * shot.key * cam.right[k] + 0.8 * cam.up[k] - 0.5 * cam.d[k] for k in range(3)))


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
    half_vec = _unit(*(light[k] - d[k] for k in range(3)))
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


# ---- the three handoffs ---------------------------------------------------------------------------------
# Framing (zoom, shift, mirror, key light) varies from picture to picture so that no two pictures are
# near-duplicates (64-bit dHash at least 13 bits apart; the tests check > 10).
CURATED = [
    Shot("cur-01-sage.png", "three-quarter view", "sage green", "matte", "dome lid", "lit round screen", 2,
         "warm beige", (640, 640), zoom=0.8, shift=0.4, key=1),
    Shot("cur-02-coral.png", "front view", "coral red", "glossy", "flat lid", "dark wide screen", 3,
         "light gray", (640, 512), zoom=1.25, shift=0.4),
    Shot("cur-03-slate.png", "side view", "slate blue", "matte", "transparent reservoir", "lit wide screen", 2,
         "off white", (512, 640), zoom=1.25, mirror=True),
    Shot("cur-04-cream.png", "top view", "cream white", "glossy", "dome lid", "lit wide screen", 3,
         "pale blue", (640, 640), zoom=1.1, shift=0.2, key=1),
    Shot("cur-05-charcoal.png", "three-quarter view", "charcoal gray", "glossy", "transparent reservoir",
         "dark round screen", 2, "mist green", (576, 576), zoom=0.95, shift=-0.2, mirror=True),
    Shot("cur-06-mustard.png", "side view", "mustard yellow", "glossy", "flat lid", "lit round screen", 3,
         "blush", (640, 512), zoom=1.25, mirror=True, key=1),
    Shot("cur-07-teal.png", "front view", "teal", "matte", "dome lid", "lit round screen", 2,
         "off white", (512, 640), zoom=0.8, shift=-0.4, key=1),
    Shot("cur-08-pink.png", "top view", "dusty pink", "matte", "flat lid", "dark round screen", 2,
         "light gray", (576, 576), zoom=1.1, shift=-0.2),
]
COLORWAYS = {  # name -> (color, finish, top, screen, buttons)
    "slate": ("slate blue", "glossy", "transparent reservoir", "lit wide screen", 3),
    "cream": ("cream white", "matte", "dome lid", "dark round screen", 2),
    "charcoal": ("charcoal gray", "glossy", "flat lid", "lit round screen", 2),
}
TURNTABLE = [  # the render tool frames and lights each view on its own; one backdrop for the whole export
    Shot(f"tt-{name}-{view.split()[0]}.png", view, *COLORWAYS[name], "studio gray", zoom=zoom, mirror=mirror, key=key)
    for name, view, zoom, mirror, key in [
        ("slate", "front view", 1.25, False, 1), ("slate", "three-quarter view", 0.95, True, 1),
        ("slate", "side view", 1.1, True, -1), ("slate", "top view", 1.25, False, -1),
        ("cream", "front view", 1.1, False, 1), ("cream", "three-quarter view", 1.1, False, -1),
        ("cream", "side view", 1.1, False, -1), ("cream", "top view", 1.25, False, 1),
        ("charcoal", "front view", 1.25, False, -1), ("charcoal", "three-quarter view", 0.95, False, -1),
        ("charcoal", "side view", 1.25, False, 1), ("charcoal", "top view", 1.1, False, 1),
    ]
]
PROMOTED = [
    Shot("cand-0142.jpg", "three-quarter view", "coral red", "matte", "transparent reservoir", "lit round screen", 3,
         "off white", (576, 576), zoom=0.95, shift=-0.2),
    Shot("cand-0157.jpg", "front view", "mustard yellow", "matte", "dome lid", "dark round screen", 2,
         "pale blue", (512, 640), zoom=0.8, shift=0.4, key=1),
    Shot("cand-0163.jpg", "side view", "teal", "glossy", "dome lid", "dark wide screen", 3,
         "warm beige", (640, 512), zoom=1.25, shift=-0.4),
    Shot("cand-0171.jpg", "top view", "sage green", "glossy", "transparent reservoir", "dark wide screen", 2,
         "blush", (576, 576), zoom=1.25, key=1),
    Shot("cand-0188.jpg", "three-quarter view", "dusty pink", "glossy", "dome lid", "lit wide screen", 3,
         "light gray", (640, 640), zoom=0.8, shift=-0.4, mirror=True),
    Shot("cand-0194.jpg", "front view", "slate blue", "matte", "flat lid", "lit round screen", 2,
         "mist green", (576, 576), zoom=1.25, shift=-0.2, key=1),
]
MASKED = [  # close-ups, each with a loss mask of the object (masks: file)
    Shot("close-01-teal.png", "three-quarter view", "teal", "glossy", "flat lid", "lit wide screen", 3,
         "blush", (512, 512), zoom=1.6, shift=0.3, key=1),
    Shot("close-02-mustard.png", "top view", "mustard yellow", "matte", "transparent reservoir", "dark round screen",
         2, "mist green", (512, 512), zoom=1.45, shift=-0.3, mirror=True),
    Shot("close-03-charcoal.png", "side view", "charcoal gray", "matte", "dome lid", "lit wide screen", 3,
         "pale blue", (512, 512), zoom=1.7, shift=0.4, key=1),
]
REGULARISATION = [  # class images (role: regularisation): the plain class, captioned by its class_tokens
    Shot("class-01.png", "front view", "cream white", "matte", "flat lid", "dark round screen", 2,
         "studio gray", (512, 512), zoom=0.7, shift=0.5),
    Shot("class-02.png", "top view", "charcoal gray", "matte", "flat lid", "dark wide screen", 2,
         "studio gray", (512, 512), zoom=0.9, shift=-0.5, key=1),
    Shot("class-03.png", "side view", "slate blue", "matte", "dome lid", "dark round screen", 2,
         "studio gray", (512, 512), zoom=0.7, shift=0.5, key=-1),
]
ATTRIBUTE_COLUMNS = ["file", "view", "color", "finish", "top", "screen", "buttons", "background"]
BATCHES: dict[str, tuple[list[Shot], str]] = {  # batch -> (shots, what travels with the images)
    "curated-2026-10": (CURATED, "sidecar"),
    "turntable-renders-2026-11": (TURNTABLE, "attributes"),
    "promoted-candidates-2026-11": (PROMOTED, "sidecar"),
    "masked-closeups-2026-12": (MASKED, "sidecar+masks"),
    "class-images-2026-12": (REGULARISATION, "none"),
}


def encode(image: Image.Image, suffix: str) -> bytes:
    buf = io.BytesIO()
    if suffix == ".jpg":
        image.save(buf, format="JPEG", quality=85, optimize=True)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


def attributes_csv(shots: list[Shot]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(ATTRIBUTE_COLUMNS)
    for s in shots:
        writer.writerow([s.file, s.view, s.color, s.finish, s.top, s.screen, NUMBERS[s.buttons], s.background])
    return buf.getvalue()


def write_batch(sources: Path, batch: str, shots: list[Shot], captions: str) -> None:
    """Build the batch in a hidden folder, rename it into place, then mark it `_READY`."""
    final, staging = sources / batch, sources / f".{batch}.staging"
    shutil.rmtree(staging, ignore_errors=True)  # our own leftover from an interrupted run
    staging.mkdir(parents=True)
    for shot in shots:
        image = render(shot)
        (staging / shot.file).write_bytes(encode(image, Path(shot.file).suffix))
        if captions.startswith("sidecar"):
            (staging / shot.file).with_suffix(".txt").write_text(shot.caption + "\n", encoding="utf-8")
        if captions.endswith("+masks"):
            (staging / shot.file).with_suffix(".mask.png").write_bytes(encode(object_mask(shot, image), ".png"))
    if captions == "attributes":
        (staging / "attributes.csv").write_text(attributes_csv(shots), encoding="utf-8")
    if final.exists():  # --force: unmark the old batch first, so nothing reads it as ready while it goes
        (final / READY_MARKER).unlink(missing_ok=True)
        retired = sources / f".{batch}.retired"
        shutil.rmtree(retired, ignore_errors=True)
        final.rename(retired)
        staging.rename(final)
        shutil.rmtree(retired)
    else:
        staging.rename(final)
    atomic_write_text(final / READY_MARKER, "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DataRoot.from_env().sources, help="the sources folder to fill")
    parser.add_argument("--force", action="store_true", help="replace batches that already exist")
    args = parser.parse_args(argv)
    existing = [b for b in BATCHES if (args.out / b).exists()]
    if existing and not args.force:
        print(f"{args.out / existing[0]}: batch already exists and sources are immutable; "
              "pass --force to regenerate it", file=sys.stderr)
        return 1
    for batch, (shots, captions) in BATCHES.items():
        write_batch(args.out, batch, shots, captions)
        print(f"wrote {args.out / batch} ({len(shots)} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
