"""Quality of generated videos: shapes-world oracle scores, diversity, coverage, Fréchet distance.

- Prompt adherence per attribute: the oracle reads each video and `score_caption` checks it.
- Motion consistency: the share of detected shapes moving on a straight line at constant
  speed (centroid residual under 0.5 px, present in at least 90 % of frames).
- Sharpness: the oracle's sharpness x cleanliness.
- Diversity: for each prompt, the spread across seeds of what the prompt leaves free
  (start position, speed, size), averaged over prompts: a collapsed student scores 0.
- Coverage (Naeem et al., 2020): the share of real videos whose k-nearest-neighbour ball,
  in oracle feature space, holds at least one generated video.
- Fréchet distance between Gaussian fits of generated and real feature sets; the default
  features come from the oracle, and plug-in extractors (e.g. CLIP from a local weights
  path) add their own, plus a text-video score.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from distill.data.oracle import VideoReading, analyse, score_caption
from distill.data.shapes import COLOURS, DIRECTIONS, SHAPES
from distill.errors import InputError


def oracle_features(reading: VideoReading) -> np.ndarray:
    """A fixed-length description of a video: its first shape's attributes and the image quality."""
    f = np.zeros(3 + len(SHAPES) + 2 + 5)
    if reading.shapes:
        s = reading.shapes[0]
        side = min(reading.height, reading.width)
        rgb = np.asarray(COLOURS.get(s.colour, (0, 0, 0)), dtype=float) / 255.0
        shape = np.eye(len(SHAPES))[SHAPES.index(s.shape)] if s.shape in SHAPES else np.zeros(len(SHAPES))
        direction = np.asarray(DIRECTIONS.get(s.direction, (0.0, 0.0)), dtype=float)
        start = s.positions[np.isfinite(s.positions).all(axis=1)][:1]
        x0, y0 = (start[0] / [reading.width, reading.height]) if len(start) else (0.5, 0.5)
        f[:] = np.concatenate([rgb, shape, direction, [x0, y0, s.speed / side * 10, s.size / side, reading.sharpness]])
    return f


def free_attributes(reading: VideoReading) -> np.ndarray | None:
    """What a caption does not fix: start position, speed and size of the first shape, in frame units."""
    if not reading.shapes:
        return None
    s = reading.shapes[0]
    start = s.positions[np.isfinite(s.positions).all(axis=1)][:1]
    if not len(start):
        return None
    side = min(reading.height, reading.width)
    return np.array([start[0][0] / reading.width, start[0][1] / reading.height, s.speed / side, s.size / side])


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), with symmetric square roots."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)

    def sqrtm(m: np.ndarray) -> np.ndarray:
        w, v = np.linalg.eigh((m + m.T) / 2)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    root_a = sqrtm(s_a)
    cross = sqrtm(root_a @ s_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * cross))


def coverage(real: np.ndarray, fake: np.ndarray, k: int = 3) -> float:
    """Share of real samples whose k-NN radius (among real samples) contains a generated sample."""
    if len(real) <= k or not len(fake):
        return float("nan")
    d_rr = np.linalg.norm(real[:, None] - real[None], axis=-1)
    radius = np.sort(d_rr, axis=1)[:, k]  # index 0 is the point itself
    d_rf = np.linalg.norm(real[:, None] - fake[None], axis=-1)
    return float((d_rf.min(axis=1) <= radius).mean())


class FeatureMetric(ABC):
    """A plug-in: features of videos (for a Fréchet distance) and optionally a text-video score."""

    name: str

    @abstractmethod
    def features(self, videos: list[np.ndarray]) -> np.ndarray: ...

    def text_score(self, videos: list[np.ndarray], captions: list[str]) -> float | None:
        return None


