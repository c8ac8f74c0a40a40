"""`distill bench` and `distill compare` on CPU checkpoints; the quality metrics on known inputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
import torch

from distill.bench import quality
from distill.bench.compare import compare
from distill.cli import main as cli_main
from distill.data.shapes import ShapesWorldConfig, caption, render, sample_spec, write_dataset
from distill.training.trainer import Trainer
from tiny import tiny_config

SIZE = {"num_frames": 5, "height": 16, "width": 16}


def test_frechet_distance_and_coverage_on_known_sets():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 3))
    assert quality.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shifted = a + np.array([2.0, 0.0, 0.0])
    assert quality.frechet_distance(a, shifted) == pytest.approx(4.0, abs=1e-6)  # |mu| difference squared
    wide = a * 2.0
    assert quality.frechet_distance(a, wide) == pytest.approx(3.0, rel=0.05)  # tr(S1 + 4 S1 - 2 * 2 S1) = tr(S1)
    assert quality.coverage(a, a[:200]) > 0.8
    assert quality.coverage(a, shifted + 10) == 0.0


def shapes_videos(n, seed=0, **kw):
    cfg = ShapesWorldConfig(num_frames=9, height=32, width=32, seed=seed, **kw)
    specs = [sample_spec(cfg, i) for i in range(n)]
    return [render(s, cfg) for s in specs], [caption(s) for s in specs]


def test_quality_scores_follow_what_is_shown():
    videos, captions = shapes_videos(24)
    ids = list(range(12)) * 2
    real = quality.real_feature_set(shapes_videos(40, seed=5)[0])
    good = quality.score_videos(videos, captions, ids, real_features=real)
    assert good["adherence_all"] == 1.0 and good["motion_consistency"] > 0.9 and good["sharpness"] > 0.8
    assert good["coverage"] > 0.3
    wrong = quality.score_videos(videos, captions[1:] + captions[:1], ids, real_features=real)
    assert wrong["adherence_all"] < 0.5
    noisy = [np.clip(v + np.random.default_rng(1).normal(0, 40, v.shape), 0, 255).astype(np.uint8) for v in videos]
    assert quality.score_videos(noisy, captions, ids)["sharpness"] < good["sharpness"]
    # The same video for every seed of a prompt has no diversity; different ones do.
    same = [videos[i % 12] for i in range(24)]
    assert quality.score_videos(same, captions[:12] * 2, ids)["diversity"] == 0.0
    varied = quality.score_videos(videos, captions, list(range(24)))  # one per prompt: nothing to spread
    assert varied["diversity"] == 0.0
    blank = quality.score_videos([np.zeros((9, 32, 32, 3), np.uint8)] * 4, captions[:4], [0, 0, 1, 1], real_features=real)
    assert blank["adherence_all"] == 0.0 and blank["coverage"] < good["coverage"]
    assert blank["fd_oracle"] > good["fd_oracle"]
    # One video (one prompt x one seed) still scores, without a Fréchet distance (no covariance of one).
    single = quality.score_videos(videos[:1], captions[:1], [0], real_features=real)
    assert single["adherence_all"] == 1.0 and "fd_oracle" not in single


def tiny_clip(folder):
    """A random-weight CLIP saved as a local folder, as a user's weights path would hold one."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    # The byte-level alphabet of BPE tokenizers: printable bytes as themselves, the rest shifted past 255.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(shifted))]
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    return folder


