"""Typed run config, loaded strictly from YAML.

Every section is a keyword-only dataclass with a one-line docstring under each field.
`load_config` rejects an unknown key, a wrong type or an impossible value with a
`ConfigError` that names the key path (``training.learning_rate``), before any model is
built (the strict building is `distill.strict`'s). ``method_config`` is typed by the
method named in ``method`` (see registry.py); loading a config imports no model library.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from distill.errors import ConfigError
from distill.locations import check_endpoint_url, check_weights_source
from distill.model_config import MAX_FLOW_SHIFT, ModelConfig  # noqa: F401  (the model section, a module of its own)
from distill.parallel_config import ParallelConfig
from distill.role_config import LoraSettings, RoleConfig, check_lora, check_shard  # noqa: F401  (the roles section)
from distill.strict import build_section, check_seeds, load_yaml, non_negative, positive

__all__ = ["Config", "ConfigError", "build_config", "build_section", "load_config", "to_dict"]


# ---------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class RunConfig:
    name: str = "run"
    """Run name, shown in logs and reports."""
    output: str = "runs/default"
    """Folder of the run: config, metrics, checkpoints, validation videos."""
    seed: int = 0
    """Seed of weight init, data order, noise and timestep draws, in [0, 2**32)."""

    def validate(self, path: str) -> None:
        check_seeds(path, "seed", [self.seed])


LRSchedule = Literal["constant", "constant_with_warmup", "linear", "cosine"]


@dataclass(kw_only=True)
class TrainingConfig:
    max_steps: int = 100
    """Training iterations (an iteration = one critic/optimizer step for every trainable role due)."""
    batch_size: int = 1
    """Micro-batch size per rank."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    learning_rate: float = 1e-5
    """Student (or sole trainable role) AdamW learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    lr_scheduler: LRSchedule = "constant"
    """Learning-rate schedule; its horizon is the run (max_steps), in each role's own optimizer steps."""
    warmup_steps: int = 0
    """Warm-up of the schedule, in iterations (a role that steps every k-th iteration warms up over as many iterations)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    fake_score_learning_rate: float | None = None
    """Critic learning rate; unset = learning_rate. Every fake_score_* key falls back to its student twin."""
    fake_score_betas: tuple[float, float] | None = None
    """Critic AdamW betas; unset = betas."""
    fake_score_weight_decay: float | None = None
    """Critic weight decay; unset = weight_decay."""
    fake_score_eps: float | None = None
    """Critic AdamW epsilon; unset = eps."""
    fake_score_lr_scheduler: LRSchedule | None = None
    """Critic schedule; unset = lr_scheduler."""
    fake_score_warmup_steps: int | None = None
    """Critic warm-up steps; unset = warmup_steps."""
    fake_score_max_grad_norm: float | None = None
    """Critic clipping norm; unset = max_grad_norm."""
    log_every: int = 1
    """Write metrics every this many iterations."""
    checkpoint_every: int = 0
    """Save a checkpoint every this many iterations and at the end (0 = only at the end)."""
    keep_checkpoints: int = 3
    """Keep the newest this many checkpoints (plus marked ones); older ones are deleted."""
    keep_checkpoint_every: int = 0
    """Mark (keep for good) checkpoints at multiples of this many iterations (0 = none)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; auto = cuda when available."""
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto = bf16 on GPU, fp32 on CPU."""
    optimizer_implementation: Literal["auto", "for_loop", "foreach", "fused"] = "auto"
    """Kernels of the trainable roles' AdamW step: torch's choice (auto: foreach on GPU), or for_loop, foreach, fused."""
    progress_bar: bool = True
    """A progress bar on rank 0 when stderr is a terminal; off, or without a terminal, rank 0 writes a progress line
    (iteration/total, the headline losses, seconds per iteration, ETA) every log_every iterations."""

    def validate(self, path: str) -> None:
        positive(self, path, "max_steps", "batch_size", "gradient_accumulation_steps", "learning_rate", "log_every",
                  "keep_checkpoints")
        non_negative(self, path, "checkpoint_every", "keep_checkpoint_every")
        positive(self, path, "fake_score_learning_rate")
        non_negative(self, path, "weight_decay", "warmup_steps", "max_grad_norm", "eps")
        non_negative(self, path, "fake_score_weight_decay", "fake_score_warmup_steps", "fake_score_max_grad_norm")
        for key in ("betas", "fake_score_betas"):
            betas = getattr(self, key)
            if betas is not None and not all(0.0 <= b < 1.0 for b in betas):
                raise ConfigError(f"{path}.{key}: each beta must be in [0, 1), got {list(betas)}")


