"""`distill export CHECKPOINT OUT_DIR`: a checkpoint's product as a stock diffusers folder.

The folder holds the exported role's modules (the student's transformer), the teacher's VAE,
text encoder and tokenizer, and a scheduler configured for the role's sampling as its method
recorded it in the checkpoint (for a DMD2 student: its own steps, re-noising between them),
so that plain `WanPipeline.from_pretrained(OUT_DIR)` samples the distilled way.
`distill_export.json` beside it says how to call it (steps, guidance 1, text length) and how
closely the scheduler reproduces the trained steps.

A LoRA student exports as its adapter in diffusers' LoRA file (`pytorch_lora_weights.safetensors`, for
`WanPipeline.load_lora_weights` on the base model's pipeline) with the scheduler beside it; `fuse` merges the
adapter into the base weights and writes the whole folder instead.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from distill import registry
from distill.config import StorageConfig
from distill.errors import InputError
from distill.outputs import check_output_folder, staged_folder
from distill.run_layout import open_checkpoint
from distill.validation import SamplingSpec


def export(checkpoint: str, out_dir: str | Path, storage: StorageConfig | None = None, *,
           overwrite: bool = False, fuse: bool = False) -> dict:
    """Write the diffusers folder; returns the export record (also written as distill_export.json).

    The checkpoint and out_dir are checked before any model is built: out_dir must be new or empty
    unless `overwrite`. The folder is made beside out_dir and replaces it whole once complete."""
    import torch

    ckpt = open_checkpoint(checkpoint, storage)
    out_dir = check_output_folder(out_dir, overwrite=overwrite, what="export folder")
    if ckpt.store.is_local and Path(ckpt.store.root).resolve().is_relative_to(out_dir.resolve()):
        raise InputError(f"{out_dir}: holds the checkpoint being exported ({checkpoint}); choose another folder")
    cfg = ckpt.config
    with tempfile.TemporaryDirectory(prefix="distill-export-") as tmp, staged_folder(out_dir) as staging:
        folder = ckpt.fetch_export(Path(tmp))  # verified (files, finite weights) before anything is built
        plugin = registry.get_model(cfg.model.family)(cfg, device=torch.device("cpu"), frozen_dtype=torch.float32)
        record = plugin.export_pipeline(folder, staging, SamplingSpec.from_dict(ckpt.sampling), fuse=fuse)
        record.update(checkpoint=checkpoint, step=ckpt.step, role=ckpt.export_role, weights=ckpt.method["weights"],
                      method=cfg.method)
        (staging / "distill_export.json").write_text(json.dumps(record, indent=2))
    return record
