"""Benchmark: the shapes-world oracle's time per video (every benchmark row scores its videos with it).

    python -m distill.bench.oracle [--videos 64] [--frames 9] [--size 32] [--shapes 2] [--json OUT]

Renders the videos in memory (`distill.data.shapes`, one or up to --shapes shapes each), reads each back with
`analyse`, and prints the median and mean milliseconds per video and how many readings got every shape right.
Prints numbers; asserts nothing.
"""

from __future__ import annotations

import json
import statistics
import time

from distill.arguments import Parser, at_least
from distill.data.oracle import analyse, score_caption
from distill.data.shapes import ShapesWorldConfig, caption, render, sample_spec


def measure(videos: int = 64, frames: int = 9, size: int = 32, shapes: int = 2, seed: int = 0) -> dict:
    cfg = ShapesWorldConfig(num_frames=frames, height=size, width=size, shapes_per_video=(1, shapes), seed=seed)
    specs = [sample_spec(cfg, i) for i in range(videos)]
    clips = [render(spec, cfg) for spec in specs]
    analyse(clips[0])  # warm-up: the first call's one-off costs are not the oracle's per-video time
    seconds, exact = [], 0
    for spec, clip in zip(specs, clips):
        start = time.perf_counter()
        reading = analyse(clip)
        seconds.append(time.perf_counter() - start)
        exact += score_caption(reading, caption(spec))["exact"] == 1.0
    return {"videos": videos, "size": [frames, size, size], "max_shapes": shapes, "read_exactly": exact,
            "median_ms_per_video": 1000 * statistics.median(seconds),
            "mean_ms_per_video": 1000 * statistics.mean(seconds)}


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m distill.bench.oracle", description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=at_least(1), default=64)
    p.add_argument("--frames", type=at_least(2), default=9)
    p.add_argument("--size", type=at_least(16), default=32, help="height and width in pixels")
    p.add_argument("--shapes", type=at_least(1), default=2, help="most shapes in a video")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    result = measure(args.videos, args.frames, args.size, args.shapes)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
