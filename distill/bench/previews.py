"""The benchmark's videos for people: each row's videos as previews a browser plays, and their index.

Previews are H.264 4:2:0 mp4 (the profile every browser plays; the sampled videos beside them keep full
chroma for the oracle), scaled up by a whole factor (nearest) so that a 32-pixel video stays sharp on a
page. The index, kept in the report's meta.json under "previews", names the file of every
(prompt, seed) in every column:

    {"rows": [{"prompt": ..., "seed": ...}, ...],
     "columns": [{"label": "teacher-ode-50", "model": "teacher", "sampler": "ode", "steps": 50,
                  "guidance": 4.0, "checkpoint": "step-000300", "weights_id": ...,
                  "videos": ["web/teacher-ode-50/000.mp4", null, ...]}, ...]}

A `null` is a row the column has no video for (the data holds fewer held-out videos of a prompt).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from distill.video import mp4_writable, scale_up, write_video

logger = logging.getLogger(__name__)

PREVIEW_MIN_SIZE = 128
"""Previews are scaled up (by a whole factor) to at least this many pixels on their shorter side."""


def preview_frames(frames: np.ndarray, min_size: int = PREVIEW_MIN_SIZE) -> np.ndarray:
    """(F, H, W, 3) uint8 scaled up by the smallest whole factor reaching `min_size`, padded to even sizes
    (4:2:0 needs them)."""
    frames = scale_up(frames, min_size)
    return np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)), mode="edge")


def write_previews(out_dir: Path, label: str, videos: list[np.ndarray | None], fps: int = 8) -> list[str | None]:
    """Write each video as `web/<label>/<index>.mp4` under `out_dir`; their paths relative to it (None stays).
    Without PyAV (a dependency, but a GPU image with its own stack may lack it) there are no previews: every path
    is None, and the pages show their tables and plots only."""
    if not mp4_writable():
        logger.warning("bench: no browser previews for %s: PyAV (av) is not installed", label)
        return [None] * len(videos)
    paths = []
    for index, frames in enumerate(videos):
        if frames is None:
            paths.append(None)
            continue
        rel = f"web/{label}/{index:03d}.mp4"
        write_video(preview_frames(np.asarray(frames)), Path(out_dir) / rel, fps=fps, full_chroma=False)
        paths.append(rel)
    return paths


def grid_rows(prompts: list[str], seeds: list[int]) -> list[dict]:
    """The rows of the video grid, prompt-major as the validator samples them."""
    return [{"prompt": p, "seed": s} for p in prompts for s in seeds]


def data_column_videos(rows: list[dict], seeds: list[int], captions: list[str], videos: list) -> list:
    """The held-out real videos laid on the grid: the j-th video of a prompt in the row of its j-th seed."""
    by_prompt: dict[str, list] = {}
    for caption, frames in zip(captions, videos):
        by_prompt.setdefault(caption, []).append(frames)
    out = []
    for row in rows:
        held = by_prompt.get(row["prompt"], [])
        j = seeds.index(row["seed"])
        out.append(held[j] if j < len(held) else None)
    return out
