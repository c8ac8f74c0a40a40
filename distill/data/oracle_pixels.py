"""The oracle's pixel work (numpy only): input normalisation, masks and connected components,
unmixing pixels against the palette, and the noise estimate."""

from __future__ import annotations

import math

import numpy as np

from distill.data.shapes_world import COLOURS

_PALETTE = np.asarray(list(COLOURS.values()), dtype=np.float32)  # (K, 3)


# --- input ------------------------------------------------------------------------------------

def normalise(video, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """A video as float32 (F, H, W, 3) in grey levels [0, 255].

    Accepts a uint8 array or tensor (F, H, W, 3) (or one frame (H, W, 3)); a float torch tensor
    (C, F, H, W) in `value_range` (default [-1, 1], what the model produces in pixel space); a
    float numpy array (F, H, W, 3) in `value_range` (default [0, 255]).
    """
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(video, torch.Tensor):
        if video.dtype == torch.uint8:
            video = video.cpu().numpy()
        else:
            if video.ndim == 5 and video.shape[0] == 1:
                video = video[0]
            if video.ndim != 4 or video.shape[0] != 3:
                raise ValueError(f"oracle: a float tensor must be (C=3, F, H, W), got {tuple(video.shape)}")
            lo, hi = value_range or (-1.0, 1.0)
            x = (video.detach().float().cpu().permute(1, 2, 3, 0).numpy() - lo) * (255.0 / (hi - lo))
            return np.clip(x, 0.0, 255.0).astype(np.float32)
    x = np.asarray(video)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] not in (3, 4):
        raise ValueError(f"oracle: expected (F, H, W, 3) frames, got {x.shape}")
    x = x[..., :3]
    if x.dtype == np.uint8:
        return x.astype(np.float32)
    lo, hi = value_range or (0.0, 255.0)
    return np.clip((x.astype(np.float32) - lo) * (255.0 / (hi - lo)), 0.0, 255.0)


# --- small image operations (numpy only) -----------------------------------------------------

def _shift_max(a: np.ndarray, axis: int) -> np.ndarray:
    out = a.copy()
    n = a.shape[axis]
    sl = [slice(None)] * a.ndim
    src = [slice(None)] * a.ndim
    sl[axis], src[axis] = slice(1, n), slice(0, n - 1)
    np.maximum(out[tuple(sl)], a[tuple(src)], out=out[tuple(sl)])
    sl[axis], src[axis] = slice(0, n - 1), slice(1, n)
    np.maximum(out[tuple(sl)], a[tuple(src)], out=out[tuple(sl)])
    return out


def _dilate(mask: np.ndarray, r: int = 1) -> np.ndarray:
    """3x3 (square) dilation over the last two axes, r times."""
    out = mask
    for _ in range(r):
        out = _shift_max(_shift_max(out, -1), -2)
    return out


