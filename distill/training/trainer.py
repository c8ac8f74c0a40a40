"""The training loop: infra only. Any registered method, any registered model plugin.

Build order (cheap checks first): the inputs (`distill.preflight`: weights sources, data, the
output's store, device) → run folder (empty, unless --resume or --overwrite) → process group →
a checkpoint to resume from → model plugin
(scheduler, VAE, tokenizer) → data fields vs. what the method needs → roles → method
(optimizers) → one DeepSpeed engine per trainable role → resume. Then `train()` runs
iterations, logs metrics, samples validation videos every `validation.every` iterations
and saves checkpoints every `training.checkpoint_every` iterations, both also at the end.
"""

from __future__ import annotations

import time

import torch
import yaml

from distill import registry
from distill.config import Config, ConfigError, to_dict
from distill.data.loader import BatchLoader
from distill.data.prompts import PromptDataset
from distill.data.shards import ShardDataset
from distill.device import resolve_device
from distill.preflight import check_inputs, check_overwrite
from distill.storage import open_store
from distill.training.checkpoint import CheckpointContents, CheckpointManager, RNGState
from distill.training.distributed import all_reduce_mean, init_distributed
from distill.training.engines import wrap_in_engines
from distill.training.metrics import MetricsLog, truncate_metrics
from distill.training.run_folder import SHARD_CACHE, RunFolder
from distill.video import check_video_format