@dataclass(kw_only=True)
class DataConfig:
    prompts: list[str] = field(default_factory=list)
    """Inline training prompts (prompt-only data: enough for rollout_mode simulate)."""
    videos: str | None = None
    """A folder holding a captions table and the videos it names: the input of `distill preprocess`."""
    captions_file: str = "captions.csv"
    """The captions table inside `videos`: CSV or parquet with columns `video` (path relative to the folder) and `caption`."""
    shards: str | None = None
    """Shard folder: written by `distill preprocess`, read by `distill train` (takes precedence over prompts)."""
    prompt_only: bool = False
    """Preprocess text embeddings only (captions of `videos`, or `prompts`): shards for rollout_mode simulate."""
    shard_size: int = 256
    """Samples per shard file."""
    preprocess_batch_size: int = 8
    """Videos encoded together by `distill preprocess`."""
    negative_prompt: str = ""
    """Prompt of the unconditional branch of classifier-free guidance."""
    num_frames: int = 9
    """Frames of a training video (the first num_frames of each video)."""
    height: int = 32
    """Height of a training video in pixels (videos are centre-cropped and resized to it)."""
    width: int = 32
    """Width of a training video in pixels."""

    def validate(self, path: str) -> None:
        if not (self.prompts or self.videos or self.shards):
            raise ConfigError(f"{path}: the data set is empty; give {path}.prompts, {path}.videos or {path}.shards")
        positive(self, path, "num_frames", "height", "width", "shard_size", "preprocess_batch_size")


@dataclass(kw_only=True)
class ValidationConfig:
    every: int = 0
    """Sample validation videos every this many iterations and at the end (0 = never)."""
    prompts: list[str] = field(default_factory=list)
    """Validation prompts; empty = the first training prompt."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """One video per (prompt, seed); each in [0, 2**32)."""
    num_frames: int | None = None
    """Frames; unset = data.num_frames."""
    height: int | None = None
    """Height; unset = data.height."""
    width: int | None = None
    """Width; unset = data.width."""
    fps: int = 8
    """Frame rate of the written videos."""
    video_format: Literal["mp4", "gif"] = "mp4"
    """mp4 (H.264 through PyAV) or gif (Pillow only)."""

    def validate(self, path: str) -> None:
        non_negative(self, path, "every")
        positive(self, path, "num_frames", "height", "width", "fps")
        if not self.seeds:
            raise ConfigError(f"{path}.seeds: give at least one seed")
        check_seeds(path, "seeds", self.seeds)


@dataclass(kw_only=True)
class StorageConfig:
    endpoint_url: str | None = None
    """S3-compatible endpoint for s3:// outputs (http(s)://host[:port]); unset = AWS. Credentials come from the
    standard AWS chain only, never from this URL."""
    region: str | None = None
    """S3 region; unset = the AWS chain's."""
    local_dir: str | None = None
    """Local working folder of a run whose output is s3:// (unset = a fresh temporary folder)."""
    retries: int = 4
    """Attempts per transfer, with exponential backoff between them."""
    backoff_seconds: float = 1.0
    """Wait before the second attempt; doubles after each failure."""
    connect_timeout: float = 10.0
    """Seconds to connect to the S3 endpoint."""
    read_timeout: float = 60.0
    """Seconds to wait for the S3 endpoint to answer."""
    multipart_threshold_mb: int = 64
    """Files larger than this go up and down in parts."""
    multipart_chunk_mb: int = 64
    """Size of one part."""
    max_concurrency: int = 8
    """Parts of a large file, or small files of a folder, in flight at once."""

    def validate(self, path: str) -> None:
        positive(self, path, "retries", "connect_timeout", "read_timeout", "multipart_threshold_mb",
                  "multipart_chunk_mb", "max_concurrency")
        non_negative(self, path, "backoff_seconds")
        if self.endpoint_url is not None:
            check_endpoint_url(self.endpoint_url, f"{path}.endpoint_url")