def _erode_cross(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 4 neighbours are set too (outside the frame counts as unset)."""
    out = mask.copy()
    out[..., 1:, :] &= mask[..., :-1, :]
    out[..., :-1, :] &= mask[..., 1:, :]
    out[..., :, 1:] &= mask[..., :, :-1]
    out[..., :, :-1] &= mask[..., :, 1:]
    out[..., 0, :] = out[..., -1, :] = False
    out[..., :, 0] = out[..., :, -1] = False
    return out


def _components(mask: np.ndarray) -> np.ndarray:
    """8-connected components over the last two axes: int labels, 0 = unset, unique over the array.

    A pixel's label is the flat index + 1 of the last pixel of its component (max propagation
    with pointer jumping, a few iterations for compact blobs).
    """
    flat_ids = np.arange(1, mask.size + 1, dtype=np.int64).reshape(mask.shape)
    lab = np.where(mask, flat_ids, 0)
    while True:
        new = np.where(mask, _shift_max(_shift_max(lab, -1), -2), 0)
        flat = new.reshape(-1)
        nz = flat > 0
        flat[nz] = flat[flat[nz] - 1]  # jump to the label held by the label's own pixel
        if np.array_equal(new, lab):
            return lab
        lab = new


def _median_masked(x: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median over axis 0 of x (F, ...) where `valid` (F, ...); returns (median, any_valid)."""
    big = np.where(valid, x, np.inf)
    srt = np.sort(big, axis=0)
    n = valid.sum(axis=0)
    lo = np.clip((n - 1) // 2, 0, None)[None]
    hi = np.clip(n // 2, 0, None)[None]
    med = 0.5 * (np.take_along_axis(srt, lo, 0)[0] + np.take_along_axis(srt, hi, 0)[0])
    return np.where(n > 0, med, 0.0), n > 0


# --- colour unmixing --------------------------------------------------------------------------

def _unmix(x: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coverage and off-line residual of every pixel against every palette colour.

    x: (F, H, W, 3); bg: (3,) or (H, W, 3). Returns alpha (K, F, H, W) (unclipped) and residual
    (K, F, H, W) in grey levels.
    """
    diff = x - bg  # (F, H, W, 3)
    direc = _PALETTE.reshape((-1,) + (1,) * (bg.ndim - 1) + (3,)) - bg  # (K, [H, W,] 3)
    norm2 = np.maximum((direc * direc).sum(-1), 1.0)  # (K, [H, W])
    if bg.ndim == 1:
        dot = np.einsum("fhwc,kc->kfhw", diff, direc)
        norm2 = norm2[:, None, None, None]
    else:
        dot = np.einsum("fhwc,khwc->kfhw", diff, direc)
        norm2 = norm2[:, None]
    alpha = dot / norm2
    # Pythagoras: |diff|^2 = (projection)^2 + residual^2
    resid = np.sqrt(np.maximum((diff * diff).sum(-1)[None] - alpha * dot, 0.0))
    return alpha, resid


def _label(alpha: np.ndarray, resid: np.ndarray) -> np.ndarray:
    """(K, F, H, W) bool: the pixel takes colour k (closest line among coverages >= 0.5)."""
    ok = (alpha >= 0.5) & (alpha <= 1.6)
    score = np.where(ok, resid, np.inf)
    best = np.argmin(score, axis=0)
    best_score = np.take_along_axis(score, best[None], 0)[0]
    # reject pixels far off every line (a colour that is no palette colour): a loose bound that
    # grows with the coverage (0.35 of the colour's norm, 60-85 grey levels, at full coverage)
    norms = np.linalg.norm(_PALETTE, axis=1)
    limit = 0.35 * np.take(norms, best) * np.clip(np.take_along_axis(alpha, best[None], 0)[0], 0, 1) + 12.0
    fg = np.isfinite(best_score) & (best_score <= limit)
    return (best[None] == np.arange(len(_PALETTE))[:, None, None, None]) & fg[None]


# --- noise ----------------------------------------------------------------------------------

_IMMERKAER_GAUSS = 6.0 * 0.6745  # median |response| of the filter to unit Gaussian noise


def _noise(x: np.ndarray, edges: np.ndarray, shapes: np.ndarray) -> float:
    """Robust noise level (grey levels): the mean of a spatial estimate away from shape edges and a
    temporal one on the background (away from the shapes)."""
    F, H, W, _ = x.shape
    # spatial (Immerkaer): [[1,-2,1],[-2,4,-2],[1,-2,1]] kills constants, ramps and planes
    c = x[:, 1:-1, 1:-1]
    r = (x[:, :-2, :-2] + x[:, :-2, 2:] + x[:, 2:, :-2] + x[:, 2:, 2:]
         - 2 * (x[:, :-2, 1:-1] + x[:, 2:, 1:-1] + x[:, 1:-1, :-2] + x[:, 1:-1, 2:]) + 4 * c)
    keep = ~_dilate(edges, 1)[:, 1:-1, 1:-1]
    resp = np.abs(r)[keep] if keep.any() else np.abs(r).reshape(-1, 3)
    spatial = float(np.median(resp, axis=0).mean()) / _IMMERKAER_GAUSS
    if F < 2:
        return spatial
    # temporal: differences of consecutive frames
    keep_t = ~(shapes[1:] | shapes[:-1])
    d = np.abs(x[1:] - x[:-1])
    resp_t = d[keep_t] if keep_t.any() else d.reshape(-1, 3)
    temporal = float(np.median(resp_t, axis=0).mean()) / (math.sqrt(2.0) * 0.6745)
    return 0.5 * (spatial + temporal)
