"""Checkpoints through the store: exact resume after SIGKILL (local and S3), faults, retention."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from distill.config import ConfigError
from distill.storage import StorageError
from distill.run_layout import CheckpointError
from distill.training.trainer import Trainer
from tiny import tiny_config, tiny_raw

LOSS_KEYS = ("critic_loss", "generator_loss", "critic_grad_norm", "student_grad_norm", "rollout_k", "critic_lr")
STEPS, EVERY = 40, 10


def run_config(tmp_path: Path, output: str, endpoint: str | None = None) -> Path:
    raw = tiny_raw(output, training={"max_steps": STEPS, "checkpoint_every": EVERY, "log_every": 1,
                                     "batch_size": 2, "keep_checkpoints": 2},
                   method_config={"generator_update_interval": 3, "ema_decay": 0.9, "ema_start_step": 2},
                   data={"num_frames": 3, "height": 16, "width": 16})
    if endpoint:
        raw["storage"] = {"endpoint_url": endpoint, "local_dir": str(tmp_path / "work"), "retries": 2,
                          "backoff_seconds": 0.05}
    path = tmp_path / f"run-{abs(hash(output))}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def distill(*args: str, wait: bool = True):
    # A fresh process group: not the one an in-process trainer of an earlier test left in os.environ.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "distill.cli", *args]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def losses(rows: list[dict]) -> list[tuple]:
    return [(r["step"],) + tuple(r.get(k) for k in LOSS_KEYS) for r in rows]


def parse(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def exported_weights(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "export" / "transformer" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The losses of an uninterrupted run, and its final EMA (what its last checkpoint exports)."""
    tmp = tmp_path_factory.mktemp("reference")
    distill("train", str(run_config(tmp, str(tmp / "run"))))
    return SimpleNamespace(losses=losses(parse((tmp / "run" / "metrics.jsonl").read_text())),
                           ema=exported_weights(tmp / "run" / "checkpoints" / f"step-{STEPS:06d}"))


def kill_after_first_checkpoint(config: Path, latest) -> None:
    proc = distill("train", str(config), wait=False)
    deadline = time.time() + 240
    while latest() is None:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_losses_local(tmp_path, reference):
    out = tmp_path / "run"
    config = run_config(tmp_path, str(out))
    latest = out / "checkpoints" / "latest"
    kill_after_first_checkpoint(config, lambda: latest.read_text() if latest.exists() else None)
    killed_at = latest.read_text()
    assert killed_at in ("step-000010", "step-000020", "step-000030")

    with pytest.raises(subprocess.CalledProcessError):  # a fresh start would mix with the checkpoints: refused
        subprocess.run([sys.executable, "-m", "distill.cli", "train", str(config)], check=True, capture_output=True)
    distill("train", str(config), "--resume")
    assert losses(parse((out / "metrics.jsonl").read_text())) == reference.losses
    assert latest.read_text() == "step-000040"
    # The EMA of the student, read back from the checkpoint's export on resume, ends bit for bit the same.
    ema = exported_weights(out / "checkpoints" / "step-000040")
    assert ema.keys() == reference.ema.keys() and all(torch.equal(ema[k], reference.ema[k]) for k in ema)
    assert ema["scale_shift_table"].dtype == torch.float32
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert kept == ["step-000030", "step-000040"]  # keep_checkpoints: 2


@pytest.mark.slow
def test_sigkill_then_resume_from_s3_gives_identical_losses(tmp_path, s3, reference):
    prefix = f"runs/kill-{os.getpid()}"
    config = run_config(tmp_path, f"s3://{s3.bucket}/{prefix}", endpoint=s3.endpoint)
    client = s3.client()

    def latest():
        try:
            return client.get_object(Bucket=s3.bucket, Key=f"{prefix}/checkpoints/latest")["Body"].read().decode()
        except client.exceptions.NoSuchKey:
            return None

    kill_after_first_checkpoint(config, latest)
    proc = distill("train", str(config), "--resume")
    metrics = client.get_object(Bucket=s3.bucket, Key=f"{prefix}/metrics.jsonl")["Body"].read().decode()
    assert losses(parse(metrics)) == reference.losses
    assert latest() == "step-000040"
    assert list((tmp_path / "work").glob(".resume/*")) == []  # the downloaded checkpoint is gone once loaded

    # Credentials appear nowhere: not in output, config, metrics or checkpoint files.
    texts = [proc.stdout, proc.stderr]
    for obj in client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix)["Contents"]:
        if obj["Key"].endswith((".json", ".yaml", ".jsonl", "latest")):
            texts.append(client.get_object(Bucket=s3.bucket, Key=obj["Key"])["Body"].read().decode())
    assert len(texts) > 5
    for text in texts:
        assert s3.secret not in text and s3.key_id not in text


@pytest.mark.slow
def test_store_stopped_mid_upload_fails_clearly_and_latest_stays(tmp_path, monkeypatch):
    from s3_server import start_s3_server

    server = start_s3_server()
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret)
        cfg = tiny_config(f"s3://{server.bucket}/run", training={"max_steps": 4, "checkpoint_every": 2},
                          storage={"endpoint_url": server.endpoint, "local_dir": str(tmp_path / "work"),
                                   "retries": 2, "backoff_seconds": 0.05, "connect_timeout": 1.0,
                                   "read_timeout": 1.0})
        trainer = Trainer(cfg)
        store = trainer.folder.store
        real_put = type(store).put_file

        started = []

        def put_file(self, local, key):  # the 9th file: one of the first 8 in flight (max_concurrency) is up
            if "step-000004/" in key:
                started.append(key)
            if len(started) == 9 and server.process.poll() is None:
                os.kill(server.process.pid, signal.SIGSTOP)  # the server stops answering mid-checkpoint
                self._stopped = True
            return real_put(self, local, key)

        monkeypatch.setattr(type(store), "put_file", put_file)
        # the files go up several at a time: whichever failed first in the folder's order is named
        with pytest.raises(StorageError, match=r"checkpoints/step-000004/\S+: upload failed after 2 attempts"):
            trainer.train()
        assert getattr(store, "_stopped", False)
        os.kill(server.process.pid, signal.SIGCONT)
        client = server.client()
        latest = client.get_object(Bucket=server.bucket, Key="run/checkpoints/latest")["Body"].read().decode()
        assert latest == "step-000002"
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=server.bucket, Prefix="run/checkpoints/step-000004")
                .get("Contents", [])]
        assert keys and "run/checkpoints/step-000004/MANIFEST.json" not in keys  # partial, never published
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
        server.stop()


