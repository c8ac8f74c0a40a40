"""Adding a method is one new module: register it, name it in a config, train it."""

from __future__ import annotations

import importlib.util
import textwrap

import pytest
import torch

import distill.methods  # noqa: F401  (registers the built-in methods)
import distill.models  # noqa: F401  (registers the built-in model families)
from distill import registry
from distill.config import ConfigError, build_config
from distill.training.trainer import Trainer
from tiny import LatentDataset, tiny_raw

NEW_METHOD = textwrap.dedent('''
    from dataclasses import dataclass

    import torch.nn.functional as F

    from distill.methods.base import DistillMethod, make_optimizer, optimizer_settings
    from distill.registry import register_method
    from distill.validation import SamplingSpec


    @dataclass(kw_only=True)
    class X0RegressionConfig:
        role: str = "student"
        """The trainable role."""


    @register_method("x0_regression", X0RegressionConfig)
    class X0Regression(DistillMethod):
        """Predict x0 from a noised sample: a toy method, enough to prove the extension point."""

        @classmethod
        def required_roles(cls, method_cfg):
            return {method_cfg.role: True}

        def build_optimizers(self):
            make_optimizer(self.roles[self.method_cfg.role], **optimizer_settings(self.cfg.training))

        def sampling(self):
            return SamplingSpec(sampler_kind="ode", num_inference_steps=2)

        def train_step(self, raw_batch, iteration):
            batch = self.adapter.prepare_batch(raw_batch, latents_source="data")
            handle = self.roles[self.method_cfg.role]
            t = self.sample_timesteps(batch.size, batch.latents.device)
            x_t = self.adapter.add_noise(batch.latents, self.randn_like(batch.latents), t)
            loss = F.mse_loss(self.adapter.predict_x0(handle, x_t, t, batch, conditional=True), batch.latents)
            handle.backward(loss)
            handle.step()
            return {"x0_loss": loss.item()}
''')


def test_a_method_in_one_new_file_trains(tmp_path):
    path = tmp_path / "x0_regression.py"
    path.write_text(NEW_METHOD)
    spec = importlib.util.spec_from_file_location("x0_regression_plugin", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    try:
        raw = tiny_raw(tmp_path / "run", method="flow_matching", training={"max_steps": 3})
        raw["method"], raw["method_config"] = "x0_regression", {}
        cfg = build_config(raw)
        history = Trainer(cfg, dataset=LatentDataset("pixels", (3, 1, 16, 16))).train()
        assert len(history) == 3 and all(torch.isfinite(torch.tensor(h["x0_loss"])) for h in history)
    finally:
        registry._METHODS.pop("x0_regression", None)


def test_duplicate_and_unknown_names():
    with pytest.raises(ValueError, match="registered twice"):
        registry.register_method("dmd2", object)(type("Again", (), {}))
    with pytest.raises(ConfigError, match="registered: dmd2, flow_matching"):
        registry.get_method("dmd3")
    with pytest.raises(ConfigError, match="model.family.*registered: wan"):
        registry.get_model("cogvideo")
