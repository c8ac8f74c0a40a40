"""The shapes world's rules: its vocabulary, the specs of a video and how they are sampled, and captions.

A video's spec is a function of `ShapesWorldConfig` (its seed, size and vocabulary) and the
video's index alone. Rules that keep every video readable:

- every shape's bounding box stays inside the frame, with a margin, in every frame;
- the shapes of one video have distinct colours and move in separate lanes (the frame is cut
  into equal bands, one per shape), so they never overlap;
- a shape's size and its travel over the clip scale with ``min(height, width)``: its bounding
  box side is 20-30 % of it (less where lanes are narrow) and it travels at least 10 % of it,
  at a constant speed in pixels per frame;
- all coordinates are in pixels, x to the right, y down; a pixel (i, j) covers
  ``[j, j + 1) x [i, i + 1)``, so its centre is ``(j + 0.5, i + 0.5)``. Edges are
  anti-aliased (4 x 4 supersampling), so positions and speeds are sub-pixel.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

# --- the vocabulary -------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
"""Shape names. All are drawn in an axis-aligned size x size box: a disc of diameter size, a
square of side size, and an isosceles triangle with its apex at the top centre and its base
(width size) at the bottom."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (40, 70, 230),
    "yellow": (235, 215, 30),
    "magenta": (210, 40, 210),
    "cyan": (30, 200, 220),
    "orange": (245, 130, 20),
    "white": (240, 240, 240),
}
"""Colour name -> RGB. Saturated (or, for white, bright) colours far from each other and from
the backgrounds' greys (levels 20-100), so they stay separable after H.264 and on texture."""

DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}
"""Direction name -> unit (dx, dy) in image coordinates (y down)."""

BACKGROUNDS: tuple[str, ...] = ("plain", "textured")
"""plain: one uniform grey (level 20-80). textured: a static, smooth, low-contrast greyish pattern
(mean level 35-80, +-16 around it, a slight tint of at most 5 per channel)."""

SIZE_RANGE = (0.20, 0.30)  # bounding-box side, as a fraction of min(height, width)
MIN_TRAVEL = 0.10  # shortest travel over the clip, as a fraction of min(height, width)
MARGIN = 1.0  # pixels kept free between a shape's bounding box and the frame's (or lane's) edge
SUPERSAMPLING = 4  # samples per pixel side when drawing anti-aliased edges
ROUNDING = 0.02  # pixels of room kept for rounding the start to 0.01 px


# --- specs and configuration -----------------------------------------------------------------

@dataclass(frozen=True)
class ShapeSpec:
    """One shape: its bounding-box centre starts at (x0, y0) and moves speed px/frame along direction."""

    shape: str
    colour: str
    direction: str
    speed: float  # pixels per frame
    size: float  # bounding-box side, pixels
    x0: float  # bounding-box centre in frame 0, pixels (x right)
    y0: float  # (y down)

    def position(self, t: float) -> tuple[float, float]:
        """Bounding-box centre at frame t."""
        dx, dy = DIRECTIONS[self.direction]
        return self.x0 + dx * self.speed * t, self.y0 + dy * self.speed * t

    def centroid(self, t: float) -> tuple[float, float]:
        """Area centroid at frame t (what the oracle measures): the box centre, but a triangle's
        centroid lies size/6 below it."""
        x, y = self.position(t)
        return x, y + (self.size / 6.0 if self.shape == "triangle" else 0.0)


@dataclass(frozen=True)
class VideoSpec:
    """Everything `render` needs: the shapes (drawn in order), the background kind and its seed."""

    shapes: tuple[ShapeSpec, ...]
    background: str
    seed: int  # draws the background (grey level, texture)


