"""Run-config loading: the example config, dotted overrides, resolved values and defaults, the
method's config, and the check-config command. Bad inputs are in test_config_errors.py.

CPU only, no network, no models built: these tests only load and check configs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from config_base import DELETE, TINY_DMD2, base_raw, with_changes
from distill import cli
from distill.config import Config, ConfigError, build_config, load_config
from distill.methods.distribution_matching.dmd2 import DMD2Config


# ---------------------------------------------------------------------------------------
# The base dict is the example config
# ---------------------------------------------------------------------------------------


def test_base_dict_matches_example_yaml():
    assert yaml.safe_load(TINY_DMD2.read_text()) == base_raw()


def test_example_config_loads():
    cfg = load_config(TINY_DMD2)
    assert isinstance(cfg, Config)
    assert cfg.method == "dmd2"
    assert isinstance(cfg.method_config, DMD2Config)
    assert cfg.method_config.dmd_denoising_steps == [1000, 750, 500, 250]
    assert cfg.method_config.rollout_mode == "simulate"
    assert cfg.model.family == "wan" and cfg.model.preset == "tiny" and cfg.model.path is None
    assert cfg.model.pixel_space is True
    assert set(cfg.roles) == {"teacher", "student", "critic"}
    assert cfg.roles["teacher"].trainable is False
    assert cfg.roles["student"].trainable is True and cfg.roles["student"].init_from == "teacher"
    assert cfg.training.learning_rate == pytest.approx(1e-4)
    assert isinstance(cfg.training.learning_rate, float)
    assert cfg.training.betas == (0.0, 0.999)
    assert cfg.training.fake_score_learning_rate == pytest.approx(1e-3)
    assert cfg.deepspeed == {"zero_optimization": {"stage": 2}}


def test_base_dict_builds():
    cfg = build_config(base_raw())
    assert cfg.run.name == "tiny-dmd2"
    assert cfg.validation.seeds == [0, 1]


# ---------------------------------------------------------------------------------------
# Good paths
# ---------------------------------------------------------------------------------------


def test_dotted_overrides_take_effect_with_types():
    cfg = load_config(TINY_DMD2, ["training.learning_rate=1e-5", "method_config.dmd_denoising_steps=[999, 499]"])
    # YAML 1.1 reads `1e-5` as a string; the loader makes it the float.
    assert isinstance(cfg.training.learning_rate, float)
    assert cfg.training.learning_rate == 1e-05
    assert cfg.method_config.dmd_denoising_steps == [999, 499]
    assert all(type(s) is int for s in cfg.method_config.dmd_denoising_steps)
    # untouched keys keep the file's values
    assert cfg.training.max_steps == 300
    assert cfg.method_config.generator_update_interval == 5


def test_more_override_types():
    cfg = load_config(
        TINY_DMD2,
        [
            "training.betas=[0.9, 0.99]",
            "model.pixel_space=false",
            "method_config.rollout_mode=data_latent",
            "training.fake_score_eps=1e-6",
            "run.name=renamed",
        ],
    )
    assert cfg.training.betas == (0.9, 0.99)
    assert cfg.model.pixel_space is False
    assert cfg.method_config.rollout_mode == "data_latent"
    assert cfg.training.fake_score_eps == 1e-6 and isinstance(cfg.training.fake_score_eps, float)
    assert cfg.run.name == "renamed"


def test_numeric_string_float_in_yaml_file(tmp_path):
    raw = with_changes(("training.learning_rate", "2e-5"))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    assert cfg.training.learning_rate == 2e-05
    assert isinstance(cfg.training.learning_rate, float)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("training.learnin_rate=1e-5", "training.learnin_rate"),
        ("method_config.rollout_mod=simulate", "method_config.rollout_mod"),
        ("trainer.max_steps=3", "trainer"),
        ("training.learning_rate=0", "training.learning_rate"),
        ("method_config.dmd_denoising_steps=[]", "method_config.dmd_denoising_steps"),
    ],
)
def test_bad_override_fails_naming_the_key(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(TINY_DMD2, [override])
    assert expected in str(info.value)


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(TINY_DMD2, ["training.learning_rate"])


def test_override_through_a_non_mapping():
    with pytest.raises(ConfigError) as info:
        load_config(TINY_DMD2, ["method.foo=1"])
    assert "method" in str(info.value) and "not a mapping" in str(info.value)


def test_unset_fake_score_keys_stay_none():
    raw = with_changes(("training.fake_score_learning_rate", DELETE))
    cfg = build_config(raw)
    tr = cfg.training
    for key in ("learning_rate", "betas", "weight_decay", "eps", "lr_scheduler", "warmup_steps", "max_grad_norm"):
        assert getattr(tr, f"fake_score_{key}") is None, key
    # the student's values are still set
    assert tr.learning_rate == pytest.approx(1e-4)
    # and a set fake_score key is kept, as a float
    cfg = load_config(TINY_DMD2)
    assert cfg.training.fake_score_learning_rate == pytest.approx(1e-3)
    assert cfg.training.fake_score_betas is None


def test_explicit_null_fake_score_key_is_none():
    cfg = build_config(with_changes(("training.fake_score_learning_rate", None)))
    assert cfg.training.fake_score_learning_rate is None


def test_cfg_convention_cond_plus_adds_one():
    cfg = build_config(with_changes(("method_config.cfg_convention", "cond_plus")))
    m = cfg.method_config
    assert m.cfg_convention == "cond_plus"
    assert m.standard_guidance_scale == m.real_score_guidance_scale + 1
    assert m.standard_guidance_scale == pytest.approx(4.5)

    std = build_config(base_raw()).method_config
    assert std.cfg_convention == "standard"
    assert std.standard_guidance_scale == std.real_score_guidance_scale == pytest.approx(3.5)


def test_boundary_values_are_accepted():
    cfg = build_config(
        with_changes(
            ("method_config.dmd_denoising_steps", [1000, 0]),
            ("method_config.min_timestep_ratio", 0.5),
            ("method_config.max_timestep_ratio", 0.5),
            ("method_config.generator_update_interval", 1),
            ("method_config.rollout_mode", "data_latent"),
        )
    )
    assert cfg.method_config.dmd_denoising_steps == [1000, 0]
    assert cfg.method_config.generator_update_interval == 1


def test_the_model_speed_settings_are_accepted_and_default_to_today_s_behaviour():
    default = build_config(base_raw()).model
    assert (default.checkpoint_every, default.attention_backend, default.compile) == (1, None, False)
    assert default.checkpoint_save == []
    model = build_config(with_changes(("model.gradient_checkpointing", True),
                                      ("model.checkpoint_save", ["attention", "matmul"]))).model
    assert model.checkpoint_save == ["attention", "matmul"]
    assert (default.compile_mode, default.compile_backend) == (None, "inductor")
    model = build_config(with_changes(
        ("model.gradient_checkpointing", True), ("model.checkpoint_every", 3), ("model.attention_backend", "_native_cudnn"),
        ("model.compile", True), ("model.compile_mode", "max-autotune-no-cudagraphs"),
    )).model
    assert (model.checkpoint_every, model.attention_backend, model.compile_mode) == (3, "_native_cudnn",
                                                                                    "max-autotune-no-cudagraphs")
    model = build_config(with_changes(("model.compile", True), ("model.compile_backend", "aot_eager"))).model
    assert model.compile and model.compile_backend == "aot_eager" and model.compile_mode is None
    assert (default.vae_channels_last, default.vae_compile) == (False, False)
    model = build_config(with_changes(("model.pixel_space", False), ("model.vae_channels_last", True),
                                      ("model.vae_compile", True), ("model.compile_mode", "max-autotune"))).model
    assert model.vae_channels_last and model.vae_compile and not model.compile and model.compile_mode == "max-autotune"
    assert default.compile_options == {}


def test_compile_takes_the_mode_the_options_and_the_settings_for_sound_gradients_as_one_set():
    """torch.compile refuses a mode with options; distill passes the mode as its settings, then the settings that
    training needs (mix-order reductions off: wrong gradients on an H200), then the config's own, which win."""
    from distill.models.compiling import SOUND_GRADIENTS, compile_kwargs

    def kwargs(*changes):
        return compile_kwargs(build_config(with_changes(("model.compile", True), *changes)).model)

    assert kwargs() == {"backend": "inductor", "options": SOUND_GRADIENTS}
    assert kwargs(("model.compile_mode", "max-autotune-no-cudagraphs"),
                  ("model.compile_options", {"split_reductions": False, "triton.mix_order_reduction": True})) == {
        "backend": "inductor", "options": {"max_autotune": True, "coordinate_descent_tuning": True,
                                           "split_reductions": False, "triton.mix_order_reduction": True}}
    assert kwargs(("model.compile_backend", "aot_eager")) == {"backend": "aot_eager"}


