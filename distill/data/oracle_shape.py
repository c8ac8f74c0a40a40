"""Reading one shape found by the oracle: its motion (a straight line through its centroids) and
its outline (the best-fitting anti-aliased template, crisp or blurred)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from distill.data.oracle_pixels import _erode_cross
from distill.data.shapes_render import coverage, shape_area
from distill.data.shapes_world import COLOURS, DIRECTIONS, SHAPES

_COLOUR_NAMES = tuple(COLOURS)
_DIR_NAMES = tuple(DIRECTIONS)
_DIR_VECTORS = np.asarray(list(DIRECTIONS.values()), dtype=np.float64)
_DIR_VECTORS /= np.linalg.norm(_DIR_VECTORS, axis=1, keepdims=True)

STATIC_TRAVEL = 0.03  # less travel than this (fraction of min(H, W)) over the clip reads as "none"
TEMPLATE_FRAMES = 5
BLUR_SIGMAS = (0.0, 0.6, 1.0, 1.5, 2.2)  # px: the blurs templates are tried at


@dataclass
class ShapeReading:
    """One shape found in a video."""

    colour: str
    shape: str
    direction: str  # a DIRECTIONS name, or "none" when it does not move
    speed: float  # px/frame along the fitted line
    velocity: tuple[float, float]  # (vx, vy) px/frame, y down
    positions: np.ndarray  # (F, 2) coverage centroid (x, y) per frame; NaN where not found
    size: float  # bounding-box side implied by its area for the chosen shape, px
    presence: float  # fraction of frames in which it was found
    colour_residual: float  # mean distance (grey levels) of its core pixels from the colour's line; 0 = exact
    shape_errors: dict[str, float]  # template misfit per shape, at its best blur (lower fits better)
    shape_confidence: float  # 1 - best / second-best misfit, in [0, 1]
    direction_confidence: float  # cosine between the velocity and the chosen direction (0 when "none")
    motion_residual: float  # rms distance (px) of the centroids from the fitted line
    fit_error: float  # the chosen shape's crisp template misfit (what sharpness judges)
    blur: float  # px: the Gaussian sigma of the best-fitting template (0 = crisp)
    edge_width: float  # px: soft-edge pixels (0.1 < coverage < 0.9) per unit of perimeter

    def attributes(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "direction": self.direction}


def _read_shape(k, a, sel, region, pos, area, found, resid_k, label_k, D) -> ShapeReading:
    F = len(found)
    frames = np.flatnonzero(found)
    t = frames.astype(np.float64)
    P = pos[frames].astype(np.float64)
    # motion: least-squares line through the centroids
    if len(frames) >= 2:
        A = np.stack([np.ones_like(t), t], 1)
        coef, *_ = np.linalg.lstsq(A, P, rcond=None)
        velocity = coef[1]
        motion_residual = float(np.sqrt(np.mean(np.sum((A @ coef - P) ** 2, axis=1))))
    else:  # one frame: no motion to read
        velocity, motion_residual = np.zeros(2), 0.0
    speed = float(np.hypot(*velocity))
    if speed * max(F - 1, 1) < STATIC_TRAVEL * D:
        direction, direction_confidence = "none", 0.0
    else:
        cos = _DIR_VECTORS @ (velocity / speed)
        direction, direction_confidence = _DIR_NAMES[int(np.argmax(cos))], float(cos.max())

    # shape: templates of equal area at the centroid, crisp and blurred, on up to TEMPLATE_FRAMES frames
    use = frames[np.unique(np.linspace(0, len(frames) - 1, min(TEMPLATE_FRAMES, len(frames))).round().astype(int))]
    errors = np.zeros((len(SHAPES), len(BLUR_SIGMAS)))
    soft, perimeter = 0.0, np.zeros(len(SHAPES))
    H, W = a.shape[1:]
    for f in use:
        rows, cols = np.flatnonzero(region[f].any(1)), np.flatnonzero(region[f].any(0))
        r0, r1, c0, c1 = rows[0] - 2, rows[-1] + 3, cols[0] - 2, cols[-1] + 3
        win = (r0, c0, r1, c1)
        inside = _window(region[f].astype(np.float32), win)
        obs = _window(np.where(region[f], a[f], 0.0), win)
        ar = max(float(area[f]), 1e-6)
        cx, cy = pos[f]
        blurs = [(_blur_matrix(r1 - r0, sg), _blur_matrix(c1 - c0, sg)) for sg in BLUR_SIGMAS]
        for i, s in enumerate(SHAPES):
            size = math.sqrt(ar / shape_area(s, 1.0))
            bx, by = cx, cy - (size / 6.0 if s == "triangle" else 0.0)
            tmpl = coverage(s, bx, by, size, H, W, window=win)
            for j, (bh, bw) in enumerate(blurs):
                t = tmpl if bh is None else bh @ tmpl @ bw.T
                errors[i, j] += float(np.abs(obs - t * inside).sum()) / ar
            perimeter[i] += size * _PERIMETER[s]
        soft += float(((obs > 0.1) & (obs < 0.9)).sum())
    errors /= len(use)
    # the shape whose template fits best at any blur; sharpness judges the crisp template (blur 0)
    best_blur = errors.argmin(axis=1)
    fits = errors[np.arange(len(SHAPES)), best_blur]
    ranked = np.argsort(fits)
    shape = SHAPES[ranked[0]]
    best, second = fits[ranked[0]], fits[ranked[1]]
    size = float(np.sqrt(np.median(area[frames]) / shape_area(shape, 1.0)))
    core = _erode_cross(label_k & sel)
    colour_residual = float(resid_k[core].mean()) if core.any() else float(resid_k[sel].mean())
    return ShapeReading(
        colour=_COLOUR_NAMES[k], shape=shape, direction=direction, speed=speed,
        velocity=(float(velocity[0]), float(velocity[1])), positions=pos.astype(np.float64), size=size,
        presence=float(len(frames) / F), colour_residual=colour_residual,
        shape_errors={name: float(e) for name, e in zip(SHAPES, fits)},
        shape_confidence=float(1.0 - best / second) if second > 0 else 0.0,
        direction_confidence=direction_confidence, motion_residual=motion_residual,
        fit_error=float(errors[ranked[0], 0]), blur=float(BLUR_SIGMAS[best_blur[ranked[0]]]),
        edge_width=soft / max(perimeter[ranked[0]], 1e-6))


_PERIMETER = {"circle": math.pi, "square": 4.0, "triangle": 1.0 + math.sqrt(5.0)}  # per unit of box side


@lru_cache(maxsize=1024)
def _blur_matrix(n: int, sigma: float) -> np.ndarray | None:
    """(n, n) matrix of a 1-D Gaussian blur (zero outside), or None for sigma 0."""
    if sigma <= 0:
        return None
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    m = np.exp(-0.5 * (d / sigma) ** 2).astype(np.float32)
    return m / m.sum(axis=1, keepdims=True)


def _window(img: np.ndarray, win) -> np.ndarray:
    r0, c0, r1, c1 = win
    H, W = img.shape
    out = np.zeros((r1 - r0, c1 - c0), dtype=np.float32)
    rr0, rr1, cc0, cc1 = max(r0, 0), min(r1, H), max(c0, 0), min(c1, W)
    out[rr0 - r0:rr1 - r0, cc0 - c0:cc1 - c0] = img[rr0:rr1, cc0:cc1]
    return out