@dataclass(frozen=True)
class ShapesWorldConfig:
    """How the world's videos are drawn.

    shapes_per_video: an int, a ``range`` (``range(1, 3)``: 1 or 2) or an inclusive ``(min, max)``
    pair; each video draws its count uniformly from it.
    """

    num_frames: int = 9
    height: int = 32
    width: int = 32
    shapes_per_video: int | tuple[int, int] | range = 1
    backgrounds: tuple[str, ...] = BACKGROUNDS
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)
    directions: tuple[str, ...] = tuple(DIRECTIONS)
    seed: int = 0
    fps: int = 8

    def __post_init__(self):
        for name, values, vocabulary in (("shapes", self.shapes, SHAPES), ("colours", self.colours, COLOURS),
                                         ("directions", self.directions, DIRECTIONS),
                                         ("backgrounds", self.backgrounds, BACKGROUNDS)):
            if not values:
                raise ValueError(f"ShapesWorldConfig.{name}: empty")
            unknown = [v for v in values if v not in vocabulary]
            if unknown:
                raise ValueError(f"ShapesWorldConfig.{name}: unknown {unknown}; known: {list(vocabulary)}")
        if self.num_frames < 2:
            raise ValueError(f"ShapesWorldConfig.num_frames ({self.num_frames}) must be at least 2")
        if min(self.height, self.width) < 16:
            raise ValueError(f"ShapesWorldConfig: frames of {self.height}x{self.width} are too small (min side 16)")
        counts = self.counts()
        if not counts or min(counts) < 1:
            raise ValueError(f"ShapesWorldConfig.shapes_per_video ({self.shapes_per_video}) must be at least 1")
        if max(counts) > min(4, len(self.colours)):
            raise ValueError(f"ShapesWorldConfig.shapes_per_video ({self.shapes_per_video}): at most "
                             f"{min(4, len(self.colours))} shapes per video (distinct colours, one lane each)")
        # every lane must hold a 4 px shape travelling the shortest travel along its narrow side
        D = min(self.height, self.width)
        if D / max(counts) - 2 * MARGIN - ROUNDING - MIN_TRAVEL * D < 4.0:
            raise ValueError(f"ShapesWorldConfig.shapes_per_video ({self.shapes_per_video}): {max(counts)} lanes "
                             f"of {D / max(counts):.1f} px are too narrow for {self.height}x{self.width} frames; "
                             f"use fewer shapes or larger frames")
        if self.fps < 1:
            raise ValueError(f"ShapesWorldConfig.fps ({self.fps}) must be positive")

    def counts(self) -> list[int]:
        """The possible numbers of shapes per video."""
        spv = self.shapes_per_video
        if isinstance(spv, (int, np.integer)):
            return [int(spv)]
        if isinstance(spv, range):
            return list(spv)
        lo, hi = spv
        return list(range(int(lo), int(hi) + 1))


# --- sampling ---------------------------------------------------------------------------------

def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) % 2**63 for k in keys]))


def sample_spec(cfg: ShapesWorldConfig, index: int) -> VideoSpec:
    """The spec of video `index`: a function of cfg (its seed, size and vocabulary) and index alone."""
    rng = _rng(cfg.seed, index, 0x5A4E5)
    counts = cfg.counts()
    k = counts[int(rng.integers(len(counts)))]
    background = cfg.backgrounds[int(rng.integers(len(cfg.backgrounds)))]
    colours = [cfg.colours[i] for i in rng.choice(len(cfg.colours), size=k, replace=False)]
    shapes = [cfg.shapes[int(i)] for i in rng.integers(len(cfg.shapes), size=k)]
    directions = [cfg.directions[int(i)] for i in rng.integers(len(cfg.directions), size=k)]

    # Lanes: k equal bands. Split across the motion when all shapes move along one axis, so
    # that every shape gets the full frame length to travel; with mixed axes, take the split
    # that leaves the most room to the most cramped shape (ties at random).
    H, W = cfg.height, cfg.width
    D = min(H, W)
    order = rng.permutation(k)  # which shape takes which lane
    splits = [True, False] if rng.integers(2) else [False, True]  # True: bands of rows
    boxes = {split: [_lane(split, int(order[i]), k, H, W) for i in range(k)] for split in splits}
    room = {split: min(_max_size(b, directions[i], D) for i, b in enumerate(boxes[split])) for split in splits}
    split = max(splits, key=lambda sp: room[sp] if room[sp] < SIZE_RANGE[1] * D else math.inf)
    specs = [_sample_shape(rng, shapes[i], colours[i], directions[i], boxes[split][i], D, cfg.num_frames)
             for i in range(k)]
    return VideoSpec(shapes=tuple(specs), background=background, seed=int(rng.integers(2**31)))


def _lane(split_rows: bool, lane: int, k: int, H: int, W: int) -> tuple[float, float, float, float]:
    """(x_lo, y_lo, x_hi, y_hi) of lane `lane` of k."""
    if split_rows:
        return 0.0, lane * H / k, float(W), (lane + 1) * H / k
    return lane * W / k, 0.0, (lane + 1) * W / k, float(H)


