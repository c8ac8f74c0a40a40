"""`distill export CHECKPOINT OUT_DIR`: a checkpoint's product as a stock diffusers folder.

The folder holds the exported role's modules (the student's transformer), the teacher's VAE,
text encoder and tokenizer, and a scheduler configured for the role's sampling as its method
recorded it in the checkpoint (for a DMD2 student: its own steps, re-noising between them),
so that plain `WanPipeline.from_pretrained(OUT_DIR)` samples the distilled way.
`distill_export.json` beside it says how to call it (steps, guidance 1, text length) and how
closely the scheduler reproduces the trained steps.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from distill import registry
from distill.config import StorageConfig
from distill.run_layout import open_checkpoint
from distill.validation import SamplingSpec


def export(checkpoint: str, out_dir: str | Path, storage: StorageConfig | None = None) -> dict:
    """Write the diffusers folder; returns the export record (also written as distill_export.json)."""
    import torch

    ckpt = open_checkpoint(checkpoint, storage)
    cfg = ckpt.config
    with tempfile.TemporaryDirectory() as tmp:
        folder = ckpt.fetch_export(Path(tmp))  # verified (files, finite weights) before anything is built
        plugin = registry.get_model(cfg.model.family)(cfg, device=torch.device("cpu"), frozen_dtype=torch.float32)
        record = plugin.export_pipeline(folder, Path(out_dir), SamplingSpec.from_dict(ckpt.sampling))
    record.update(checkpoint=checkpoint, step=ckpt.step, role=ckpt.export_role, weights=ckpt.method["weights"],
                  method=cfg.method)
    Path(out_dir, "distill_export.json").write_text(json.dumps(record, indent=2))
    return record