class Trainer:
    def __init__(self, cfg: Config, dataset=None, resume: str | None = None, overwrite: bool = False):
        """resume: a checkpoint name or "latest"; overwrite: a fresh run may replace an earlier run's files
        in run.output (deleted once the models are built). Without either, run.output must be empty."""
        self.cfg = cfg
        check_inputs(cfg, data=dataset is None)
        self.device = resolve_device(cfg)
        precision = cfg.training.mixed_precision
        self.bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        self.folder = RunFolder(cfg)  # its store answered in check_inputs
        if resume is None and overwrite:
            check_overwrite(cfg)  # --overwrite deletes run.output's files: none may be an input
        elif resume is None:
            self.folder.refuse_leftovers()
        self.dist = init_distributed(self.device.type)
        self.run_dir = self.folder.local
        self.checkpoints = CheckpointManager(self.folder.store, self.folder.local, rank=self.dist.rank,
                                             world_size=self.dist.world_size,
                                             zero_stage=cfg.zero_stage)
        if resume is not None:
            resume = self.checkpoints.resolve(resume)

        # 1. The model plugin's shared parts, and the data checked against the method.
        spec = registry.get_method(cfg.method)
        torch.manual_seed(cfg.run.seed)
        self.plugin = registry.get_model(cfg.model.family)(
            cfg, device=self.device, frozen_dtype=torch.bfloat16 if self.bf16 else torch.float32
        )
        self.dataset = dataset if dataset is not None else self.open_data(spec.cls)
        self.check_data(spec.cls)
        if cfg.validation.every:
            check_video_format(cfg.validation.video_format)

        # 2. Roles, method, engines.
        self.roles = self.plugin.build_roles()
        validator = self.plugin.validator() if cfg.validation.every else None
        self.method = spec.cls(cfg, self.roles, self.plugin, validator, rank=self.dist.rank)
        self.method.build()
        wrap_in_engines(self.roles, cfg, self.bf16)

        self.batches = BatchLoader(
            self.dataset, cfg.training.batch_size, rank=self.dist.rank, world_size=self.dist.world_size, seed=cfg.run.seed
        )
        self.iteration = 0
        if resume is not None:
            self.resumed_from = self.checkpoints.load(resume, self.checkpoint_contents())
            if self.dist.is_main and self.folder.fetch("metrics.jsonl"):
                truncate_metrics(self.run_dir, self.iteration)  # drop steps the dead run logged after its checkpoint
        if overwrite and resume is None and self.dist.is_main:
            self.folder.clear()  # only now: a config that fails to build leaves the earlier run as it was
        self.metrics = MetricsLog(self.run_dir, enabled=self.dist.is_main, purge_step=self.iteration + 1)
        if self.dist.is_main:
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            self.folder.sync("config.yaml")

    def open_data(self, method_cls):
        """Shards when data.shards is set (latents read only for methods that use them), else the inline prompts."""
        d = self.cfg.data
        if d.shards:
            return ShardDataset(open_store(d.shards, self.cfg.storage), identity=self.plugin.identity(),
                                max_text_length=self.cfg.model.max_text_length,
                                video={"num_frames": d.num_frames, "height": d.height, "width": d.width},
                                negative_prompt=d.negative_prompt,
                                with_latents=method_cls.latents_source(self.cfg.method_config) == "data",
                                cache_dir=self.run_dir / SHARD_CACHE / f"rank-{self.dist.rank:05d}")
        if d.prompts:
            return PromptDataset(d.prompts)
        raise ConfigError(f"data.videos ({d.videos}) must be preprocessed first: `distill preprocess CONFIG` "
                          f"writes shards; then set data.shards to train on them")

    def check_data(self, method_cls) -> None:
        """Fail before building models when the data cannot feed the method."""
        if len(self.dataset) == 0:
            raise ConfigError("data: the data set is empty")
        if method_cls.latents_source(self.cfg.method_config) == "data":
            key = self.plugin.latents_key
            fields = getattr(self.dataset, "fields", ())
            if key not in fields:
                reason = method_cls.data_latents_reason(self.cfg.method_config)
                raise ConfigError(
                    f"data.shards: {reason} needs {key!r} from the data, which gives only "
                    f"{', '.join(fields) or 'nothing'}; give shards that carry {key!r} "
                    f"(`distill preprocess` without prompt_only), or change {reason.split(':')[0]}"
                )

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"iteration": self.iteration,
                "optimizer_steps": {h.name: h.optimizer_steps for h in self.roles.trainable()}}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = state["iteration"]
        for name, steps in state["optimizer_steps"].items():  # what an EMA's start step counts
            self.roles[name].optimizer_steps = steps

    def checkpoint_contents(self) -> CheckpointContents:
        """What a checkpoint saves and a resume restores, and what readers of it need to know."""
        method, export_role = self.method, self.method.export_role
        return CheckpointContents(
            step=self.iteration,
            engines={h.name: h.engine for h in self.roles.trainable()},
            states={"trainer": self, "method": method, "loader": self.batches, "rng": RNGState()},
            # Modules a pipeline can load (diffusers or peft folders); a training-only head stays in the engine state.
            export={k: m for k, m in method.exported_modules().items() if hasattr(m, "save_pretrained")},
            export_is_state=method.exports_state,
            config=to_dict(self.cfg),
            manifest={"export_role": export_role, "sampling": method.sampling().to_dict(),
                      "method": method.metadata(self.cfg.method_config)},
        )

    # -- steps -----------------------------------------------------------------------------

    def train_iteration(self) -> dict[str, float]:
        """One iteration: every micro-batch through the method; metrics averaged over micro-batches and ranks."""
        sums: dict[str, float] = {}
        n = self.cfg.training.gradient_accumulation_steps
        trainable = self.roles.trainable()
        steps_before = [h.optimizer_steps for h in trainable]
        for _ in range(n):
            for key, value in self.method.train_step(next(self.batches), self.iteration).items():
                sums[key] = sums.get(key, 0.0) + value
        values = {k: v / n for k, v in sums.items()}
        for handle, before in zip(trainable, steps_before):
            values[f"{handle.name}_lr"] = handle.lr
            if handle.optimizer_steps > before and handle.last_grad_norm is not None:  # the same on every rank
                values[f"{handle.name}_grad_norm"] = handle.last_grad_norm
        self.iteration += 1
        return all_reduce_mean(values, self.device)

    def checkpoint_due(self) -> bool:
        every = self.cfg.training.checkpoint_every
        return self.iteration == self.cfg.training.max_steps or (every > 0 and self.iteration % every == 0)

    def save_checkpoint(self) -> str:
        """Metrics and TensorBoard events into the store, then a checkpoint of every rank."""
        if self.dist.is_main:
            self.metrics.flush()
            self.folder.sync("metrics.jsonl")
            self.folder.sync("tb")
        tr = self.cfg.training
        return self.checkpoints.save(self.checkpoint_contents(), keep_last=tr.keep_checkpoints,
                                     keep_every=tr.keep_checkpoint_every)

    def validation_due(self) -> bool:
        every = self.cfg.validation.every
        return every > 0 and (self.iteration % every == 0 or self.iteration == self.cfg.training.max_steps)

    def validate(self) -> dict[str, float]:
        rel = f"validation/step-{self.iteration:06d}"
        out_dir = self.run_dir / rel if self.dist.is_main else None
        result = self.method.log_validation(self.iteration, None if out_dir is None else str(out_dir))
        if result is None:
            return {}
        if self.dist.is_main:
            self.folder.sync(rel)
        return {"validation_seconds_per_video": sum(result.seconds_per_video) / len(result.seconds_per_video)}

    def train(self) -> list[dict[str, float]]:
        """Run to training.max_steps; returns the logged metrics (means over each log window)."""
        from tqdm import tqdm

        tr = self.cfg.training
        history = []
        window: dict[str, list[float]] = {}  # values since the last log line, averaged when written
        bar = tqdm(total=tr.max_steps, initial=self.iteration, disable=not (self.dist.is_main and tr.progress_bar))
        try:
            while self.iteration < tr.max_steps:
                start = time.perf_counter()
                values = self.train_iteration()
                values["seconds_per_iteration"] = time.perf_counter() - start
                if self.validation_due():
                    values.update(self.validate())
                for key, value in values.items():
                    window.setdefault(key, []).append(value)
                if self.iteration % tr.log_every == 0 or self.iteration == tr.max_steps:
                    means = {k: sum(v) / len(v) for k, v in window.items()}
                    self.metrics.log(self.iteration, means)
                    history.append({"step": self.iteration, **means})
                    window.clear()
                if self.checkpoint_due():
                    self.save_checkpoint()
                bar.update(1)
                bar.set_postfix({k: f"{values[k]:.4g}" for k in self.method.headline_losses if k in values})
        finally:
            bar.close()
            self.metrics.close()
        return history
