"""The Wan plugin on diffusers: building roles, loading folders, and sampling through WanPipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distill.config import ConfigError
from distill.models.wan import WanPlugin
from distill.training.trainer import Trainer
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


def test_gif_videos_are_written_by_pillow_alone(run_dir, tmp_path):
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
    from distill.video import read_video

    cfg = tiny_config(run_dir, model={"pixel_space": False}, data={"num_frames": 5, "height": 16, "width": 16})
    plugin, roles = plugin_and_roles(cfg)
    assert plugin.latent_shape == (4, 2, 2, 2)
    result = plugin.validator().run(
        request(roles["student"], tmp_path, sampler_kind="sde", sampling_timesteps=[1000.0, 500.0], num_frames=5)
    )
    frames = read_video(result.videos[0])
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

    from distill.models.casting import cast_frozen
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


def test_the_timestep_shift_is_the_scheduler_s_unless_one_is_given(run_dir):
    """σ' = s σ / (1 + (s − 1) σ): s is model.flow_shift by default, DMD2's timestep_shift when given."""
    plugin, _ = plugin_and_roles(tiny_config(run_dir, model={"flow_shift": 3.0}))
    t = torch.tensor([0.0, 250.0, 500.0, 1000.0])
    torch.testing.assert_close(plugin.shift_timestep(t), torch.tensor([0.0, 500.0, 750.0, 1000.0]))
    torch.testing.assert_close(plugin.shift_timestep(t, 1.0), t)
    torch.testing.assert_close(plugin.shift_timestep(t, 5.0), 5 * t / (1000 + 4 * t) * 1000)


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


# ---------------------------------------------------------------------------------------
# Speed settings of the model section (issue 14): same numbers, same state dict
# ---------------------------------------------------------------------------------------


def velocity_and_grads(plugin, handle, seed: int = 0):
    """The role's conditional velocity at a fixed input, and (for a trainable role) its weights' gradients
    of a loss on it."""
    g = torch.Generator().manual_seed(seed)
    batch = plugin.prepare_batch({"prompt": ["a red circle moving left"]}, latents_source="zeros")
    x_t, t = torch.randn(1, *plugin.latent_shape, generator=g), torch.tensor([700.0])
    v = plugin.predict_velocity(handle, x_t, t, batch, conditional=True)
    if not handle.trainable:
        return v, []
    module = handle.modules["transformer"]
    module.zero_grad()
    v.pow(2).mean().backward()
    return v.detach(), [p.grad.clone() for p in module.parameters()]


def test_checkpoint_every_recomputes_only_every_nth_block_with_the_same_gradients(run_dir):
    """4 blocks: checkpoint_every 3 recomputes blocks 0 and 3 in the backward; outputs, gradients and
    state-dict keys are those of no checkpointing."""
    calls, results = {}, {}
    for label, model in (("off", {}), ("every", {"gradient_checkpointing": True}),
                         ("every-3", {"gradient_checkpointing": True, "checkpoint_every": 3})):
        cfg = tiny_config(run_dir, model={"preset": "small", **model})
        plugin, roles = plugin_and_roles(cfg)
        student = roles["student"]
        blocks = student.modules["transformer"].blocks
        counts = [0] * len(blocks)
        hooks = [b.register_forward_pre_hook(lambda m, a, i=i: counts.__setitem__(i, counts[i] + 1))
                 for i, b in enumerate(blocks)]
        results[label] = velocity_and_grads(plugin, student)
        for h in hooks:
            h.remove()
        calls[label] = counts
        assert not roles["teacher"].modules["transformer"].gradient_checkpointing  # a frozen role never recomputes
        keys = list(student.modules["transformer"].state_dict())
        assert keys == list(roles["teacher"].modules["transformer"].state_dict())
    assert calls == {"off": [1, 1, 1, 1], "every": [2, 2, 2, 2], "every-3": [2, 1, 1, 2]}
    for label in ("every", "every-3"):
        torch.testing.assert_close(results[label][0], results["off"][0], rtol=0, atol=1e-6)
        for got, want in zip(results[label][1], results["off"][1], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_checkpoint_save_keeps_the_attention_outputs_with_the_same_gradients(run_dir):
    """model.checkpoint_save: the backward's recompute runs no attention kernel again when "attention" is kept (as
    many attention calls as without checkpointing, against twice as many with full checkpointing); outputs and
    gradients are those of no checkpointing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountAttention(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "scaled_dot_product" in func.__name__ and "backward" not in func.__name__:
                self.calls += 1
            return func(*args, **(kwargs or {}))

    calls, results = {}, {}  # calls: the transformer's self- and cross-attention
    for label, model in (("off", {}), ("every", {"gradient_checkpointing": True}),
                         ("attention", {"gradient_checkpointing": True, "checkpoint_save": ["attention"]}),
                         ("matmul-every-2", {"gradient_checkpointing": True, "checkpoint_save": ["matmul"],
                                             "checkpoint_every": 2})):
        plugin, roles = plugin_and_roles(tiny_config(run_dir, model={"preset": "small", **model}))
        plugin.prepare_batch({"prompt": ["a red circle moving left"]}, latents_source="zeros")  # its text: cached
        with CountAttention() as count:
            results[label] = velocity_and_grads(plugin, roles["student"])
        calls[label] = count.calls
    blocks = len(roles["student"].modules["transformer"].blocks)
    assert calls == {"off": 2 * blocks, "every": 4 * blocks, "attention": 2 * blocks, "matmul-every-2": 3 * blocks}
    for label in ("every", "attention", "matmul-every-2"):
        torch.testing.assert_close(results[label][0], results["off"][0], rtol=0, atol=1e-6)
        for got, want in zip(results[label][1], results["off"][1], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.slow  # compiles the blocks of several configs
def test_the_speed_settings_train_dmd2_to_the_same_losses(tmp_path):
    """Checkpointing every block or every other one, and all the settings at once (compiled blocks, the
    native attention backend) give the losses of none of them: through DeepSpeed engines, a frozen teacher,
    no-grad rollouts, the GAN head's hooks on the critic's blocks, an EMA and a validation."""
    from torch._dynamo.utils import counters

    from tiny import LatentDataset

    def losses(name, **model):
        cfg = tiny_config(tmp_path / name, model=model, training={"max_steps": 3},
                          method_config={"generator_update_interval": 2, "gan_critic_weight": 0.01,
                                         "gan_generator_weight": 0.005, "ema_decay": 0.9},
                          validation={"every": 3, "seeds": [0], "video_format": "gif"},
                          data={"shards": "unused: the test gives the data set"})
        history = Trainer(cfg, dataset=LatentDataset("pixels", (3, 1, 16, 16))).train()
        return torch.tensor([[h["critic_loss"], h.get("generator_loss", 0.0), h["d_fake"]] for h in history])

    off = losses("off")
    graphs = counters["stats"]["unique_graphs"]
    for name, model in (("every", {"gradient_checkpointing": True}),
                        ("every-2", {"gradient_checkpointing": True, "checkpoint_every": 2}),
                        ("all", {"gradient_checkpointing": True, "checkpoint_every": 2, "attention_backend": "native",
                                 "compile": True, "compile_backend": "eager"})):
        torch.testing.assert_close(losses(name, **model), off, rtol=0, atol=1e-5, msg=name)
    assert counters["stats"]["unique_graphs"] > graphs  # the blocks did compile


def test_checking_an_attention_backend_draws_no_random_numbers(run_dir):
    state = torch.random.get_rng_state()
    WanPlugin.check_runtime(tiny_config(run_dir, model={"attention_backend": "native"}), torch.device("cpu"),
                            backward=True)
    assert torch.equal(torch.random.get_rng_state(), state)  # a checked run draws what an unchecked one does


def test_the_attention_backend_names_are_diffusers_own():
    from diffusers.models.attention_dispatch import AttentionBackendName

    from distill.models import DIFFUSERS_ATTENTION_BACKENDS

    assert sorted(DIFFUSERS_ATTENTION_BACKENDS) == sorted(b.value for b in AttentionBackendName)


@pytest.fixture
def attention_default():
    """set_attention_backend also makes its backend diffusers' process-wide default: restore it after the test."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(active)


def attention_backends(module) -> set:
    return {m.processor._attention_backend for m in module.modules() if hasattr(getattr(m, "processor", None),
                                                                                  "_attention_backend")}


def test_the_attention_backend_reaches_every_role_and_native_equals_the_default(run_dir, attention_default):
    plugin, roles = plugin_and_roles(tiny_config(run_dir))
    default = {name: velocity_and_grads(plugin, roles[name]) for name in ("teacher", "student")}
    assert attention_backends(roles["student"].modules["transformer"]) == {None}
    for backend, atol in (("native", 0.0), ("_native_math", 1e-5)):
        plugin, roles = plugin_and_roles(tiny_config(run_dir, model={"attention_backend": backend}))
        for name in ("teacher", "student", "critic"):
            assert {str(b.value) for b in attention_backends(roles[name].modules["transformer"])} == {backend}
        for name, (v, grads) in default.items():
            got_v, got_grads = velocity_and_grads(plugin, roles[name])
            torch.testing.assert_close(got_v, v, rtol=0, atol=atol)
            for got, want in zip(got_grads, grads, strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=atol)
        sampled = plugin.frozen_role("student", {"transformer": plugin.new_denoiser()})  # a checkpoint's, in the bench
        assert {str(b.value) for b in attention_backends(sampled.modules["transformer"])} == {backend}


def test_compiled_blocks_give_the_same_outputs_and_gradients_and_keep_the_state_dict(run_dir):
    plain_plugin, plain = plugin_and_roles(tiny_config(run_dir))
    plugin, roles = plugin_and_roles(tiny_config(run_dir, model={"compile": True, "compile_backend": "aot_eager"}))
    sampled = plugin.frozen_role("student", {"transformer": plugin.new_denoiser()})  # a checkpoint's, in the bench
    for handle in (*roles, sampled):
        module = handle.modules["transformer"]
        assert all(block._compiled_call_impl is not None for block in module.blocks), handle.name
        assert list(module.state_dict()) == list(plain["teacher"].modules["transformer"].state_dict())
    want_v, want_grads = velocity_and_grads(plain_plugin, plain["student"])
    v, grads = velocity_and_grads(plugin, roles["student"])
    torch.testing.assert_close(v, want_v, rtol=0, atol=1e-5)
    for got, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.slow  # compiles the blocks of several configs
def test_compiled_blocks_recompute_inside_their_graph_with_the_same_gradients(run_dir):
    """compile with gradient checkpointing: each trainable block checkpoints inside its own forward, so its compiled
    graph holds the recompute (diffusers' checkpointing around a compiled block gave other gradients on each call
    on an H200); the forward keeps fewer activations, as many fewer as blocks recompute, and outputs and gradients
    are those of the plain model. A frozen role is compiled as it is."""
    def saved_and_grads(plugin, handle):
        g = torch.Generator().manual_seed(0)
        batch = plugin.prepare_batch({"prompt": ["a red circle moving left"]}, latents_source="zeros")
        x_t, t = torch.randn(1, *plugin.latent_shape, generator=g), torch.tensor([700.0])
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
            v = plugin.predict_velocity(handle, x_t, t, batch, conditional=True)
        handle.modules["transformer"].zero_grad()
        v.pow(2).mean().backward()
        return sum(saved), v.detach(), [p.grad.clone() for p in handle.modules["transformer"].parameters()]

    plain_plugin, plain = plugin_and_roles(tiny_config(run_dir, model={"preset": "small"}))
    _, want_v, want_grads = saved_and_grads(plain_plugin, plain["student"])
    saved = {}
    compiled = {"preset": "small", "compile": True, "compile_backend": "aot_eager"}
    for label, model in (("none", compiled), ("every", {**compiled, "gradient_checkpointing": True}),
                         ("every-3", {**compiled, "gradient_checkpointing": True, "checkpoint_every": 3}),
                         ("every-attention", {**compiled, "gradient_checkpointing": True,
                                              "checkpoint_save": ["attention"]})):
        plugin, roles = plugin_and_roles(tiny_config(run_dir, model=model))
        student, teacher = (roles[n].modules["transformer"] for n in ("student", "teacher"))
        assert not student.gradient_checkpointing  # not diffusers' way, around the compiled blocks
        assert list(student.state_dict()) == list(plain["student"].modules["transformer"].state_dict())
        assert type(teacher.blocks[0]) is type(plain["teacher"].modules["transformer"].blocks[0])
        saved[label], v, grads = saved_and_grads(plugin, roles["student"])
        torch.testing.assert_close(v, want_v, rtol=0, atol=1e-5)
        for got, want in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert saved["every"] < saved["every-3"] < saved["none"], saved
    assert saved["every-attention"] < saved["none"], saved  # AOT's partitioner picks what else it keeps


@pytest.mark.parametrize("settings", [
    {"vae_channels_last": True},
    pytest.param({"vae_channels_last": True, "vae_compile": True, "compile_backend": "eager"},  # dynamo's graphs
                 marks=pytest.mark.slow),
], ids=["channels-last", "channels-last-compiled"])
def test_vae_fast_paths_decode_as_stock_compile_a_bounded_set_of_graphs_and_export_stock(tmp_path, settings):
    import torch._dynamo
    from diffusers import AutoencoderKLWan
    from torch._dynamo.utils import counters

    data = {"num_frames": 9, "height": 16, "width": 16}
    stock = WanPlugin(tiny_config(tmp_path / "a", model={"pixel_space": False}, data=data), device=torch.device("cpu"))
    fast = WanPlugin(tiny_config(tmp_path / "b", model={"pixel_space": False, **settings}, data=data),
                     device=torch.device("cpu"))
    assert list(fast.vae.state_dict()) == list(stock.vae.state_dict())
    conv = fast.vae.decoder.conv_in.weight
    assert conv.dim() == 5 and conv.is_contiguous(memory_format=torch.channels_last_3d)
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    for frames in (3, 5, 7, 3):  # latent frames: three lengths, then the first again
        z = torch.randn(1, 4, frames, 2, 2, generator=torch.Generator().manual_seed(frames))
        want = stock.vae.decode(z, return_dict=False)[0]
        got = fast.vae.decode(z, return_dict=False)[0]
        assert got.shape == want.shape == (1, 3, 4 * frames - 3, 16, 16)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        graphs.append(counters["stats"]["unique_graphs"])
    if settings.get("vae_compile"):
        # first frame, second frame, the rest: three graphs, three more when the length first changes (its
        # strides then become dynamic), none after; far under the recompile limit, so nothing falls back to eager
        assert graphs == [3, 6, 6, 6] and not counters["graph_break"], (graphs, dict(counters["graph_break"]))
    # the export is a stock folder whatever the layout in memory
    fast.export_pipeline(fast_export_source(fast, tmp_path), tmp_path / "export",
                         SamplingSpec(sampler_kind="ode", num_inference_steps=4))
    loaded = AutoencoderKLWan.from_pretrained(tmp_path / "export" / "vae")
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, stock.vae.state_dict()[name], rtol=0, atol=0)


def fast_export_source(plugin: WanPlugin, tmp_path) -> str:
    """A modules folder holding a transformer, as a checkpoint's export reads it."""
    folder = tmp_path / "modules"
    plugin.new_denoiser().save_pretrained(folder / plugin.denoiser_key)
    return str(folder)


def cuda_or_module(module: str) -> bool:
    import importlib.util

    return torch.cuda.is_available() or importlib.util.find_spec(module) is not None


@pytest.mark.parametrize("sets, expected", [
    (["model.attention_backend=flash"], ["'flash' does not run here (cpu, float32, with backward)", "flash-attn"]),
    (["model.attention_backend=_native_cudnn"], ["'_native_cudnn' does not run here (cpu"]),
    (["model.compile=true", "model.compile_backend=nope"], ["model.compile_backend", "'nope'", "aot_eager", "inductor"]),
    (["model.compile=true", "model.compile_options={split_reduction: false}"],
     ["model.compile_options", "split_reduction not a setting of torch._inductor.config"]),
], ids=["package-missing", "needs-cuda", "unknown-compiler", "unknown-inductor-setting"])
def test_check_config_and_train_refuse_what_cannot_run_here_before_building_models(tmp_path, capsys, monkeypatch,
                                                                                   sets, expected):
    import yaml

    from distill.cli import main
    from tiny import tiny_raw

    if cuda_or_module("flash_attn"):
        pytest.skip("the backends refused here may run on this machine")

    def built(*args, **kwargs):
        raise AssertionError("a model plugin was built before the error")

    monkeypatch.setattr(WanPlugin, "__init__", built)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(tmp_path / "run")))
    for command in ("check-config", "train"):
        assert main([command, str(config), *(a for s in sets for a in ("--set", s))]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("distill: config error: "), err
        assert all(text in err for text in expected), err
    assert not (tmp_path / "run").exists()


def test_check_config_passes_backends_and_compilers_that_run_here(tmp_path, capsys):
    import yaml

    from distill.cli import main
    from tiny import tiny_raw

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(tmp_path / "run")))
    sets = ["model.attention_backend=_native_math", "model.compile=true", "model.compile_backend=aot_eager",
            "model.gradient_checkpointing=true", "model.checkpoint_every=2"]
    assert main(["check-config", str(config), *(a for s in sets for a in ("--set", s))]) == 0
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert (model["attention_backend"], model["compile_backend"], model["checkpoint_every"]) == ("_native_math",
                                                                                                  "aot_eager", 2)


