"""The trainer with real DeepSpeed engines (one process, gloo) over tiny random Wan roles."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from distill.adapter import BatchError
from distill.cli import main as cli_main
from distill.config import ConfigError
from distill.training.metrics import read_metrics
from distill.training.trainer import Trainer
from tiny import LatentDataset, tiny_config


def snapshot(handle) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in handle.modules["transformer"].state_dict().items()}


def changed(before: dict, handle) -> bool:
    after = handle.modules["transformer"].state_dict()
    return any(not torch.equal(before[k], after[k]) for k in before)


def test_teacher_frozen_student_every_interval_critic_every_iteration(run_dir):
    cfg = tiny_config(run_dir, method_config={"generator_update_interval": 3}, training={"max_steps": 7})
    trainer = Trainer(cfg)
    teacher, student, critic = (trainer.roles[n] for n in ("teacher", "student", "critic"))
    teacher_start = snapshot(teacher)
    assert student.engine is not None and critic.engine is not None and teacher.engine is None
    assert not any(p.requires_grad for p in teacher.parameters())

    for it in range(7):
        s, c = snapshot(student), snapshot(critic)
        metrics = trainer.train_iteration()
        assert changed(s, student) == (it % 3 == 0), f"student at iteration {it}"
        assert changed(c, critic), f"critic at iteration {it}"
        assert metrics["updated_student"] == float(it % 3 == 0)
        assert all(p.grad is None for p in teacher.parameters())

    assert student.engine.global_steps == 3 and critic.engine.global_steps == 7
    for k, v in teacher.modules["transformer"].state_dict().items():
        assert torch.equal(v, teacher_start[k]), k


def test_gradient_accumulation_steps_once_per_iteration(run_dir):
    cfg = tiny_config(run_dir, training={"max_steps": 4, "gradient_accumulation_steps": 2},
                      method_config={"generator_update_interval": 2})
    trainer = Trainer(cfg)
    for _ in range(4):
        metrics = trainer.train_iteration()
        assert metrics["critic_grad_norm"] > 0
    assert trainer.roles["critic"].engine.global_steps == 4
    assert trainer.roles["student"].engine.global_steps == 2


def test_lr_schedule_runs_through_the_engine(run_dir):
    cfg = tiny_config(run_dir, training={"max_steps": 4, "lr_scheduler": "linear", "learning_rate": 1e-3,
                                         "fake_score_learning_rate": 2e-3},
                      method_config={"generator_update_interval": 1})
    trainer = Trainer(cfg)
    lrs = [trainer.train_iteration()["critic_lr"] for _ in range(3)]
    assert lrs[0] > lrs[1] > lrs[2] > 0
    assert trainer.roles["student"].lr < 1e-3


def test_each_role_s_schedule_ends_with_the_run_in_its_own_steps(run_dir):
    """With the student updating every 5th iteration, a cosine schedule still reaches 0 at the last student
    update (it counts student steps: 0, 5, 10, 15 of 20 iterations), and warms up over the same iterations."""
    cfg = tiny_config(run_dir, training={"max_steps": 20, "lr_scheduler": "cosine", "learning_rate": 1e-3,
                                         "fake_score_learning_rate": 2e-3, "warmup_steps": 5},
                      method_config={"generator_update_interval": 5})
    trainer = Trainer(cfg)
    student, critic = trainer.roles["student"], trainer.roles["critic"]
    student_lrs = []
    for _ in range(20):
        values = trainer.train_iteration()
        if values["updated_student"]:
            student_lrs.append(student.lr)
    # 4 student steps: 1 of warm-up (ceil(5 / 5)), then cosine over the other 3, ending at 0.
    assert student.optimizer_steps == 4 and critic.optimizer_steps == 20
    assert student_lrs[0] == pytest.approx(1e-3)  # the warm-up step done
    assert student_lrs[-1] == pytest.approx(0.0, abs=1e-12) and critic.lr == pytest.approx(0.0, abs=1e-12)
    assert student_lrs[1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 3)))


def test_data_latent_without_latents_fails_before_models_are_built(run_dir, monkeypatch):
    cfg = tiny_config(run_dir, method_config={"rollout_mode": "data_latent"})
    built = []
    monkeypatch.setattr("distill.models.base.ModelPlugin.build_roles", lambda self: built.append(1))
    with pytest.raises(ConfigError, match="rollout_mode: data_latent needs 'pixels' from the data, which gives only "
                                          "prompt;.*or change method_config.rollout_mode"):
        Trainer(cfg)
    assert not built


def test_data_latent_batch_without_vae_latent_is_a_clear_error(run_dir):
    cfg = tiny_config(run_dir, model={"pixel_space": False}, data={"num_frames": 5, "height": 16, "width": 16},
                      method_config={"rollout_mode": "data_latent"})
    trainer = Trainer(cfg, dataset=LatentDataset("vae_latent", (4, 2, 2, 2)))
    with pytest.raises(BatchError, match="no 'vae_latent'.*keys: prompt"):
        trainer.method.train_step({"prompt": ["a red circle moving left"]}, 0)


def test_data_latent_trains_on_vae_latents(run_dir):
    cfg = tiny_config(run_dir, model={"pixel_space": False}, data={"num_frames": 5, "height": 16, "width": 16},
                      method_config={"rollout_mode": "data_latent", "generator_update_interval": 1},
                      training={"max_steps": 3, "batch_size": 2})
    trainer = Trainer(cfg, dataset=LatentDataset("vae_latent", (4, 2, 2, 2)))
    history = trainer.train()
    assert len(history) == 3 and all(h["generator_loss"] > 0 for h in history)


def test_same_seed_same_losses(tmp_path):
    def losses(out):
        cfg = tiny_config(out, training={"max_steps": 6}, method_config={"generator_update_interval": 2})
        return [(h["critic_loss"], h.get("generator_loss")) for h in Trainer(cfg).train()]

    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_flow_matching_fits_fixed_data_and_validates(run_dir):
    cfg = tiny_config(run_dir, method="flow_matching", training={"max_steps": 100, "learning_rate": 3e-3, "log_every": 25},
                      method_config={"cond_dropout": 0.0, "validation_steps": 3, "validation_guidance_scale": 2.0},
                      validation={"every": 100, "seeds": [0]})
    trainer = Trainer(cfg, dataset=LatentDataset("pixels", (3, 1, 16, 16), n=2))
    history = trainer.train()
    assert history[-1]["flow_matching_loss"] < 0.8 * history[0]["flow_matching_loss"]
    meta = json.loads((run_dir / "validation" / "step-000100" / "meta.json").read_text())
    assert meta["sampler_kind"] == "ode" and len(meta["timesteps"]) == 3
    assert meta["function_evaluations_per_video"] == 6  # CFG: two passes per step


def test_cli_train_writes_metrics_config_and_validation_videos(run_dir, tmp_path, capsys):
    import yaml

    from tiny import tiny_raw

    raw = tiny_raw(run_dir, training={"max_steps": 10, "log_every": 5},
                   validation={"every": 5, "seeds": [0, 1], "prompts": ["a red circle moving left"]})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli_main(["train", str(path), "--set", "method_config.generator_update_interval=2"]) == 0
    printed = capsys.readouterr().out
    assert "trained 10 iterations" in printed
    # No terminal here: a progress line every log_every iterations, with the headline losses, speed and time left.
    lines = [line for line in printed.splitlines() if line.startswith("train ")]
    assert len(lines) == 2
    assert re.fullmatch(r"train 5/10 \(50%\) \| critic_loss [\d.e-]+ generator_loss [\d.e-]+ \| [\d.e-]+ s/it \| ETA \d+s",
                        lines[0]), lines[0]
    assert lines[1].startswith("train 10/10 (100%) | ") and " | done in " in lines[1]

    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [5, 10]
    for key in ("generator_loss", "critic_loss", "student_grad_norm", "critic_grad_norm", "student_lr", "critic_lr",
                "updated_student"):
        assert key in rows[0], key
    # TensorBoard: each validation's contact sheet and its videos (an animated GIF) beside the scalars, at its step.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0}).Reload()
    assert "critic_loss" in events.Tags()["scalars"]
    sheets, gifs = events.Images("validation/contact_sheet"), events.Images("validation/videos")
    assert [e.step for e in sheets] == [e.step for e in gifs] == [5, 10]
    assert gifs[0].encoded_image_string[:4] == b"GIF8" and gifs[0].height == 2 * 128  # two videos, 16 px scaled by 8
    assert sheets[0].encoded_image_string[:4] == b"\x89PNG"
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert written["method_config"]["generator_update_interval"] == 2
    for step in ("step-000005", "step-000010"):
        folder = run_dir / "validation" / step
        assert (folder / "contact.png").stat().st_size > 0
        videos = sorted(p.name for p in folder.glob("*.mp4"))
        assert videos == ["p00-s0.mp4", "p00-s1.mp4"]
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["sampler_kind"] == "sde" and meta["timesteps"] == [1000.0, 750.0, 500.0, 250.0]


def test_cli_reports_config_error(tmp_path, capsys):
    import yaml

    from tiny import tiny_raw

    raw = tiny_raw(tmp_path / "run", training={"learning_rate": 0})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli_main(["train", str(path)]) == 2
    assert "training.learning_rate" in capsys.readouterr().err


def test_batched_cfg_gives_the_dmd2_losses_of_two_forwards(tmp_path):
    def history(batched):
        cfg = tiny_config(tmp_path / str(batched), model={"batched_cfg": batched}, training={"max_steps": 4},
                          method_config={"generator_update_interval": 1})
        return Trainer(cfg).train()

    batched, separate = history(True), history(False)
    for a, b in zip(batched, separate):
        for key in ("generator_loss", "critic_loss", "dmd_grad_rms", "real_x0_std"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


def test_optimizer_implementations_give_the_losses_of_the_default(tmp_path):
    def history(implementation):
        cfg = tiny_config(tmp_path / implementation, training={"max_steps": 4, "optimizer_implementation": implementation},
                          method_config={"generator_update_interval": 1})
        trainer = Trainer(cfg)
        for role in ("student", "critic"):  # torch's AdamW arguments: None = its own choice
            defaults = trainer.roles[role].optimizer.defaults
            assert (defaults["foreach"], defaults["fused"]) == {"auto": (None, None), "foreach": (True, None),
                                                                "fused": (None, True)}[implementation]
        return trainer.train()

    default = history("auto")
    for implementation in ("foreach", "fused"):
        for a, b in zip(history(implementation), default):
            for key in ("generator_loss", "critic_loss", "student_grad_norm", "critic_grad_norm"):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (implementation, key)


def test_cpu_ranks_on_one_machine_split_its_cores(monkeypatch):
    """Each of N local ranks takes cores / N threads (torch would give each all of them); OMP_NUM_THREADS wins."""
    from distill.training.distributed import share_cores

    before = torch.get_num_threads()
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        for env, threads in ((("LOCAL_SIZE", "2"), 4), (("LOCAL_WORLD_SIZE", "8"), 1)):  # deepspeed's, torchrun's
            monkeypatch.setenv(*env)
            share_cores()
            assert torch.get_num_threads() == threads, env
            monkeypatch.delenv(env[0])
        torch.set_num_threads(5)
        share_cores()  # one rank: torch's own choice stays
        assert torch.get_num_threads() == 5
        monkeypatch.setenv("LOCAL_SIZE", "4")
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(3)
        share_cores()
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
