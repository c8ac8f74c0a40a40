"""The training loop: infra only. Any registered method, any registered model plugin.

Build order (cheap checks first): the inputs (`distill.preflight`: weights sources, data, the
output's store, device) → run folder (empty, unless --resume or --overwrite) → process group →
a checkpoint to resume from, its files verified (the checkpoints that `init_from` names, verified
too) → model plugin (scheduler, VAE, tokenizer) → data fields vs. what the method needs, every
shard's checksum → roles → method (optimizers) → one DeepSpeed engine per trainable role →
resume. A start that fails removes the folders it made. Then `train()` runs iterations, logs
metrics, samples validation videos every `validation.every` iterations and saves checkpoints
every `training.checkpoint_every` iterations, both also at the end.

Nothing non-finite is published: a loss or gradient that is not finite stops the run before its
optimizer step, weights are checked after each iteration and before each save, and a checkpoint
whose weights then gave non-finite values is withdrawn (`latest` goes back to the one before). A
damaged shard stops the run at an iteration boundary, after a checkpoint of the work since the last.
"""

from __future__ import annotations

import time

import torch
import yaml

from distill import registry
from distill.config import Config, ConfigError, to_dict
from distill.data.loader import BatchLoader
from distill.data.prompts import PromptDataset
from distill.data.shards import ShardDataset, ShardError
from distill.device import resolve_device
from distill.errors import NonFiniteError
from distill.finite import described, nonfinite_names
from distill.preflight import check_inputs, check_overwrite
from distill.progress import Progress
from distill.run_layout import CheckpointError, resolve_export, step_of
from distill.storage import open_store
from distill.training.checkpoint import CheckpointContents, CheckpointManager, RNGState
from distill.training.distributed import all_reduce_mean, init_distributed, ranks_where
from distill.training.engines import wrap_in_engines
from distill.training.metrics import MetricsLog, truncate_metrics
from distill.training.run_folder import SHARD_CACHE, RunFolder
from distill.video import check_video_format