def _max_size(box, direction, D) -> float:
    """The largest box side that fits `box` while travelling the shortest travel along `direction`."""
    x_lo, y_lo, x_hi, y_hi = box
    dx, dy = DIRECTIONS[direction]
    min_travel = MIN_TRAVEL * D
    return min(SIZE_RANGE[1] * D, x_hi - x_lo - 2 * MARGIN - ROUNDING - abs(dx) * min_travel,
               y_hi - y_lo - 2 * MARGIN - ROUNDING - abs(dy) * min_travel)


def _sample_shape(rng, shape, colour, direction, box, D, num_frames) -> ShapeSpec:
    x_lo, y_lo, x_hi, y_hi = box
    dx, dy = DIRECTIONS[direction]
    min_travel = MIN_TRAVEL * D
    # along x the box needs size + |dx| travel + 2 margins, along y size + |dy| travel + 2 margins
    room_x, room_y = x_hi - x_lo - 2 * MARGIN - ROUNDING, y_hi - y_lo - 2 * MARGIN - ROUNDING
    s_max = _max_size(box, direction, D)
    s_min = min(max(SIZE_RANGE[0] * D, 4.0), s_max)
    if s_max < 4.0:
        raise ValueError(f"shapes world: a lane of {x_hi - x_lo:.0f}x{y_hi - y_lo:.0f} px is too small for a "
                         f"shape of at least 4 px travelling {min_travel:.1f} px; use fewer shapes or larger frames")
    size = math.floor(float(rng.uniform(s_min, s_max)) * 100) / 100
    t_max = min((room_x - size) / abs(dx) if dx else math.inf, (room_y - size) / abs(dy) if dy else math.inf)
    travel = float(rng.uniform(min_travel, max(min_travel, t_max)))
    # a speed of 3 decimals: rounded down, up where that falls short of the shortest travel, but
    # never past the room there is (the travel may then fall short by less than 0.001 px/frame)
    steps = num_frames - 1
    speed = math.floor(travel / steps * 1000 + 1e-6) / 1000
    if speed * steps < min_travel - 1e-9:
        speed = math.ceil(min_travel / steps * 1000 - 1e-6) / 1000
    if speed * steps > t_max + 1e-9:
        speed = math.floor(t_max / steps * 1000 + 1e-6) / 1000
    travel = speed * steps
    start = []
    for lo, hi, d in ((x_lo, x_hi, dx), (y_lo, y_hi, dy)):
        a = lo + MARGIN + size / 2 - min(0.0, d * travel)
        b = hi - MARGIN - size / 2 - max(0.0, d * travel)
        # round inwards so the rounded start keeps the shape inside
        a, b = math.ceil(a * 100) / 100, math.floor(b * 100) / 100
        start.append(round(float(rng.uniform(a, b)) if b > a else (a + b) / 2, 2))
    return ShapeSpec(shape=shape, colour=colour, direction=direction, speed=speed, size=size,
                     x0=start[0], y0=start[1])


# --- captions -----------------------------------------------------------------------------

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(spec: VideoSpec) -> str:
    """``"a red circle moving left"``; several shapes are joined with ``" and "`` in drawing order."""
    return " and ".join(f"{_article(s.colour)} {s.colour} {s.shape} moving {s.direction}" for s in spec.shapes)


_PART = re.compile(r"^an? (?P<colour>[a-z]+) (?P<shape>[a-z]+) moving (?P<direction>[a-z]+)$")


def parse_caption(text: str) -> list[dict]:
    """Invert `caption`: ``[{"shape": ..., "colour": ..., "direction": ...}, ...]``.

    Case, surrounding spaces and a final full stop are ignored; anything outside the world's
    vocabulary raises ValueError.
    """
    clean = " ".join(text.strip().lower().rstrip(".").split())
    out = []
    for part in clean.split(" and "):
        m = _PART.match(part.strip())
        if not m or m["colour"] not in COLOURS or m["shape"] not in SHAPES or m["direction"] not in DIRECTIONS:
            raise ValueError(f"not a shapes-world caption: {text!r} (part {part!r})")
        out.append({"shape": m["shape"], "colour": m["colour"], "direction": m["direction"]})
    return out
