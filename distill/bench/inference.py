"""Benchmark a checkpoint: latency and quality of its student and of its teacher, same prompts and seeds.

Rows, one per (checkpoint, model, sampler, steps):
- the exported role (the student) with its own sampling (a DMD2 student: its k steps, sde, no CFG);
- when the run has a frozen `teacher` role: the teacher with CFG at `teacher_steps` (ode) and at
  the student's k steps (ode), the baselines the student is judged against;
- `data`: held-out real videos of the same prompts, as many per prompt as seeds (the ceiling
  of adherence, the data's own diversity, and the Fréchet distance of real against real).
Latency excludes a warm-up video and is the median over every (prompt, seed) video.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import random
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from distill import registry
from distill.bench.previews import data_column_videos, grid_rows, write_previews
from distill.bench.quality import load_metric, real_feature_set, score_videos
from distill.config import Config, StorageConfig, to_dict
from distill.device import resolve_device
from distill.errors import InputError
from distill.progress import Progress
from distill.run_layout import CheckpointError, open_checkpoint, resolve_latest
from distill.storage import open_store
from distill.validation import SamplingSpec, ValidationRequest


@dataclass(kw_only=True)
class BenchSpec:
    prompts: int = 8
    """Prompts, drawn (seeded) from the run's captions."""
    seeds: int = 4
    """Videos per prompt."""
    teacher_steps: int = 50
    """Steps of the reference teacher (ode, with CFG)."""
    teacher_rows: bool = True
    """Sample the teacher's rows; off when a sibling report already has them (same teacher, prompts, seeds)."""
    teacher_guidance: float | None = None
    """CFG scale of the teacher; unset = the run's (DMD2's real-score scale, or flow matching's validation scale)."""
    real_videos: int = 64
    """Real videos (from data.videos) for Fréchet distance and coverage."""
    metrics: list[str] = field(default_factory=list)
    """Plug-in metrics, NAME=PATH (e.g. clip=/models/clip)."""
    seed: int = 0
    video_format: str = "mp4"
    """Format of the sampled videos written beside the report (gif needs Pillow alone)."""


@dataclass
class BenchData:
    captions: list[str]
    """The prompts to sample, a seeded draw from the run's captions."""
    real_videos: list[np.ndarray] = field(default_factory=list)
    """The reference set for Fréchet distance and coverage, (F, H, W, 3) uint8."""
    data_videos: list[np.ndarray] = field(default_factory=list)
    """Other real videos of the same prompts, as many per prompt as seeds: the `data` row, the
    ceiling of adherence and the diversity the data has at the same group size."""
    data_captions: list[str] = field(default_factory=list)


