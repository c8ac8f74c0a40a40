"""Wan 2.2: the two-expert A14B model (routing at boundary_ratio, both experts trained, checkpointed and exported
for stock WanPipeline, loaded from model.path) and TI2V-5B's 48-channel VAE, on tiny versions built in code."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distill.cli import main as cli_main
from distill.models.wan import PRESETS, WanPlugin
from distill.training.trainer import Trainer
from test_export import PROMPT, SEED, validator_frames
from tiny import tiny_config

SIZE = {"num_frames": 5, "height": 16, "width": 16}


def two_experts(tmp_path, data=None, overrides=(), **sections):
    return tiny_config(tmp_path / "run", model={"preset": "tiny-a14b", "pixel_space": False}, data=data or SIZE,
                       overrides=overrides, **sections)


def test_each_call_goes_to_the_expert_its_timestep_selects(tmp_path):
    plugin = WanPlugin(two_experts(tmp_path), device=torch.device("cpu"))
    assert plugin.expert_keys == ("transformer", "transformer_2") and plugin.boundary_ratio == 0.875
    roles = plugin.build_roles()
    student = roles["student"]
    assert set(student.modules) == {"transformer", "transformer_2"}
    calls = []
    for key, module in student.modules.items():
        module.register_forward_hook(lambda m, a, kw, out, key=key: calls.append((key, kw["timestep"].tolist())),
                                     with_kwargs=True)
    batch = plugin.prepare_batch({"prompt": [PROMPT, PROMPT]}, latents_source="zeros")
    x = torch.randn(2, *plugin.latent_shape, generator=torch.Generator().manual_seed(0))
    boundary = 875.0  # boundary_ratio · T: WanPipeline runs `transformer` at t >= it, `transformer_2` below
    for t, expert in ((boundary, "transformer"), (boundary - 0.125, "transformer_2"), (1000.0, "transformer"),
                      (20.0, "transformer_2")):
        calls.clear()
        plugin.predict_velocity(student, x, torch.full((2,), t), batch, conditional=True)
        assert calls == [(expert, [t, t])]
    # A batch that straddles the boundary: each sample through its own expert, as two single calls give.
    calls.clear()
    t = torch.tensor([900.0, 300.0])
    both = plugin.predict_velocity(student, x, t, batch, conditional=True)
    assert calls == [("transformer", [900.0]), ("transformer_2", [300.0])]
    single = plugin.prepare_batch({"prompt": [PROMPT]}, latents_source="zeros")
    for i in range(2):
        one = plugin.predict_velocity(student, x[i:i + 1], t[i:i + 1], single, conditional=True)
        assert torch.allclose(both[i:i + 1], one, atol=1e-6)
    # Both experts take gradients from one loss over such a batch; the frozen teacher's do not exist.
    both.pow(2).mean().backward()
    for key, module in student.modules.items():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters() if p.ndim > 1), key
    assert all(not p.requires_grad for p in roles["teacher"].parameters())
    # The experts start from different weights (a preset seeds each apart), and every role starts from the teacher's.
    high, low = (student.modules[k].state_dict() for k in ("transformer", "transformer_2"))
    assert not torch.equal(high["proj_out.weight"], low["proj_out.weight"])


def test_both_experts_train_checkpoint_and_export_to_stock_wanpipeline(tmp_path):
    from diffusers import WanPipeline

    cfg = two_experts(tmp_path, training={"max_steps": 6, "checkpoint_every": 6},
                      method_config={"generator_update_interval": 1, "min_timestep_ratio": 0.8,
                                     "max_timestep_ratio": 0.95, "warp_denoising_step": True})
    trainer = Trainer(cfg)
    start = {k: m.state_dict()["proj_out.weight"].clone() for k, m in trainer.roles["critic"].modules.items()}
    trainer.train()
    for role in ("student", "critic"):  # every expert of every trainable role learned
        for key, module in trainer.roles[role].modules.items():
            teacher = trainer.roles["teacher"].modules[key].state_dict()["proj_out.weight"]
            assert not torch.equal(module.state_dict()["proj_out.weight"], teacher), (role, key)
    assert any(not torch.equal(start[k], m.state_dict()["proj_out.weight"])
               for k, m in trainer.roles["critic"].modules.items())
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000006"
    assert sorted(p.name for p in (checkpoint / "export").iterdir()) == ["transformer", "transformer_2"]

    out = tmp_path / "exported"
    assert cli_main(["export", str(checkpoint), str(out)]) == 0
    record = json.loads((out / "distill_export.json").read_text())
    pipe = WanPipeline.from_pretrained(out)  # stock diffusers: both experts and the boundary
    assert pipe.config.boundary_ratio == 0.875 and pipe.transformer_2 is not None
    student = trainer.roles["student"].modules
    for key in ("transformer", "transformer_2"):
        ours = student[key].state_dict()
        assert all(torch.equal(ours[k], v) for k, v in getattr(pipe, key).state_dict().items())
    torch.manual_seed(SEED)
    call = {k: v for k, v in record["call"].items() if k != "output_type"}
    frames = pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(SEED), output_type="np", **SIZE,
                  **call).frames[0]
    from distill.video import to_uint8_frames

    theirs = to_uint8_frames(frames, value_range=(0.0, 1.0))
    assert np.abs(theirs.astype(int) - validator_frames(trainer, **SIZE).astype(int)).max() <= 1

    # That folder, as model.path: two experts and the boundary read from its model_index.json.
    plugin = WanPlugin(tiny_config(tmp_path / "again", model={"preset": None, "path": str(out), "pixel_space": False},
                                   data=SIZE), device=torch.device("cpu"))
    assert plugin.expert_keys == ("transformer", "transformer_2") and plugin.boundary_ratio == 0.875
    loaded = plugin.new_denoiser("transformer_2").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in student["transformer_2"].state_dict().items())


def test_lora_roles_hold_an_adapter_per_expert_over_the_teachers_experts(tmp_path):
    lora = {"init_from": "teacher", "trainable": True, "share_base": True, "lora": {"rank": 2}}
    cfg = two_experts(tmp_path, roles={"teacher": {"trainable": False}, "student": lora, "critic": lora},
                      training={"max_steps": 2}, method_config={"generator_update_interval": 1})
    trainer = Trainer(cfg)
    trainer.train()
    for key in ("transformer", "transformer_2"):
        teacher = {id(p) for p in trainer.roles["teacher"].modules[key].parameters()}
        student = trainer.roles["student"].modules[key]
        assert {id(p) for n, p in student.named_parameters() if "lora_" not in n} == teacher
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000002"
    assert set(json.loads((checkpoint / "MANIFEST.json").read_text())["lora_bases"]["student"]) == {
        "transformer", "transformer_2"}
    ours = validator_frames(trainer, **SIZE)

    def sample(pipe, record):
        from distill.video import to_uint8_frames

        torch.manual_seed(SEED)
        call = {k: v for k, v in record["call"].items() if k != "output_type"}
        frames = pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(SEED), output_type="np", **SIZE,
                      **call).frames[0]
        return np.abs(to_uint8_frames(frames, value_range=(0.0, 1.0)).astype(int) - ours.astype(int)).max()

    # One LoRA file per expert, loaded by stock WanPipeline over the base model's two-expert pipeline.
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    assert cli_main(["export", str(checkpoint), str(tmp_path / "lora")]) == 0
    record = json.loads((tmp_path / "lora" / "distill_export.json").read_text())
    assert record["lora"]["load_lora_weights"] == [
        {"weight_name": "pytorch_lora_weights.safetensors"},
        {"weight_name": "pytorch_lora_weights_transformer_2.safetensors", "load_into_transformer_2": True}]
    plugin, teacher = trainer.plugin, trainer.roles["teacher"].modules
    WanPipeline(tokenizer=plugin.tokenizer, text_encoder=plugin.text_encoder, vae=plugin.vae,
                scheduler=plugin.noise_scheduler, transformer=plugin.new_denoiser("transformer"),
                transformer_2=plugin.new_denoiser("transformer_2"),
                boundary_ratio=plugin.boundary_ratio).save_pretrained(tmp_path / "base")
    pipe = WanPipeline.from_pretrained(tmp_path / "base")
    for kwargs in record["lora"]["load_lora_weights"]:
        pipe.load_lora_weights(tmp_path / "lora", **kwargs)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path / "lora", subfolder="scheduler")
    assert sample(pipe, record) <= 1
    # Merged: a whole stock folder.
    assert cli_main(["export", str(checkpoint), str(tmp_path / "fused"), "--fuse"]) == 0
    record = json.loads((tmp_path / "fused" / "distill_export.json").read_text())
    assert sample(WanPipeline.from_pretrained(tmp_path / "fused"), record) <= 1


def test_the_gan_head_on_two_experts_is_refused_naming_the_key(tmp_path):
    from distill.config import ConfigError
    from tiny import LatentDataset

    cfg = two_experts(tmp_path, method_config={"gan_critic_weight": 0.01}, data={**SIZE, "shards": "unused"})
    with pytest.raises(ConfigError, match="method_config.gan_critic_weight: .* two-expert"):
        Trainer(cfg, dataset=LatentDataset("vae_latent", (4, 2, 2, 2)))


def test_ti2v_5b_trains_on_the_48_channel_vae_layout(tmp_path):
    """The Wan 2.2 VAE's structure at test size: 2 x 2 patchified pixels, 16 x spatial compression."""
    vae = PRESETS["wan2.2-ti2v-5b"]["vae"]
    assert (vae["z_dim"], vae["patch_size"], vae["scale_factor_spatial"], vae["is_residual"]) == (48, 2, 16, True)
    cfg = tiny_config(tmp_path / "run", model={"preset": "tiny-ti2v", "pixel_space": False},
                      data={"num_frames": 5, "height": 32, "width": 32}, training={"max_steps": 2})
    trainer = Trainer(cfg)
    assert trainer.plugin.latent_shape == (8, 2, 2, 2)  # 32 px / 16, 5 frames -> 2 latent frames
    history = trainer.train()
    assert np.isfinite(history[-1]["critic_loss"])
    from distill.config import ConfigError

    with pytest.raises(ConfigError, match="data.height: 48 must be a multiple of 32"):
        WanPlugin(tiny_config(tmp_path / "bad", model={"preset": "tiny-ti2v", "pixel_space": False},
                              data={"num_frames": 5, "height": 48, "width": 32}), device=torch.device("cpu"))


