"""LoRA roles: student and critic as peft adapters over the teacher's frozen base, held once; adapter-only
checkpoints with the base's fingerprint; export as a diffusers LoRA file (or fused); exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from distill.cli import main as cli_main
from distill.config import ConfigError
from distill.run_layout import CheckpointError
from distill.training.trainer import Trainer
from test_export import PROMPT, SEED, validator_frames
from tiny import tiny_config, tiny_raw

LORA = ["roles.student.lora={rank: 4, alpha: 8}", "roles.student.share_base=true",
        "roles.critic.lora={rank: 4}", "roles.critic.share_base=true"]


def lora_config(tmp_path, *overrides, **sections):
    return tiny_config(tmp_path / "run", overrides=[*LORA, *overrides], **sections)


@pytest.mark.parametrize("overrides, message", [
    (["roles.student.share_base=true"], r"roles\.student\.share_base: only a LoRA role"),
    (["roles.critic.lora={rank: 4}", "roles.critic.share_base=true", "roles.critic.init_from=student",
      "roles.student.lora={rank: 2}"], r"roles\.critic\.share_base: .* init_from is 'student'"),
    (["roles.teacher.lora={rank: 4}"], r"roles\.teacher\.lora: a frozen role's adapter would never train"),
    (["roles.student.lora={rank: 0}"], r"roles\.student\.lora\.rank: must be > 0"),
    (["roles.student.lora={dropout: 1.0}"], r"roles\.student\.lora\.dropout: must be in \[0, 1\)"),
    (["roles.student.lora={target_modules: [to_q, to_q]}"], r"roles\.student\.lora\.target_modules: .* twice"),
    (["roles.student.lora={rank: 4}", "deepspeed.zero_optimization.stage=3"],
     r"roles\.student\.lora: LoRA roles train under deepspeed\.zero_optimization\.stage 0-2"),
])
def test_lora_config_errors_name_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path / "run", overrides=overrides)


def test_unknown_target_modules_are_refused_naming_the_key_and_the_linears(tmp_path):
    cfg = tiny_config(tmp_path / "run", overrides=["roles.student.lora={target_modules: [to_qq]}"])
    with pytest.raises(ConfigError, match=r"roles\.student\.lora\.target_modules: \['to_qq'\] match no linear.*to_q"):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()  # a failed start leaves nothing behind


def test_adapters_train_over_the_teachers_base_held_once(tmp_path):
    cfg = lora_config(tmp_path, "training.max_steps=4", "method_config.generator_update_interval=1")
    trainer = Trainer(cfg)
    teacher, student, critic = (trainer.roles[n].modules["transformer"] for n in ("teacher", "student", "critic"))
    # One base in memory: the student's and the critic's base layers are the teacher's parameters.
    base = {id(p) for p in teacher.parameters()}
    for role in (student, critic):
        assert {id(p) for n, p in role.named_parameters() if "lora_" not in n} == base
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x, t, text = torch.randn(1, 3, 1, 16, 16), torch.tensor([600.0]), torch.randn(1, 16, 32)
    with torch.no_grad():
        teacher_out = teacher(x, t, text, return_dict=False)[0]

    trainer.train()
    # The teacher (the base) is unchanged, and so is its output; exactly the adapters have optimizer state.
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    with torch.no_grad():
        assert torch.equal(teacher(x, t, text, return_dict=False)[0], teacher_out)
    for handle in trainer.roles.trainable():
        names = [n for n, _ in handle.named_trainable_parameters()]
        assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
        stepped = [p for group in handle.engine.optimizer.bit16_groups for p in group]
        assert {id(p) for p in stepped} == {id(p) for p in handle.trainable_parameters()}
        assert all(p.grad is None for n, p in handle.named_parameters() if "lora_" not in n)
        lora_b = [p for n, p in handle.named_trainable_parameters() if ".lora_B." in n]
        assert all(p.abs().max() > 0 for p in lora_b)  # B starts at zero: every adapter learned
    # The adapter makes the student differ from the teacher now.
    with torch.no_grad():
        assert not torch.allclose(student(x, t, text, return_dict=False)[0], teacher_out)


def test_checkpoints_hold_adapters_only_and_resume_exactly(tmp_path):
    overrides = ["training.max_steps=6", "training.checkpoint_every=3", "training.log_every=1",
                 "method_config.generator_update_interval=2", "method_config.ema_decay=0.9"]
    first = Trainer(lora_config(tmp_path, *overrides)).train()
    ckpt = tmp_path / "run" / "checkpoints" / "step-000003"
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())
    assert set(manifest["lora_bases"]) == {"student", "critic"}
    states = torch.load(ckpt / "roles" / "student" / "state" / "mp_rank_00_model_states.pt", weights_only=False)
    assert states["module"] and all("lora_" in k for k in states["module"])  # no base weights
    base = json.loads((ckpt / "export" / "transformer" / "base.json").read_text())
    assert base == manifest["lora_bases"]["student"]["transformer"] and base["weights"] == "preset:tiny:init_seed=0"
    assert sorted(p.name for p in (ckpt / "export" / "transformer").iterdir()) == [
        "base.json", "pytorch_lora_weights.safetensors"]

    resumed = Trainer(lora_config(tmp_path, *overrides), resume="step-000003", force=True).train()
    assert resumed == [{**row, "seconds_per_iteration": r["seconds_per_iteration"]}
                       for row, r in zip(first[3:], resumed)]


def test_adapters_on_another_base_are_refused_naming_both(tmp_path):
    Trainer(lora_config(tmp_path, "training.max_steps=2")).train()
    ckpt = tmp_path / "run" / "checkpoints" / "step-000002"
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())
    digest = manifest["lora_bases"]["student"]["transformer"]["digest"]
    # Resuming over other base weights (a model.path folder whose files changed): refused before training.
    manifest["lora_bases"]["student"]["transformer"]["digest"] = "0" * 16
    (ckpt / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=f"digest 0000000000000000.*digest {digest}"):
        Trainer(lora_config(tmp_path, "training.max_steps=2"), resume="latest")
    # Sampling or starting from the exported adapter over another base: refused too.
    from distill.models.wan import WanPlugin

    other = WanPlugin(lora_config(tmp_path, "model.init_seed=1"), device=torch.device("cpu"))
    with pytest.raises(CheckpointError, match=r"trained on base weights preset:tiny:init_seed=0 .*"
                                              r"the base here is preset:tiny:init_seed=1"):
        other.load_module("transformer", str(ckpt / "export" / "transformer"))


def test_adapters_over_a_teacher_folder_are_fused_onto_that_folder(tmp_path):
    """A teacher from a diffusers folder (not the preset's weights): what samples or exports the student (bench,
    export --fuse) fuses its adapter onto that folder's weights."""
    from distill.models.wan import WanPlugin

    teacher = WanPlugin(lora_config(tmp_path), device=torch.device("cpu")).new_denoiser()
    with torch.no_grad():
        for param in teacher.parameters():
            param.add_(0.01)  # weights other than the preset's
    teacher.save_pretrained(tmp_path / "teacher")
    cfg = lora_config(tmp_path, "training.max_steps=2", f"roles.teacher.init_from={tmp_path / 'teacher'}")
    Trainer(cfg).train()
    export = tmp_path / "run" / "checkpoints" / "step-000002" / "export" / "transformer"
    student = WanPlugin(cfg, device=torch.device("cpu")).load_module("transformer", str(export))
    untouched = "condition_embedder.time_embedder.linear_1.weight"  # no adapter on it
    assert torch.equal(student.state_dict()[untouched], teacher.state_dict()[untouched])
    assert not torch.equal(student.blocks[0].attn1.to_q.weight, teacher.blocks[0].attn1.to_q.weight)
    assert cli_main(["export", str(export.parent.parent), str(tmp_path / "fused"), "--fuse"]) == 0


