"""The method layer: algorithms over roles and adapter primitives, never over model classes."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from distill.errors import NonFiniteError
from distill.roles import RoleHandle, RoleManager, check_roles
from distill.validation import SamplingSpec, ValidationRequest, ValidationResult, Validator

if TYPE_CHECKING:  # the config module loads methods to type method_config: no import back at run time
    from distill.config import Config


class DistillMethod(ABC):
    """A training method: declares its roles, builds their optimizers, runs one micro-batch.

    The trainer calls `train_step(raw_batch, iteration)` once per micro-batch (gradient
    accumulation is the engines' business) and `log_validation` every N iterations.

    What infrastructure (trainer, bench, flows, reports) may know of a method is declared here,
    as class metadata and `sampling()`, and recorded in each checkpoint's manifest.
    """

    name: ClassVar[str]
    headline_losses: ClassVar[tuple[str, ...]] = ()
    """The losses `train_step` returns that a person watches: progress bars, artifacts, report curves."""
    update_kinds: ClassVar[tuple[str, ...]] = ("update",)
    """The kinds of iteration this method runs (see `iteration_kind`); throughput is reported per kind."""

    def __init__(
        self,
        cfg: Config,
        roles: RoleManager,
        adapter: Any,
        validator: Validator | None = None,
        *,
        rank: int = 0,
    ):
        self.cfg = cfg
        self.method_cfg = cfg.method_config
        self.roles = roles
        self.adapter = adapter
        self.validator = validator
        self.rank = rank
        # `shared_rng` draws what every rank must agree on (e.g. DMD2's rollout length);
        # `local_rng` draws what each rank draws for itself (noise, timesteps).
        self.shared_rng = torch.Generator().manual_seed(cfg.run.seed)
        self.local_rng = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + 7919 * (rank + 1))
        # Noise is drawn where it is used: a batch of video noise drawn on the CPU and copied over
        # cost more than the whole forward and backward pass of a small model on a GPU.
        device = getattr(adapter, "device", torch.device("cpu"))
        self.noise_rng = torch.Generator(device=device).manual_seed(cfg.run.seed * 1_000_033 + 6007 * (rank + 1))

    # -- build -----------------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def required_roles(cls, method_cfg: Any) -> dict[str, bool]:
        """Role name -> trainable flag that this method needs."""

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Cross-section checks run when the config loads (before anything is built)."""
        check_roles({n: r.trainable for n, r in cfg.roles.items()}, cls.required_roles(cfg.method_config))

    def build(self) -> None:
        self.roles.require_roles(self.required_roles(self.method_cfg))
        self.build_optimizers()

    @abstractmethod
    def build_optimizers(self) -> None:
        """Create each trainable role's optimizer and scheduler and write them onto its handle."""

    def iteration_kind(self, iteration: int) -> str:
        """Which of `update_kinds` iteration `iteration` is (e.g. DMD2: student_update or critic_only)."""
        return self.update_kinds[0]

    @classmethod
    def reference_guidance(cls, method_cfg: Any) -> float:
        """The standard CFG scale the teacher is judged at (bench baselines); 1 = no guidance."""
        return 1.0

    @classmethod
    def metadata(cls, method_cfg: Any) -> dict:
        """What a checkpoint records of its method, so readers need not build one."""
        return {"name": cls.name, "headline_losses": list(cls.headline_losses), "update_kinds": list(cls.update_kinds),
                "reference_guidance": cls.reference_guidance(method_cfg), "weights": "trained"}

    @property
    def export_role(self) -> str:
        """The role a checkpoint exports as the product (a diffusers transformer)."""
        return next(name for name, trainable in self.required_roles(self.method_cfg).items() if trainable)

    def exported_modules(self) -> dict[str, nn.Module]:
        """The product's modules, as checkpoints export them and validation samples them: the export role's
        own (a method keeping an EMA returns the averaged ones)."""
        return self.roles[self.export_role].modules

    @property
    def exports_state(self) -> bool:
        """True when the exported modules are the method's own state (an EMA), so a resume reads them back."""
        return False

    def export_handle(self) -> RoleHandle:
        """A handle over the exported modules (the export role itself when they are its own)."""
        role = self.roles[self.export_role]
        modules = self.exported_modules()
        if modules is role.modules:
            return role
        weights = self.metadata(self.method_cfg)["weights"]
        return RoleHandle(name=f"{role.name}-{weights}", modules=modules, trainable=False)

    @classmethod
    def latents_source(cls, method_cfg: Any) -> str:
        """"data" when the method trains on data latents (the data must carry them), else "zeros"."""
        return "data"

    @classmethod
    def data_latents_reason(cls, method_cfg: Any) -> str:
        """What in the config makes the method need data latents, for the error when the data has none."""
        return f"method {cls.name!r}"

    # -- step ------------------------------------------------------------------------------

    @abstractmethod
    def train_step(self, raw_batch: dict, iteration: int) -> dict[str, float]:
        """Run one micro-batch of iteration `iteration`; return scalars to log (losses; the trainer adds grad norms and lrs)."""

    @abstractmethod
    def sampling(self) -> SamplingSpec:
        """How the exported role samples: sampler, exact timesteps or step count, guidance."""

    def log_validation(self, iteration: int, output_dir: str | None) -> ValidationResult | None:
        """Sample validation videos with the exported role (every rank calls; a rank with an output_dir writes)."""
        if self.validator is None:
            return None
        return self.validator.run(self.validation_request(self.export_handle(), output_dir, self.sampling()))

    def validation_request(self, handle: RoleHandle, output_dir: str | None, sampling: SamplingSpec) -> ValidationRequest:
        """A request for the config's validation prompts, seeds and size, sampled as `sampling` says."""
        v, d = self.cfg.validation, self.cfg.data
        return ValidationRequest(
            sample_handle=handle,
            prompts=v.prompts or d.prompts[:1],
            seeds=v.seeds,
            num_frames=v.num_frames or d.num_frames,
            height=v.height or d.height,
            width=v.width or d.width,
            negative_prompt=d.negative_prompt,
            fps=v.fps,
            video_format=v.video_format,
            output_dir=output_dir,
            sampling=sampling,
        )

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"shared_rng": self.shared_rng.get_state(), "local_rng": self.local_rng.get_state(),
                "noise_rng": self.noise_rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.shared_rng.set_state(state["shared_rng"])
        self.local_rng.set_state(state["local_rng"])
        self.noise_rng.set_state(state["noise_rng"])

    def load_resharded(self, states: list[dict]) -> None:
        """The state of a run with `len(states)` data ranks, for this rank of a run with another number. The shared
        stream is the same on every rank (rank 0's is taken); the per-rank streams differ by design: a rank the
        saved run had goes on with its own, a rank it lacked keeps the seeds a fresh run gives it."""
        if any(not torch.equal(s["shared_rng"], states[0]["shared_rng"]) for s in states):
            raise ValueError("the shared random stream differs between the saved ranks (it draws what they agree on)")
        if self.rank < len(states):
            self.load_state_dict(states[self.rank])
        else:
            self.shared_rng.set_state(states[0]["shared_rng"])

    # -- helpers shared by methods ----------------------------------------------------------

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=self.noise_rng, device=self.noise_rng.device, dtype=torch.float32).to(x.device)

    def sample_timesteps(self, batch_size: int, device: torch.device, lo: float = 0.0, hi: float = 1.0,
                         shift: float | None = None) -> torch.Tensor:
        """t uniform in [0, T], through the model's timestep shift (`shift` in place of its own), clamped to
        [lo, hi] · T."""
        T = self.adapter.num_train_timesteps
        t = torch.rand(batch_size, generator=self.local_rng) * T
        t = self.adapter.shift_timestep(t, shift)
        return t.clamp(lo * T, hi * T).to(device)


