"""Tiny run configs and data for tests (CPU, random tiny Wan components built in code)."""

from __future__ import annotations

import copy

import torch
from torch.utils.data import Dataset

from distill.config import apply_overrides, build_config

PROMPTS = ["a red circle moving left", "a blue square moving right", "a green triangle moving up"]


def tiny_raw(output: str, method: str = "dmd2", **sections) -> dict:
    raw = {
        "run": {"name": "test", "output": str(output), "seed": 0},
        "model": {"family": "wan", "preset": "tiny", "pixel_space": True, "max_text_length": 16},
        "roles": {
            "teacher": {"trainable": False},
            "student": {"init_from": "teacher", "trainable": True},
            "critic": {"init_from": "teacher", "trainable": True},
        },
        "method": method,
        "method_config": {"rollout_mode": "simulate", "dmd_denoising_steps": [1000, 750, 500, 250],
                          "generator_update_interval": 5, "real_score_guidance_scale": 3.5},
        "training": {"max_steps": 4, "batch_size": 1, "learning_rate": 1e-3, "fake_score_learning_rate": 1e-3,
                     "progress_bar": False},
        "data": {"prompts": PROMPTS, "num_frames": 1, "height": 16, "width": 16},
        "deepspeed": {"zero_optimization": {"stage": 1}},  # stage 0 in fp32: DeepSpeed reports no grad norm
    }
    if method == "flow_matching":
        raw["roles"] = {"student": {"trainable": True}}
        raw["method_config"] = {"cond_dropout": 0.1, "validation_steps": 3}
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(raw.get(name), dict):
            raw[name] = {**raw[name], **values}
        else:
            raw[name] = values
    return raw


def tiny_config(output, method: str = "dmd2", overrides: list[str] = (), **sections):
    return build_config(apply_overrides(tiny_raw(output, method, **sections), list(overrides)))


class LatentDataset(Dataset):
    """Prompts with fixed random x0 ("pixels" or "vae_latent"), as shards will give them."""

    def __init__(self, key: str, shape: tuple[int, ...], n: int = 3, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.fields = ("prompt", key)
        self.key = key
        self.latents = torch.randn(n, *shape, generator=g).clamp(-1, 1)

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict:
        return {"prompt": PROMPTS[i % len(PROMPTS)], self.key: self.latents[i]}


def deep(raw: dict) -> dict:
    return copy.deepcopy(raw)
