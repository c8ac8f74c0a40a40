"""Drawing the shapes world: anti-aliased shape coverage, backgrounds and whole videos from a spec."""

from __future__ import annotations

import math

import numpy as np

from distill.data.shapes_world import (BACKGROUNDS, COLOURS, SHAPES, SUPERSAMPLING, ShapesWorldConfig, VideoSpec,
                                       _rng, caption, sample_spec)


def coverage(shape: str, cx: float, cy: float, size: float, height: int, width: int,
             ss: int = SUPERSAMPLING, window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of `shape` with box centre (cx, cy) and side `size`.

    Returns a (height, width) float32 map, or with `window` = (row0, col0, row1, col1) the map of
    that window only (which may extend past the frame).
    """
    r0, c0, r1, c1 = window if window is not None else (0, 0, height, width)
    half = size / 2.0
    # only the pixels the box touches
    rr0, rr1 = max(r0, math.floor(cy - half)), min(r1, math.ceil(cy + half) + 1)
    cc0, cc1 = max(c0, math.floor(cx - half)), min(c1, math.ceil(cx + half) + 1)
    out = np.zeros((r1 - r0, c1 - c0), dtype=np.float32)
    if rr1 <= rr0 or cc1 <= cc0:
        return out
    offs = (np.arange(ss, dtype=np.float32) + 0.5) / ss
    ys = (np.arange(rr0, rr1, dtype=np.float32)[:, None] + offs[None, :]).reshape(-1)[:, None] - cy
    xs = (np.arange(cc0, cc1, dtype=np.float32)[:, None] + offs[None, :]).reshape(-1)[None, :] - cx
    if shape == "circle":
        inside = xs * xs + ys * ys <= half * half
    elif shape == "square":
        inside = (np.abs(xs) <= half) & (np.abs(ys) <= half)
    elif shape == "triangle":
        inside = (ys <= half) & (np.abs(xs) <= (ys + half) / 2.0)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    cov = inside.reshape(rr1 - rr0, ss, cc1 - cc0, ss).mean(axis=(1, 3), dtype=np.float32)
    out[rr0 - r0:rr1 - r0, cc0 - c0:cc1 - c0] = cov
    return out


def shape_area(shape: str, size: float) -> float:
    """Area in px^2 of `shape` with box side `size`."""
    return {"circle": math.pi / 4.0, "square": 1.0, "triangle": 0.5}[shape] * size * size


def background(spec: VideoSpec, height: int, width: int) -> np.ndarray:
    """The (height, width, 3) float32 background of a video (static over its frames)."""
    rng = _rng(spec.seed, 0xB6)
    if spec.background == "plain":
        level = float(rng.uniform(20, 80))
        return np.full((height, width, 3), level, dtype=np.float32)
    if spec.background != "textured":
        raise ValueError(f"unknown background {spec.background!r}; known: {BACKGROUNDS}")
    level = float(rng.uniform(35, 80))
    tint = rng.uniform(-5, 5, size=3)
    # a smooth pattern: a coarse random grid (5 cells across the short side at any size),
    # bilinearly upsampled, plus faint stripes; normalised to +-16 grey levels.
    cells = 5
    gh, gw = max(3, round(cells * height / min(height, width))), max(3, round(cells * width / min(height, width)))
    grid = rng.uniform(-1, 1, size=(gh + 1, gw + 1))
    y = (np.arange(height) + 0.5) / height * gh
    x = (np.arange(width) + 0.5) / width * gw
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    pattern = (grid[y0][:, x0] * (1 - fy) * (1 - fx) + grid[y0 + 1][:, x0] * fy * (1 - fx)
               + grid[y0][:, x0 + 1] * (1 - fy) * fx + grid[y0 + 1][:, x0 + 1] * fy * fx)
    angle, freq, phase = rng.uniform(0, math.pi), rng.uniform(1.5, 3.5), rng.uniform(0, 2 * math.pi)
    yy, xx = np.meshgrid(np.arange(height) / min(height, width), np.arange(width) / min(height, width),
                         indexing="ij")
    pattern = pattern + 0.5 * np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)) + phase)
    pattern = pattern / max(1e-6, float(np.abs(pattern).max())) * 16.0
    return (level + pattern[..., None] + tint[None, None, :]).astype(np.float32)


def render(spec: VideoSpec, cfg: ShapesWorldConfig) -> np.ndarray:
    """The video of `spec`: (num_frames, height, width, 3) uint8."""
    F, H, W = cfg.num_frames, cfg.height, cfg.width
    bg = background(spec, H, W)
    frames = np.repeat(bg[None], F, axis=0)
    for s in spec.shapes:
        colour = np.asarray(COLOURS[s.colour], dtype=np.float32)
        for t in range(F):
            cx, cy = s.position(t)
            a = coverage(s.shape, cx, cy, s.size, H, W)[..., None]
            frames[t] = frames[t] * (1.0 - a) + colour * a
    return np.clip(frames + 0.5, 0, 255).astype(np.uint8)


def sample(cfg: ShapesWorldConfig, index: int) -> tuple[np.ndarray, str, VideoSpec]:
    """Frames, caption and spec of video `index`."""
    spec = sample_spec(cfg, index)
    return render(spec, cfg), caption(spec), spec