def check_finite(loss: torch.Tensor, name: str, iteration: int) -> None:
    """Stop before an optimizer step would write NaN or Inf into the weights: on every rank at once.

    The ranks agree first (one small all-reduce), so a loss that is not finite on one rank stops
    all of them with the same error instead of leaving the others waiting in a collective.
    """
    bad = torch.zeros(1, device=loss.device)
    if not torch.isfinite(loss).all():
        bad += 1
    ranks = [0] if bad.item() else []
    if dist.is_initialized() and dist.get_world_size() > 1:
        flags = torch.zeros(dist.get_world_size(), device=loss.device)
        flags[dist.get_rank()] = bad
        dist.all_reduce(flags)
        ranks = [r for r, flag in enumerate(flags.tolist()) if flag]
    if ranks:
        raise NonFiniteError(f"{name} is not finite (NaN or Inf) on rank {', '.join(map(str, ranks))} at "
                                 f"iteration {iteration}; every rank stops before the optimizer step")


def optimizer_settings(training: Any, prefix: str = "", every: int = 1) -> dict[str, Any]:
    """AdamW and schedule settings from `training`; with a prefix (`fake_score_`), each unset
    prefixed key falls back to its unprefixed twin, key by key.

    `every`: the role steps on every `every`-th iteration. The schedule counts the role's own
    optimizer steps, so its horizon (`max_steps`) and warm-up, given in iterations, become
    ceil(iterations / every) of its steps: a schedule ends where the run ends for every role.
    """

    def pick(key: str) -> Any:
        value = getattr(training, prefix + key) if prefix else None
        return getattr(training, key) if value is None else value

    return dict(
        lr=pick("learning_rate"), betas=pick("betas"), weight_decay=pick("weight_decay"), eps=pick("eps"),
        schedule=pick("lr_scheduler"), warmup_steps=math.ceil(pick("warmup_steps") / every),
        max_grad_norm=pick("max_grad_norm"), total_steps=math.ceil(training.max_steps / every),
        implementation=training.optimizer_implementation,
    )


def make_optimizer(
    handle: RoleHandle,
    *,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    eps: float,
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    max_grad_norm: float,
    implementation: str = "auto",
) -> None:
    """AdamW over the role's trainable parameters plus a LambdaLR schedule, written onto the handle.

    `implementation`: auto (torch's choice), for_loop, foreach or fused: the same update, in other kernels.
    """
    params = handle.trainable_parameters()
    if not params:
        raise ValueError(f"role {handle.name!r} is trainable but has no parameters that require grad")
    handle.optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps,
                                         **_ADAMW_KERNELS[implementation])
    handle.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        handle.optimizer, _lr_lambda(schedule, warmup_steps, total_steps)
    )
    handle.max_grad_norm = max_grad_norm


_ADAMW_KERNELS = {"auto": {}, "for_loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def _lr_lambda(schedule: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if schedule == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant_with_warmup":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine

    return factor
