"""`distill export CHECKPOINT OUT_DIR`: a checkpoint's product as a stock diffusers folder.

The folder holds the exported role's transformer (the student), the teacher's VAE, text
encoder and tokenizer, and a scheduler configured for the role's sampling (for a DMD2
student: its own steps, re-noising between them), so that plain
`WanPipeline.from_pretrained(OUT_DIR)` samples the distilled way. `distill_export.json`
beside it says how to call it (steps, guidance 1, text length) and how closely the
scheduler reproduces the trained steps.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import yaml

from distill import registry
from distill.config import StorageConfig, build_config
from distill.roles import RoleManager
from distill.storage import open_store
from distill.training.checkpoint import MANIFEST, CheckpointError


def export(checkpoint: str, out_dir: str | Path, storage: StorageConfig | None = None) -> dict:
    """Write the diffusers folder; returns the export record (also written as distill_export.json)."""
    import torch

    store = open_store(checkpoint.rstrip("/"), storage)
    if not store.exists(MANIFEST):
        raise CheckpointError(f"{checkpoint}: not a complete checkpoint (no {MANIFEST})")
    manifest = json.loads(store.get_text(MANIFEST))
    cfg = build_config(yaml.safe_load(store.get_text("config.yaml")))
    if storage is not None:
        cfg.storage = storage

    spec = registry.get_method(cfg.method)
    plugin = registry.get_model(cfg.model.family)(cfg, device=torch.device("cpu"), frozen_dtype=torch.float32)
    method = spec.cls(cfg, RoleManager({}), plugin)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "transformer"
        store.download_folder("export/transformer", folder)
        record = plugin.export_pipeline(folder, Path(out_dir), method.sampling())
    record.update(checkpoint=checkpoint, step=manifest["step"], role=manifest["export_role"], method=cfg.method)
    Path(out_dir, "distill_export.json").write_text(json.dumps(record, indent=2))
    return record
