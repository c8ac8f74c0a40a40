"""Strict run-config loading: every bad input fails at load with a ConfigError naming the key path.

CPU only, no network, no models built: these tests only load and check configs. What loads,
with overrides, defaults and the check-config command, is in test_config.py.
"""

from __future__ import annotations

import pytest
import yaml

from config_base import DELETE, with_changes
from distill.config import ConfigError, build_config, load_config


# ---------------------------------------------------------------------------------------
# Bad inputs: each fails at load, naming the key path
# ---------------------------------------------------------------------------------------

BAD = [
    # sharding a role's weights (ZeRO-3) and splitting its sequence
    pytest.param([("roles.teacher.shard", True)], ["roles.teacher.shard", "needs deepspeed.zero_optimization.stage 3"],
                 id="shard-without-zero3"),
    pytest.param([("roles.student.shard", True)], ["roles.student.shard", "shard is for frozen roles"],
                 id="shard-a-trainable-role"),
    pytest.param([("parallel.sequence_parallel_size", 0)], ["parallel.sequence_parallel_size", "> 0"],
                 id="sequence-parallel-size-zero"),
    # unknown keys
    pytest.param([("trainig", {"max_steps": 1})], ["trainig", "unknown key"], id="unknown-top-level"),
    pytest.param([("training.learnin_rate", 1e-5)], ["training.learnin_rate", "unknown key"], id="unknown-in-training"),
    pytest.param([("model.familly", "wan")], ["model.familly", "unknown key"], id="unknown-in-model"),
    pytest.param([("roles.student.trainabel", True)], ["roles.student.trainabel", "unknown key"], id="unknown-in-role"),
    pytest.param([("method_config.rollout_mod", "simulate")], ["method_config.rollout_mod", "unknown key"],
                 id="unknown-in-method_config"),
    # wrong types
    pytest.param([("training.max_steps", "ten")], ["training.max_steps", "integer"], id="max_steps-str"),
    pytest.param([("training.max_steps", 10.5)], ["training.max_steps", "integer"], id="max_steps-float"),
    pytest.param([("training.max_steps", True)], ["training.max_steps", "integer"], id="max_steps-bool"),
    pytest.param([("training.betas", [0.9, 0.99, 0.999])], ["training.betas", "2 values"], id="betas-3-values"),
    pytest.param([("training.betas", 0.9)], ["training.betas"], id="betas-scalar"),
    pytest.param([("training.fake_score_betas", [0.9])], ["training.fake_score_betas"], id="fake_score_betas-1-value"),
    pytest.param([("training.learning_rate", "fast")], ["training.learning_rate", "number"], id="lr-not-numeric"),
    pytest.param([("model.pixel_space", "yes")], ["model.pixel_space", "true or false"], id="pixel_space-str"),
    pytest.param([("roles.student.trainable", 1)], ["roles.student.trainable", "true or false"], id="trainable-int"),
    pytest.param([("method_config.dmd_denoising_steps", [1000, "750"])], ["method_config.dmd_denoising_steps[1]"],
                 id="step-str"),
    pytest.param([("method_config.dmd_denoising_steps", 500)], ["method_config.dmd_denoising_steps", "list"],
                 id="steps-not-a-list"),
    pytest.param([("data.prompts", "a red circle")], ["data.prompts", "list"], id="prompts-not-a-list"),
    pytest.param([("training", [1, 2])], ["training", "mapping"], id="section-not-a-mapping"),
    pytest.param([("training.lr_scheduler", "exponential")], ["training.lr_scheduler", "must be one of"],
                 id="lr_scheduler-literal"),
    # DMD2 method_config values
    pytest.param([("method_config.min_timestep_ratio", 0.9), ("method_config.max_timestep_ratio", 0.1)],
                 ["method_config.min_timestep_ratio", "method_config.max_timestep_ratio"], id="min-ratio-gt-max"),
    pytest.param([("method_config.max_timestep_ratio", 1.5)], ["method_config.max_timestep_ratio"], id="ratio-above-1"),
    pytest.param([("method_config.min_timestep_ratio", -0.1)], ["method_config.min_timestep_ratio"], id="ratio-below-0"),
    pytest.param([("method_config.dmd_denoising_steps", [])], ["method_config.dmd_denoising_steps", "at least one"],
                 id="steps-empty"),
    pytest.param([("method_config.dmd_denoising_steps", [1001, 750, 500])],
                 ["method_config.dmd_denoising_steps[0]", "1001", "outside"], id="step-1001"),
    pytest.param([("method_config.dmd_denoising_steps", [1000, 500, -1])],
                 ["method_config.dmd_denoising_steps[2]", "-1", "outside"], id="step-minus-1"),
    pytest.param([("method_config.dmd_denoising_steps", [250, 500, 750, 1000])],
                 ["method_config.dmd_denoising_steps", "decreasing"], id="steps-increasing"),
    pytest.param([("method_config.dmd_denoising_steps", [1000, 500, 500])],
                 ["method_config.dmd_denoising_steps", "decreasing"], id="steps-repeated"),
    pytest.param([("method_config.generator_update_interval", 0)], ["method_config.generator_update_interval"],
                 id="gen-interval-0"),
    pytest.param([("method_config.generator_update_interval", -3)], ["method_config.generator_update_interval"],
                 id="gen-interval-neg"),
    pytest.param([("method_config.rollout_mode", "teacher_forcing")],
                 ["method_config.rollout_mode", "simulate", "data_latent"], id="rollout_mode-bad"),
    pytest.param([("method_config.cfg_convention", "plus")], ["method_config.cfg_convention"], id="cfg_convention-bad"),
    pytest.param([("method_config.real_score_guidance_scale", -1.0)], ["method_config.real_score_guidance_scale"],
                 id="guidance-negative"),
    # learning rates
    pytest.param([("training.learning_rate", 0)], ["training.learning_rate", "> 0"], id="lr-0"),
    pytest.param([("training.learning_rate", -1e-5)], ["training.learning_rate", "> 0"], id="lr-negative"),
    pytest.param([("training.learning_rate", "-1e-5")], ["training.learning_rate", "> 0"], id="lr-negative-str"),
    pytest.param([("training.fake_score_learning_rate", 0)], ["training.fake_score_learning_rate", "> 0"],
                 id="fake-lr-0"),
    pytest.param([("training.batch_size", 0)], ["training.batch_size"], id="batch_size-0"),
    pytest.param([("training.learning_rate", float("nan"))], ["training.learning_rate", "finite"], id="lr-nan"),
    pytest.param([("training.max_grad_norm", float("nan"))], ["training.max_grad_norm", "finite"], id="clip-nan"),
    pytest.param([("model.flow_shift", float("nan"))], ["model.flow_shift", "finite"], id="flow_shift-nan"),
    pytest.param([("method_config.real_score_guidance_scale", float("nan"))],
                 ["method_config.real_score_guidance_scale"], id="guidance-nan"),
    pytest.param([("training.betas", [0.9, 1.0])], ["training.betas"], id="beta-1"),
    pytest.param([("training.optimizer_implementation", "apex")], ["training.optimizer_implementation", "fused"],
                 id="optimizer_implementation-bad"),
    pytest.param([("model.batched_cfg", "yes")], ["model.batched_cfg", "true or false"], id="batched_cfg-str"),
    # registries
    pytest.param([("method", "dmd3")], ["method", "'dmd3'", "registered", "dmd2", "flow_matching"], id="unknown-method"),
    pytest.param([("model.family", "hunyuan")], ["model.family", "'hunyuan'", "registered", "wan"], id="unknown-family"),
    # roles the method needs
    pytest.param([("roles.critic", DELETE)], ["roles.critic", "needs a role"], id="critic-missing"),
    pytest.param([("roles.teacher", DELETE)], ["roles.teacher"], id="teacher-missing"),
    pytest.param([("roles.teacher.trainable", True)], ["roles.teacher", "frozen"], id="teacher-trainable"),
    pytest.param([("roles.student.trainable", False)], ["roles.student", "trainable"], id="student-frozen"),
    pytest.param([("roles.critic.init_from", "critic")], ["roles.critic.init_from"], id="role-init-from-itself"),
    # deepspeed keys the trainer owns
    pytest.param([("deepspeed.optimizer", {"type": "AdamW", "params": {"lr": 1e-4}})], ["deepspeed.optimizer"],
                 id="ds-optimizer"),
    pytest.param([("deepspeed.scheduler", {"type": "WarmupLR"})], ["deepspeed.scheduler"], id="ds-scheduler"),
    pytest.param([("deepspeed.train_micro_batch_size_per_gpu", 4)],
                 ["deepspeed.train_micro_batch_size_per_gpu", "training.batch_size"], id="ds-micro-batch"),
    pytest.param([("deepspeed.gradient_clipping", 1.0)], ["deepspeed.gradient_clipping", "training.max_grad_norm"],
                 id="ds-clipping"),
    pytest.param([("deepspeed.bf16", {"enabled": True})], ["deepspeed.bf16", "training.mixed_precision"], id="ds-bf16"),
    pytest.param([("deepspeed.fp16", {"enabled": True})], ["deepspeed.fp16"], id="ds-fp16"),
    pytest.param([("deepspeed.bfloat16", {"enabled": True})], ["deepspeed.bfloat16", "training.mixed_precision"],
                 id="ds-bfloat16-alias"),
    # model weights source
    pytest.param([("model.path", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers")], ["model.preset", "model.path"],
                 id="model-preset-and-path"),
    pytest.param([("model.preset", DELETE)], ["model.preset", "model.path"], id="model-neither"),
    # speed settings of the model (issue 14)
    pytest.param([("model.gradient_checkpointing", True), ("model.checkpoint_every", 0)],
                 ["model.checkpoint_every", "> 0"], id="checkpoint_every-0"),
    pytest.param([("model.checkpoint_every", 2)], ["model.checkpoint_every", "model.gradient_checkpointing: true"],
                 id="checkpoint_every-without-checkpointing"),
    pytest.param([("model.checkpoint_save", ["attention"])],
                 ["model.checkpoint_save", "model.gradient_checkpointing: true"], id="checkpoint_save-without-checkpointing"),
    pytest.param([("model.gradient_checkpointing", True), ("model.checkpoint_save", ["attn"])],
                 ["model.checkpoint_save", "'attn'", "attention, matmul"], id="checkpoint_save-unknown"),
    pytest.param([("model.gradient_checkpointing", True), ("model.checkpoint_save", ["matmul", "matmul"])],
                 ["model.checkpoint_save", "twice"], id="checkpoint_save-twice"),
    pytest.param([("model.attention_backend", "flash2")],
                 ["model.attention_backend", "'flash2'", "known:", "native", "_native_cudnn", "flash"],
                 id="attention_backend-unknown"),
    pytest.param([("model.attention_backend", "Native")], ["model.attention_backend", "'Native'"],
                 id="attention_backend-case"),
    pytest.param([("model.compile", True), ("model.compile_mode", "fast")], ["model.compile_mode", "must be one of"],
                 id="compile_mode-unknown"),
    pytest.param([("model.compile_mode", "max-autotune")], ["model.compile_mode", "model.compile: true"],
                 id="compile_mode-without-compile"),
    pytest.param([("model.compile_backend", "aot_eager")], ["model.compile_backend", "model.compile: true"],
                 id="compile_backend-without-compile"),
    pytest.param([("model.compile", True), ("model.compile_backend", "eager"), ("model.compile_mode", "max-autotune")],
                 ["model.compile_mode", "inductor", "'eager'"], id="compile_mode-not-inductor"),
    pytest.param([("model.compile", True), ("model.compile_mode", "reduce-overhead")],
                 ["model.compile_mode", "CUDA graphs", "repeated blocks", "max-autotune-no-cudagraphs"],
                 id="compile_mode-cuda-graphs"),
    pytest.param([("model.compile", True), ("model.compile_options", {"triton.cudagraphs": True})],
                 ["model.compile_options", "CUDA graphs"], id="compile_options-cuda-graphs"),
    pytest.param([("model.compile_options", {"split_reductions": False})],
                 ["model.compile_options", "model.compile: true"], id="compile_options-without-compile"),
    pytest.param([("model.compile", True), ("model.compile_backend", "aot_eager"),
                  ("model.compile_options", {"split_reductions": False})],
                 ["model.compile_options", "inductor", "'aot_eager'"], id="compile_options-not-inductor"),
    pytest.param([("model.compile", True), ("model.compile_options", ["split_reductions"])],
                 ["model.compile_options"], id="compile_options-not-a-mapping"),
    pytest.param([("model.pixel_space", True), ("model.vae_channels_last", True)],
                 ["model.vae_channels_last", "model.pixel_space: true", "no VAE"], id="vae_channels_last-pixel-space"),
    pytest.param([("model.pixel_space", True), ("model.vae_compile", True)],
                 ["model.vae_compile", "model.pixel_space: true", "no VAE"], id="vae_compile-pixel-space"),
    # required keys
    pytest.param([("method", DELETE)], ["method", "required key is missing"], id="missing-method"),
    pytest.param([("model", DELETE)], ["model", "required key is missing"], id="missing-model"),
    pytest.param([("roles", DELETE)], ["roles", "required key is missing"], id="missing-roles"),
    pytest.param([("data", DELETE)], ["data", "required key is missing"], id="missing-data"),
    pytest.param([("data.prompts", [])], ["data.prompts"], id="data-empty"),
    pytest.param([("validation.seeds", [])], ["validation.seeds"], id="validation-no-seeds"),
]


@pytest.mark.parametrize("changes, expected", BAD)
def test_bad_config_is_rejected_naming_the_key(changes, expected):
    raw = with_changes(*changes)
    with pytest.raises(ConfigError) as info:
        build_config(raw)
    message = str(info.value)
    for text in expected:
        assert text in message, f"{text!r} not in error message {message!r}"


@pytest.mark.parametrize(
    "changes, expected",
    [
        pytest.param([("training.learnin_rate", 1e-5)], "training.learnin_rate", id="unknown-key"),
        pytest.param([("method_config.min_timestep_ratio", 0.99)], "method_config.min_timestep_ratio", id="min-gt-max"),
        pytest.param([("roles.critic", DELETE)], "roles.critic", id="critic-missing"),
        pytest.param([("deepspeed.bf16", {"enabled": True})], "deepspeed.bf16", id="ds-bf16"),
    ],
)
def test_bad_yaml_file_is_rejected_by_load_config(tmp_path, changes, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(with_changes(*changes)))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert expected in str(info.value)


def test_missing_file_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("training: {max_steps: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_top_level_not_a_mapping():
    with pytest.raises(ConfigError, match="top level"):
        build_config([1, 2, 3])


def test_the_role_error_is_a_config_error():
    from distill.roles import RoleError

    with pytest.raises(RoleError) as info:
        build_config(with_changes(("roles.teacher.trainable", True)))
    assert isinstance(info.value, ConfigError)
    assert "roles.teacher.trainable: false" in str(info.value)


def test_fused_adamw_where_torch_has_none_is_refused_before_any_model(tmp_path, capsys, monkeypatch):
    """check-config and train run the same preflight: a device without torch's fused AdamW (as the CPU was before
    torch 2.4) stops the run naming the key, before a model is built."""
    from distill import cli

    path = tmp_path / "fused.yaml"
    path.write_text(yaml.safe_dump(with_changes(("training.optimizer_implementation", "fused"),
                                                ("training.device", "cpu"), ("run.output", str(tmp_path / "run")))))
    assert cli.main(["check-config", str(path)]) == 0  # torch 2.4+ fuses AdamW on CPU
    capsys.readouterr()
    monkeypatch.setattr("torch.utils._foreach_utils._get_fused_kernels_supported_devices", lambda: ["cuda"])
    for command in ("check-config", "train"):
        assert cli.main([command, str(path)]) == 2
        assert "training.optimizer_implementation: fused AdamW does not run on cpu" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