def test_clip_plugin_from_a_local_weights_path(tmp_path):
    metric = quality.load_metric(f"clip={tiny_clip(tmp_path / 'clip')}")
    videos, captions = shapes_videos(6)
    feats = metric.features(videos)
    assert feats.shape == (6, 8) and np.isfinite(feats).all()
    scores = quality.score_videos(videos, captions, list(range(6)), real_videos=shapes_videos(6, seed=3)[0],
                                  metrics=[metric])
    assert np.isfinite(scores["fd_clip"]) and scores["fd_clip"] >= 0 and 0 <= scores["clip_score"] <= 100
    with pytest.raises(ValueError, match="NAME=PATH"):
        quality.load_metric("inception")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny DMD2 run on a shapes data set of 4 captions, with checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("bench")
    world = ShapesWorldConfig(**SIZE, seed=0, colours=("red", "blue"), shapes=("square",), directions=("left", "up"))
    write_dataset(tmp / "shapes", 24, world)
    cfg = tiny_config(tmp / "run", data={**SIZE, "videos": str(tmp / "shapes"), "shards": str(tmp / "shards")},
                      training={"max_steps": 4, "checkpoint_every": 2},
                      method_config={"generator_update_interval": 1})
    from distill.data.preprocess import preprocess

    preprocess(cfg, progress=False)
    Trainer(cfg).train()
    return tmp / "run"


@pytest.fixture(scope="module")
def benched(checkpoints):
    """`distill bench` of both checkpoints: the first without the teacher's rows, the second with them and the
    training throughput."""
    args = ["--prompts", "3", "--seeds", "2", "--teacher-steps", "6", "--real-videos", "12"]
    assert cli_main(["bench", str(checkpoints / "checkpoints" / "step-000002"), *args, "--no-teacher"]) == 0
    assert cli_main(["bench", str(checkpoints / "checkpoints" / "step-000004"), *args, "--training-iterations", "3"]) == 0
    return checkpoints


