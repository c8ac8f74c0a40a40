"""The shapes world: a deterministic, seeded generator of short captioned videos.

Each video shows one or more flat-coloured shapes moving in a straight line at a constant
speed over a plain or a textured (low-contrast, greyish) background; its caption is built
from the attributes alone: ``"a red circle moving left and a blue square moving up"``.
`distill.data.oracle` reads the attributes back from any video, so a model trained on this
world can be judged on what it draws.

The world is split in three modules, all re-exported here:

- `distill.data.shapes_world`: the fixed vocabulary (`SHAPES`, `COLOURS`, `DIRECTIONS`,
  `BACKGROUNDS`), `ShapesWorldConfig`, the video specs and their sampling (and the rules that
  keep every video readable), captions;
- `distill.data.shapes_render`: drawing a spec into frames (`render`, `coverage`, `background`);
- this module: the data set writer and its command line.

`write_dataset` lays the videos out as a user's own data set would be::

    out_dir/videos/000000.mp4 ...
    out_dir/captions.csv      video,caption            (video: path relative to out_dir)
    out_dir/attributes.csv    ground truth, one row per shape

Command line: ``distill shapes OUT --count N --frames F --height H --width W --seed S
[--shapes-per-video K | A-B] [--backgrounds plain,textured] [--fps 8] [--workers 2] [--overwrite]``
(or ``python -m distill.data.shapes ...``). OUT must be new or empty unless --overwrite.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from distill.arguments import Parser, at_least
from distill.errors import InputError
from distill.outputs import check_output_folder, staged_folder

# re-exported: the world's rules and its drawing live in their own modules
from distill.data.shapes_render import background, coverage, render, sample, shape_area  # noqa: F401
from distill.data.shapes_world import (  # noqa: F401
    BACKGROUNDS, COLOURS, DIRECTIONS, MARGIN, MIN_TRAVEL, ROUNDING, SHAPES, SIZE_RANGE, SUPERSAMPLING, ShapeSpec,
    ShapesWorldConfig, VideoSpec, caption, parse_caption, sample_spec)

# --- files --------------------------------------------------------------------------------

CAPTION_COLUMNS = ("video", "caption")
ATTRIBUTE_COLUMNS = ("video", "shape_index", "shape", "colour", "direction", "speed", "size", "x0", "y0",
                     "background")


def attributes(spec: VideoSpec) -> list[dict]:
    """One ground-truth row per shape (without the video column)."""
    return [{"shape_index": i, "shape": s.shape, "colour": s.colour, "direction": s.direction,
             "speed": s.speed, "size": s.size, "x0": s.x0, "y0": s.y0, "background": spec.background}
            for i, s in enumerate(spec.shapes)]


def video_name(index: int) -> str:
    return f"videos/{index:06d}.mp4"


def write_dataset(out_dir: str | Path, count: int, cfg: ShapesWorldConfig, *, workers: int = 2,
                  start: int = 0, overwrite: bool = False) -> Path:
    """Write videos `start .. start + count - 1` with their captions and ground truth; returns out_dir.

    The mp4 files are written by `distill.video.write_video` on `workers` threads. Writes captions.csv
    (video,caption) and attributes.csv.
    A non-empty out_dir is refused unless `overwrite`; the data set is made beside it and replaces
    it whole once complete (an earlier set's videos are never left orphaned among the new ones).
    """
    if count < 1:
        raise InputError(f"write_dataset: count ({count}) must be at least 1")
    out_dir = check_output_folder(out_dir, overwrite=overwrite, what="data set folder")
    with staged_folder(out_dir) as staging:
        _write_videos(staging, range(start, start + count), cfg, workers)
    return out_dir


def is_shapes_dataset(folder: str | Path) -> bool:
    """Whether `folder` holds a shapes-world data set (its ground truth, attributes.csv, is there)."""
    return (Path(folder) / "attributes.csv").is_file()


def _write_videos(out_dir: Path, indices: range, cfg: ShapesWorldConfig, workers: int) -> None:
    import pandas as pd

    from distill.video import write_video

    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    count = len(indices)

    def one(index: int) -> tuple[str, str, list[dict]]:
        spec = sample_spec(cfg, index)
        name = video_name(index)
        write_video(render(spec, cfg), out_dir / name, fps=cfg.fps)
        return name, caption(spec), [{"video": name, **row} for row in attributes(spec)]

    if workers > 1 and count > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(one, indices))
    else:
        results = [one(i) for i in indices]
    pd.DataFrame([(n, c) for n, c, _ in results], columns=list(CAPTION_COLUMNS)).to_csv(
        out_dir / "captions.csv", index=False)
    pd.DataFrame([row for _, _, rows in results for row in rows], columns=list(ATTRIBUTE_COLUMNS)).to_csv(
        out_dir / "attributes.csv", index=False)


def _shapes_per_video(text: str) -> int | tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*(?:[-:]\s*(\d+)\s*)?", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected K or A-B, got {text!r}")
    return int(m[1]) if m[2] is None else (int(m[1]), int(m[2]))


def main(argv: list[str] | None = None, prog: str = "python -m distill.data.shapes") -> int:
    parser = Parser(prog=prog, description="Write a shapes-world data set (videos/, captions.csv, "
                                                            "attributes.csv).")
    parser.add_argument("out", type=Path, help="output folder (new or empty, unless --overwrite)")
    parser.add_argument("--count", type=at_least(1), default=1000, help="number of videos")
    parser.add_argument("--frames", type=at_least(2), default=9, help="frames per video")
    parser.add_argument("--height", type=at_least(16), default=32, help="frame height in pixels")
    parser.add_argument("--width", type=at_least(16), default=32, help="frame width in pixels")
    parser.add_argument("--seed", type=at_least(0), default=0, help="seed of the world (the same seed, the same videos)")
    parser.add_argument("--fps", type=at_least(1), default=8, help="frame rate of the mp4 files")
    parser.add_argument("--shapes-per-video", type=_shapes_per_video, default=1, metavar="K|A-B",
                        help="shapes per video: K, or an inclusive range A-B drawn per video")
    parser.add_argument("--backgrounds", default=",".join(BACKGROUNDS),
                        help=f"comma-separated, from {','.join(BACKGROUNDS)}")
    parser.add_argument("--workers", type=at_least(1), default=2, help="videos encoded at once")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT (its files are deleted)")
    args = parser.parse_args(argv)
    try:
        cfg = ShapesWorldConfig(num_frames=args.frames, height=args.height, width=args.width,
                                shapes_per_video=args.shapes_per_video, seed=args.seed, fps=args.fps,
                                backgrounds=tuple(b.strip() for b in args.backgrounds.split(",") if b.strip()))
    except ValueError as err:
        parser.error(str(err))
    begin = time.perf_counter()
    try:
        write_dataset(args.out, args.count, cfg, workers=args.workers, overwrite=args.overwrite)
    except InputError as err:
        print(f"{prog}: input error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.count} videos ({cfg.num_frames}x{cfg.height}x{cfg.width}) to {args.out} "
          f"in {time.perf_counter() - begin:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
