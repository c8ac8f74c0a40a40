"""DMD2: distribution matching distillation with a trainable critic (fake score).

One iteration i, per micro-batch:
  1. batch = prepare_batch(raw, latents_source = zeros if simulate else data)
  2. student rollout to x̂0 at a step index k drawn the same on every rank
  3. on student-update iterations (i % generator_update_interval == 0): the DMD loss
     grad = (fake − real) / mean_per_sample |x̂0 − real|,  loss_G = ½ mse(x̂0, x̂0 − grad)
  4. every iteration: the critic's flow-matching loss on the (detached) student sample
The trainer logs each role's grad norm and learning rate beside the losses returned here.

Guidance convention: `real = uncond + w (cond − uncond)` with w = real_score_guidance_scale
(standard CFG; w = 1 is conditional only). Configs written for the other convention,
`cond + w' (cond − uncond)`, set `cfg_convention: cond_plus`; that is standard w = w' + 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from distill.adapter import Batch, LatentsSource
from distill.errors import ConfigError
from distill.methods.base import DistillMethod, check_finite, make_optimizer, optimizer_settings
from distill.methods.distribution_matching.dmd2_config import DMD2Config
from distill.methods.distribution_matching.gan import GANHead, critic_gan_loss, generator_gan_loss
from distill.methods.ema import EMA
from distill.registry import register_method
from distill.roles import RoleHandle
from distill.validation import SamplingSpec

if TYPE_CHECKING:
    from distill.config import Config


class DMD2Adapter(Protocol):
    """The primitives DMD2 needs from a model plugin."""

    num_train_timesteps: int
    noise_scheduler: object  # exposes `.timesteps`, the T-step training schedule (shifted)

    def prepare_batch(self, raw: dict, *, latents_source: LatentsSource) -> Batch: ...
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...
    def predict_velocity(self, handle: RoleHandle, x_t, t, batch: Batch, *, conditional: bool) -> torch.Tensor: ...
    def predict_x0(self, handle: RoleHandle, x_t, t, batch: Batch, *, conditional: bool) -> torch.Tensor: ...
    def predict_x0_cond_uncond(self, handle: RoleHandle, x_t, t, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        ...
    def shift_timestep(self, t: torch.Tensor, shift: float | None = None) -> torch.Tensor: ...
    def copy_denoiser(self, module: nn.Module, memo: dict | None = None) -> nn.Module: ...  # the EMA's copy


@register_method("dmd2", DMD2Config)
class DMD2(DistillMethod):
    headline_losses = ("critic_loss", "generator_loss")
    update_kinds = ("student_update", "critic_only")

    @classmethod
    def required_roles(cls, method_cfg: DMD2Config) -> dict[str, bool]:
        return {"student": True, "teacher": False, "critic": True}

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        from distill import registry

        T = registry.model_spec(cfg.model.family).num_train_timesteps
        for i, s in enumerate(cfg.method_config.dmd_denoising_steps):
            if not 0 <= s <= T:
                raise ConfigError(f"method_config.dmd_denoising_steps[{i}]: step {s} is outside [0, {T}]")
        if cfg.method_config.gan_critic_weight and not cfg.data.shards:
            raise ConfigError("method_config.gan_critic_weight: the GAN term needs real videos, but the data gives "
                              "prompts only; set data.shards to shards that carry latents (`distill preprocess` "
                              "without prompt_only), or set method_config.gan_critic_weight: 0")
        if cfg.method_config.ema_decay and cfg.zero_stage == 3:
            raise ConfigError("method_config.ema_decay: the EMA averages the student's whole weights on each rank, "
                              "which deepspeed.zero_optimization.stage 3 partitions; use stage 0-2 with an EMA")

    def build(self) -> None:
        m = self.method_cfg
        self.gan_blocks = self._add_gan_head() if m.gan_critic_weight else None  # before the critic's optimizer
        super().build()
        self.student = self.roles["student"]
        self.teacher = self.roles["teacher"]
        self.critic = self.roles["critic"]
        self.denoising_steps = self._denoising_steps()
        self.ema = (EMA(self.student.modules, m.ema_decay, m.ema_start_step, deepcopy=self.adapter.copy_denoiser)
                    if m.ema_decay else None)

    def _add_gan_head(self) -> list[int]:
        """The classifier head, a module of the critic (it trains in the critic's engine); returns its blocks."""
        critic = self.roles["critic"]
        try:
            num_blocks, width = self.adapter.block_feature_shape(critic)
        except NotImplementedError as err:
            raise ConfigError(f"method_config.gan_critic_weight: the classifier reads the critic's block features, "
                              f"and {err}; set it to 0") from None
        blocks = self.method_cfg.gan_blocks or [num_blocks // 2]
        for i in blocks:
            if not -num_blocks <= i < num_blocks:
                raise ConfigError(f"method_config.gan_blocks: block {i} is outside the denoiser's {num_blocks} blocks")
        blocks = [i % num_blocks for i in blocks]
        head = GANHead(width, len(blocks), self.method_cfg.gan_head_hidden).to(next(critic.parameters()).device)
        group = self.cfg.parallel.sequence_parallel_size
        if group > 1:
            # Every rank of a sequence-parallel group reads the whole gathered sequence, so each computes the head's
            # full gradient where the transformer's ranks each hold their own tokens' share; the losses are scaled by
            # the group's size for the latter (Trainer), so the head's gradient is taken back by it.
            for param in head.parameters():
                param.register_hook(lambda grad: grad / group)
        critic.add_module("gan_head", head)
        return blocks

    def exported_modules(self) -> dict:
        return self.ema.modules if self.ema is not None else super().exported_modules()

    @property
    def exports_state(self) -> bool:
        return self.ema is not None

    @classmethod
    def metadata(cls, method_cfg: DMD2Config) -> dict:
        return {**super().metadata(method_cfg), "weights": "ema" if method_cfg.ema_decay else "trained",
                "ema_decay": method_cfg.ema_decay}

    def build_optimizers(self) -> None:
        tr = self.cfg.training
        # The student steps every generator_update_interval iterations: its schedule counts those steps.
        make_optimizer(self.roles["student"], **optimizer_settings(tr, every=self.method_cfg.generator_update_interval))
        make_optimizer(self.roles["critic"], **optimizer_settings(tr, prefix="fake_score_"))

    def _denoising_steps(self) -> torch.Tensor:
        steps = torch.tensor(self.method_cfg.dmd_denoising_steps, dtype=torch.float32)
        if self.method_cfg.warp_denoising_step:
            # Index the shifted T-step training schedule, with 0 appended so s = 0 maps to 0.
            T = self.adapter.num_train_timesteps
            schedule = torch.cat([self.adapter.noise_scheduler.timesteps.float().cpu(), torch.zeros(1)])
            steps = schedule[T - steps.long()]
        return steps

    # -- one micro-batch ----------------------------------------------------------------------

    @classmethod
    def latents_source(cls, method_cfg: DMD2Config) -> LatentsSource:
        # The GAN's real samples come from the data also when the student rolls out from noise.
        return "zeros" if method_cfg.rollout_mode == "simulate" and not method_cfg.gan_critic_weight else "data"

    @classmethod
    def data_latents_reason(cls, method_cfg: DMD2Config) -> str:
        if method_cfg.rollout_mode == "data_latent":
            return "method_config.rollout_mode: data_latent"
        return f"method_config.gan_critic_weight: {method_cfg.gan_critic_weight} (the GAN's real samples)"

    def is_student_update(self, iteration: int) -> bool:
        return iteration % self.method_cfg.generator_update_interval == 0

    def iteration_kind(self, iteration: int) -> str:
        return "student_update" if self.is_student_update(iteration) else "critic_only"

    @classmethod
    def reference_guidance(cls, method_cfg: DMD2Config) -> float:
        return method_cfg.standard_guidance_scale

    def train_step(self, raw_batch: dict, iteration: int) -> dict[str, float]:
        batch = self.adapter.prepare_batch(raw_batch, latents_source=self.latents_source(self.method_cfg))
        update_student = self.is_student_update(iteration)
        metrics: dict[str, float] = {"updated_student": float(update_student)}

        # 1. Student rollout (with grad only where the student learns this iteration).
        x0_student, k = self.rollout(batch, grad=update_student)
        metrics["rollout_k"] = float(k)

        # 2. Student update: the distribution-matching loss.
        if update_student:
            # The critic (and its head) takes no gradient from the student's loss: frozen through the
            # backward too, where checkpointed activations are recomputed as they were computed.
            with self.critic.frozen():
                loss_g, stats = self.generator_loss(x0_student, batch)
                check_finite(loss_g, "generator_loss", iteration)
                self.student.backward(loss_g)
            steps = self.student.optimizer_steps
            self.student.step()
            if self.ema is not None and self.student.optimizer_steps > steps:  # a step was applied
                self.ema.update(self.student.modules, self.student.optimizer_steps)
            metrics["generator_loss"] = loss_g.item()
            metrics.update(stats)

        # 3. Critic update on the student's sample (reused, detached), and the classifier's loss.
        loss_c = self.critic_loss(x0_student.detach(), batch)
        if self.gan_blocks is not None:
            gan_c, gan_stats = self.critic_gan_loss(x0_student.detach(), batch)
            metrics.update(critic_flow_loss=loss_c.item(), **gan_stats)
            loss_c = loss_c + self.method_cfg.gan_critic_weight * gan_c
        check_finite(loss_c, "critic_loss", iteration)
        self.critic.backward(loss_c)
        self.critic.step()
        metrics["critic_loss"] = loss_c.item()
        return metrics

    def pick_rollout_index(self) -> int:
        """k uniform over the step list, from the generator every rank advances identically."""
        return int(torch.randint(len(self.denoising_steps), (1,), generator=self.shared_rng))

    def rollout(self, batch: Batch, *, grad: bool) -> tuple[torch.Tensor, int]:
        """The student's x̂0 at step k; the last call carries grad when `grad`."""
        k = self.pick_rollout_index()
        steps = self.denoising_steps.to(batch.latents.device)
        B = batch.size

        def t_at(j: int) -> torch.Tensor:
            return steps[j].expand(B)

        if self.method_cfg.rollout_mode == "data_latent":
            x = self.adapter.add_noise(batch.latents, self.randn_like(batch.latents), t_at(k))
        else:
            x = self.randn_like(batch.latents)  # pure noise at s_0
            with torch.no_grad():
                for j in range(k):  # only the k steps needed to reach s_k
                    x0 = self.adapter.predict_x0(self.student, x, t_at(j), batch, conditional=True)
                    x = self.adapter.add_noise(x0, self.randn_like(x0), t_at(j + 1))
        with torch.set_grad_enabled(grad):
            x0 = self.adapter.predict_x0(self.student, x, t_at(k), batch, conditional=True)
        return x0, k

    def real_and_fake_x0(self, x0_student: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise the detached sample to a random t; the teacher's CFG x0 and the critic's x0 there."""
        m = self.method_cfg
        x0 = x0_student.detach()
        t = self.sample_timesteps(batch.size, x0.device, m.min_timestep_ratio, m.max_timestep_ratio,
                                  m.timestep_shift)
        x_t = self.adapter.add_noise(x0, self.randn_like(x0), t)
        with torch.no_grad():
            fake = self.adapter.predict_x0(self.critic, x_t, t, batch, conditional=True)
            w = m.standard_guidance_scale
            if w == 1.0:
                real = self.adapter.predict_x0(self.teacher, x_t, t, batch, conditional=True)
            else:
                cond, uncond = self.adapter.predict_x0_cond_uncond(self.teacher, x_t, t, batch)
                real = uncond + w * (cond - uncond)
        return real, fake

    def generator_loss(self, x0_student: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The student's loss (DMD, plus the GAN term when on), and what shows a collapse early: the DMD
        gradient's size and the x0 statistics. Call it with the critic frozen (`train_step` does)."""
        real, fake = self.real_and_fake_x0(x0_student, batch)
        grad = dmd_gradient(x0_student, real, fake)
        loss, stats = dmd_loss(x0_student, real, fake, grad), dmd_statistics(x0_student, real, fake, grad)
        w = self.method_cfg.gan_generator_weight
        if w:
            t = self.gan_timesteps(batch.size, x0_student.device)
            x_t = self.adapter.add_noise(x0_student, self.randn_like(x0_student), t)
            gan = generator_gan_loss(self.discriminate(x_t, t, batch))  # through the frozen critic
            stats.update(dmd_loss=loss.item(), gan_generator_loss=gan.item())
            loss = loss + w * gan
        return loss, stats

    # -- the GAN term -------------------------------------------------------------------------

    def gan_timesteps(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """t uniform in [0, gan_max_timestep_ratio · T]."""
        T = self.adapter.num_train_timesteps
        return (torch.rand(batch_size, generator=self.local_rng) * self.method_cfg.gan_max_timestep_ratio * T).to(device)

    def discriminate(self, x_t: torch.Tensor, t: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Real/fake logits (B,) of the critic's classifier head at (x_t, t)."""
        features = self.adapter.block_features(self.critic, x_t, t, batch, blocks=self.gan_blocks)
        return self.critic.module("gan_head")(features)

    def critic_gan_loss(self, x0_fake: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The classifier's loss on real data and the (detached) student sample, noised to one t."""
        t = self.gan_timesteps(batch.size, x0_fake.device)
        logits_real = self.discriminate(self.adapter.add_noise(batch.latents, self.randn_like(x0_fake), t), t, batch)
        logits_fake = self.discriminate(self.adapter.add_noise(x0_fake, self.randn_like(x0_fake), t), t, batch)
        loss = critic_gan_loss(logits_real, logits_fake)
        return loss, {"gan_critic_loss": loss.item(), "d_real": torch.sigmoid(logits_real).mean().item(),
                      "d_fake": torch.sigmoid(logits_fake).mean().item()}

    def critic_loss(self, x0_sample: torch.Tensor, batch: Batch) -> torch.Tensor:
        m = self.method_cfg
        t = self.sample_timesteps(batch.size, x0_sample.device, m.min_timestep_ratio, m.max_timestep_ratio,
                                  m.timestep_shift)
        noise = self.randn_like(x0_sample)
        x_t = self.adapter.add_noise(x0_sample, noise, t)
        v = self.adapter.predict_velocity(self.critic, x_t, t, batch, conditional=True)
        return F.mse_loss(v.float(), (noise - x0_sample).float())

    # -- validation ---------------------------------------------------------------------------

    def sampling(self) -> SamplingSpec:
        # The student samples with exactly the steps it trains on: never written twice in a config.
        return SamplingSpec(sampler_kind="sde", timesteps=tuple(self._denoising_steps().tolist()), guidance_scale=1.0)


@torch.no_grad()
def dmd_gradient(x0_student: torch.Tensor, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """grad = (fake − real) / mean_per_sample |x̂0 − real|, fp32, NaN (a zero normaliser) set to 0."""
    x0 = x0_student.float()
    dims = tuple(range(1, x0.ndim))
    normalizer = (x0 - real.float()).abs().mean(dim=dims, keepdim=True)
    return torch.nan_to_num((fake.float() - real.float()) / normalizer)


def dmd_loss(x0_student: torch.Tensor, real: torch.Tensor, fake: torch.Tensor,
             grad: torch.Tensor | None = None) -> torch.Tensor:
    """½ mse(x̂0, x̂0 − grad), in fp32 (`grad`: dmd_gradient's, when already computed).

    Its gradient w.r.t. x̂0 is grad / numel: the normalised score difference, pushed
    through the student's parameters.
    """
    x0 = x0_student.float()
    grad = dmd_gradient(x0_student, real, fake) if grad is None else grad
    return 0.5 * F.mse_loss(x0, (x0 - grad).detach())


@torch.no_grad()
def dmd_statistics(x0_student: torch.Tensor, real: torch.Tensor, fake: torch.Tensor,
                   grad: torch.Tensor) -> dict[str, float]:
    """Logged beside the losses: the DMD gradient's RMS, and the spread of the student's, the teacher's
    (real) and the critic's (fake) x0. A student collapsing to few modes shows as a falling x0 std."""
    x0, real, fake = x0_student.float(), real.float(), fake.float()
    values = torch.stack([grad.pow(2).mean().sqrt(), x0.std(), real.std(), fake.std(), (fake - real).abs().mean()])
    keys = ("dmd_grad_rms", "student_x0_std", "real_x0_std", "fake_x0_std", "real_fake_x0_gap")
    return dict(zip(keys, values.tolist()))  # one device sync for all five
