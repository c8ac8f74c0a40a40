"""DMD2's GAN term: its losses against hand-written references, which role each loss trains, and a real run."""

from __future__ import annotations

import json

import pytest
import torch

from distill.adapter import Batch
from distill.methods.distribution_matching.dmd2 import DMD2
from distill.methods.distribution_matching.gan import critic_gan_loss, generator_gan_loss
from distill.roles import RoleHandle, RoleManager
from distill.training.trainer import Trainer
from test_dmd2 import SHAPE, ConstNet, FakeAdapter, StudentNet
from tiny import LatentDataset, tiny_config


def test_gan_losses_and_gradients_match_reference():
    logits_real = torch.tensor([0.3, -1.2, 2.0], requires_grad=True)
    logits_fake = torch.tensor([-0.5, 0.8, 1.5], requires_grad=True)
    loss = critic_gan_loss(logits_real, logits_fake)
    loss.backward()
    r, f = logits_real.detach().double(), logits_fake.detach().double()
    softplus = lambda x: torch.log1p(torch.exp(x))  # noqa: E731
    torch.testing.assert_close(loss.double(), softplus(f).mean() + softplus(-r).mean())
    torch.testing.assert_close(logits_fake.grad.double(), torch.sigmoid(f) / 3)  # d softplus(x) = sigmoid(x)
    torch.testing.assert_close(logits_real.grad.double(), -torch.sigmoid(-r) / 3)

    fake = torch.tensor([-0.5, 0.8, 1.5], requires_grad=True)
    loss = generator_gan_loss(fake)
    loss.backward()
    torch.testing.assert_close(loss.double(), softplus(-f).mean())
    torch.testing.assert_close(fake.grad.double(), -torch.sigmoid(-f) / 3)


class FeatureAdapter(FakeAdapter):
    """Block features that depend on x_t and on the role's weight w, so every gradient path exists."""

    REAL = 0.7

    def prepare_batch(self, raw, *, latents_source):
        batch = super().prepare_batch(raw, latents_source=latents_source)
        if latents_source == "data":
            batch = Batch(torch.full(SHAPE, self.REAL), batch.prompt_embeds, batch.negative_prompt_embeds, True)
        return batch

    def block_feature_shape(self, handle):
        return 4, SHAPE[1]

    def block_features(self, handle, x_t, t, batch, *, blocks, conditional=True):
        tokens = x_t.flatten(2).transpose(1, 2)  # (B, tokens, C)
        return [tokens * handle.modules["transformer"].w * (i + 1) for i in blocks]


def gan_stack(tmp_path, **method_config):
    cfg = tiny_config(tmp_path, method_config={"rollout_mode": "simulate", "dmd_denoising_steps": [1000, 500],
                                               "generator_update_interval": 1, **method_config},
                      training={"learning_rate": 0.1, "fake_score_learning_rate": 0.2, "max_grad_norm": 0.0},
                      data={"shards": "unused: the test gives batches"})
    roles = RoleManager({
        "student": RoleHandle("student", {"transformer": StudentNet()}, trainable=True),
        "teacher": RoleHandle("teacher", {"transformer": ConstNet(0.8, -0.2).requires_grad_(False)}, trainable=False),
        "critic": RoleHandle("critic", {"transformer": ConstNet(0.1, 0.0)}, trainable=True),
    })
    method = DMD2(cfg, roles, FeatureAdapter())
    method.build()
    return method, roles