def test_retention_keeps_newest_and_marked(run_dir):
    cfg = tiny_config(run_dir, training={"max_steps": 6, "checkpoint_every": 1, "keep_checkpoints": 2,
                                         "keep_checkpoint_every": 3})
    trainer = Trainer(cfg)
    trainer.train()
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert names == ["step-000003", "step-000005", "step-000006"]
    assert (run_dir / "checkpoints" / "step-000003" / "KEEP").exists()
    manifest = json.loads((run_dir / "checkpoints" / "step-000006" / "MANIFEST.json").read_text())
    assert manifest["step"] == 6 and manifest["world_size"] == 1 and manifest["export_role"] == "student"
    assert (run_dir / "checkpoints" / "step-000006" / "export" / "transformer" / "config.json").exists()


def test_resume_refusals_name_the_cause(run_dir):
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        Trainer(tiny_config(run_dir), resume="latest")
    Trainer(tiny_config(run_dir, training={"max_steps": 2})).train()
    with pytest.raises(CheckpointError, match="step-000009.*not a complete checkpoint.*step-000002"):
        Trainer(tiny_config(run_dir), resume="step-000009")
    with pytest.raises(ConfigError, match="method_config.real_score_guidance_scale"):
        Trainer(tiny_config(run_dir, method_config={"real_score_guidance_scale": 2.0}), resume="latest")
    with pytest.raises(ConfigError, match="already holds a run \\(checkpoints/"):
        Trainer(tiny_config(run_dir))
    trainer = Trainer(tiny_config(run_dir, training={"max_steps": 3}), resume="latest")
    assert trainer.iteration == 2 and trainer.resumed_from == "step-000002"


def test_how_the_model_runs_may_change_on_resume_and_a_checkpoint_may_predate_its_keys(tmp_path):
    """model.gradient_checkpointing, checkpoint_every, attention_backend and compile* change how the model runs, not
    what it computes: a resume may change them, and a checkpoint written before issue 14 lacks them."""
    from distill.config import to_dict
    from distill.training.checkpoint import _check_same_run

    levers = {"gradient_checkpointing": True, "checkpoint_every": 2, "checkpoint_save": ["attention"],
              "attention_backend": "native", "compile": True,
              "compile_mode": "max-autotune-no-cudagraphs", "compile_backend": "inductor"}
    now = to_dict(tiny_config(tmp_path, model=levers))
    saved = to_dict(tiny_config(tmp_path))
    for key in levers:
        del saved["model"][key]
    _check_same_run(saved, now, "step-000002")
    saved["model"]["flow_shift"] = 5.0
    with pytest.raises(ConfigError, match="model.flow_shift: 3.0 now, 5.0 in the checkpoint step-000002"):
        _check_same_run(saved, now, "step-000002")


def test_speed_levers_may_change_on_resume_and_a_checkpoint_from_before_them_resumes(run_dir):
    from distill.config import to_dict
    from distill.training.checkpoint import _check_same_run

    Trainer(tiny_config(run_dir, model={"batched_cfg": False}, training={"max_steps": 2})).train()
    trainer = Trainer(tiny_config(run_dir, model={"batched_cfg": True},
                                  training={"max_steps": 3, "optimizer_implementation": "fused"}), resume="latest")
    assert trainer.iteration == 2 and trainer.train()[-1]["critic_loss"] > 0  # fused steps from the loaded state
    now = to_dict(tiny_config(run_dir))
    older = json.loads(json.dumps(now))
    del older["model"]["batched_cfg"], older["training"]["optimizer_implementation"]  # written before the keys
    _check_same_run(older, now, "step-000002")
    older["model"]["flow_shift"] = 5.0
    with pytest.raises(ConfigError, match="model.flow_shift: 3.0 now, 5.0 in the checkpoint"):
        _check_same_run(older, now, "step-000002")


def test_a_checkpoint_of_an_older_layout_is_refused_before_any_model_is_built(run_dir, monkeypatch):
    from distill.run_layout import open_checkpoint

    Trainer(tiny_config(run_dir, training={"max_steps": 2})).train()
    path = run_dir / "checkpoints" / "step-000002" / "MANIFEST.json"
    manifest = json.loads(path.read_text())
    del manifest["format"], manifest["sampling"], manifest["method"]  # as the first layout wrote it
    path.write_text(json.dumps(manifest))
    monkeypatch.setattr("distill.models.base.ModelPlugin.build_roles", lambda *a, **k: pytest.fail("built roles"))
    with pytest.raises(CheckpointError, match="step-000002: checkpoint layout 1, this distill reads layout 3 \\(and 2\\)"):
        Trainer(tiny_config(run_dir, training={"max_steps": 3}), resume="latest")
    with pytest.raises(CheckpointError, match="step-000002: checkpoint layout 1, this distill reads layout 3 \\(and 2\\)"):
        open_checkpoint(str(run_dir / "checkpoints" / "step-000002"))
