"""The checks of a run's inputs that need the file system or a store, but no model.

`distill check-config` and the trainer both run `check_inputs` before anything is built, so a
config that check-config passes does not fail later on a missing folder, and a typo costs a
second, not a model build. Loading the config (`distill.config`) checked its form already.
"""

from __future__ import annotations

from pathlib import Path

from distill.config import Config, ConfigError
from distill.locations import hub_id
from distill.run_layout import check_weights_folder
from distill.storage import open_store


def check_inputs(cfg: Config, *, data: bool = True) -> None:
    """Weights sources, the data to train on (unless the caller brings its own), the output's store, device
    and precision."""
    check_weights(cfg)
    if data:
        check_data(cfg)
    check_output(cfg)
    check_runtime(cfg)


def check_weights(cfg: Config) -> None:
    """model.path is a folder (or hub:), and each role's init_from a role, hub:, a folder or a checkpoint."""
    path = cfg.model.path
    if path is not None and hub_id(path) is None and not Path(path).is_dir():
        raise ConfigError(f"model.path: {path}: no such folder")
    for name, role in cfg.roles.items():
        source = role.init_from
        if source is None or source in cfg.roles or hub_id(source) is not None:
            continue
        check_weights_folder(source, f"roles.{name}.init_from", cfg.storage)


def check_data(cfg: Config) -> None:
    """Training reads shards (made by `distill preprocess`) or inline prompts."""
    from distill.data.shards import read_manifest

    d = cfg.data
    if d.shards:
        read_manifest(open_store(d.shards, cfg.storage))
    elif not d.prompts:
        raise ConfigError(f"data.videos ({d.videos}) must be preprocessed first: `distill preprocess CONFIG` "
                          f"writes shards; then set data.shards to train on them")


def check_output(cfg: Config) -> None:
    """run.output is a folder (or can be made), and its store answers (bucket, credentials, endpoint)."""
    store = open_store(cfg.run.output, cfg.storage)
    if store.is_local and Path(store.root).exists() and not Path(store.root).is_dir():
        raise ConfigError(f"run.output: {store.root} is a file; a run's output is a folder")
    store.check()


def check_overwrite(cfg: Config) -> None:
    """--overwrite deletes what run.output holds: refuse when an input of the run lives there."""
    output = _normal(cfg.run.output)
    inputs = {"data.shards": cfg.data.shards, "data.videos": cfg.data.videos, "model.path": cfg.model.path}
    inputs.update({f"roles.{name}.init_from": role.init_from for name, role in cfg.roles.items()
                   if role.init_from not in cfg.roles})
    for key, value in inputs.items():
        if value is None or hub_id(value) is not None:
            continue
        where = _normal(value)
        if where == output or where.startswith(f"{output}/"):
            raise ConfigError(f"run.output: {cfg.run.output} holds {key} ({value}), which --overwrite would delete; "
                              f"choose another run.output")


def _normal(location: str) -> str:
    return location.rstrip("/") if "://" in location else str(Path(location).resolve())


def check_fused_adamw(device) -> None:
    """torch has a fused AdamW kernel for the device (otherwise AdamW(fused=True) fails at its first step)."""
    import torch
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    # torch's own list (private), which AdamW checks at its first step; torch has no public query.
    if device.type not in _get_fused_kernels_supported_devices():
        raise ConfigError(f"training.optimizer_implementation: fused AdamW does not run on {device.type} in torch "
                          f"{torch.__version__}; use auto or foreach")


def check_runtime(cfg: Config) -> None:
    """The device asked for is there, its precision and optimizer kernels run on it, the model's attention backend
    and compiler run there, and validation can write its videos."""
    tr, m = cfg.training, cfg.model
    # only these can fail: import torch for them alone
    if tr.device == "cuda" or tr.mixed_precision == "bf16" or tr.optimizer_implementation == "fused":
        from distill.device import resolve_device

        device = resolve_device(cfg)  # cuda asked for and not there: an error
        if tr.mixed_precision == "bf16" and device.type == "cpu":
            raise ConfigError("training.mixed_precision: bf16 training runs on GPU; use auto or fp32 on CPU")
        if tr.optimizer_implementation == "fused":
            check_fused_adamw(device)
    if m.attention_backend is not None or m.compile or m.vae_compile:  # only these need the model library
        from distill import registry
        from distill.device import resolve_device

        trains = any(role.trainable for role in cfg.roles.values())
        registry.get_model(m.family).check_runtime(cfg, resolve_device(cfg), backward=trains)
    if cfg.validation.every:
        from distill.video import check_video_format

        check_video_format(cfg.validation.video_format)
