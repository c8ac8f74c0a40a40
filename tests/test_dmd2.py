"""DMD2 against independent reference computations, with model-free roles (no DeepSpeed here)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from distill.adapter import Batch
from distill.errors import ConfigError
from distill.methods.distribution_matching.dmd2 import DMD2, dmd_loss
from distill.roles import RoleError, RoleHandle, RoleManager
from tiny import tiny_config

SHAPE = (2, 3, 2, 4, 4)  # B, C, F, H, W


def test_dmd_loss_and_gradient_match_reference():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(SHAPE, generator=g, dtype=torch.float64).float().requires_grad_(True)
    real = torch.randn(SHAPE, generator=g)
    fake = torch.randn(SHAPE, generator=g)

    loss = dmd_loss(x0, real, fake)
    loss.backward()

    # Reference, written out per sample in float64.
    x, r, f = x0.detach().double(), real.double(), fake.double()
    ref_grad = torch.empty_like(x)
    for b in range(SHAPE[0]):
        norm = (x[b] - r[b]).abs().mean()
        ref_grad[b] = (f[b] - r[b]) / norm
    ref_loss = 0.5 * ((x - (x - ref_grad)) ** 2).mean()  # = ½ mean(grad²)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=0)
    # d/dx ½ mean((x − target)²) with target detached = (x − target) / N = grad / N
    torch.testing.assert_close(x0.grad.double(), ref_grad / x.numel(), rtol=1e-5, atol=1e-12)


def test_dmd_loss_nan_normaliser_is_zeroed():
    x0 = torch.ones(SHAPE, requires_grad=True)
    real = torch.ones(SHAPE)  # |x0 − real| = 0 → 0/0
    fake = torch.ones(SHAPE)
    loss = dmd_loss(x0, real, fake)
    assert torch.isfinite(loss) and loss.item() == 0.0


# -- a model-free adapter: roles are tiny modules whose outputs we can write down ---------------


class StudentNet(nn.Module):
    """x0 prediction = theta (broadcast), so d loss / d theta is the sum of d loss / d x0."""

    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.full((1, SHAPE[1], 1, 1, 1), 0.25))
        self.calls: list[bool] = []  # grad enabled at each call

    def forward(self, x_t, t, conditional):
        self.calls.append(torch.is_grad_enabled())
        return self.theta.expand_as(x_t) + 0 * x_t


class ConstNet(nn.Module):
    """x0 prediction = cond or uncond constant; flow prediction = x_t · w (trainable)."""

    def __init__(self, cond: float, uncond: float):
        super().__init__()
        self.cond, self.uncond = cond, uncond
        self.w = nn.Parameter(torch.tensor(0.5))

    def forward(self, x_t, t, conditional):
        return torch.full_like(x_t, self.cond if conditional else self.uncond)


class FakeAdapter:
    num_train_timesteps = 1000

    class noise_scheduler:  # noqa: N801 - mimics the attribute of a diffusers scheduler
        timesteps = torch.arange(1000, 0, -1).float()

    def copy_denoiser(self, module, memo=None):
        return copy.deepcopy(module, memo)

    def prepare_batch(self, raw, *, latents_source):
        z = torch.zeros(SHAPE)
        e = torch.zeros(SHAPE[0], 4, 8)
        return Batch(latents=z, prompt_embeds=e, negative_prompt_embeds=e, from_data=False)

    def add_noise(self, x0, noise, t):
        s = (t / 1000).view(-1, 1, 1, 1, 1)
        return (1 - s) * x0 + s * noise

    def shift_timestep(self, t, shift=None):
        return t

    def predict_x0(self, handle, x_t, t, batch, *, conditional):
        return handle.modules["transformer"](x_t, t, conditional)

    def predict_x0_cond_uncond(self, handle, x_t, t, batch):
        return (self.predict_x0(handle, x_t, t, batch, conditional=True),
                self.predict_x0(handle, x_t, t, batch, conditional=False))

    def predict_velocity(self, handle, x_t, t, batch, *, conditional):
        net = handle.modules["transformer"]
        return x_t * net.w if hasattr(net, "w") else net(x_t, t, conditional)


def fake_stack(tmp_path, **method_config):
    cfg = tiny_config(tmp_path, method_config={"rollout_mode": "simulate", "dmd_denoising_steps": [1000, 500],
                                               "generator_update_interval": 1, **method_config},
                      training={"learning_rate": 0.1, "fake_score_learning_rate": 0.2, "betas": [0.5, 0.9],
                                "max_grad_norm": 0.0, "progress_bar": False})
    roles = RoleManager({
        "student": RoleHandle("student", {"transformer": StudentNet()}, trainable=True),
        "teacher": RoleHandle("teacher", {"transformer": ConstNet(cond=0.8, uncond=-0.2).requires_grad_(False)}, trainable=False),
        "critic": RoleHandle("critic", {"transformer": ConstNet(cond=0.1, uncond=0.0)}, trainable=True),
    })
    method = DMD2(cfg, roles, FakeAdapter())
    method.build()
    return method, roles


@pytest.mark.parametrize("convention,w,standard_w", [("standard", 3.5, 3.5), ("cond_plus", 2.5, 3.5), ("standard", 1.0, 1.0)])
def test_student_gradient_through_method_matches_reference(tmp_path, convention, w, standard_w):
    method, roles = fake_stack(tmp_path, real_score_guidance_scale=w, cfg_convention=convention)
    student = roles["student"].modules["transformer"]
    theta0 = student.theta.detach().clone()

    batch = method.adapter.prepare_batch({}, latents_source="zeros")
    x0, k = method.rollout(batch, grad=True)
    loss, stats = method.generator_loss(x0, batch)
    loss.backward()

    # Reference: real = uncond + w (cond − uncond) = -0.2 + w·1.0; fake = 0.1; x0 = theta.
    real = -0.2 + standard_w * (0.8 - (-0.2))
    x = theta0.expand(SHAPE).double()
    norm = (x - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    grad = ((0.1 - real) / norm).expand(SHAPE)
    ref_loss = 0.5 * (grad**2).mean()
    ref_dtheta = (grad / x.numel()).sum(dim=(0, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(student.theta.grad.double(), ref_dtheta, rtol=1e-5, atol=1e-12)
    # Logged beside the loss: the DMD gradient's RMS and the x0 statistics.
    assert stats["dmd_grad_rms"] == pytest.approx(float(grad.pow(2).mean().sqrt()), rel=1e-5)
    assert stats["real_fake_x0_gap"] == pytest.approx(abs(0.1 - real), rel=1e-5)
    assert stats["real_x0_std"] == pytest.approx(0.0, abs=1e-6) and stats["fake_x0_std"] == pytest.approx(0.0, abs=1e-6)
    assert stats["student_x0_std"] == pytest.approx(float(x.std()), rel=1e-4)


def test_critic_optimizer_falls_back_to_student_values_key_by_key(tmp_path):
    method, roles = fake_stack(tmp_path)
    s, c = roles["student"].optimizer.param_groups[0], roles["critic"].optimizer.param_groups[0]
    assert s["lr"] == pytest.approx(0.1) and c["lr"] == pytest.approx(0.2)  # fake_score_learning_rate set
    assert tuple(c["betas"]) == tuple(s["betas"]) == (0.5, 0.9)  # fake_score_betas unset: the student's
    assert c["weight_decay"] == s["weight_decay"]
    assert roles["teacher"].optimizer is None


def test_simulate_runs_exactly_k_no_grad_student_calls(tmp_path):
    method, roles = fake_stack(tmp_path, dmd_denoising_steps=[1000, 750, 500, 250], generator_update_interval=2)
    student = roles["student"].modules["transformer"]
    seen = set()
    for it in range(40):
        student.calls.clear()
        metrics = method.train_step({}, it)
        k = int(metrics["rollout_k"])
        seen.add(k)
        update = it % 2 == 0
        # k rollout calls under no_grad, then the call at s_k: with grad only on student updates.
        assert student.calls == [False] * k + [update], (it, k, student.calls)
        assert ("generator_loss" in metrics) == update
    assert seen == {0, 1, 2, 3}


def test_data_latent_noises_data_to_step_k_with_one_student_call(tmp_path):
    method, roles = fake_stack(tmp_path, rollout_mode="data_latent")
    student = roles["student"].modules["transformer"]
    batch = method.adapter.prepare_batch({}, latents_source="data")
    student.calls.clear()
    method.rollout(batch, grad=True)
    assert student.calls == [True]


def test_warp_denoising_step_maps_through_shifted_schedule():
    from diffusers import FlowMatchEulerDiscreteScheduler

    class Adapter(FakeAdapter):
        noise_scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)

    method = DMD2.__new__(DMD2)
    method.adapter = Adapter()
    method.method_cfg = type("C", (), {"dmd_denoising_steps": [1000, 750, 500, 250, 0], "warp_denoising_step": True})()
    steps = method._denoising_steps()
    shifted = [3 * s / (1 + 2 * s) * 1000 for s in (1.0, 0.75, 0.5, 0.25)]
    torch.testing.assert_close(steps, torch.tensor(shifted + [0.0]), rtol=1e-4, atol=1e-2)


def test_timestep_shift_reaches_the_model_s_shift_for_the_dmd_and_critic_timesteps(tmp_path):
    """A student update draws two timesteps (the DMD loss's, the critic's); both go through the plugin's shift with
    method_config.timestep_shift (unset: None, the model's own). The formula is the plugin's (test_wan)."""
    for shift in (None, 1.0):
        method, _ = fake_stack(tmp_path, timestep_shift=shift)
        seen = []
        shift_timestep = method.adapter.shift_timestep
        method.adapter.shift_timestep = lambda t, s=None: seen.append(s) or shift_timestep(t, s)
        method.train_step({}, 0)
        assert seen == [shift, shift]
    with pytest.raises(ConfigError, match=r"method_config.timestep_shift: must be in \(0, 20.0\]"):
        fake_stack(tmp_path, timestep_shift=0.0)


def test_require_roles_names_the_role():
    roles = RoleManager({"student": RoleHandle("student", {}, True), "teacher": RoleHandle("teacher", {}, True)})
    with pytest.raises(RoleError, match="roles.teacher"):
        roles.require_roles({"student": True, "teacher": False})
    with pytest.raises(RoleError, match="roles.critic"):
        roles.require_roles({"student": True, "critic": True})


def test_check_finite_stops_before_the_optimizer_step():
    from distill.methods.base import check_finite

    check_finite(torch.tensor(1.5), "critic_loss", 3)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(FloatingPointError, match="critic_loss is not finite .* on rank 0 at iteration 3"):
            check_finite(torch.tensor(bad), "critic_loss", 3)


def test_ema_moves_only_on_student_updates_and_averages_with_its_decay(tmp_path):
    method, roles = fake_stack(tmp_path, generator_update_interval=2, ema_decay=0.5, ema_start_step=1)
    student = roles["student"].modules["transformer"]
    average = method.exported_modules()["transformer"]
    assert average is not student and method.exports_state
    assert method.export_handle().name == "student-ema" and method.metadata(method.method_cfg)["weights"] == "ema"
    expected = student.theta.detach().clone()
    for it in range(6):
        method.train_step({}, it)
        if it % 2 == 0:  # student updates at 0, 2, 4: the first is copied (start step 1), then averaged
            w = student.theta.detach()
            expected = w.clone() if it == 0 else 0.5 * expected + 0.5 * w
        torch.testing.assert_close(average.theta, expected, rtol=0, atol=1e-7)
    assert not torch.equal(average.theta, student.theta)  # it lags the student
