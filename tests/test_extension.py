"""A new model family and a new method are one file each plus a registration line.

tests/plugins/points2d.py is a flow-matching family (2-D points from two Gaussian modes, an
analytic teacher) and tests/plugins/ode_regression.py a method (one-step distillation of the
teacher's ODE). Registered through the public registry, they train with the real Trainer,
and the checkpoint says how its student samples without building the method.
"""

from __future__ import annotations

import sys

import torch

from distill import registry
from distill.config import build_config
from distill.run_layout import open_checkpoint
from distill.training.trainer import Trainer
from distill.validation import SamplingSpec


def toy_config(output) -> dict:
    return {
        "run": {"name": "points", "output": str(output), "seed": 0},
        "model": {"family": "points2d", "preset": "two-modes", "flow_shift": 1.0},
        "roles": {"teacher": {"trainable": False}, "student": {"init_from": "teacher", "trainable": True}},
        "method": "ode_regression",
        "method_config": {"teacher_steps": 16},
        "training": {"max_steps": 150, "batch_size": 128, "learning_rate": 3e-3, "progress_bar": False,
                     "log_every": 10},
        "data": {"prompts": ["two modes"]},
    }


def test_a_toy_family_and_method_train_with_the_real_trainer(tmp_path):
    import plugins.ode_regression  # noqa: F401  (the method registers itself)

    registry.register_model("points2d", "plugins.points2d:PointsPlugin", num_train_timesteps=1000)
    try:
        cfg = build_config(toy_config(tmp_path / "run"))
        assert "plugins.points2d" not in sys.modules  # loading a config does not import the family
        trainer = Trainer(cfg)
        history = trainer.train()

        losses = [h["ode_loss"] for h in history]
        assert losses[-1] < 0.2 * losses[0], losses
        # One step from noise lands on the modes (±2, 0); the untrained copy of the teacher gives their mean, (0, 0).
        student = trainer.roles["student"]
        noise = torch.randn(512, 2, generator=torch.Generator().manual_seed(1))
        batch = trainer.plugin.prepare_batch({"prompt": ["two modes"] * 512}, latents_source="zeros")
        with torch.no_grad():
            x0 = trainer.plugin.predict_x0(student, noise, torch.full((512,), 1000.0), batch, conditional=True)
        assert x0[:, 0].abs().mean() > 1.5 and x0[:, 1].abs().mean() < 0.5

        ckpt = open_checkpoint(str(tmp_path / "run" / "checkpoints" / "step-000150"))
        assert SamplingSpec.from_dict(ckpt.sampling) == SamplingSpec(sampler_kind="ode", timesteps=(1000.0,))
        assert ckpt.method["headline_losses"] == ["ode_loss"] and ckpt.export_modules == ["denoiser"]
        exported = trainer.plugin.load_module("denoiser", str(tmp_path / "run" / "checkpoints" / "step-000150" /
                                                              "export" / "denoiser"))
        t = torch.full((8,), 500.0)
        torch.testing.assert_close(exported(noise[:8], t), student.modules["denoiser"](noise[:8], t))
    finally:
        registry._METHODS.pop("ode_regression", None)
        registry._MODELS.pop("points2d", None)
        sys.modules.pop("plugins.ode_regression", None)
