"""Writing videos and contact sheets (uint8 frames, shape F x H x W x 3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distill.config import ConfigError
from distill.errors import InputError


def to_uint8_frames(video: torch.Tensor | np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """(C, F, H, W) tensor or (F, H, W, C) array in `value_range` -> (F, H, W, 3) uint8."""
    if isinstance(video, torch.Tensor):
        video = video.detach().float().cpu().permute(1, 2, 3, 0).numpy()
    elif video.dtype == np.uint8:
        return video  # already frames
    lo, hi = value_range
    video = (np.clip(video, lo, hi) - lo) / (hi - lo)
    return (video * 255.0 + 0.5).astype(np.uint8)


def write_video(frames: np.ndarray, path: str | Path, fps: int = 8, *, full_chroma: bool = True) -> Path:
    """Write (F, H, W, 3) uint8 frames as `.mp4` (H.264, libx264 at CRF 10, through PyAV) or `.gif` (Pillow), by
    suffix.

    `full_chroma` keeps colour at full resolution (4:4:4): exact colours for data and for the
    oracle, but browsers don't play that profile. Previews for people pass False (4:2:0,
    for even sizes; odd sizes stay 4:4:4).
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"write_video: expected (F, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gif":
        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
        return path
    import av  # in-process: no ffmpeg process per file (a data set is thousands of files)

    even = frames.shape[1] % 2 == 0 and frames.shape[2] % 2 == 0
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p" if not full_chroma and even else "yuv444p"  # 4:2:0 halves colour resolution
        stream.options = {"crf": "10"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames
    return path


def scale_up(frames: np.ndarray, min_size: int, size: int | None = None) -> np.ndarray:
    """(..., H, W, C) frames scaled up (nearest) by the smallest whole factor that takes `size` (default: the
    shorter side) to at least `min_size` pixels: a 32-pixel video stays sharp where people look at it."""
    factor = max(1, -(-min_size // (size or min(frames.shape[-3:-1]))))
    return frames.repeat(factor, axis=-3).repeat(factor, axis=-2)


class VideoReadError(InputError):
    """A video file cannot be decoded; the message names the file."""


def read_video(path: str | Path) -> np.ndarray:
    """All frames of a video file as (F, H, W, 3) uint8; unreadable or empty files raise VideoReadError."""
    import av

    path = Path(path)
    try:
        with av.open(str(path)) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except Exception as err:  # FFmpeg raises many types for corrupt input (and IndexError: no video stream)
        first_line = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise VideoReadError(f"{path}: cannot decode video ({type(err).__name__}: {first_line})") from None
    if not frames:
        raise VideoReadError(f"{path}: no frames decoded")
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        raise VideoReadError(f"{path}: frames of different sizes ({', '.join(sorted(map(str, shapes)))})")
    return np.stack(frames)


def mp4_writable() -> bool:
    """Whether PyAV (which writes mp4) is installed."""
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def check_video_format(video_format: str) -> None:
    """Fail early when mp4 is asked for and PyAV is missing."""
    if video_format == "mp4" and not mp4_writable():
        raise ConfigError("validation.video_format: mp4 needs PyAV (pip install av); install it or set gif")


def contact_sheet(videos: list[np.ndarray], path: str | Path, max_columns: int = 8) -> Path:
    """One row per video, up to `max_columns` evenly spaced frames per row, as a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for frames in videos:
        idx = np.linspace(0, len(frames) - 1, min(max_columns, len(frames))).round().astype(int)
        rows.append(np.concatenate([frames[i] for i in idx], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    return path