def test_bench_and_compare_checkpoints(benched, tmp_path, capsys):
    checkpoints = benched
    first = pd.read_parquet(checkpoints / "bench" / "step-000002" / "report.parquet")
    assert list(first.model) == ["student", "data"]  # the teacher's rows are left to a sibling report
    report = checkpoints / "bench" / "step-000004"
    table = pd.read_parquet(report / "report.parquet")
    assert list(zip(table.model, table.sampler, table.steps)) == [("student", "sde", 4), ("teacher", "ode", 6),
                                                                    ("teacher", "ode", 4), ("teacher", "sde", 4),
                                                                    ("data", "-", 0)]
    data = table.iloc[-1]  # held-out real videos of the same 3 prompts, 2 each (as many as seeds)
    assert data.videos == 6 and data.adherence_all == 1.0 and data.motion_consistency == 1.0
    assert data.diversity > 0 and data.fd_oracle >= 0 and pd.isna(data.latency_s)
    table = table.iloc[:-1]
    assert list(table.nfe) == [4, 12, 8, 4]  # the teacher samples with CFG: two passes a step
    # ... except as the student's starting point: the teacher's weights through the student's sampler and guidance
    assert list(table.guidance.iloc[[0, 3]]) == [1.0, 1.0] and table.weights_id.iloc[3] == table.weights_id.iloc[1]
    assert table.weights_id.iloc[3] != table.weights_id.iloc[0]
    assert (table.latency_s > 0).all() and (table.latency_s >= table.denoise_s).all()
    assert (table.latency_spread_s >= 0).all() and table.weights_id.iloc[1] == table.weights_id.iloc[2]
    for column in ("adherence_all", "motion_consistency", "sharpness", "diversity", "coverage", "fd_oracle"):
        assert table[column].notna().all(), column
    assert pd.read_csv(report / "report.csv").shape == (len(table) + 1, table.shape[1])
    md = (report / "report.md").read_text()
    assert "Speed-up of student (4 steps) over teacher (6 steps" in md and "CPU" in md and "torch" in md
    assert "The `data` row scores held-out real videos" in md
    for png in ("quality_vs_steps.png", "latency_vs_steps.png", "training_curves.png"):
        assert (report / png).stat().st_size > 1000
    training = json.loads((report / "training.json").read_text())
    assert training["iterations"] == 3 and 0 < training["mfu"] < 1 and training["forward_flops"] > 0
    assert (report / "videos" / "student-sde-4" / "contact.png").exists()
    # Previews a browser plays (H.264 4:2:0, scaled up to 128 px), indexed in meta.json, shown in report.html.
    previews = json.loads((report / "meta.json").read_text())["previews"]
    assert len(previews["rows"]) == 6 and [c["label"] for c in previews["columns"]] == [
        "student-sde-4", "teacher-ode-6", "teacher-ode-4", "teacher-sde-4", "data"]
    files = [v for c in previews["columns"] for v in c["videos"] if v]
    assert len(files) == 5 * 6  # 30 captions of 5 kinds: every prompt has 2 held-out videos
    with av.open(str(report / files[0])) as container:
        video = container.streams.video[0].codec_context
        assert (video.name, video.pix_fmt, video.width, video.height) == ("h264", "yuv420p", 128, 128)
    page = (report / "report.html").read_text()
    assert page.count("<video ") == 30 and all(f'src="{f}"' in page for f in files)
    assert "http" not in page.replace('name="viewport"', "")  # self-contained: no network
    capsys.readouterr()

    out = tmp_path / "compare"
    assert cli_main(["compare", str(checkpoints / "bench" / "step-000002"), str(report), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "# Comparison" in printed and "delta step-000004" in printed
    frame = pd.read_parquet(out / "compare.parquet")
    assert {"step-000002", "step-000004", "delta step-000004"} <= set(frame.columns)
    assert set(frame.metric) >= {"latency_s", "adherence_all", "fd_oracle"}
    # compare.html: one grid (student per checkpoint, the teacher's rows and the data once), its files copied in.
    page = (out / "compare.html").read_text()
    sources = re.findall(r'<video src="([^"]+)"', page)
    assert len(sources) == 6 * 6 and all((out / src).is_file() for src in sources)
    assert "student sde-4 @ step-000002" in page and "student sde-4 @ step-000004" in page
    assert page.count("teacher ode-6 CFG") == 1 and (out / "compare.png").stat().st_size > 1000
    side_by_side = printed.split("## Side by side")[1].split("## ")[0]
    assert side_by_side.count("| step-000004 | teacher |") == 3 and "| step-000002 | teacher |" not in side_by_side


@pytest.mark.browser
def test_the_pages_in_a_browser(benched, tmp_path):
    """compare.html and report.html in headless Chromium: every video plays, every image decodes, the side-by-side
    table has a row per model of the grid; at a phone's width nothing but the tables and the grid scrolls sideways."""
    from browser import PHONE, assert_all_loaded, browser, screenshot, wait_until_loaded

    out = tmp_path / "compare"
    compare([benched / "bench" / "step-000002", benched / "bench" / "step-000004"], out)
    with browser() as engine:
        page = engine.new_page(viewport={"width": 1280, "height": 900})
        page.goto((out / "compare.html").as_uri())
        state = wait_until_loaded(page)
        screenshot(page, "compare.png")
        assert len(state["videos"]) == 6 * 6 and len(state["images"]) == 1  # 6 (prompt, seed) rows, 6 models
        assert_all_loaded(state)
        models = page.locator("#videos thead th").count() - 2  # prompt, seed, then a column per model
        assert page.locator("#side-by-side tbody tr").count() == models == 6
        page.wait_for_function("() => Array.from(document.querySelectorAll('video')).some(v => v.currentTime > 0)")

        phone = engine.new_page(viewport=PHONE)
        phone.goto((out / "compare.html").as_uri())
        state = wait_until_loaded(phone)
        screenshot(phone, "compare-phone.png")
        assert_all_loaded(state)
        assert state["overflow"] <= 0  # the page itself fits; the wide parts scroll inside their boxes

        page.goto((benched / "bench" / "step-000004" / "report.html").as_uri())
        state = wait_until_loaded(page)
        screenshot(page, "report.png")
        assert len(state["videos"]) == 6 * 5 and len(state["images"]) == 3
        assert_all_loaded(state)


def test_without_pyav_there_are_no_previews_and_no_failure(tmp_path, monkeypatch, caplog):
    """PyAV is a dependency, but an install without it (a GPU image with its own stack) still benches: the
    previews are left out with a warning instead of failing."""
    import sys

    from distill.bench.previews import write_previews

    frames = np.zeros((3, 8, 8, 3), np.uint8)
    assert write_previews(tmp_path, "student-sde-4", [frames, None]) == ["web/student-sde-4/000.mp4", None]
    monkeypatch.setitem(sys.modules, "av", None)  # import fails
    assert write_previews(tmp_path / "without", "student-sde-4", [frames, None]) == [None, None]
    assert "PyAV (av) is not installed" in caplog.text and not (tmp_path / "without").exists()


def test_compare_flags_regressions(tmp_path):
    base = {"checkpoint": "a", "model": "student", "sampler": "sde", "steps": 4, "adherence_all": 0.9,
            "latency_s": 1.0, "fd_oracle": 1.0, "diversity": 0.2}
    worse = {**base, "checkpoint": "b", "adherence_all": 0.7, "latency_s": 1.5, "fd_oracle": 0.5}
    for name, row in (("a", base), ("b", worse)):
        (tmp_path / name).mkdir()
        pd.DataFrame([row]).to_parquet(tmp_path / name / "report.parquet")
    frame, md = compare([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    flags = json.loads((tmp_path / "out" / "regressions.json").read_text())
    assert any(f.startswith("adherence_all") for f in flags) and any(f.startswith("latency_s") for f in flags)
    assert not any(f.startswith("fd_oracle") for f in flags)  # lower is better: an improvement
    assert not any(f.startswith("diversity") for f in flags)


def test_compare_flags_neither_timing_noise_nor_unchanged_weights(tmp_path):
    """The frozen teacher (same weights in both reports) is never flagged; a student's timing only beyond its spread."""
    rows = {"a": [{"model": "student", "weights_id": "s1", "latency_s": 1.0, "latency_spread_s": 0.1},
                  {"model": "teacher", "weights_id": "t", "latency_s": 5.0, "latency_spread_s": 0.1,
                   "adherence_all": 0.9}],
            "b": [{"model": "student", "weights_id": "s2", "latency_s": 1.3, "latency_spread_s": 0.3},
                  {"model": "teacher", "weights_id": "t", "latency_s": 7.0, "latency_spread_s": 0.1,
                   "adherence_all": 0.5}],
            "c": [{"model": "student", "weights_id": "s3", "latency_s": 1.6, "latency_spread_s": 0.1}]}
    for name, table in rows.items():
        (tmp_path / name).mkdir()
        pd.DataFrame([{"checkpoint": name, "sampler": "ode", "steps": 4, **r} for r in table]).to_parquet(
            tmp_path / name / "report.parquet")
    _, md = compare([tmp_path / n for n in rows])
    regressions = md.split("## Regressions")[1].split("## ")[0]
    assert "teacher" not in regressions and "in b" not in regressions  # 0.3 s slower, within 0.1 + 0.3 of spread
    assert "latency_s of student ode 4-step: 1 -> 1.6 in c" in regressions


def test_compare_runs_with_the_same_checkpoint_names(tmp_path):
    """A 4-step and a 1-step student of two runs: both checkpoints are step-001600; every row shows."""
    rows = {
        "student-4": [{"checkpoint": "step-001600", "model": "student", "sampler": "sde", "steps": 4, "adherence_all": 0.9},
                      {"checkpoint": "step-001600", "model": "teacher", "sampler": "ode", "steps": 50, "adherence_all": 0.8}],
        "student-1": [{"checkpoint": "step-001600", "model": "student", "sampler": "sde", "steps": 1, "adherence_all": 0.7},
                      {"checkpoint": "step-001600", "model": "teacher", "sampler": "ode", "steps": 50, "adherence_all": 0.8}],
    }
    for run, table in rows.items():
        folder = tmp_path / run / "bench" / "step-001600"
        folder.mkdir(parents=True)
        pd.DataFrame(table).to_parquet(folder / "report.parquet")
    frame, _ = compare([tmp_path / r / "bench" / "step-001600" for r in rows])
    assert {"student-4/step-001600", "student-1/step-001600", "delta student-1/step-001600"} <= set(frame.columns)
    by_steps = frame.set_index(["model", "steps"])
    assert by_steps.loc[("student", 4), "student-4/step-001600"] == 0.9
    assert by_steps.loc[("student", 1), "student-1/step-001600"] == 0.7
    assert pd.isna(by_steps.loc[("student", 1), "delta student-1/step-001600"])  # no earlier report has the row
    assert by_steps.loc[("teacher", 50), "delta student-1/step-001600"] == 0.0


def test_training_throughput_of_a_config(tmp_path, capsys):
    """`python -m distill.bench.training CONFIG`: both kinds of DMD2 iteration timed, FLOPs counted, a profile."""
    import yaml

    from distill.bench.training import main as training_main
    from tiny import tiny_raw

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(str(tmp_path / "run"))))
    training_main([str(config), "--set", "method_config.generator_update_interval=2", "--iterations", "4",
                   "--profile", "--json", str(tmp_path / "t.json")])
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "t.json").read_text())
    assert len(result["rows"]) == 4 and result["forward_flops"] > 0 and 0 < result["mfu"] < 1
    assert result["student_update_seconds"] > 0 and result["critic_only_seconds"] > 0
    assert [r["kind"] for r in result["rows"]] == ["student_update", "critic_only"] * 2
    assert "Self CPU time total" in printed