def test_lora_export_loads_in_stock_diffusers_as_a_lora_file_and_fused(tmp_path, capsys):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    size = {"num_frames": 5, "height": 16, "width": 16}
    cfg = lora_config(tmp_path, "training.max_steps=2", "method_config.generator_update_interval=1",
                      "roles.student.lora.alpha=4", model={"pixel_space": False}, data=size)
    trainer = Trainer(cfg)
    trainer.train()
    ours = validator_frames(trainer, **size)
    checkpoint = str(tmp_path / "run" / "checkpoints" / "step-000002")
    plugin = trainer.plugin

    def sample(pipe, record) -> np.ndarray:
        from distill.video import to_uint8_frames

        torch.manual_seed(SEED)  # the re-noising draws from the global generator, as in the validator
        call = {k: v for k, v in record["call"].items() if k != "output_type"}
        frames = pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(SEED), output_type="np",
                      **size, **call).frames[0]
        return to_uint8_frames(frames, value_range=(0.0, 1.0))

    # (a) The adapter as a diffusers LoRA file, loaded by stock WanPipeline over the base model's pipeline.
    lora_out = tmp_path / "lora"
    assert cli_main(["export", checkpoint, str(lora_out)]) == 0
    assert "load_lora_weights" in capsys.readouterr().out
    record = json.loads((lora_out / "distill_export.json").read_text())
    assert record["lora"]["base"]["weights"] == "preset:tiny:init_seed=0" and not record["fused_lora"]
    base_dir = tmp_path / "base"  # the base model as its owner has it: a stock pipeline folder
    WanPipeline(tokenizer=plugin.tokenizer, text_encoder=plugin.text_encoder, vae=plugin.vae,
                scheduler=plugin.noise_scheduler, transformer=plugin.new_denoiser()).save_pretrained(base_dir)
    pipe = WanPipeline.from_pretrained(base_dir)
    pipe.load_lora_weights(lora_out)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(lora_out, subfolder="scheduler")
    assert np.abs(sample(pipe, record).astype(int) - ours.astype(int)).max() <= 1

    # (b) --fuse: a whole stock pipeline folder with the adapter merged into the base weights.
    fused_out = tmp_path / "fused"
    assert cli_main(["export", checkpoint, str(fused_out), "--fuse"]) == 0
    record = json.loads((fused_out / "distill_export.json").read_text())
    assert record["fused_lora"]
    pipe = WanPipeline.from_pretrained(fused_out)
    assert not any("lora" in k for k in pipe.transformer.state_dict())
    assert np.abs(sample(pipe, record).astype(int) - ours.astype(int)).max() <= 1