def bench_data(cfg: Config, n_prompts: int, n_real: int, seed: int, per_prompt: int = 0) -> BenchData:
    """Captions to sample (seeded draw), the real reference set, and held-out real videos of the
    sampled captions (`per_prompt` each, where the data has them), all at the run's size.

    Pixel shards give videos without decoding a file; otherwise captions come from data.videos'
    table (real videos decoded from its files), the shards' records, or the inline prompts.
    """
    rng = random.Random(seed)
    d = cfg.data
    per_item: list[str] = []
    if d.shards:
        from distill.data.shards import ShardDataset, read_manifest

        store = open_store(d.shards, cfg.storage)
        manifest = read_manifest(store)
        per_item = [c for r in manifest["shards"] for c in r.get("captions", [])]
        if "pixels" in manifest["fields"]:
            data = ShardDataset(store, identity=manifest["model"], max_text_length=cfg.model.max_text_length)

            def load(i: int) -> np.ndarray:
                return ((data[i]["pixels"] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 3, 0).numpy()

            return _draw(per_item, load, n_prompts, n_real, per_prompt, rng)
    if d.videos:
        from distill.data.preprocess import check_inside, load_clip, read_captions

        table = Path(d.videos) / d.captions_file
        frame = read_captions(table)
        if "caption" not in frame.columns:
            raise InputError(f"{table}: no caption column (data.videos of the checkpoint's run)")
        if "video" not in frame.columns:
            captions = sorted(set(frame["caption"]))
            return BenchData(rng.sample(captions, min(n_prompts, len(captions))))
        for row, video in enumerate(frame["video"], start=1):
            check_inside(str(video), f"{table}, row {row}")
        paths = [Path(d.videos) / v for v in frame["video"]]

        def load(i: int) -> np.ndarray:
            return load_clip(paths[i], d.num_frames, d.height, d.width).permute(1, 2, 3, 0).numpy()

        return _draw(list(frame["caption"]), load, n_prompts, n_real, per_prompt, rng)
    captions = sorted(set(per_item or cfg.validation.prompts or d.prompts))
    if not captions:
        raise CheckpointError("the run's data names no captions to benchmark with")
    return BenchData(rng.sample(captions, min(n_prompts, len(captions))))


def _draw(per_item: list[str], load, n_prompts: int, n_real: int, per_prompt: int, rng: random.Random) -> BenchData:
    """Prompts, a reference set, and held-out videos of the prompts (outside the reference set)."""
    captions = sorted(set(per_item))
    prompts = rng.sample(captions, min(n_prompts, len(captions)))
    reference = rng.sample(range(len(per_item)), min(n_real, len(per_item)))
    taken = set(reference)
    held_out = []
    for caption in prompts:
        candidates = [i for i, c in enumerate(per_item) if c == caption and i not in taken]
        held_out += rng.sample(candidates, min(per_prompt, len(candidates)))
    return BenchData(prompts, [load(i) for i in reference], [load(i) for i in held_out],
                     [per_item[i] for i in held_out])


def run_bench(uri: str, spec: BenchSpec, out_dir: Path, storage: StorageConfig | None = None,
              progress: Progress | None = None) -> tuple[list[dict], dict]:
    """Rows of the inference/quality table, and the report's metadata; `progress` counts the rows."""
    ckpt = open_checkpoint(uri, storage)
    cfg = ckpt.config
    # The run's data first: a data folder that is gone fails before any model is built.
    data = bench_data(cfg, spec.prompts, spec.real_videos, spec.seed, per_prompt=spec.seeds)
    device = resolve_device(cfg)
    sampling = SamplingSpec.from_dict(ckpt.sampling)
    with tempfile.TemporaryDirectory() as tmp:
        folder = ckpt.fetch_export(Path(tmp))  # verified (files, finite weights) before anything is built
        plugin = registry.get_model(cfg.model.family)(
            cfg, device=device, frozen_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        student = plugin.frozen_role(ckpt.export_role, {name: plugin.load_module(name, str(folder / name))
                                                        for name in ckpt.export_modules})
    runs = [(student, sampling)]
    teacher_role = cfg.roles.get("teacher")
    if spec.teacher_rows and teacher_role is not None and not teacher_role.trainable and ckpt.export_role != "teacher":
        teacher = plugin.build_roles(["teacher"])["teacher"]
        w = spec.teacher_guidance if spec.teacher_guidance is not None else ckpt.method["reference_guidance"]
        reference = SamplingSpec(sampler_kind="ode", num_inference_steps=spec.teacher_steps, guidance_scale=w)
        runs.append((teacher, reference))
        if sampling.num_steps != spec.teacher_steps:
            runs.append((teacher, dataclasses.replace(reference, num_inference_steps=sampling.num_steps)))
        # The student's starting point: the teacher sampled as the student samples (its sampler, steps and
        # guidance), which shows what training added beyond a few-step sampler; left out where a teacher row has
        # that label already (an ODE student of the teacher's k steps).
        if sampling.label not in {how.label for _, how in runs[1:]}:
            runs.append((teacher, sampling))

    d = cfg.data
    captions, real_videos = data.captions, data.real_videos
    real_features = real_feature_set(real_videos) if len(real_videos) > 1 else None
    metrics = [load_metric(m) for m in spec.metrics]
    seeds = [spec.seed + i for i in range(spec.seeds)]
    validator = plugin.validator()

    if progress is not None:
        progress.expect(len(runs) + bool(data.data_videos))
    rows, columns = [], []
    grid = grid_rows(captions, seeds)
    for handle, how in runs:
        request = dict(sample_handle=handle, num_frames=d.num_frames, height=d.height, width=d.width,
                       negative_prompt=d.negative_prompt, sampling=how)
        validator.run(ValidationRequest(prompts=captions[:1], seeds=seeds[:1], output_dir=None,
                                        **{**request, "sampling": warm_up(how)}))
        label = f"{handle.name}-{how.label}"
        result = validator.run(ValidationRequest(prompts=captions, seeds=seeds, output_dir=str(out_dir / "videos" / label),
                                                 video_format=spec.video_format, **request))
        prompt_ids = [i for i in range(len(captions)) for _ in seeds]
        per_video = [c for c in captions for _ in seeds]
        quality = score_videos(result.frames, per_video, prompt_ids, real_features=real_features,
                               real_videos=real_videos, metrics=metrics)
        latency = statistics.median(result.seconds_per_video)
        denoise = statistics.median(result.denoising_seconds_per_video)
        rows.append({
            "checkpoint": ckpt.name, "step": ckpt.step, "model": handle.name,
            "sampler": how.sampler_kind, "steps": how.num_steps, "guidance": how.guidance_scale,
            "weights": ckpt.method["weights"] if handle is student else "trained",
            "weights_id": weights_id(ckpt, cfg, handle is student),
            "nfe": result.function_evaluations_per_video, "latency_s": latency, "denoise_s": denoise,
            "decode_s": latency - denoise, "latency_spread_s": spread(result.seconds_per_video),
            "denoise_spread_s": spread(result.denoising_seconds_per_video), "videos": len(result.frames), **quality,
            "contact_sheet": f"videos/{label}/contact.png",
        })
        columns.append(_column(rows[-1], label, write_previews(out_dir, label, result.frames)))
        if progress is not None:
            progress.update(1, note=f"{label}: {len(result.frames)} videos, {latency:.3g} s each")
    if data.data_videos:
        prompt_ids = [data.data_captions.index(c) for c in data.data_captions]  # first index: an id per caption
        quality = score_videos(data.data_videos, data.data_captions, prompt_ids, real_features=real_features,
                               real_videos=real_videos, metrics=metrics)
        rows.append({"checkpoint": ckpt.name, "step": ckpt.step, "model": "data", "sampler": "-", "steps": 0,
                     "weights_id": _digest(["data", to_dict(cfg.data)]), "videos": len(data.data_videos), **quality})
        held_out = data_column_videos(grid, seeds, data.data_captions, data.data_videos)
        columns.append(_column(rows[-1], "data", write_previews(out_dir, "data", held_out)))
        if progress is not None:
            progress.update(1, note=f"data: {len(data.data_videos)} real videos scored")
    meta = {
        "checkpoint": uri, "run": cfg.run.name, "name": ckpt.name, "step": ckpt.step, "method": cfg.method,
        "headline_losses": ckpt.method["headline_losses"], "weights": ckpt.method["weights"], "card": card(device),
        "versions": versions(), "prompts": captions, "seeds": seeds, "real_videos": len(real_videos),
        "size": {"num_frames": d.num_frames, "height": d.height, "width": d.width},
        "previews": {"rows": grid, "columns": columns},
    }
    return rows, meta


def warm_up(how: SamplingSpec) -> SamplingSpec:
    """The untimed first sample of a row: its sampler on the same shapes, for at most two steps (every step runs
    the same kernels; a 50-step warm-up would cost a whole teacher sample)."""
    if how.num_inference_steps is not None and how.num_inference_steps > 2:
        return dataclasses.replace(how, num_inference_steps=2)
    return how


def _column(row: dict, label: str, videos: list[str | None]) -> dict:
    """A column of the video grid (see distill/bench/previews.py): the row's identity and its preview files."""
    keys = ("model", "sampler", "steps", "guidance", "checkpoint", "weights_id")
    return {"label": label, **{k: row.get(k) for k in keys}, "videos": videos}


def spread(seconds: list[float]) -> float:
    """How far one video's timing strays: max - min over the measured videos (0 for one video)."""
    return max(seconds) - min(seconds)


def weights_id(ckpt, cfg: Config, student: bool) -> str:
    """Identity of a row's weights: the checkpoint for the student; for the teacher, its source (a `latest`
    pointer read as the checkpoint it names) and the model section, so reports of one run share it."""
    if student:
        return _digest([ckpt.uri, ckpt.manifest.get("created")])
    source = cfg.roles["teacher"].init_from
    if source and source.rstrip("/").endswith("/latest"):
        source = resolve_latest(source, cfg.storage)
    return _digest(["teacher", source, to_dict(cfg.model)])


def _digest(parts: list) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def card(device: torch.device) -> str:
    """The card of a report: the GPU's name, or CPU and its processor."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"


def versions() -> dict:
    import deepspeed
    import diffusers

    out = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "deepspeed": deepspeed.__version__, "numpy": np.__version__}
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out
