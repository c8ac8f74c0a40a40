"""The shapes world (distill.data.shapes) and its oracle (distill.data.oracle).

The oracle is judged on the generator's own videos after the mp4 round trip (write_dataset,
then read_video), at two sizes (9 x 32 x 32 and 17 x 64 x 64), with 1 and 2 shapes, on plain
and textured backgrounds.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import torch

from distill.data import shapes as S
from distill.data.oracle import analyse, analyse_file, normalise, score_caption
from distill.video import read_video

SMALL = {"num_frames": 9, "height": 32, "width": 32}
LARGE = {"num_frames": 17, "height": 64, "width": 64}
DATASETS = {  # name: (size, shapes per video, count, seed)
    "small-1": (SMALL, 1, 80, 101),
    "small-2": (SMALL, 2, 80, 102),
    "large-1": (LARGE, 1, 60, 103),
    "large-2": (LARGE, 2, 60, 104),
}
MIN_ACCURACY = 0.99
SPEED_TOLERANCE = 0.05  # px/frame (measured: at most 0.025 at 32 px, 0.015 at 64 px)
POSITION_TOLERANCE = 0.3  # px, per frame (measured: at most 0.17)
NOISE_SIGMAS = (0, 2, 4, 8, 16, 32)
BLUR_KERNELS = (1, 3, 5, 7, 9)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Each data set written to disk and read back: (cfg, root, captions, attributes, videos)."""
    out = {}
    for name, (size, k, count, seed) in DATASETS.items():
        cfg = S.ShapesWorldConfig(**size, shapes_per_video=k, seed=seed)
        root = S.write_dataset(tmp_path_factory.mktemp(name), count, cfg)
        captions = pd.read_csv(root / "captions.csv")
        attributes = pd.read_csv(root / "attributes.csv")
        with ThreadPoolExecutor(2) as pool:
            videos = list(pool.map(read_video, [root / v for v in captions["video"]]))
        out[name] = (cfg, root, captions, attributes, videos)
    return out


def _blur(video: np.ndarray, kernel: int) -> np.ndarray:
    """Gaussian blur of every frame with a kernel x kernel window (OpenCV's default sigma)."""
    x = video.astype(np.float32)
    if kernel <= 1:
        return x
    sigma = 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8
    r = kernel // 2
    w = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma**2))
    w /= w.sum()
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (r, r)
        p = np.pad(x, pad, mode="edge")
        x = sum(w[i] * np.take(p, np.arange(i, i + x.shape[axis]), axis=axis) for i in range(kernel))
    return x