def test_fuse_of_a_full_weight_checkpoint_is_refused(tmp_path):
    Trainer(tiny_config(tmp_path / "run", training={"max_steps": 1})).train()
    assert cli_main(["export", str(tmp_path / "run" / "checkpoints" / "step-000001"), str(tmp_path / "out"),
                     "--fuse"]) != 0
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_lora_run_killed_then_resumed_gives_identical_losses(tmp_path):
    def config(output: str):
        raw = tiny_raw(output, training={"max_steps": 12, "checkpoint_every": 4, "log_every": 1},
                       method_config={"generator_update_interval": 2, "ema_decay": 0.9})
        for role in ("student", "critic"):
            raw["roles"][role].update(lora={"rank": 4}, share_base=True)
        path = tmp_path / f"{os.path.basename(output)}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return str(path)

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    train = [sys.executable, "-m", "distill.cli", "train"]
    subprocess.run([*train, config(str(tmp_path / "reference"))], env=env, check=True, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen([*train, config(str(out))], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest, deadline = out / "checkpoints" / "latest", time.time() + 240
    while not latest.exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest.read_text() in ("step-000004", "step-000008")
    subprocess.run([*train, config(str(out)), "--resume"], env=env, check=True, capture_output=True)

    def rows(run):
        keys = ("critic_loss", "generator_loss", "critic_grad_norm", "student_grad_norm", "rollout_k")
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [tuple(json.loads(line).get(k) for k in ("step", *keys)) for line in lines]

    assert rows("killed") == rows("reference") and len(rows("reference")) == 12