TINY_WAN = ["--preset", "tiny", "--frames", "5", "--height", "16", "--width", "16"]


def test_the_dmd2_step_bench_takes_config_overrides_and_records_them(tmp_path, capsys):
    """`python -m distill.bench.dmd2_step --set KEY=VALUE`: one lever at a time, recorded in the output."""
    from distill.bench.dmd2_step import main as step_main

    sets = ["model.checkpoint_every=2", "model.attention_backend=native", "method_config.generator_update_interval=2"]
    step_main([*TINY_WAN, "--text-length", "16", "--text-dim", "32", "--iterations", "3", "--warmup", "1",
               "--zero-stage", "1", "--output", str(tmp_path / "run"), "--json", str(tmp_path / "step.json"),
               *(a for s in sets for a in ("--set", s))])
    result = json.loads((tmp_path / "step.json").read_text())
    assert result["overrides"] == sets
    assert result["model"]["checkpoint_every"] == 2 and result["model"]["attention_backend"] == "native"
    assert result["activation_checkpointing"] is True and len(result["warmup_seconds"]) == 1
    assert [r["kind"] for r in result["rows"]] == ["critic_only", "student_update"]
    assert all(r["compiled_graphs"] == 0 for r in result["rows"])  # nothing compiles without model.compile
    # The next lever, measured in the same folder.
    step_main([*TINY_WAN, "--text-length", "16", "--text-dim", "32", "--iterations", "2", "--warmup", "1",
               "--zero-stage", "1", "--output", str(tmp_path / "run"), "--json", str(tmp_path / "step.json"),
               "--set", "model.gradient_checkpointing=false", "--profile", str(tmp_path / "profile")])
    result = json.loads((tmp_path / "step.json").read_text())
    assert result["activation_checkpointing"] is False and result["overrides"] == ["model.gradient_checkpointing=false"]
    # one profiled iteration of each kind: a trace to open in Perfetto, and its top operators in the result
    for kind in ("student_update", "critic_only"):
        assert (tmp_path / "profile" / f"trace-{kind}.json.gz").stat().st_size > 0
        top = result["profile"][kind]["top"]
        assert len(top) == 15 and top[0]["self_ms"] >= top[-1]["self_ms"] > 0
        assert 0 < sum(op["share"] for op in top) <= 1 + 1e-9
        assert result["profile"][kind]["wall_ms"] > 0 and "busy" not in result["profile"][kind]  # busy: on a GPU
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        step_main([*TINY_WAN, "--output", str(tmp_path / "bad"), "--set", "model.checkpoint_every=0"])
    assert exit_.value.code == 2 and "model.checkpoint_every: must be > 0" in capsys.readouterr().err