@dataclass(kw_only=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    """Name, output folder and seed."""
    model: ModelConfig
    """The model plugin and its weights."""
    roles: dict[str, RoleConfig]
    """Roles by name (student, teacher, critic, ...)."""
    method: str
    """Training method, by registry name (dmd2, flow_matching)."""
    method_config: Any = None
    """The method's own typed config (see the method's module)."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Optimisation and loop settings."""
    data: DataConfig
    """Training data."""
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    """Periodic validation sampling."""
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """A DeepSpeed config, passed through (batch size, clipping and precision are filled in from training)."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Artifact storage settings."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Sequence parallelism across ranks (data parallelism needs no key: it is every rank beyond it)."""

    @property
    def zero_stage(self) -> int:
        """The DeepSpeed ZeRO stage of the trainable roles' engines (0 when the deepspeed section sets none)."""
        return self.deepspeed.get("zero_optimization", {}).get("stage", 0)

    def validate(self, path: str) -> None:
        zero = self.deepspeed.get("zero_optimization", {})
        if not isinstance(zero, dict) or zero.get("stage", 0) not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_optimization: expected a mapping with stage 0, 1, 2 or 3, got {zero!r}")
        for key in ("bf16", "bfloat16", "fp16", "amp"):  # bfloat16: DeepSpeed's alias of bf16
            if key in self.deepspeed:
                raise ConfigError(f"deepspeed.{key}: set training.mixed_precision instead (auto = bf16 on GPU, fp32 on CPU)")
        for key in ("optimizer", "scheduler"):
            if key in self.deepspeed:
                raise ConfigError(
                    f"deepspeed.{key}: optimizers and schedulers are created by the method from "
                    f"training.learning_rate / betas / weight_decay / lr_scheduler (and fake_score_*); remove it"
                )
        for key, ours in (
            ("train_micro_batch_size_per_gpu", "training.batch_size"),
            ("gradient_accumulation_steps", "training.gradient_accumulation_steps"),
            ("gradient_clipping", "training.max_grad_norm"),
            ("train_batch_size", "training.batch_size"),
        ):
            if key in self.deepspeed:
                raise ConfigError(f"deepspeed.{key}: set {ours} instead; the trainer fills it in")
        if self.validation.every and not (self.validation.prompts or self.data.prompts):
            raise ConfigError("validation.prompts: validation needs prompts, and data gives no inline prompts to borrow")
        for name, role in self.roles.items():
            if role.init_from == name:
                raise ConfigError(f"roles.{name}.init_from: a role cannot start from itself")
            check_lora(name, role, self.roles, self.zero_stage)
            check_shard(name, role, self.zero_stage)

# ---------------------------------------------------------------------------------------
# Strict loading
# ---------------------------------------------------------------------------------------

def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `key.path=value` overrides (values parsed as YAML) to a raw config mapping."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        dotted, text = item.split("=", 1)
        keys = dotted.strip().split(".")
        if not all(keys):
            raise ConfigError(f"--set {item!r}: expected key.path=value with no empty key")
        value = load_yaml(text, f"--set {dotted.strip()}")
        node = raw
        for i, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {dotted}: {'.'.join(keys[: i + 1])} is not a mapping")
            node = child
        node[keys[-1]] = value
    return raw


def build_config(raw: dict) -> Config:
    """Build and check a `Config` from a raw mapping (already overridden).

    Methods and model families are looked up in the registry; model plugins are not imported
    (the registry knows a family's name and timesteps without loading diffusers).
    """
    import distill.methods  # noqa: F401  (registers the built-in methods)
    import distill.models  # noqa: F401  (registers the built-in model families, without importing them)
    from distill import registry

    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
    raw = dict(raw)
    method_raw = raw.pop("method_config", None)
    cfg = build_section(Config, raw, "")
    spec = registry.get_method(cfg.method, key="method")
    cfg.method_config = build_section(spec.config_cls, method_raw, "method_config")
    family = registry.model_spec(cfg.model.family, key="model.family")
    family.check_preset(cfg.model.preset)
    family.check_attention_backend(cfg.model.attention_backend)
    spec.cls.check_config(cfg)
    for name, role in cfg.roles.items():  # after the method's roles: a missing role is named as such first
        if role.init_from is not None:
            check_weights_source(role.init_from, f"roles.{name}.init_from", tuple(cfg.roles))
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML run config, apply `--set` overrides, and check it strictly."""
    return build_config(apply_overrides(read_config_file(path), overrides or []))


def read_config_file(path: str | Path) -> dict:
    """The raw mapping of a YAML config file; a ConfigError naming the file when it is not one."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a config file")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8); give a YAML config") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror})") from None
    raw = load_yaml(text, str(path))
    if raw is None:
        raise ConfigError(f"{path}: the config file is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (run:, model:, ...) at the top level, "
                          f"got a {type(raw).__name__}")
    return raw


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain data (for config.yaml in the run folder)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(cfg)
