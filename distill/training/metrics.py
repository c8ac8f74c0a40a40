"""Scalars per iteration to metrics.jsonl and TensorBoard (rank 0 only).

metrics.jsonl is strict JSON, one object a line: a NaN or Inf value is written as null (JSON has
no such numbers). A line cut short by a killed run is skipped by the readers.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path


class MetricsLog:
    def __init__(self, run_dir: str | Path, enabled: bool = True, purge_step: int | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a")
            # purge_step: a resumed run drops the events its dead predecessor wrote after the checkpoint.
            self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=purge_step)
        self._start = time.time()

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time() - self._start, 3)}
        record.update({k: (v if _finite(v) else None) for k, v in values.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        for key, value in values.items():
            if _finite(value):
                self._tb.add_scalar(key, value, step)

    def log_validation(self, step: int, videos: list, contact_sheet: str | None, fps: int = 8) -> None:
        """A validation beside the scalars at `step`: its contact sheet as an image, and its videos (F, H, W, 3)
        uint8, one under the other, as an animated GIF that TensorBoard's images tab plays."""
        if not self.enabled:
            return
        import numpy as np
        from PIL import Image

        if contact_sheet is not None:
            self._tb.add_image("validation/contact_sheet", np.asarray(Image.open(contact_sheet).convert("RGB")), step,
                               dataformats="HWC")
        if videos:
            self._add_gif("validation/videos", animated_column(videos), step, fps)

    def _add_gif(self, tag: str, frames, step: int, fps: int) -> None:
        """What SummaryWriter.add_video writes (a GIF in an image summary), without its moviepy 1.x dependency
        (moviepy.editor, which add_video imports, is gone from moviepy 2)."""
        import io

        from PIL import Image
        from tensorboard.compat.proto.summary_pb2 import Summary

        images = [Image.fromarray(f) for f in frames]
        buffer = io.BytesIO()
        images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps),
                       loop=0)
        height, width = frames[0].shape[:2]
        image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=buffer.getvalue())
        self._tb._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def flush(self) -> None:
        if self.enabled:
            self._file.flush()
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()


def _finite(value) -> bool:
    return value is not None and not (isinstance(value, float) and not math.isfinite(value))


def animated_column(videos: list, min_height: int = 128) -> list:
    """Videos (F, H, W, 3) uint8, one under the other, frame by frame (shorter ones hold their last frame),
    scaled up by a whole factor (nearest) so that each is at least `min_height` pixels tall."""
    import numpy as np

    from distill.video import scale_up

    length = max(len(v) for v in videos)
    width = max(v.shape[2] for v in videos)
    tallest = max(v.shape[1] for v in videos)
    frames = []
    for t in range(length):
        rows = [np.pad(v[min(t, len(v) - 1)], ((0, 0), (0, width - v.shape[2]), (0, 0))) for v in videos]
        frames.append(scale_up(np.concatenate(rows, axis=0), min_height, size=tallest))
    return frames


def parse_metrics(text: str) -> list[dict]:
    """The rows of a metrics.jsonl text. A line that does not parse (cut short by a kill) is skipped;
    NaN and Infinity, written by older versions, read as None."""
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line, parse_constant=lambda _: None)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def read_metrics(run_dir: str | Path) -> list[dict]:
    return parse_metrics((Path(run_dir) / "metrics.jsonl").read_text())


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Keep the rows of steps <= `step` (a resumed run replays the rest)."""
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists():
        kept = [row for row in parse_metrics(path.read_text()) if row["step"] <= step]
        tmp = path.with_name(path.name + ".tmp")  # a kill while writing must not lose the rows kept
        tmp.write_text("".join(json.dumps(row, allow_nan=False) + "\n" for row in kept))
        os.replace(tmp, path)
