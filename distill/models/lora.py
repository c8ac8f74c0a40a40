"""LoRA roles through peft: adapters over frozen base weights, the base held once, adapter-only files.

A LoRA role's denoiser is its base module with a peft adapter ("default") injected into the chosen
linears. With `share_base` the base is another role's (the teacher's): `share_weights` gives a module
of its own (own hooks, own checkpointing, own adapter) whose parameters are the teacher's tensors.
One module per role rather than one module with switched adapters: a checkpointed block recomputes
its forward during the backward, and it must recompute with the adapter it ran with, whatever role
ran last.

An adapter is saved the way diffusers saves one (`save_lora_adapter`: `pytorch_lora_weights.safetensors`,
its LoraConfig in the file's metadata), with `base.json`, the fingerprint of the base weights it applies to.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from distill.role_config import LoraSettings
from distill.errors import ConfigError
from distill.run_layout import CheckpointError

ADAPTER = "default"
"""The peft adapter name of a LoRA role (one adapter per module)."""
ADAPTER_FILE = "pytorch_lora_weights.safetensors"
"""diffusers' file name of a LoRA (`save_lora_adapter`, `load_lora_weights`)."""
BASE_FILE = "base.json"


def share_weights(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters are the same tensors (no memory), with buffers of its own."""
    return copy.deepcopy(module, {id(p): p for p in module.parameters()})


def add_lora(module: nn.Module, settings: LoraSettings, default_targets: list[str], key: str) -> nn.Module:
    """Inject a fresh adapter (B = 0: the module computes what its base does) into `module`, in place; only the
    adapter's parameters then require grad. `key` names the config section in errors."""
    from peft import LoraConfig

    module.requires_grad_(False)
    targets = settings.target_modules or default_targets
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha or settings.rank, lora_dropout=settings.dropout,
                        target_modules=targets, init_lora_weights=True)
    try:
        module.add_adapter(config, adapter_name=ADAPTER)
    except ValueError as err:
        if "not found" not in str(err) and "Target modules" not in str(err):
            raise
        linears = sorted({name.rsplit(".", 1)[-1] for name, m in module.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"{key}.target_modules: {targets} match no linear of the denoiser; its linears end in "
                          f"{', '.join(linears)}") from None
    return module


def has_lora(module: nn.Module) -> bool:
    return bool(getattr(module, "peft_config", None))


def adapter_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors, by diffusers' LoRA key (`blocks.0.attn1.to_q.lora_A.weight`)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(module, adapter_name=ADAPTER)


def base_fingerprint(module: nn.Module, weights: str) -> dict:
    """What identifies the frozen base weights under a LoRA module: `weights` (where they came from) and a digest of
    every base tensor's name, shape and a strided sample of its values rounded to bf16, so that the fp32 base of a
    CPU export and the bf16 base of a GPU run agree. Reads some thousand values a tensor, not the whole base."""
    digest = hashlib.sha256()
    for name, param in module.named_parameters():
        if "lora_" in name:
            continue
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)].to(torch.bfloat16).view(torch.int16).cpu()
        digest.update(f"{name.replace('.base_layer', '')}:{tuple(param.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return {"weights": weights, "digest": digest.hexdigest()[:16]}


def check_same_base(saved: dict, now: dict, where: str) -> None:
    """Refuse adapters trained on other base weights, naming both."""
    if saved.get("digest") != now["digest"]:
        raise CheckpointError(f"{where}: its LoRA adapters were trained on base weights {saved.get('weights')} "
                              f"(digest {saved.get('digest')}), but the base here is {now['weights']} (digest "
                              f"{now['digest']}); use the base the adapters were trained on (model.path / model.preset "
                              f"and model.init_seed)")


def save_adapter(module: nn.Module, folder: Path, base: dict) -> None:
    """The adapter as diffusers saves one (its LoraConfig in the file's metadata), and its base's fingerprint."""
    module.save_lora_adapter(folder, adapter_name=ADAPTER, weight_name=ADAPTER_FILE)
    (Path(folder) / BASE_FILE).write_text(json.dumps(base, indent=1))


def is_adapter_folder(folder: Path) -> bool:
    return (Path(folder) / ADAPTER_FILE).is_file() and (Path(folder) / BASE_FILE).is_file()


def read_adapter(folder: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(tensors, LoraConfig fields, base fingerprint) of a saved adapter."""
    from safetensors import safe_open

    path = Path(folder) / ADAPTER_FILE
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        config = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    if not config:
        raise CheckpointError(f"{path}: holds no LoRA config in its metadata; it was not saved by distill")
    return tensors, config, adapter_base(folder)


def adapter_base(folder: Path) -> dict:
    """The fingerprint of the base weights an exported adapter was trained on (`weights`: where they came from)."""
    return json.loads((Path(folder) / BASE_FILE).read_text())


def load_adapter_state(module: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Put saved adapter tensors into the module's adapter, every one of them and no other."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(module, tensors, adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise CheckpointError(f"{where}: the adapter does not fit the role's (missing {missing[:3]}, unexpected "
                              f"{list(result.unexpected_keys)[:3]})")


def fused(module: nn.Module, folder: Path, weights: str, where: str) -> nn.Module:
    """The base `module` with the adapter saved in `folder` merged into its weights: a plain module again. The
    adapter's base fingerprint must be the module's."""
    from peft import LoraConfig

    tensors, config, base = read_adapter(folder)
    check_same_base(base, base_fingerprint(module, weights), where)
    fields = {k: v for k, v in config.items() if k in ("r", "lora_alpha", "lora_dropout", "target_modules")}
    module.add_adapter(LoraConfig(**fields), adapter_name=ADAPTER)
    load_adapter_state(module, tensors, where)
    module.fuse_lora(adapter_names=[ADAPTER])
    module.unload_lora()
    return module
