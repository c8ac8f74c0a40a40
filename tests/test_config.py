"""Strict run-config loading: every bad input fails at load with a ConfigError naming the key path.

CPU only, no network, no models built: these tests only load and check configs.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from distill import cli
from distill.config import Config, ConfigError, build_config, load_config
from distill.methods.distribution_matching.dmd2 import DMD2Config

REPO = Path(__file__).resolve().parents[1]
TINY_DMD2 = REPO / "configs" / "tiny_dmd2.yaml"


def base_raw() -> dict:
    """The content of configs/tiny_dmd2.yaml as a fresh raw mapping."""
    return {
        "run": {"name": "tiny-dmd2", "output": "runs/tiny-dmd2", "seed": 0},
        "model": {"family": "wan", "preset": "tiny", "pixel_space": True, "flow_shift": 3.0, "max_text_length": 32},
        "roles": {
            "teacher": {"trainable": False},
            "student": {"init_from": "teacher", "trainable": True},
            "critic": {"init_from": "teacher", "trainable": True},
        },
        "method": "dmd2",
        "method_config": {
            "rollout_mode": "simulate",
            "dmd_denoising_steps": [1000, 750, 500, 250],
            "warp_denoising_step": True,
            "generator_update_interval": 5,
            "real_score_guidance_scale": 3.5,
            "min_timestep_ratio": 0.02,
            "max_timestep_ratio": 0.98,
        },
        "training": {
            "max_steps": 300,
            "batch_size": 2,
            "learning_rate": 1.0e-4,
            "betas": [0.0, 0.999],
            "weight_decay": 0.01,
            "fake_score_learning_rate": 1.0e-3,
            "max_grad_norm": 1.0,
            "log_every": 10,
        },
        "data": {
            "prompts": [
                "a red circle moving left",
                "a blue square moving right",
                "a green triangle moving up",
                "a yellow circle moving down",
            ],
            "num_frames": 5,
            "height": 32,
            "width": 32,
        },
        "validation": {"every": 100, "seeds": [0, 1], "prompts": ["a red circle moving left", "a blue square moving right"]},
        "deepspeed": {"zero_optimization": {"stage": 2}},
    }


def with_changes(*changes: tuple[str, object]) -> dict:
    """A deep copy of the base config with dotted-path changes; the value DELETE removes the key."""
    raw = copy.deepcopy(base_raw())
    for dotted, value in changes:
        *parents, last = dotted.split(".")
        node = raw
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return raw


DELETE = object()


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
# Bad inputs: each fails at load, naming the key path
# ---------------------------------------------------------------------------------------

BAD = [
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
    pytest.param([("training.learning_rate", float("nan"))], ["training.learning_rate", "> 0"], id="lr-nan"),
    pytest.param([("training.max_grad_norm", float("nan"))], ["training.max_grad_norm", ">= 0"], id="clip-nan"),
    pytest.param([("model.flow_shift", float("nan"))], ["model.flow_shift", "> 0"], id="flow_shift-nan"),
    pytest.param([("method_config.real_score_guidance_scale", float("nan"))],
                 ["method_config.real_score_guidance_scale"], id="guidance-nan"),
    pytest.param([("training.betas", [0.9, 1.0])], ["training.betas"], id="beta-1"),
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
