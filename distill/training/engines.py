"""One DeepSpeed engine per trainable role (and per frozen role with `shard`), from the run config's `deepspeed`
section."""

from __future__ import annotations

import copy

from distill.config import Config
from distill.roles import RoleHandle, RoleManager, RoleModules


def deepspeed_config(cfg: Config, handle: RoleHandle, bf16: bool, load_universal: bool = False) -> dict:
    """The user's DeepSpeed config with batch size, accumulation, clipping and precision filled in; with
    `load_universal`, set to load a universal checkpoint (one a resume on another number of ranks reads)."""
    ds = copy.deepcopy(cfg.deepspeed)
    ds["train_micro_batch_size_per_gpu"] = cfg.training.batch_size
    ds["gradient_accumulation_steps"] = cfg.training.gradient_accumulation_steps
    ds["gradient_clipping"] = handle.max_grad_norm
    ds["bf16"] = {"enabled": bf16}
    ds.setdefault("zero_optimization", {"stage": 0})
    ds.setdefault("zero_allow_untested_optimizer", True)  # the method's torch AdamW
    ds.setdefault("steps_per_print", 10**9)
    if load_universal:
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    return ds


def wrap_in_engines(roles: RoleManager, cfg: Config, bf16: bool, load_universal: bool = False) -> None:
    """Hand each trainable role's modules (as one RoleModules), optimizer and scheduler to `deepspeed.initialize`;
    a frozen role with `shard` gets an engine without an optimizer, which only partitions its weights.
    `load_universal`: the trainable roles' engines will load a universal checkpoint."""
    import deepspeed

    for handle in roles.trainable():
        engine, _, _, _ = deepspeed.initialize(
            model=RoleModules(handle.modules),
            optimizer=handle.optimizer,
            lr_scheduler=handle.lr_scheduler,
            config=deepspeed_config(cfg, handle, bf16, load_universal),
            dist_init_required=False,
        )
        handle.engine = engine
    for handle in (h for h in roles if not h.trainable and cfg.roles[h.name].shard):
        # ZeRO-3 without an optimizer: the weights partitioned, each forward gathering them block by block
        engine, _, _, _ = deepspeed.initialize(model=RoleModules(handle.modules),
                                               config=deepspeed_config(cfg, handle, bf16), dist_init_required=False)
        handle.engine = engine