class Trainer:
    def __init__(self, cfg: Config, dataset=None, resume: str | None = None, force: bool = False,
                 overwrite: bool = False):
        """`resume`: "latest" or a checkpoint name of this run; `force`: drop the run's checkpoints newer than it;
        `overwrite`: a fresh run may replace an earlier run's files in run.output (deleted once the models are
        built). Without `resume` or `overwrite`, run.output must be empty."""
        self.cfg = cfg
        self.overwrite = overwrite
        check_inputs(cfg, data=dataset is None)
        self.device = resolve_device(cfg)
        precision = cfg.training.mixed_precision
        self.bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        self.folder = RunFolder(cfg)  # its store answered in check_inputs
        if resume is None and overwrite:
            check_overwrite(cfg)  # --overwrite deletes run.output's files: none may be an input
        elif resume is None:
            self.folder.refuse_leftovers()
        self.dist = init_distributed(self.device.type, cfg.parallel.sequence_parallel_size)
        self.run_dir = self.folder.local
        with self.folder.removed_on_error():
            resume = self.open_run(resume, force)
            self.build(dataset)
            self.restore(resume)

    def open_run(self, resume: str | None, force: bool) -> str | None:
        """The store reachable, the checkpoint to resume from checked (or none there to overwrite), and the
        checkpoints that roles start from verified: all before any model is built."""
        self.folder.store.check()
        self.checkpoints = CheckpointManager(self.folder.store, self.folder.local, rank=self.dist.rank,
                                             world_size=self.dist.world_size, zero_stage=self.cfg.zero_stage)
        self.dropped: list[str] = []
        self.load_universal = False
        if resume is not None:
            resume = self.checkpoints.resolve(resume, to_dict(self.cfg))
            self.load_universal = self.checkpoints.loads_universal(resume)  # the engines are built to read it
            self.dropped = self.checkpoints.newer_than(resume)
            if self.dropped and not force:
                raise CheckpointError(
                    f"--resume {resume}: the run has newer checkpoints ({', '.join(self.dropped)}) that resuming from "
                    f"{resume} would drop, with the metrics.jsonl rows after step {step_of(resume)}; resume from "
                    f"{self.dropped[-1]}, or pass --force to drop them")
        for name, role in self.cfg.roles.items():
            if role.init_from and role.init_from not in self.cfg.roles:
                try:
                    resolve_export(role.init_from, self.cfg.storage)  # verified once; build_roles reuses it
                except CheckpointError as err:
                    raise CheckpointError(f"roles.{name}.init_from: {err}") from None
        return resume

    def build(self, dataset) -> None:
        """Model plugin, data (checked against the method, every shard's checksum), roles, method, engines."""
        cfg = self.cfg
        # 1. The model plugin's shared parts, and the data checked against the method.
        spec = registry.get_method(cfg.method)
        torch.manual_seed(cfg.run.seed)
        self.plugin = registry.get_model(cfg.model.family)(
            cfg, device=self.device, frozen_dtype=torch.bfloat16 if self.bf16 else torch.float32
        )
        if self.dist.sequence_parallel_size > 1:
            self.plugin.sequence_mesh = self.dist.sequence_mesh(self.device.type)
        self.dataset = dataset if dataset is not None else self.open_data(spec.cls)
        self.check_data(spec.cls)
        if isinstance(self.dataset, ShardDataset):
            self.dataset.verify()
        if cfg.validation.every:
            check_video_format(cfg.validation.video_format)

        # 2. Roles, method, engines.
        self.roles = self.plugin.build_roles()
        validator = self.plugin.validator() if cfg.validation.every else None
        # The ranks of a sequence-parallel group are one data-parallel rank: the same batch, the same draws.
        self.method = spec.cls(cfg, self.roles, self.plugin, validator, rank=self.dist.data_rank)
        self.method.build()
        wrap_in_engines(self.roles, cfg, self.bf16, self.load_universal)
        for handle in self.roles:
            # Each rank of a group holds the gradient of its own tokens; the engines average over every rank, so
            # the group's sum (the whole sequence's gradient) needs its size back.
            handle.gradient_scale = self.dist.sequence_parallel_size

        self.batches = BatchLoader(self.dataset, cfg.training.batch_size, rank=self.dist.data_rank,
                                   world_size=self.dist.data_world_size, seed=cfg.run.seed)

    def restore(self, resume: str | None) -> None:
        """The checkpoint's state (the newer ones dropped first, when forced), the metrics log, the config."""
        self.iteration = 0
        if resume is not None:
            self.checkpoints.drop(self.dropped)
            self.resumed_from = self.checkpoints.load(resume, self.checkpoint_contents())
            if self.dist.is_main and self.folder.fetch("metrics.jsonl"):
                truncate_metrics(self.run_dir, self.iteration)  # drop steps the dead run logged after its checkpoint
        self.saved_at = self.iteration
        if self.overwrite and resume is None and self.dist.is_main:
            self.folder.clear()  # only now: a config that fails to build leaves the earlier run as it was
        self.metrics = MetricsLog(self.run_dir, enabled=self.dist.is_main, purge_step=self.iteration + 1)
        if self.dist.is_main:
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
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

    def load_resharded(self, states: list[dict]) -> None:
        """The loop's state from a run with another number of ranks: the same on each of its ranks."""
        if any(s != states[0] for s in states):
            raise ValueError(f"the ranks' iteration and optimizer steps differ: {states}")
        self.load_state_dict(states[0])

    def checkpoint_contents(self) -> CheckpointContents:
        """What a checkpoint saves and a resume restores, and what readers of it need to know."""
        method, export_role = self.method, self.method.export_role
        return CheckpointContents(
            step=self.iteration,
            engines={h.name: h.engine for h in self.roles.trainable()},
            states={"trainer": self, "method": method, "loader": self.batches, "rng": RNGState()},
            # Modules a pipeline can load (diffusers folders, LoRA adapters); a training-only head stays in the engine state.
            export={k: m for k, m in method.exported_modules().items() if hasattr(m, "save_pretrained")},
            export_is_state=method.exports_state,
            config=to_dict(self.cfg),
            manifest={"export_role": export_role, "sampling": method.sampling().to_dict(),
                      "method": method.metadata(self.cfg.method_config)},
            bases={h.name: h.base for h in self.roles if h.base is not None},
        )

    # -- steps -----------------------------------------------------------------------------

    def train_iteration(self) -> dict[str, float]:
        """One iteration: every micro-batch through the method; metrics averaged over micro-batches and ranks."""
        sums: dict[str, float] = {}
        n = self.cfg.training.gradient_accumulation_steps
        trainable = self.roles.trainable()
        steps_before = [h.optimizer_steps for h in trainable]
        for batch in self.next_batches(n):
            for key, value in self.method.train_step(batch, self.iteration).items():
                sums[key] = sums.get(key, 0.0) + value
        values = {k: v / n for k, v in sums.items()}
        for handle, before in zip(trainable, steps_before):
            values[f"{handle.name}_lr"] = handle.lr
            if handle.optimizer_steps > before and handle.last_grad_norm is not None:  # the same on every rank
                values[f"{handle.name}_grad_norm"] = handle.last_grad_norm
        self.iteration += 1
        self.check_weights()
        return all_reduce_mean(values, self.device)

    def next_batches(self, n: int) -> list[dict]:
        """The iteration's micro-batches, read before any compute: a damaged shard then stops every rank at an
        iteration boundary, the data position where it was, so a checkpoint keeps the work done."""
        position = self.batches.state_dict()
        try:
            batches, error = [next(self.batches) for _ in range(n)], None
        except ShardError as err:
            batches, error = [], err
        ranks = ranks_where(error is not None)
        if ranks:
            self.batches.load_state_dict(position)
            raise error or ShardError(f"rank {ranks[0]} read a damaged shard (its own error names it)")
        return batches

    def check_weights(self) -> None:
        """Every trainable weight finite after the iteration's optimizer steps, before anything logs, samples or
        saves it (a frozen base does not change); every rank stops together (ZeRO-3 ranks hold different parts)."""
        bad = [f"{h.name}.{name}" for h in self.roles.trainable() for name in nonfinite_names(h.named_trainable_parameters())]
        ranks = ranks_where(bool(bad))
        if ranks:
            raise NonFiniteError(f"weights became non-finite (NaN or Inf) at iteration {self.iteration - 1} on rank "
                                 f"{', '.join(map(str, ranks))}{': ' + described(bad) if bad else ''}; the usual "
                                 f"cause is a learning rate too large (training.learning_rate and its per-role keys)")

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
        name = self.checkpoints.save(self.checkpoint_contents(), keep_last=tr.keep_checkpoints,
                                     keep_every=tr.keep_checkpoint_every)
        self.saved_at = self.iteration
        return name

    def keep_work(self) -> str:
        """After a damaged shard stopped the run at an iteration boundary: a checkpoint of the work since the last."""
        if self.iteration == self.saved_at:
            return "no work since the last checkpoint was lost"
        name = self.save_checkpoint()
        return f"saved {name} before stopping: restore the shard, then resume with --resume"

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
            self.metrics.log_validation(self.iteration, result.frames, result.contact_sheet, self.cfg.validation.fps)
            self.folder.sync(rel)
        return {"validation_seconds_per_video": sum(result.seconds_per_video) / len(result.seconds_per_video)}

    def train(self) -> list[dict[str, float]]:
        """Run to training.max_steps; returns the logged metrics (means over each log window)."""
        tr = self.cfg.training
        history = []
        window: dict[str, list[float]] = {}  # values since the last log line, averaged when written
        # A bar on a terminal; otherwise (a log file, the flows) a line every log_every iterations.
        progress = Progress("train", tr.max_steps, initial=self.iteration, every=tr.log_every,
                            bar=tr.progress_bar, enabled=self.dist.is_main)
        try:
            while self.iteration < tr.max_steps:
                start = time.perf_counter()
                values = self.train_iteration()
                values["seconds_per_iteration"] = time.perf_counter() - start
                if self.validation_due():
                    values.update(self.validate())
                for key, value in values.items():
                    window.setdefault(key, []).append(value)
                shown = values
                if self.iteration % tr.log_every == 0 or self.iteration == tr.max_steps:
                    shown = means = {k: sum(v) / len(v) for k, v in window.items()}
                    self.metrics.log(self.iteration, means)
                    history.append({"step": self.iteration, **means})
                    window.clear()
                if self.checkpoint_due():
                    self.save_checkpoint()
                progress.update(1, {k: shown[k] for k in self.method.headline_losses if k in shown})
        except NonFiniteError as err:  # weights of this iteration's step (and later) are not to be trusted
            raise NonFiniteError(f"{err}; {self.checkpoints.withdraw_from(self.iteration)}") from None
        except ShardError as err:
            raise ShardError(f"{err}; {self.keep_work()}") from None
        finally:
            progress.close()
            self.metrics.close()
            self.folder.close()
        return history