@pytest.mark.parametrize("preset, billions", [("wan2.1-1.3b", 1.419), ("wan2.1-14b", 14.288),
                                             ("wan2.2-ti2v-5b", 4.999), ("wan2.2-a14b", 14.288)])
def test_the_full_size_presets_are_the_released_architectures(preset, billions):
    """Random-weight presets of Wan2.1-T2V-1.3B and -14B, Wan2.2-TI2V-5B and -T2V-A14B (each of its two experts) for
    the GPU benchmarks: their transformers' parameter counts, built on the meta device (no memory)."""
    from diffusers import WanTransformer3DModel

    from distill.models.wan import PRESETS

    with torch.device("meta"):
        transformer = WanTransformer3DModel(**PRESETS[preset]["transformer"])
    assert round(sum(p.numel() for p in transformer.parameters()) / 1e9, 3) == billions
    assert preset in WanPlugin.presets


def test_sequence_parallel_refuses_what_it_cannot_split(tmp_path):
    """Sizes that do not divide the ranks, the heads or the tokens; an attention backend without it.
    (Splitting itself is tested on 2 and 4 gloo ranks in test_distributed.py.)"""
    from diffusers import WanTransformer3DModel

    from distill.models.sequence_parallel import enable_ulysses
    from distill.models.wan_presets import PRESETS

    with pytest.raises(ConfigError, match=r"parallel.sequence_parallel_size: 2 does not divide the 1 ranks"):
        Trainer(tiny_config(tmp_path / "a", parallel={"sequence_parallel_size": 2}))

    class FourRanks:  # the part of a DeviceMesh that is read before any collective
        def __getitem__(self, name):
            return self

        def size(self):
            return 4

    def transformer(preset):
        return WanTransformer3DModel(**PRESETS[preset]["transformer"], in_channels=3, out_channels=3)

    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match=r"4 does not divide the transformer's 2 attention heads"):
        enable_ulysses(transformer("tiny"), FourRanks(), cpu, {"data": 64})
    with pytest.raises(ConfigError, match=r"4 does not divide the 6 tokens of a video of validation's size"):
        enable_ulysses(transformer("small"), FourRanks(), cpu, {"data": 64, "validation": 6})
    module = transformer("small")
    module.set_attention_backend("_native_math")
    with pytest.raises(ConfigError, match=r"model.attention_backend: _native_math cannot split a sequence"):
        enable_ulysses(module, FourRanks(), cpu, {"data": 64})