def test_the_latency_bench_takes_config_overrides_and_records_them(tmp_path, capsys):
    from distill.bench.wan_latency import main as latency_main

    sets = ["model.max_text_length=16", "model.attention_backend=native", "model.vae_channels_last=true"]
    result = latency_main([*TINY_WAN, "--teacher-steps", "2", "--repeats", "1", "--json", str(tmp_path / "l.json"),
                           "--against-stock", *(a for s in sets for a in ("--set", s))])
    assert json.loads((tmp_path / "l.json").read_text())["overrides"] == sets
    assert result["model"]["attention_backend"] == "native" and result["model"]["max_text_length"] == 16
    assert result["first_forward_seconds"] > 0 and result["student"]["nfe"] == 4
    assert result["model"]["vae_channels_last"] and result["first_vae_decode_seconds"] > 0
    # the same seeded weights and embeddings without the speed settings: the same video, up to fp32 rounding
    assert result["student_video_against_stock"]["max_grey_levels"] <= 1
    with pytest.raises(SystemExit) as exit_:
        latency_main([*TINY_WAN, "--set", "model.attention_backend=flash3"])
    assert exit_.value.code == 2 and "model.attention_backend: unknown attention backend 'flash3'" in capsys.readouterr().err


def test_model_flops_count_a_batched_cfg_forward_as_two(tmp_path):
    from distill.bench.training import measure

    def row(batched):
        cfg = tiny_config(tmp_path / str(batched), model={"batched_cfg": batched},
                          method_config={"generator_update_interval": 1})
        return measure(Trainer(cfg), iterations=1, warmup=0)["rows"][0]

    batched, separate = row(True), row(False)
    assert batched["calls_no_grad"] == separate["calls_no_grad"] - 1  # the teacher's two forwards in one
    assert batched["model_flops"] == pytest.approx(separate["model_flops"], rel=1e-6)


