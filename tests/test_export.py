"""`distill export`: the student as a diffusers folder that stock WanPipeline loads and samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distill.cli import main as cli_main
from distill.run_layout import CheckpointError
from distill.training.trainer import Trainer
from distill.validation import ValidationRequest
from distill.video import to_uint8_frames
from tiny import tiny_config

PROMPT, SEED = "a red circle moving left", 3


def validator_frames(trainer, **size):
    request = ValidationRequest(sample_handle=trainer.roles["student"], prompts=[PROMPT], seeds=[SEED],
                                output_dir=None, sampling=trainer.method.sampling(), **size)
    return trainer.plugin.validator().run(request).frames[0]


def test_exported_student_samples_in_stock_diffusers_like_the_validator(tmp_path, capsys):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    size = {"num_frames": 5, "height": 16, "width": 16}
    cfg = tiny_config(tmp_path / "run", model={"pixel_space": False}, data=size, training={"max_steps": 2},
                      method_config={"warp_denoising_step": True, "generator_update_interval": 1})
    trainer = Trainer(cfg)
    trainer.train()
    out = tmp_path / "exported"
    assert cli_main(["export", str(tmp_path / "run" / "checkpoints" / "step-000002"), str(out)]) == 0
    assert "WanPipeline.from_pretrained" in capsys.readouterr().out
    record = json.loads((out / "distill_export.json").read_text())
    assert record["timesteps_trained"] == pytest.approx([1000.0, 900.0, 750.0, 500.0], abs=1e-3)
    assert record["max_timestep_deviation"] < 0.01 and record["role"] == "student" and record["step"] == 2

    pipe = WanPipeline.from_pretrained(out)  # plain diffusers: no distill code involved
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.stochastic_sampling
    torch.manual_seed(SEED)  # the re-noising draws from the global generator, as in the validator
    frames = pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(SEED), output_type="np",
                  **size, **{k: v for k, v in record["call"].items() if k != "output_type"}).frames[0]
    ours = validator_frames(trainer, **size)
    theirs = to_uint8_frames(frames, value_range=(0.0, 1.0))
    assert theirs.shape == ours.shape == (5, 16, 16, 3)
    assert np.abs(theirs.astype(int) - ours.astype(int)).max() <= 1
    # The exported transformer is the trained student, not the teacher.
    student = trainer.roles["student"].modules["transformer"].state_dict()
    assert all(torch.equal(student[k], v) for k, v in pipe.transformer.state_dict().items())


def test_pixel_space_export_samples_latents(tmp_path):
    from diffusers import WanPipeline

    cfg = tiny_config(tmp_path / "run", training={"max_steps": 1})
    trainer = Trainer(cfg)
    trainer.train()
    out = tmp_path / "exported"
    assert cli_main(["export", str(tmp_path / "run" / "checkpoints" / "step-000001"), str(out)]) == 0
    record = json.loads((out / "distill_export.json").read_text())
    assert record["load"] == {"vae": None}
    pipe = WanPipeline.from_pretrained(out, **record["load"])
    assert pipe.vae is None
    size = {"num_frames": 1, "height": 16, "width": 16}
    latents = torch.randn((1, 3, 1, 16, 16), generator=torch.Generator().manual_seed(SEED))
    torch.manual_seed(SEED)
    pixels = pipe(prompt=PROMPT, latents=latents, num_inference_steps=4, guidance_scale=1.0, max_sequence_length=16,
                  output_type="latent", **size).frames[0]
    ours = validator_frames(trainer, **size)
    assert np.abs(to_uint8_frames(pixels).astype(int) - ours.astype(int)).max() <= 1


def test_export_of_an_incomplete_checkpoint_is_refused(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        from distill.export import export

        export(str(tmp_path / "ckpt"), tmp_path / "out")
