"""The example run config (configs/tiny_dmd2.yaml) as a raw mapping, and edits of it, for the config tests."""

from __future__ import annotations

import copy
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_DMD2 = REPO / "configs" / "tiny_dmd2.yaml"


def base_raw() -> dict:
    """The content of configs/tiny_dmd2.yaml as a fresh raw mapping."""
    return {
        "run": {"name": "tiny-dmd2", "output": "runs/tiny-dmd2", "seed": 0},
        "model": {"family": "wan", "preset": "tiny", "pixel_space": True, "flow_shift": 3.0, "max_text_length": 32},
        "roles": {
            "teacher": {"trainable": False},
            "student": {"init_from": "teacher", "trainable": True},
            "critic": {"init_from": "teacher", "trainable": True},
        },
        "method": "dmd2",
        "method_config": {
            "rollout_mode": "simulate",
            "dmd_denoising_steps": [1000, 750, 500, 250],
            "warp_denoising_step": True,
            "generator_update_interval": 5,
            "real_score_guidance_scale": 3.5,
            "min_timestep_ratio": 0.02,
            "max_timestep_ratio": 0.98,
        },
        "training": {
            "max_steps": 300,
            "batch_size": 2,
            "learning_rate": 1.0e-4,
            "betas": [0.0, 0.999],
            "weight_decay": 0.01,
            "fake_score_learning_rate": 1.0e-3,
            "max_grad_norm": 1.0,
            "log_every": 10,
        },
        "data": {
            "prompts": [
                "a red circle moving left",
                "a blue square moving right",
                "a green triangle moving up",
                "a yellow circle moving down",
            ],
            "num_frames": 5,
            "height": 32,
            "width": 32,
        },
        "validation": {"every": 100, "seeds": [0, 1], "prompts": ["a red circle moving left", "a blue square moving right"]},
        "deepspeed": {"zero_optimization": {"stage": 2}},
    }


DELETE = object()


def with_changes(*changes: tuple[str, object]) -> dict:
    """A deep copy of the base config with dotted-path changes; the value DELETE removes the key."""
    raw = copy.deepcopy(base_raw())
    for dotted, value in changes:
        *parents, last = dotted.split(".")
        node = raw
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return raw
