"""A new model family and a new method are one file each plus a registration line.

tests/plugins/points2d.py is a flow-matching family (2-D points from two Gaussian modes, an
analytic teacher) and tests/plugins/ode_regression.py a method (one-step distillation of the
teacher's ODE). Registered through the public registry, they train with the real Trainer,
and the checkpoint says how its student samples without building the method.
"""

from __future__ import annotations

import sys

import pytest
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


@pytest.fixture
def toy_plugins():
    """The toy method (it registers itself on import) and the family's registration line; removed afterwards."""
    import plugins.ode_regression  # noqa: F401

    registry.register_model("points2d", "plugins.points2d:PointsPlugin", num_train_timesteps=1000)
    yield
    registry._METHODS.pop("ode_regression", None)
    registry._MODELS.pop("points2d", None)
    sys.modules.pop("plugins.ode_regression", None)
    sys.modules.pop("plugins.points2d", None)


def test_a_toy_family_and_method_train_with_the_real_trainer(tmp_path, toy_plugins):
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


def test_a_module_added_to_a_role_trains_in_its_engine_and_resumes_exactly(tmp_path, toy_plugins):
    """A method gives the student a head in build(): it trains in the student's engine, is checkpointed with
    it (not exported: no pipeline loads it), and a resumed run ends with the very weights of an unbroken one."""
    from torch import nn

    from plugins.ode_regression import ODERegression, ODERegressionConfig

    @registry.register_method("ode_regression_head", ODERegressionConfig)
    class WithHead(ODERegression):
        def build(self):
            head = nn.Linear(2, 2)
            with torch.no_grad():
                head.weight.copy_(torch.eye(2))
                head.bias.zero_()
            self.roles["student"].add_module("head", head)
            super().build()

        def train_step(self, raw_batch, iteration):
            batch = self.adapter.prepare_batch(raw_batch, latents_source="zeros")
            noise = self.randn_like(batch.latents)
            target = self.teacher_ode(noise, batch)
            t = torch.full((batch.size,), 1000.0)
            student = self.roles["student"]
            x0 = student.module("head")(self.adapter.predict_x0(student, noise, t, batch, conditional=True))
            loss = torch.nn.functional.mse_loss(x0, target)
            student.backward(loss)
            student.step()
            return {"ode_loss": loss.item()}

    try:
        def run(output, steps, resume=None):
            raw = toy_config(output)
            raw["method"] = "ode_regression_head"
            raw["training"].update(max_steps=steps, checkpoint_every=3, batch_size=16, log_every=1)
            trainer = Trainer(build_config(raw), resume=resume)
            trainer.train()
            return trainer

        whole = run(tmp_path / "whole", 6)
        head = whole.roles["student"].modules["head"]
        assert whole.roles["student"].engine.module["head"] is head
        assert not torch.equal(head.weight, torch.eye(2))  # it trained
        run(tmp_path / "cut", 3)
        resumed = run(tmp_path / "cut", 6, resume="latest")
        for name in ("head", "denoiser"):
            for a, b in zip(whole.roles["student"].modules[name].parameters(),
                            resumed.roles["student"].modules[name].parameters()):
                assert torch.equal(a, b)
        ckpt = open_checkpoint(str(tmp_path / "cut" / "checkpoints" / "step-000006"))
        assert ckpt.export_modules == ["denoiser"]
    finally:
        registry._METHODS.pop("ode_regression_head", None)