def test_method_config_defaults_when_omitted():
    cfg = build_config(with_changes(("method_config", DELETE)))
    assert cfg.method_config == DMD2Config()


def test_flow_matching_config_loads_with_one_role():
    raw = with_changes(("method", "flow_matching"), ("method_config", {"role": "teacher", "cond_dropout": 0.2}))
    raw["roles"] = {"teacher": {"trainable": True}}
    cfg = build_config(raw)
    assert cfg.method == "flow_matching"
    assert cfg.method_config.role == "teacher" and cfg.method_config.cond_dropout == pytest.approx(0.2)
    # DMD2 keys are unknown to flow_matching's method_config
    raw["method_config"]["rollout_mode"] = "simulate"
    with pytest.raises(ConfigError, match=r"method_config\.rollout_mode"):
        build_config(raw)


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def test_cli_check_config_ok(capsys):
    assert cli.main(["check-config", str(TINY_DMD2)]) == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out)
    assert resolved["method"] == "dmd2"
    assert resolved["method_config"]["dmd_denoising_steps"] == [1000, 750, 500, 250]
    assert resolved["training"]["fake_score_betas"] is None


def test_cli_check_config_with_set(capsys):
    assert cli.main(["check-config", str(TINY_DMD2), "--set", "training.learning_rate=1e-5"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["training"]["learning_rate"] == 1e-05


def test_cli_check_config_bad(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(with_changes(("method_config.rollout_mod", "simulate"))))
    assert cli.main(["check-config", str(bad)]) == 2
    captured = capsys.readouterr()
    assert "config error" in captured.err
    assert "method_config.rollout_mod" in captured.err
    assert captured.out == ""


def test_cli_check_config_bad_override(capsys):
    assert cli.main(["check-config", str(TINY_DMD2), "--set", "training.learning_rate=-1"]) == 2
    assert "training.learning_rate" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(str(p) for p in Path(__file__).parents[1].glob("configs/**/*.yaml")
                                        if "pipeline" not in p.name))
def test_every_example_run_config_loads(path):
    """The configs/ examples (run configs; the flows' pipeline specs are tested with the flows) pass every check."""
    cfg = load_config(path)
    assert cfg.roles and cfg.method