def test_model_flops_count_a_backward_through_frozen_weights_as_one_forward(tmp_path, capsys):
    """A call with grad costs 2 forwards plus the share of parameters that take weight gradients: 3 for a trainable
    role, 2 through frozen weights, barely over 2 for a LoRA role over its frozen base (`--lora`)."""
    from distill.bench.dmd2_step import main as step_main
    from distill.bench.training import _forwards
    from distill.models.lora import add_lora
    from distill.role_config import LoraSettings

    layer = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    with torch.no_grad():
        assert _forwards(layer) == 1.0
    assert _forwards(layer) == 3.0
    assert _forwards(layer.requires_grad_(False)) == 2.0

    result = step_main([*TINY_WAN, "--text-length", "16", "--text-dim", "32", "--iterations", "3", "--warmup", "1",
                        "--zero-stage", "1", "--lora", "4", "--output", str(tmp_path / "run")])
    assert result["lora_rank"] == 4 and 0 < result["mfu"] < 1
    lora_forwards = {round(f, 3) for f in [_forwards(m) for m in [_lora_denoiser(add_lora, LoraSettings)]]}
    assert all(2.0 < f < 2.2 for f in lora_forwards)
    capsys.readouterr()


def _lora_denoiser(add_lora, settings_cls):
    from diffusers import WanTransformer3DModel

    from distill.models.wan import PRESETS, WanPlugin

    module = WanTransformer3DModel(**PRESETS["tiny"]["transformer"], in_channels=4, out_channels=4)
    return add_lora(module, settings_cls(rank=4), WanPlugin.lora_target_modules, key="roles.student.lora")


def test_the_compiled_gradients_probe_runs_and_says_sound_on_the_cpu(capsys, monkeypatch):
    """scripts/compile_grads.py (the GPU lever compile-grads): eager against compiled gradients, twice each; on the
    CPU with AOT autograd they agree, and the script says so with exit status 0."""
    import runpy
    import sys

    script = str(Path(__file__).parents[1] / "scripts" / "compile_grads.py")
    monkeypatch.setattr(sys, "argv", [script, "--compiled-set", "model.compile_backend=aot_eager",
                                      "--no-donated-buffers"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(script, run_name="__main__")
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert printed.count("compiled call") == 2 and "largest relative gradient difference" in printed
