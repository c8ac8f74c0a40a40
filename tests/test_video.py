"""Video files in and out (distill/video.py): PyAV for mp4, Pillow for gif."""

from __future__ import annotations

import av
import numpy as np
import pytest

from distill.video import VideoReadError, read_video, write_video


def frames(num_frames: int, height: int, width: int) -> np.ndarray:
    """Flat colour blocks that move: what lossy H.264 at CRF 10 keeps within a few levels."""
    out = np.zeros((num_frames, height, width, 3), np.uint8)
    for f in range(num_frames):
        out[f, :, : width // 2] = (200, 30, 40)
        out[f, f : f + height // 3, width // 2 :] = (20, 180, 220)
    return out


@pytest.mark.parametrize("suffix, size", [(".mp4", (16, 24)), (".mp4", (15, 17)), (".gif", (16, 24))])
def test_written_videos_read_back_with_every_frame(tmp_path, suffix, size):
    video = frames(6, *size)
    back = read_video(write_video(video, tmp_path / f"v{suffix}"))
    assert back.shape == video.shape and back.dtype == np.uint8
    assert np.abs(back.astype(int) - video).max() <= (6 if suffix == ".mp4" else 0)


def test_data_files_keep_full_chroma_and_previews_play_in_browsers(tmp_path):
    """4:4:4 for data (exact colours), 4:2:0 for previews where the size allows (odd sizes stay 4:4:4)."""
    cases = {"data.mp4": ((16, 16), True, "yuv444p"), "preview.mp4": ((16, 16), False, "yuv420p"),
             "odd.mp4": ((15, 16), False, "yuv444p")}
    for name, (size, full_chroma, pix_fmt) in cases.items():
        write_video(frames(4, *size), tmp_path / name, fps=8, full_chroma=full_chroma)
        with av.open(str(tmp_path / name)) as container:
            stream = container.streams.video[0]
            assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ("h264", pix_fmt)
            assert stream.average_rate == 8 and stream.frames == 4


def test_unreadable_files_name_the_file(tmp_path):
    (tmp_path / "text.mp4").write_text("not a video")
    (tmp_path / "audio.wav").write_bytes(b"RIFF$\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00@\x1f\x00\x00"
                                         b"\x80>\x00\x00\x02\x00\x10\x00data\x00\x00\x00\x00")  # no video stream
    for name in ("text.mp4", "audio.wav", "missing.mp4"):
        with pytest.raises(VideoReadError, match=f"{name}: cannot decode video"):
            read_video(tmp_path / name)
    with pytest.raises(ValueError, match=r"expected \(F, H, W, 3\) uint8 frames"):
        write_video(frames(2, 8, 8).astype(np.float32), tmp_path / "float.mp4")