def _noisy(video: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    return np.clip(video.astype(np.float32) + np.random.default_rng(seed).normal(0, sigma, video.shape), 0, 255)


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


# --- the generator ----------------------------------------------------------------------------

def test_same_seed_gives_identical_videos_and_captions_other_seeds_differ():
    a = S.ShapesWorldConfig(**SMALL, shapes_per_video=(1, 2), seed=5)
    b = S.ShapesWorldConfig(**SMALL, shapes_per_video=(1, 2), seed=5)
    c = S.ShapesWorldConfig(**SMALL, shapes_per_video=(1, 2), seed=6)
    for i in range(20):
        fa, ca, sa = S.sample(a, i)
        fb, cb, sb = S.sample(b, i)
        assert sa == sb and ca == cb and np.array_equal(fa, fb)
        assert fa.shape == (9, 32, 32, 3) and fa.dtype == np.uint8
    # order of calls does not matter: index 7 alone is what it was in the loop
    assert S.sample_spec(a, 7) == S.sample_spec(b, 7)
    other_seed = [S.sample(c, i) for i in range(20)]
    same_seed = [S.sample(a, i) for i in range(20)]
    assert sum(not np.array_equal(x[0], y[0]) for x, y in zip(same_seed, other_seed)) == 20
    assert sum(x[1] != y[1] for x, y in zip(same_seed, other_seed)) >= 15
    assert len({x[1] for x in same_seed}) >= 15  # indices differ too


@pytest.mark.parametrize("size,k", [(SMALL, (1, 2)), (SMALL, 3), (LARGE, (1, 3)),
                                    ({"num_frames": 2, "height": 16, "width": 16}, 2),
                                    ({"num_frames": 5, "height": 24, "width": 48}, 2),
                                    ({"num_frames": 33, "height": 128, "width": 96}, 4)])
def test_shapes_stay_inside_the_frame_apart_and_keep_their_speed(size, k):
    cfg = S.ShapesWorldConfig(**size, shapes_per_video=k, seed=3)
    F, H, W = cfg.num_frames, cfg.height, cfg.width
    D = min(H, W)
    for i in range(150):
        spec = S.sample_spec(cfg, i)
        assert len({s.colour for s in spec.shapes}) == len(spec.shapes)  # distinct colours
        boxes = []
        for s in spec.shapes:
            assert 0.1 * D - 0.05 <= s.speed * (F - 1)  # travels at least 10 % of the frame
            assert 4.0 <= s.size <= 0.3 * D + 0.01
            track = np.array([s.position(t) for t in range(F)])
            half = s.size / 2
            assert (track[:, 0] - half >= 0.99).all() and (track[:, 0] + half <= W - 0.99).all(), s
            assert (track[:, 1] - half >= 0.99).all() and (track[:, 1] + half <= H - 0.99).all(), s
            steps = np.diff(track, axis=0)
            assert np.allclose(np.hypot(steps[:, 0], steps[:, 1]), s.speed)  # constant speed
            assert np.allclose(steps / s.speed, S.DIRECTIONS[s.direction])
            boxes.append(np.concatenate([track - half, track + half], 1))  # x0 y0 x1 y1 per frame
        for p, q in itertools.combinations(boxes, 2):  # no overlap in any frame
            apart = (p[:, 2] <= q[:, 0]) | (q[:, 2] <= p[:, 0]) | (p[:, 3] <= q[:, 1]) | (q[:, 3] <= p[:, 1])
            assert apart.all()
    # and in pixels: the frame's border ring shows the background only
    for i in range(30):
        spec = S.sample_spec(cfg, i)
        frames = S.render(spec, cfg)
        bg = S.render(S.VideoSpec(shapes=(), background=spec.background, seed=spec.seed), cfg)
        border = np.ones((H, W), bool)
        border[1:-1, 1:-1] = False
        assert np.array_equal(frames[:, border], bg[:, border])
        assert not np.array_equal(frames, bg)


def test_every_attribute_appears():
    cfg = S.ShapesWorldConfig(**SMALL, shapes_per_video=(1, 2), seed=0)
    specs = [S.sample_spec(cfg, i) for i in range(300)]
    shapes = [s for spec in specs for s in spec.shapes]
    assert {s.shape for s in shapes} == set(S.SHAPES)
    assert {s.colour for s in shapes} == set(S.COLOURS)
    assert {s.direction for s in shapes} == set(S.DIRECTIONS)
    assert {spec.background for spec in specs} == set(S.BACKGROUNDS)
    assert {len(spec.shapes) for spec in specs} == {1, 2}
    assert len(S.SHAPES) >= 3 and len(S.COLOURS) >= 6 and len(S.DIRECTIONS) >= 4
    for dx, dy in S.DIRECTIONS.values():
        assert abs(np.hypot(dx, dy) - 1) < 1e-9
    # the backgrounds are greyish and far from every palette colour
    for spec in specs[:40]:
        bg = S.background(spec, 32, 32).reshape(-1, 3)
        assert np.ptp(bg, axis=1).max() <= 12  # channels within a few levels of each other
        for rgb in S.COLOURS.values():
            assert np.linalg.norm(bg - np.asarray(rgb), axis=1).min() > 100


def test_captions_and_parse_caption_round_trip():
    cfg = S.ShapesWorldConfig(**SMALL, shapes_per_video=(1, 3), seed=1)
    for i in range(300):
        spec = S.sample_spec(cfg, i)
        text = S.caption(spec)
        assert S.parse_caption(text) == [{"shape": s.shape, "colour": s.colour, "direction": s.direction}
                                         for s in spec.shapes]
    one = S.VideoSpec(shapes=(S.ShapeSpec("circle", "red", "left", 1.0, 8.0, 16.0, 16.0),), background="plain", seed=0)
    two = S.VideoSpec(shapes=one.shapes + (S.ShapeSpec("square", "blue", "up", 1.0, 8.0, 16.0, 16.0),),
                      background="plain", seed=0)
    assert S.caption(one) == "a red circle moving left"
    assert S.caption(two) == "a red circle moving left and a blue square moving up"
    orange = S.VideoSpec(shapes=(S.ShapeSpec("triangle", "orange", "down", 1.0, 8.0, 16.0, 16.0),),
                         background="plain", seed=0)
    assert S.caption(orange) == "an orange triangle moving down"
    assert S.parse_caption(" A Red circle moving LEFT. ") == [{"shape": "circle", "colour": "red", "direction": "left"}]
    for bad in ("a purple circle moving left", "a red hexagon moving left", "a red circle moving sideways",
                "a red circle", "red circle moving left", "", "a red circle moving left and"):
        with pytest.raises(ValueError):
            S.parse_caption(bad)


def test_config_rejects_impossible_settings():
    for kwargs in ({"num_frames": 1}, {"height": 8}, {"shapes_per_video": 0}, {"shapes_per_video": 9},
                   {"shapes_per_video": 4},  # 4 lanes of 8 px cannot hold a moving shape at 32 x 32
                   {"backgrounds": ("stripes",)}, {"colours": ("red", "purple")}, {"shapes": ()}):
        with pytest.raises(ValueError):
            S.ShapesWorldConfig(**kwargs)
    assert S.ShapesWorldConfig(shapes_per_video=range(1, 3)).counts() == [1, 2]
    assert S.ShapesWorldConfig(shapes_per_video=(2, 3)).counts() == [2, 3]


@pytest.mark.slow  # the written data sets take ~30 s
def test_data_set_files_on_disk(datasets):
    for name, (cfg, root, captions, attributes, videos) in datasets.items():
        count = DATASETS[name][2]
        assert sorted(p.name for p in (root / "videos").iterdir()) == [f"{i:06d}.mp4" for i in range(count)]
        assert list(captions.columns) == ["video", "caption"] and len(captions) == count
        assert list(attributes.columns) == list(S.ATTRIBUTE_COLUMNS)
        assert list(captions["video"]) == [f"videos/{i:06d}.mp4" for i in range(count)]
        assert len(attributes) == count * cfg.shapes_per_video
        for i, (video, text) in enumerate(zip(captions["video"], captions["caption"])):
            spec = S.sample_spec(cfg, i)
            assert text == S.caption(spec)
            rows = attributes[attributes["video"] == video].sort_values("shape_index")
            assert list(rows["shape"]) == [s.shape for s in spec.shapes]
            assert list(rows["colour"]) == [s.colour for s in spec.shapes]
            assert list(rows["direction"]) == [s.direction for s in spec.shapes]
            assert np.allclose(rows["speed"], [s.speed for s in spec.shapes])
            assert np.allclose(rows[["x0", "y0"]].to_numpy(), [(s.x0, s.y0) for s in spec.shapes])
            assert set(rows["background"]) == {spec.background}
        for v in videos:
            assert v.shape == (cfg.num_frames, cfg.height, cfg.width, 3) and v.dtype == np.uint8
        # H.264 at the project's settings keeps the frames close to the rendering
        first = S.render(S.sample_spec(cfg, 0), cfg)
        assert np.abs(videos[0].astype(int) - first).mean() < 2.0


def test_command_line_writes_a_non_square_data_set(tmp_path):
    out = tmp_path / "world"
    assert S.main([str(out), "--count", "6", "--frames", "8", "--height", "24", "--width", "40", "--seed", "3",
                   "--shapes-per-video", "1-2"]) == 0
    captions = pd.read_csv(out / "captions.csv")
    attributes = pd.read_csv(out / "attributes.csv")
    assert len(captions) == 6 and list(captions.columns) == ["video", "caption"]
    cfg = S.ShapesWorldConfig(num_frames=8, height=24, width=40, shapes_per_video=(1, 2), seed=3)
    assert list(captions["caption"]) == [S.caption(S.sample_spec(cfg, i)) for i in range(6)]
    assert len(attributes) == sum(len(S.sample_spec(cfg, i).shapes) for i in range(6))
    for v in captions["video"]:
        assert read_video(out / v).shape == (8, 24, 40, 3)
    with pytest.raises(SystemExit):
        S.main([str(out), "--shapes-per-video", "many"])


# --- the oracle -----------------------------------------------------------------------------

@pytest.mark.slow  # the written data sets take ~30 s
@pytest.mark.parametrize("name", list(DATASETS))
def test_oracle_reads_the_worlds_videos_after_the_mp4_round_trip(datasets, name):
    cfg, root, captions, attributes, videos = datasets[name]
    right = {"colour": [], "shape": [], "direction": [], "speed": [], "position": [], "size": []}
    counts, by_background = [], {b: [] for b in S.BACKGROUNDS}
    for i, video in enumerate(videos):
        spec = S.sample_spec(cfg, i)
        reading = analyse(video)
        counts.append(len(reading.shapes) == len(spec.shapes))
        found = {s.colour: s for s in reading.shapes}
        for s in spec.shapes:
            r = found.get(s.colour)
            right["colour"].append(r is not None)
            right["shape"].append(r is not None and r.shape == s.shape)
            right["direction"].append(r is not None and r.direction == s.direction)
            right["speed"].append(r is not None and abs(r.speed - s.speed) <= SPEED_TOLERANCE)
            truth = np.array([s.centroid(t) for t in range(cfg.num_frames)])
            right["position"].append(r is not None and np.abs(r.positions - truth).max() <= POSITION_TOLERANCE)
            right["size"].append(r is not None and abs(r.size / s.size - 1) <= 0.1)
            by_background[spec.background].append(right["shape"][-1] and right["direction"][-1]
                                                   and right["colour"][-1])
    accuracy = {k: float(np.mean(v)) for k, v in right.items()}
    assert len(right["colour"]) >= 60
    assert all(a >= MIN_ACCURACY for a in accuracy.values()), accuracy
    assert np.mean(counts) >= MIN_ACCURACY
    for b, ok in by_background.items():
        assert len(ok) >= 10 and np.mean(ok) >= MIN_ACCURACY, (b, np.mean(ok))
    # and through score_caption with the captions from the CSV
    scores = [score_caption(analyse(v), c) for v, c in zip(videos[:30], captions["caption"][:30])]
    assert np.mean([s["exact"] for s in scores]) >= MIN_ACCURACY


@pytest.mark.slow  # the written data sets take ~30 s
def test_oracle_reads_model_tensors_and_files_like_frames(datasets):
    cfg, root, captions, attributes, videos = datasets["small-2"]
    video = videos[3]
    tensor = torch.from_numpy(video).permute(3, 0, 1, 2).float() / 127.5 - 1.0  # (C, F, H, W) in [-1, 1]
    assert np.allclose(normalise(tensor), video, atol=1e-3)
    a, b, c = analyse(video), analyse(tensor), analyse_file(root / captions["video"][3])
    assert a.attributes() == b.attributes() == c.attributes() and len(a.shapes) == 2
    assert abs(a.quality - b.quality) < 1e-4
    for s, t in zip(a.shapes, b.shapes):
        assert np.allclose(s.positions, t.positions, atol=1e-3) and abs(s.speed - t.speed) < 1e-4


def test_the_oracle_benchmark_reads_what_it_renders(tmp_path, capsys):
    """`python -m distill.bench.oracle` (its time per video is a printed figure, not a timed test): the videos it
    renders are read back exactly, and the figures are printed and written."""
    from distill.bench.oracle import main

    assert main(["--videos", "6", "--frames", "5", "--json", str(tmp_path / "oracle.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "oracle.json").read_text())
    assert printed["videos"] == printed["read_exactly"] == 6 and printed["size"] == [5, 32, 32]
    assert 0 < printed["median_ms_per_video"] and 0 < printed["mean_ms_per_video"]


@pytest.mark.slow  # the written data sets take ~30 s
def test_score_caption_matches_and_mismatches(datasets):
    cfg, _, captions, _, videos = datasets["small-2"]
    spec = S.sample_spec(cfg, 0)
    reading = analyse(videos[0])
    first, second = spec.shapes
    right = S.caption(spec)
    scores = score_caption(reading, right)
    assert {k: scores[k] for k in ("colour", "shape", "direction", "all", "count", "exact")} == dict.fromkeys(
        ("colour", "shape", "direction", "all", "count", "exact"), 1.0)
    assert [m["wanted"] == m["read"] for m in scores["matches"]] == [True, True]
    swapped = S.caption(S.VideoSpec(shapes=(second, first), background="plain", seed=0))
    assert score_caption(reading, swapped)["exact"] == 1.0  # the order of the shapes does not matter

    def other(value, vocabulary, avoid=()):
        return next(v for v in vocabulary if v != value and v not in avoid)

    def with_first(**change):
        s = dataclasses.replace(first, **change)
        return S.caption(S.VideoSpec(shapes=(s, second), background="plain", seed=0))

    absent = other(first.colour, S.COLOURS, avoid=(second.colour,))
    wrong_colour = score_caption(reading, with_first(colour=absent))
    assert wrong_colour["colour"] == 0.5 and wrong_colour["all"] == 0.5 and wrong_colour["exact"] == 0.0
    wrong_shape = score_caption(reading, with_first(shape=other(first.shape, S.SHAPES)))
    assert (wrong_shape["shape"], wrong_shape["colour"], wrong_shape["all"]) == (0.5, 1.0, 0.5)
    wrong_direction = score_caption(reading, with_first(direction=other(first.direction, S.DIRECTIONS)))
    assert (wrong_direction["direction"], wrong_direction["shape"], wrong_direction["all"]) == (0.5, 1.0, 0.5)
    # fewer shapes named than drawn: what is named is right, but the count is not
    only_first = score_caption(reading, S.caption(S.VideoSpec(shapes=(first,), background="plain", seed=0)))
    assert only_first["all"] == 1.0 and only_first["count"] == 0.0 and only_first["exact"] == 0.0
    # more shapes named than drawn: the unmatched one is wrong in every attribute
    one_cfg, _, one_captions, _, one_videos = datasets["small-1"]
    single = analyse(one_videos[0])
    (drawn,) = S.sample_spec(one_cfg, 0).shapes
    extra = dataclasses.replace(drawn, colour=other(drawn.colour, S.COLOURS))
    more = score_caption(single, S.caption(S.VideoSpec(shapes=(drawn, extra), background="plain", seed=0)))
    assert (more["colour"], more["shape"], more["direction"], more["all"], more["count"]) == (0.5, 0.5, 0.5, 0.5, 0.0)
    assert [m["read"] for m in more["matches"]].count(None) == 1


def test_no_shape_is_read_from_blank_or_noise_videos():
    rng = np.random.default_rng(0)
    cfg = S.ShapesWorldConfig(**SMALL)
    videos = {
        "grey": np.full((9, 32, 32, 3), 60, np.uint8),
        "black": np.zeros((9, 32, 32, 3), np.uint8),
        "one colour": np.tile(np.asarray(S.COLOURS["red"], np.uint8), (9, 32, 32, 1)),
        "uniform noise": rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8),
        "uniform noise 64": rng.integers(0, 256, (17, 64, 64, 3), dtype=np.uint8),
        "grey noise": _u8(rng.normal(100, 30, (9, 32, 32, 3))),
        "textured background": S.render(S.VideoSpec(shapes=(), background="textured", seed=4), cfg),
        "plain background": S.render(S.VideoSpec(shapes=(), background="plain", seed=4), cfg),
    }
    for name, video in videos.items():
        reading = analyse(video)
        assert reading.shapes == [], (name, reading.attributes())
        assert reading.sharpness == 0.0 and reading.quality == 0.0
        scores = score_caption(reading, "a red circle moving left")
        assert scores["all"] == 0.0 and scores["count"] == 0.0
    assert analyse(videos["uniform noise"]).noise > 40  # and the noise is measured
    assert analyse(videos["grey"]).noise < 0.5


@pytest.mark.slow  # the written data sets take ~30 s
def test_quality_falls_as_noise_or_blur_grows(datasets):
    videos = datasets["small-2"][4][:8] + datasets["large-1"][4][:6]
    noise = np.array([[analyse(_u8(_noisy(v, s, seed=i))) for s in NOISE_SIGMAS] for i, v in enumerate(videos)])
    blur = np.array([[analyse(_u8(_blur(v, k))) for k in BLUR_KERNELS] for v in videos])
    quality_n = np.vectorize(lambda r: r.quality)(noise)
    quality_b = np.vectorize(lambda r: r.quality)(blur)
    for q in (quality_n, quality_b):
        assert ((0 <= q) & (q <= 1)).all()
        assert (q[:, 0] > 0.85).all()  # the clean videos score high
        assert (np.diff(q, axis=1) < 0).all(), q.round(3)  # strictly falling, video by video
    # each component falls with its own degradation
    assert (np.diff(np.vectorize(lambda r: r.cleanliness)(noise), axis=1) < 0).all()
    assert (np.diff(np.vectorize(lambda r: r.sharpness)(blur), axis=1) < 0).all()
    assert (np.diff(np.vectorize(lambda r: r.edge_width)(blur)[:, :3], axis=1) > 0).all()  # edges widen
    assert (quality_n[:, -1] < 0.1 * quality_n[:, 0]).all() and (quality_b[:, -1] < 0.7 * quality_b[:, 0]).all()


@pytest.mark.slow  # the written data sets take ~30 s
def test_oracle_still_reads_blurred_or_noisy_videos(datasets):
    """Generated videos are rarely crisp: a 5 x 5 blur or noise of sigma 16 must not derail the reading."""
    _, _, captions_1, _, videos_1 = datasets["small-1"]
    _, _, captions_2, _, videos_2 = datasets["small-2"]
    texts = list(captions_1["caption"][:40]) + list(captions_2["caption"][:40])
    pairs = list(zip(videos_1[:40] + videos_2[:40], texts))
    for name, degrade in (("blur", lambda v, i: _u8(_blur(v, 5))), ("noise", lambda v, i: _u8(_noisy(v, 16, i)))):
        readings = [analyse(degrade(v, i)) for i, (v, _) in enumerate(pairs)]
        scores = [score_caption(r, c) for r, (_, c) in zip(readings, pairs)]
        for attribute in ("colour", "shape", "direction", "count"):
            assert np.mean([s[attribute] for s in scores]) >= 0.95, (name, attribute)
        blur = np.mean([s.blur for r in readings for s in r.shapes])
        assert (0.5 <= blur <= 1.6) if name == "blur" else blur <= 0.3, (name, blur)  # sigma 1.1 px / crisp