def test_the_head_learns_only_from_the_critic_s_loss_and_the_student_only_from_its_own(tmp_path):
    method, roles = gan_stack(tmp_path, gan_critic_weight=0.5, gan_generator_weight=0.25, gan_blocks=[1, -1])
    head = roles["critic"].modules["gan_head"]
    assert method.gan_blocks == [1, 3] and method.latents_source(method.method_cfg) == "data"
    seen = {}

    def spy(roles, role, name):
        """Note both trainable roles' gradients around `role`'s backward."""
        handle = roles[role]
        backward = handle.backward

        def grads(of):
            return [None if p.grad is None else p.grad.clone() for p in roles[of].parameters()]

        def wrapped(loss):
            seen[f"{name}: student grads before"] = grads("student")
            backward(loss)
            seen[f"{name}: critic grads"], seen[f"{name}: student grads"] = grads("critic"), grads("student")
        handle.backward = wrapped

    spy(roles, "student", "student")
    spy(roles, "critic", "critic")
    metrics = method.train_step({}, 0)
    # The student's loss (DMD + GAN) reaches no critic or head weight; the student's grads are its own.
    assert all(g is None for g in seen["student: critic grads"])
    assert all(g is not None for g in seen["student: student grads"])
    # The critic's loss (flow matching + GAN) trains critic and head, and no student weight.
    assert all(g is None for g in seen["critic: student grads before"] + seen["critic: student grads"])
    head_grads = seen["critic: critic grads"][-len(list(head.parameters())):]
    assert all(g is not None and g.abs().sum() > 0 for g in head_grads)
    assert {"gan_critic_loss", "gan_generator_loss", "dmd_loss", "critic_flow_loss", "d_real", "d_fake"} <= set(metrics)
    assert metrics["generator_loss"] == pytest.approx(metrics["dmd_loss"] + 0.25 * metrics["gan_generator_loss"])
    assert metrics["critic_loss"] == pytest.approx(metrics["critic_flow_loss"] + 0.5 * metrics["gan_critic_loss"])

    # The GAN term changes the student's gradient (it reaches the student through critic and head).
    gan_grads = seen["student: student grads"]
    plain, plain_roles = gan_stack(tmp_path, gan_critic_weight=0.5, gan_generator_weight=0.0, gan_blocks=[1, -1])
    spy(plain_roles, "student", "plain student")
    plain.train_step({}, 0)
    assert not torch.equal(seen["plain student: student grads"][0], gan_grads[0])


def gan_ema_run(run_dir) -> Trainer:
    cfg = tiny_config(run_dir, method_config={"generator_update_interval": 2, "gan_critic_weight": 0.01,
                                              "gan_generator_weight": 0.005, "ema_decay": 0.9, "gan_blocks": [0]},
                      model={"gradient_checkpointing": True},
                      training={"max_steps": 4, "batch_size": 2}, validation={"every": 4, "seeds": [0]},
                      data={"shards": "unused: the test gives the data set", "num_frames": 1})
    return Trainer(cfg, dataset=LatentDataset("pixels", (3, 1, 16, 16)))


def test_gan_and_ema_train_a_tiny_wan_student_in_the_engines(run_dir, tmp_path, monkeypatch):
    """With activation checkpointing: the critic stays frozen through the student's backward, where its
    checkpointed blocks are recomputed (a critic unfrozen by then would recompute them differently). The
    classifier reads block 0 of 2, so its forwards stop early: the run equals one with full forwards."""
    trainer = gan_ema_run(run_dir)
    head = trainer.roles["critic"].modules["gan_head"]
    assert trainer.roles["critic"].engine.module["gan_head"] is head
    before = [p.detach().clone() for p in head.parameters()]
    history = trainer.train()
    assert all(h["gan_critic_loss"] > 0 and 0 < h["d_real"] < 1 for h in history)
    assert any("gan_generator_loss" in h for h in history)
    assert any(not torch.equal(a, b) for a, b in zip(before, head.parameters()))  # the head trained
    manifest = json.loads((run_dir / "checkpoints" / "step-000004" / "MANIFEST.json").read_text())
    assert manifest["method"]["weights"] == "ema" and manifest["export_modules"] == ["transformer"]
    meta = json.loads((run_dir / "validation" / "step-000004" / "meta.json").read_text())
    assert meta["role"] == "student-ema"

    monkeypatch.setattr("distill.models.base._partitions_weights", lambda handle: True)  # no early stop
    full = gan_ema_run(tmp_path / "full").train()
    assert [{k: v for k, v in h.items() if k != "seconds_per_iteration" and "seconds" not in k} for h in full] == \
        [{k: v for k, v in h.items() if k != "seconds_per_iteration" and "seconds" not in k} for h in history]