class ClipMetric(FeatureMetric):
    """CLIP from a local folder (`transformers` CLIPModel format): FD of frame-mean image features, CLIP score."""

    name = "clip"

    def __init__(self, weights: str):
        import torch
        from transformers import CLIPModel, CLIPProcessor

        self.torch = torch
        self.model = CLIPModel.from_pretrained(weights).eval()
        self.processor = CLIPProcessor.from_pretrained(weights)

    def _image_features(self, video: np.ndarray):
        with self.torch.no_grad():
            inputs = self.processor(images=list(video), return_tensors="pt")
            feats = self.model.get_image_features(**inputs)
            feats = getattr(feats, "pooler_output", feats)
        return feats / feats.norm(dim=-1, keepdim=True)

    def features(self, videos: list[np.ndarray]) -> np.ndarray:
        return np.stack([self._image_features(v).mean(0).numpy() for v in videos])

    def text_score(self, videos: list[np.ndarray], captions: list[str]) -> float:
        scores = []
        with self.torch.no_grad():
            for video, caption in zip(videos, captions):
                text = self.processor(text=[caption], return_tensors="pt", padding=True)
                t = self.model.get_text_features(**text)
                t = getattr(t, "pooler_output", t)
                t = t / t.norm(dim=-1, keepdim=True)
                scores.append(float(100 * (self._image_features(video) @ t.T).clamp(min=0).mean()))
        return float(np.mean(scores))


METRICS: dict[str, type[FeatureMetric]] = {"clip": ClipMetric}


def check_metric(spec: str) -> tuple[str, str]:
    """(name, weights folder) of `name=/local/weights/path`; an InputError unless both are there."""
    name, _, weights = spec.partition("=")
    if name not in METRICS or not weights:
        raise InputError(f"--metric {spec!r}: expected NAME=PATH with NAME one of {', '.join(METRICS)}")
    if not Path(weights).is_dir():
        raise InputError(f"--metric {spec!r}: {weights}: no such folder (the {name} weights)")
    return name, weights


def load_metric(spec: str) -> FeatureMetric:
    """`name=/local/weights/path`, e.g. clip=/models/clip-vit-base-patch32."""
    name, weights = check_metric(spec)
    return METRICS[name](weights)


def score_videos(videos: list[np.ndarray], captions: list[str], prompt_ids: list[int], *,
                 real_features: np.ndarray | None = None, real_videos: list[np.ndarray] | None = None,
                 metrics: list[FeatureMetric] = ()) -> dict[str, float]:
    """Aggregate quality of generated `videos` (uint8 F x H x W x 3), each made for `captions[i]`."""
    readings = [analyse(v) for v in videos]
    scores = [score_caption(r, c) for r, c in zip(readings, captions)]
    out = {f"adherence_{k}": float(np.mean([s[k] for s in scores])) for k in ("colour", "shape", "direction", "all")}
    shapes = [s for r in readings for s in r.shapes]
    out["motion_consistency"] = float(np.mean([s.motion_residual < 0.5 and s.presence >= 0.9 for s in shapes])) \
        if shapes else 0.0
    out["sharpness"] = float(np.mean([r.quality for r in readings]))
    spreads = []
    for pid in sorted(set(prompt_ids)):
        free = [free_attributes(r) for r, p in zip(readings, prompt_ids) if p == pid]
        free = [f for f in free if f is not None]
        if len(free) >= 2:
            spreads.append(float(np.std(np.stack(free), axis=0).mean()))
    out["diversity"] = float(np.mean(spreads)) if spreads else 0.0
    feats = np.stack([oracle_features(r) for r in readings])
    # A Fréchet distance compares covariances: it needs two videos on each side (one prompt x one
    # seed still measures latency and adherence).
    if real_features is not None and len(real_features) > 1 and len(feats) > 1:
        out["fd_oracle"] = frechet_distance(feats, real_features)
        out["coverage"] = coverage(real_features, feats)
    for metric in metrics:
        if real_videos and len(real_videos) > 1 and len(videos) > 1:
            out[f"fd_{metric.name}"] = frechet_distance(metric.features(videos), metric.features(real_videos))
        text = metric.text_score(videos, captions)
        if text is not None:
            out[f"{metric.name}_score"] = text
    return out


def real_feature_set(videos: list[np.ndarray]) -> np.ndarray:
    return np.stack([oracle_features(analyse(v)) for v in videos])