def test_a_role_may_train_one_expert_and_keep_the_other_frozen(tmp_path):
    from distill.config import ConfigError

    cfg = two_experts(tmp_path, overrides=["roles.student.experts=[transformer_2]"],
                      training={"max_steps": 3, "checkpoint_every": 3},
                      method_config={"generator_update_interval": 1})
    trainer = Trainer(cfg)
    student, teacher = trainer.roles["student"], trainer.roles["teacher"]
    stepped = {id(p) for group in student.engine.optimizer.bit16_groups for p in group}
    assert stepped == {id(p) for p in student.modules["transformer_2"].parameters()}
    trainer.train()
    high = student.modules["transformer"].state_dict()
    assert all(torch.equal(v, teacher.modules["transformer"].state_dict()[k]) for k, v in high.items())
    low, low_teacher = student.modules["transformer_2"].state_dict(), teacher.modules["transformer_2"].state_dict()
    assert not torch.equal(low["proj_out.weight"], low_teacher["proj_out.weight"])
    # The resumed run restores the trained expert from the engine state, the frozen one from the teacher.
    resumed = Trainer(two_experts(tmp_path, overrides=["roles.student.experts=[transformer_2]"],
                                  training={"max_steps": 3, "checkpoint_every": 3},
                                  method_config={"generator_update_interval": 1}), resume="latest")
    assert torch.equal(resumed.roles["student"].modules["transformer_2"].state_dict()["proj_out.weight"],
                       low["proj_out.weight"])

    with pytest.raises(ConfigError, match=r"roles\.student\.experts: transformer_3 is not a denoiser of this model"):
        Trainer(two_experts(tmp_path / "bad", overrides=["roles.student.experts=[transformer_3]"]))
    with pytest.raises(ConfigError, match=r"roles\.teacher\.experts: names what a trainable role trains"):
        two_experts(tmp_path, overrides=["roles.teacher.experts=[transformer]"])
