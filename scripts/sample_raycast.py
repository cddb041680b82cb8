"""Ray casting of convex solids, for the sample renders (sample_render.py): intersections of ellipsoids, vertical
elliptic cylinders and slabs, hit by parallel rays in float32 with IEEE-exact arithmetic only (+ - * / sqrt), so
the results are bit-identical on any CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

F32 = np.float32
FAR = F32(1e9)
Arr = np.ndarray
Vec = tuple[float, float, float]


def unit(*v: float) -> tuple[float, ...]:
    n = math.sqrt(sum(x * x for x in v))
    return tuple(x / n for x in v)


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


def dot(n: list[Arr], v: Vec) -> Arr:
    return n[0] * F32(v[0]) + n[1] * F32(v[1]) + n[2] * F32(v[2])
