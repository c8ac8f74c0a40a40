"""The Wan plugin on diffusers: building roles, loading folders, and sampling through WanPipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distill.config import ConfigError
from distill.models.wan import WanPlugin
from distill.validation import SamplingSpec, ValidationRequest
from tiny import tiny_config


def plugin_and_roles(cfg):
    plugin = WanPlugin(cfg, device=torch.device("cpu"))
    return plugin, plugin.build_roles()


def test_roles_start_from_the_teacher_and_only_the_teacher_is_frozen(run_dir):
    plugin, roles = plugin_and_roles(tiny_config(run_dir))
    t, s, c = (roles[n].modules["transformer"] for n in ("teacher", "student", "critic"))
    for key, value in t.state_dict().items():
        assert torch.equal(value, s.state_dict()[key]) and torch.equal(value, c.state_dict()[key])
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    assert s.training and all(p.requires_grad for p in s.parameters())
    assert s is not t and c is not t and c is not s


def record_calls(module):
    calls = []

    def hook(mod, args, kwargs, output):
        calls.append({"t": kwargs["timestep"].clone(), "x": kwargs["hidden_states"].clone(), "v": output[0].clone()})

    handle = module.register_forward_hook(hook, with_kwargs=True)
    return calls, handle


SAMPLING_KEYS = {"sampler_kind": "sampler_kind", "sampling_timesteps": "timesteps",
                 "num_inference_steps": "num_inference_steps", "guidance_scale": "guidance_scale"}


def request(handle, out_dir, **kw):
    sampling = SamplingSpec(**{SAMPLING_KEYS[k]: kw.pop(k) for k in list(kw) if k in SAMPLING_KEYS})
    base = dict(sample_handle=handle, prompts=["a red circle moving left"], seeds=[3], num_frames=1, height=16,
                width=16, output_dir=None if out_dir is None else str(out_dir), sampling=sampling)
    return ValidationRequest(**{**base, **kw})


@pytest.mark.parametrize("kind", ["sde", "ode"])
def test_validator_samples_exactly_the_requested_timesteps(run_dir, tmp_path, kind):
    plugin, roles = plugin_and_roles(tiny_config(run_dir))
    student = roles["student"]
    calls, hook = record_calls(student.modules["transformer"])
    steps = [1000.0, 757.0, 500.0, 123.0]
    result = plugin.validator().run(request(student, tmp_path / kind, sampler_kind=kind, sampling_timesteps=steps))
    hook.remove()

    assert [float(c["t"][0]) for c in calls] == steps  # one pass per step: guidance 1 = conditional only
    assert result.function_evaluations_per_video == 4 and result.timesteps == steps
    # Step by step, the sampler does what its name says, with sigma = t / 1000.
    for j in range(len(steps) - 1):
        s, s_next = steps[j] / 1000, steps[j + 1] / 1000
        x, v, x_next = calls[j]["x"], calls[j]["v"], calls[j + 1]["x"]
        if kind == "ode":
            torch.testing.assert_close(x_next, x + (s_next - s) * v, rtol=1e-4, atol=1e-5)
        else:
            x0 = x - s * v
            noise = (x_next - (1 - s_next) * x0) / s_next  # what was added back must look like fresh noise
            assert abs(noise.std().item() - 1.0) < 0.2 and abs(noise.mean().item()) < 0.2
    assert student.modules["transformer"].training  # validation restores train mode
    meta = json.loads((tmp_path / kind / "meta.json").read_text())
    assert meta["timesteps"] == steps and meta["sampler_kind"] == kind
    assert (tmp_path / kind / "contact.png").exists() and len(result.videos) == 1


def test_gif_videos_need_no_ffmpeg(run_dir, tmp_path):
    from PIL import Image

    plugin, roles = plugin_and_roles(tiny_config(run_dir, data={"num_frames": 3}))
    result = plugin.validator().run(request(roles["student"], tmp_path, sampler_kind="sde", num_frames=3,
                                            sampling_timesteps=[1000.0], video_format="gif"))
    assert result.videos[0].endswith(".gif")
    assert Image.open(result.videos[0]).n_frames == 3


def test_sde_sampling_is_reproducible_per_seed(run_dir):
    plugin, roles = plugin_and_roles(tiny_config(run_dir))
    validator = plugin.validator()
    student = roles["student"]
    steps = [1000.0, 500.0]

    def final(seed):
        calls, hook = record_calls(student.modules["transformer"])
        validator.run(request(student, None, sampler_kind="sde", sampling_timesteps=steps, seeds=[seed]))
        hook.remove()
        return calls[-1]["x"]

    torch.testing.assert_close(final(1), final(1), rtol=0, atol=0)
    assert not torch.equal(final(1), final(2))


@pytest.mark.parametrize("batched", [True, False])
def test_default_schedule_uses_flow_shift_and_cfg_doubles_passes(run_dir, batched):
    plugin, roles = plugin_and_roles(tiny_config(run_dir, model={"batched_cfg": batched}))
    teacher = roles["teacher"]
    calls, hook = record_calls(teacher.modules["transformer"])
    result = plugin.validator().run(
        request(teacher, None, sampler_kind="ode", num_inference_steps=3, guidance_scale=4.0)
    )
    hook.remove()
    # Batched CFG: a forward of batch 2 per step (prompt, negative prompt); otherwise two of batch 1.
    assert [len(c["x"]) for c in calls] == ([2] * 3 if batched else [1] * 6)
    assert result.function_evaluations_per_video == 6
    from diffusers import FlowMatchEulerDiscreteScheduler

    expected = FlowMatchEulerDiscreteScheduler(shift=3.0)  # diffusers' own 3-step schedule at the model's shift
    expected.set_timesteps(3)
    np.testing.assert_allclose(result.timesteps, expected.timesteps.numpy(), rtol=1e-6)
    unshifted = FlowMatchEulerDiscreteScheduler(shift=1.0)
    unshifted.set_timesteps(3)
    assert result.timesteps[1] > unshifted.timesteps[1] + 100


def test_batched_cfg_predicts_the_same_x0_as_two_forwards(run_dir):
    plugin, roles = plugin_and_roles(tiny_config(run_dir, data={"negative_prompt": "blurry"}))
    teacher = roles["teacher"]
    batch = plugin.prepare_batch({"prompt": ["a red circle moving left", "a blue square moving right"]},
                                 latents_source="zeros")
    g = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(batch.latents.shape, generator=g), torch.tensor([900.0, 300.0])
    calls, hook = record_calls(teacher.modules["transformer"])
    cond, uncond = plugin.predict_x0_cond_uncond(teacher, x_t, t, batch)
    assert [len(c["x"]) for c in calls] == [4]  # one forward: 2 prompts, then 2 negative prompts
    plugin.cfg.model.batched_cfg = False
    two = plugin.predict_x0_cond_uncond(teacher, x_t, t, batch)
    hook.remove()
    assert [len(c["x"]) for c in calls] == [4, 2, 2]
    for batched, separate, conditional in ((cond, two[0], True), (uncond, two[1], False)):
        reference = plugin.predict_x0(teacher, x_t, t, batch, conditional=conditional)
        torch.testing.assert_close(separate, reference, rtol=0, atol=0)
        assert (batched - reference).abs().max() < 1e-5
    assert (cond - uncond).abs().max() > 1e-3  # the halves did see different prompts


@pytest.mark.parametrize("kind", ["sde", "ode"])
def test_batched_cfg_samples_as_two_forwards_do(run_dir, tmp_path, kind):
    def sample(batched):
        plugin, roles = plugin_and_roles(tiny_config(run_dir, model={"batched_cfg": batched}))
        teacher = roles["teacher"]
        calls, hook = record_calls(teacher.modules["transformer"])
        result = plugin.validator().run(request(teacher, tmp_path / str(batched), sampler_kind=kind, guidance_scale=4.0,
                                                num_inference_steps=4, negative_prompt="blurry"))
        hook.remove()
        meta = json.loads((tmp_path / str(batched) / "meta.json").read_text())
        assert meta["batched_cfg"] == batched and meta["function_evaluations_per_video"] == 8
        return calls, result.frames[0]

    (batched_calls, batched_video), (calls, video) = sample(True), sample(False)
    assert len(batched_calls) == 4 and len(calls) == 8
    for step, both in enumerate(batched_calls):  # each step's input, and the velocity of each half
        cond, uncond = calls[2 * step], calls[2 * step + 1]
        assert (both["x"][:1] - cond["x"]).abs().max() < 1e-5
        assert (both["v"][:1] - cond["v"]).abs().max() < 1e-5 and (both["v"][1:] - uncond["v"]).abs().max() < 1e-5
    assert np.abs(batched_video.astype(int) - video.astype(int)).max() <= 1  # uint8 frames: rounding at most


def test_vae_space_validation_decodes_videos(run_dir, tmp_path):
    import imageio.v3 as iio

    cfg = tiny_config(run_dir, model={"pixel_space": False}, data={"num_frames": 5, "height": 16, "width": 16})
    plugin, roles = plugin_and_roles(cfg)
    assert plugin.latent_shape == (4, 2, 2, 2)
    result = plugin.validator().run(
        request(roles["student"], tmp_path, sampler_kind="sde", sampling_timesteps=[1000.0, 500.0], num_frames=5)
    )
    frames = iio.imread(result.videos[0])
    assert frames.shape == (5, 16, 16, 3)


def test_model_and_roles_load_from_diffusers_folders(tmp_path):
    from diffusers import WanPipeline

    # Save a tiny model as a diffusers folder, then train from it by path.
    source = WanPlugin(tiny_config(tmp_path / "a", model={"pixel_space": False},
                                   data={"num_frames": 5, "height": 16, "width": 16}), device=torch.device("cpu"))
    pipe = WanPipeline(tokenizer=source.tokenizer, text_encoder=source.text_encoder, vae=source.vae,
                       scheduler=source.noise_scheduler, transformer=source.new_denoiser())
    folder = tmp_path / "tiny-wan-diffusers"
    pipe.save_pretrained(folder)
    pipe.transformer.save_pretrained(tmp_path / "just-a-transformer")

    cfg = tiny_config(tmp_path / "b", model={"preset": None, "path": str(folder), "pixel_space": False},
                      data={"num_frames": 5, "height": 16, "width": 16},
                      roles={"teacher": {"trainable": False},
                             "student": {"init_from": str(tmp_path / "just-a-transformer"), "trainable": True},
                             "critic": {"init_from": "teacher", "trainable": True}})
    plugin, roles = plugin_and_roles(cfg)
    for key, value in pipe.transformer.state_dict().items():
        assert torch.equal(roles["teacher"].modules["transformer"].state_dict()[key], value)
        assert torch.equal(roles["student"].modules["transformer"].state_dict()[key], value)
    torch.testing.assert_close(plugin.encode_prompts(["a red circle"]), source.encode_prompts(["a red circle"]))


def test_bad_folder_and_bad_sizes_name_the_key(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = tiny_config(tmp_path, roles={"teacher": {"trainable": False},
                                       "student": {"init_from": str(empty), "trainable": True},
                                       "critic": {"init_from": "teacher", "trainable": True}})
    with pytest.raises(ConfigError, match="roles.student.init_from"):
        WanPlugin(cfg, device=torch.device("cpu")).build_roles()
    with pytest.raises(ConfigError, match="data.height"):
        WanPlugin(tiny_config(tmp_path, data={"height": 17}), device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="data.num_frames"):
        WanPlugin(tiny_config(tmp_path, model={"pixel_space": False}, data={"num_frames": 4}), device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="model.preset"):
        WanPlugin(tiny_config(tmp_path, model={"preset": "huge"}), device=torch.device("cpu"))


def test_frozen_and_trainable_roles_share_numerics_so_the_critic_starts_as_the_teacher(run_dir):
    """A frozen role is cast whole to bf16, as a DeepSpeed bf16 engine casts a trainable one: at
    initialisation the critic's score is bit for bit the teacher's."""
    import copy

    from distill.models.base import cast_frozen
    from distill.roles import RoleHandle

    cfg = tiny_config(run_dir)
    plugin = WanPlugin(cfg, device=torch.device("cpu"), frozen_dtype=torch.bfloat16)
    roles = plugin.build_roles()
    assert {p.dtype for p in roles["teacher"].parameters()} == {torch.bfloat16}
    engine_like = copy.deepcopy(roles["critic"].modules["transformer"]).bfloat16()  # DeepSpeed's bf16 cast
    critic = RoleHandle("critic", {"transformer": engine_like}, trainable=False)
    batch = plugin.prepare_batch({"prompt": ["a red circle moving left"]}, latents_source="zeros")
    x_t, t = torch.randn(1, *plugin.latent_shape), torch.tensor([700.0])
    for conditional in (True, False):
        teacher_v = plugin.predict_velocity(roles["teacher"], x_t, t, batch, conditional=conditional)
        assert torch.equal(teacher_v, plugin.predict_velocity(critic, x_t, t, batch, conditional=conditional))

    # Components (VAE, text encoder) keep what their class marks fp32, parameters matched by name part too.
    component = cast_frozen(copy.deepcopy(roles["student"].modules["transformer"]), torch.bfloat16)
    dtypes = dict(component.named_parameters())
    assert dtypes["scale_shift_table"].dtype == torch.float32
    assert dtypes["blocks.0.scale_shift_table"].dtype == torch.float32
    assert dtypes["blocks.0.ffn.net.0.proj.weight"].dtype == torch.bfloat16


def test_block_features_stop_after_the_last_chosen_block_and_match_a_full_forward(run_dir):
    plugin, roles = plugin_and_roles(tiny_config(run_dir))
    critic = roles["critic"]
    blocks = critic.modules["transformer"].blocks
    assert len(blocks) == 2
    batch = plugin.prepare_batch({"prompt": ["a red circle moving left"]}, latents_source="zeros")
    x_t = torch.randn(1, *plugin.latent_shape, requires_grad=True)
    t = torch.tensor([600.0])
    second_block = []
    hook = blocks[1].register_forward_hook(lambda module, args, output: second_block.append(output))
    try:
        (early,) = plugin.block_features(critic, x_t, t, batch, blocks=[0])
        assert second_block == []  # the forward stopped before block 1
        full = []
        first = blocks[0].register_forward_hook(lambda module, args, output: full.append(output))
        plugin.predict_velocity(critic, x_t, t, batch, conditional=True)
        first.remove()
    finally:
        hook.remove()
    assert len(second_block) == 1 and torch.equal(early, full[0])
    early.pow(2).sum().backward()
    assert x_t.grad is not None and x_t.grad.abs().sum() > 0
