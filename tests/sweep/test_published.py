"""Nothing lost, nothing bad published: bad inputs and faults fed through the real CLI (`distill.cli.main`).

Each test asserts the one-line error (exit code 2) and that nothing was lost or published: `latest`
unchanged or moved back to finite weights, newer checkpoints kept, metrics.jsonl strict JSON, no
partial output. docs/RELIABILITY.md ("Nothing lost, nothing bad published") has the table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from distill.cli import main as cli_main
from distill.finite import nonfinite_in_safetensors
from distill.roles import RoleHandle
from distill.training.trainer import Trainer
from tiny import PROMPTS, tiny_raw

STEP1, STEP2 = "step-000001", "step-000002"


# -- helpers -----------------------------------------------------------------------------------


def write_config(path: Path, output: Path, **sections) -> Path:
    training = {"max_steps": 2, "checkpoint_every": 1, "log_every": 1, **sections.pop("training", {})}
    path.write_text(yaml.safe_dump(tiny_raw(output, training=training, **sections)))
    return path


def distill(capsys, *argv) -> tuple[int, str]:
    """Exit code and stderr of `distill ARGV`, run in this process."""
    code = cli_main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line_error(err: str, kind: str = "input error") -> str:
    """The one `distill: <kind>: ...` line of stderr; no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("distill: ")]
    assert len(lines) == 1 and lines[0].startswith(f"distill: {kind}: ") and "Traceback" not in err, err[-2000:]
    return lines[0]


def files_of(folder: Path) -> dict[str, str]:
    """Every file under `folder` with the sha256 of its bytes: what 'nothing changed' compares."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def strict_rows(run: Path) -> list[dict]:
    """metrics.jsonl as strict JSON (NaN and Infinity refused)."""
    def refuse(constant):
        raise ValueError(f"metrics.jsonl holds {constant}")

    return [json.loads(line, parse_constant=refuse) for line in (run / "metrics.jsonl").read_text().splitlines()]


def latest(run: Path) -> str | None:
    path = run / "checkpoints" / "latest"
    return path.read_text() if path.exists() else None


def forbid_models(monkeypatch) -> None:
    """Fail the test if anything builds a model plugin (the checks must come before)."""
    def built(*args, **kwargs):
        raise AssertionError("a model plugin was built before the bad input was refused")

    monkeypatch.setattr("distill.registry.get_model", built)


def after_step(monkeypatch, role: str, optimizer_steps: int, change) -> None:
    """Apply `change(handle)` to the role's weights right after its n-th optimizer step."""
    real_step = RoleHandle.step

    def step(self):
        real_step(self)
        if self.name == role and self.optimizer_steps == optimizer_steps:
            with torch.no_grad():
                change(self)

    monkeypatch.setattr(RoleHandle, "step", step)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny run: step-000001 and step-000002 (latest), metrics of steps 1 and 2."""
    tmp = tmp_path_factory.mktemp("trained")
    assert cli_main(["train", str(write_config(tmp / "run.yaml", tmp / "run"))]) == 0
    return tmp / "run"


@pytest.fixture
def run(trained, tmp_path) -> tuple[Path, Path]:
    """A copy of the trained run, and its config."""
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy, write_config(tmp_path / "run.yaml", copy)


# -- 1, 2: non-finite values never reach a published checkpoint -------------------------------


def test_weights_that_turn_nan_stop_the_run_before_they_are_saved(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", run, training={"max_steps": 4})
    after_step(monkeypatch, "critic", 3, lambda h: next(h.parameters()).fill_(float("nan")))  # iteration 2's step
    real_iteration = Trainer.train_iteration
    monkeypatch.setattr(Trainer, "train_iteration", lambda self: {**real_iteration(self), "probe": float("inf")})

    code, err = distill(capsys, "train", config)
    line = one_line_error(err)
    assert code == 2
    assert "weights became non-finite (NaN or Inf) at iteration 2 on rank 0: critic.transformer." in line
    assert "latest is step-000002, the last checkpoint whose weights are finite" in line
    assert latest(run) == STEP2 and not (run / "checkpoints" / "step-000003").exists()
    assert nonfinite_in_safetensors(run / "checkpoints" / STEP2) == []
    rows = strict_rows(run)  # an Inf metric is written as null: still valid JSON
    assert [r["step"] for r in rows] == [1, 2] and all(r["probe"] is None for r in rows)


def test_a_checkpoint_is_never_saved_with_nonfinite_weights(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", run)
    monkeypatch.setattr(Trainer, "check_weights", lambda self: None)  # the per-iteration check missed it
    after_step(monkeypatch, "student", 1, lambda h: next(h.parameters()).fill_(float("inf")))

    code, err = distill(capsys, "train", config)
    line = one_line_error(err)
    assert code == 2
    assert f"{run}/checkpoints/{STEP1}: not saved, weights are not finite (NaN or Inf) on rank 0: student." in line
    assert "the run has no checkpoint with finite weights" in line
    assert latest(run) is None and not (run / "checkpoints").exists()


def test_learning_rate_1e30_withdraws_the_checkpoint_its_weights_blew_up(tmp_path, capsys):
    run = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", run, training={"max_steps": 4, "learning_rate": 1e30,
                                                                "fake_score_learning_rate": 1e30})
    code, err = distill(capsys, "train", config)
    line = one_line_error(err)
    assert code == 2
    assert "critic_loss is not finite (NaN or Inf) on rank 0 at iteration 1" in line
    assert "withdrew step-000001 (weights that give non-finite values); the run has no checkpoint with finite " \
           "weights" in line
    assert latest(run) is None
    assert (run / "checkpoints" / STEP1 / "WITHDRAWN.json").exists()
    assert not (run / "checkpoints" / STEP1 / "MANIFEST.json").exists()
    assert [r["step"] for r in strict_rows(run)] == [1]
    code, err = distill(capsys, "train", config, "--resume")
    assert code == 2 and "no checkpoint to resume from" in one_line_error(err)


def test_after_weights_blow_up_latest_goes_back_to_finite_ones_and_resume_works(tmp_path, capsys, monkeypatch):
    """Weights of 1e30 are finite, so their checkpoint is saved; the next iteration's loss is not: it is withdrawn."""
    run = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", run, training={"max_steps": 4})
    with monkeypatch.context() as patch:
        after_step(patch, "critic", 3, lambda h: [p.mul_(1e30) for p in h.parameters()])
        code, err = distill(capsys, "train", config)
    line = one_line_error(err)
    assert code == 2 and "critic_loss is not finite (NaN or Inf) on rank 0 at iteration 3" in line
    assert "withdrew step-000003 (weights that give non-finite values); latest is step-000002, the last " \
           "checkpoint whose weights are finite" in line
    assert latest(run) == STEP2

    code, err = distill(capsys, "train", config, "--resume")
    assert code == 0, err
    assert latest(run) == "step-000004" and (run / "checkpoints" / "step-000003" / "MANIFEST.json").exists()
    assert [r["step"] for r in strict_rows(run)] == [1, 2, 3, 4]


def test_nonfinite_gradients_are_refused_not_silently_skipped(tmp_path, capsys, monkeypatch, caplog):
    """DeepSpeed (fp32) skips a step whose gradient norm is not finite with a log warning only: a run whose
    gradients stay non-finite would train nothing while looking healthy."""
    caplog.set_level(logging.ERROR, logger="DeepSpeed")  # its warning's handler may hold an earlier test's stderr
    run = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", run, training={"max_steps": 4})
    real_iteration = Trainer.train_iteration

    def iteration(self):
        if self.iteration == 2:
            next(self.roles["critic"].parameters()).register_hook(lambda grad: grad * float("nan"))
        return real_iteration(self)

    monkeypatch.setattr(Trainer, "train_iteration", iteration)
    code, err = distill(capsys, "train", config)
    line = one_line_error(err)
    assert code == 2
    assert "role 'critic': the gradient is not finite (NaN or Inf); its optimizer step was refused" in line
    # The gradient came from step-000002's weights: that checkpoint is not trusted either.
    assert "withdrew step-000002 (weights that give non-finite values); latest is step-000001" in line
    assert latest(run) == STEP1 and [r["step"] for r in strict_rows(run)] == [1, 2]


def poison_export(checkpoint: Path) -> None:
    """NaN in the exported weights, the manifest made to agree (as a checkpoint of an older version would)."""
    from safetensors.torch import load_file, save_file

    path = checkpoint / "export" / "transformer" / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(path))
    next(iter(weights.values())).fill_(float("nan"))
    save_file(weights, str(path), metadata={"format": "pt"})
    manifest = json.loads((checkpoint / "MANIFEST.json").read_text())
    manifest["files"]["export/transformer/diffusion_pytorch_model.safetensors"] = {
        "bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (checkpoint / "MANIFEST.json").write_text(json.dumps(manifest))


def test_export_bench_and_init_from_refuse_nonfinite_weights(run, tmp_path, capsys, monkeypatch):
    folder, _ = run
    checkpoint = folder / "checkpoints" / STEP2
    poison_export(checkpoint)
    forbid_models(monkeypatch)
    said = f"{checkpoint}: its exported weights are not finite (NaN or Inf) in transformer/"

    code, err = distill(capsys, "export", checkpoint, tmp_path / "exported")
    assert code == 2 and said in one_line_error(err) and not (tmp_path / "exported").exists()
    code, err = distill(capsys, "bench", checkpoint, "--out", tmp_path / "report")
    assert code == 2 and said in one_line_error(err) and not (tmp_path / "report").exists()
    student = write_config(tmp_path / "student.yaml", tmp_path / "student",
                           roles={"teacher": {"trainable": False},
                                  "student": {"init_from": str(checkpoint), "trainable": True},
                                  "critic": {"init_from": "teacher", "trainable": True}})
    code, err = distill(capsys, "train", student)
    assert code == 2 and f"roles.student.init_from: {said}" in one_line_error(err)
    assert not (tmp_path / "student").exists()  # the run folder it made is gone


# -- 4: a resume takes only this run's checkpoints and drops nothing unasked --------------------


def test_resume_accepts_only_this_runs_checkpoint_names(run, trained, capsys, monkeypatch):
    folder, config = run
    before = files_of(folder)
    forbid_models(monkeypatch)
    for other in (trained / "checkpoints" / STEP1, f"../../{trained.name}/checkpoints/{STEP1}"):
        code, err = distill(capsys, "train", config, "--resume", other)
        line = one_line_error(err)
        assert code == 2 and f"{other}: not a checkpoint name of the run {folder}" in line
        assert "(step-000001, step-000002, or latest)" in line and "roles.<role>.init_from" in line
    assert files_of(folder) == before
    (folder / "checkpoints" / "latest").write_text(f"../../{trained.name}/checkpoints/{STEP1}")  # a damaged latest
    code, err = distill(capsys, "train", config, "--resume")
    assert code == 2 and f"../../{trained.name}/checkpoints/{STEP1}: not a checkpoint name" in one_line_error(err)


def test_resume_from_an_older_checkpoint_keeps_the_newer_unless_forced(run, capsys, monkeypatch):
    folder, config = run
    before = files_of(folder)
    with monkeypatch.context() as patch:
        forbid_models(patch)
        code, err = distill(capsys, "train", config, "--resume", STEP1)
        line = one_line_error(err)
        assert code == 2
        assert ("--resume step-000001: the run has newer checkpoints (step-000002) that resuming from step-000001 "
                "would drop, with the metrics.jsonl rows after step 1; resume from step-000002, or pass --force") in line
        code, err = distill(capsys, "train", config, "--force")
        assert code == 2 and "--force: only with --resume" in one_line_error(err, "config error")
        # A changed key is refused before anything is built, too.
        code, err = distill(capsys, "train", config, "--resume", "--set", "method_config.real_score_guidance_scale=2")
        assert code == 2 and "method_config.real_score_guidance_scale: 2" in one_line_error(err, "config error")
    assert files_of(folder) == before

    code, err = distill(capsys, "train", config, "--resume", STEP1, "--force")
    assert code == 0 and "--force: dropped the newer checkpoints step-000002" in err
    assert latest(folder) == STEP2 and [r["step"] for r in strict_rows(folder)] == [1, 2]


# -- 8: a checkpoint's files are checked against its manifest before anything is built -----------


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flipped":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    else:
        path.unlink()


@pytest.mark.parametrize("how, said", [
    ("truncated", r"\d+ bytes, MANIFEST.json says \d+ \(truncated or changed\)"),
    ("flipped", r"checksum differs from MANIFEST.json \(the file is damaged or changed\)"),
    ("missing", r"missing \(MANIFEST.json lists it\)"),
], ids=["truncated", "flipped", "missing"])
def test_a_damaged_checkpoint_is_named_with_the_newest_complete_one(run, trained, tmp_path, capsys, monkeypatch,
                                                                    how, said):
    folder, config = run
    checkpoint = folder / "checkpoints" / STEP2
    weights = "export/transformer/diffusion_pytorch_model.safetensors"
    state = "roles/critic/state/mp_rank_00_model_states.pt"
    damage(checkpoint / weights, how)
    damage(checkpoint / state, how)
    before = files_of(folder)
    forbid_models(monkeypatch)
    named = f"{checkpoint}/{weights}: "
    newest = "; the newest complete checkpoint of the run is step-000001"

    def refused(*argv) -> str:
        code, err = distill(capsys, *argv)
        line = one_line_error(err)
        assert code == 2 and re.search(said + newest + "$", line), line
        return line

    assert named in refused("train", config, "--resume")
    assert named in refused("export", checkpoint, tmp_path / "exported")
    assert named in refused("bench", checkpoint, "--out", tmp_path / "report")
    student = write_config(tmp_path / "student.yaml", tmp_path / "student",
                           roles={"teacher": {"trainable": False},
                                  "student": {"init_from": str(checkpoint), "trainable": True},
                                  "critic": {"init_from": "teacher", "trainable": True}})
    assert f"roles.student.init_from: {named}" in refused("train", student)
    assert files_of(folder) == before and latest(folder) == STEP2
    assert not any((tmp_path / name).exists() for name in ("exported", "report", "student"))

    # The exported weights intact again: a resume still names the damaged engine state.
    shutil.copy(trained / "checkpoints" / STEP2 / weights, checkpoint / weights)
    assert f"{checkpoint}/{state}: " in refused("train", config, "--resume")


# -- 7: shards are verified before training; a shard damaged later costs no work ----------------


@pytest.fixture
def shard_run(tmp_path, capsys) -> tuple[Path, Path, Path]:
    """Prompt-only shards of one prompt each (shard-00000..00002), and a run config training on them."""
    data = {"prompts": PROMPTS, "prompt_only": True, "shards": str(tmp_path / "shards"), "shard_size": 1}
    config = write_config(tmp_path / "run.yaml", tmp_path / "run", data=data,
                          training={"max_steps": 6, "checkpoint_every": 0})
    assert cli_main(["preprocess", str(config)]) == 0
    capsys.readouterr()
    return tmp_path / "shards", tmp_path / "run", config


def test_a_damaged_shard_is_found_before_training_and_the_run_folder_goes(shard_run, capsys, monkeypatch):
    shards, run, config = shard_run
    monkeypatch.setattr("distill.models.base.ModelPlugin.build_roles",
                        lambda *a, **k: pytest.fail("roles built before the shards were verified"))
    for name in ("shard-00002.safetensors", "negative.safetensors"):
        intact = (shards / name).read_bytes()
        damage(shards / name, "flipped")
        code, err = distill(capsys, "train", config)
        assert code == 2
        assert f"{shards}/{name}: checksum differs from MANIFEST.json (the file changed or is damaged)" \
            in one_line_error(err)
        assert not run.exists()  # the run folder it made is removed: a failed start leaves nothing behind
        (shards / name).write_bytes(intact)


def test_a_shard_damaged_mid_run_is_checkpointed_before_stopping(shard_run, capsys, monkeypatch):
    shards, run, config = shard_run
    intact = {p: p.read_bytes() for p in shards.glob("shard-*.safetensors")}
    real_iteration = Trainer.train_iteration

    def iteration(self):
        if self.iteration == 3 and not getattr(self, "damaged", False):  # after training started: every shard
            self.damaged = True
            for path in intact:
                damage(path, "flipped")
        return real_iteration(self)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_iteration", iteration)
        code, err = distill(capsys, "train", config)
    line = one_line_error(err)
    stopped = latest(run)
    assert code == 2 and "checksum differs from MANIFEST.json" in line
    assert f"saved {stopped} before stopping: restore the shard, then resume with --resume" in line
    assert stopped in ("step-000003", "step-000004", "step-000005")
    assert [r["step"] for r in strict_rows(run)] == list(range(1, int(stopped[-1]) + 1))

    for path, data in intact.items():
        path.write_bytes(data)
    code, err = distill(capsys, "train", config, "--resume")
    assert code == 0, err
    assert latest(run) == "step-000006" and [r["step"] for r in strict_rows(run)] == [1, 2, 3, 4, 5, 6]


# -- more of the same kinds, found by sweeping ----------------------------------------------------


def test_a_metrics_line_cut_short_by_a_kill_does_not_stop_the_resume(run, capsys):
    folder, _ = run
    with (folder / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "critic_lo')  # the process died mid-write
    config = write_config(folder.parent / "longer.yaml", folder, training={"max_steps": 3})
    code, err = distill(capsys, "train", config, "--resume")
    assert code == 0, err
    assert [r["step"] for r in strict_rows(folder)] == [1, 2, 3]


def test_a_run_in_s3_leaves_no_temporary_folder_and_checks_shards_by_etag(tmp_path, s3, capsys, monkeypatch):
    """Without storage.local_dir a remote run works in a temporary folder: removed when done or failed. A shard
    object replaced in the bucket (same size) is refused by its ETag before training, with no download."""
    import tempfile

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    root = f"s3://{s3.bucket}/published-{tmp_path.name}"
    data = {"prompts": PROMPTS, "prompt_only": True, "shards": f"{root}/shards", "shard_size": 1}
    storage = {"endpoint_url": s3.endpoint, "retries": 2, "backoff_seconds": 0.05}
    config = write_config(tmp_path / "run.yaml", f"{root}/run", data=data, storage=storage)
    code, err = distill(capsys, "preprocess", config)
    assert code == 0, err
    assert cli_main(["train", str(config)]) == 0
    assert f"run folder: {root}/run;" in capsys.readouterr().out  # the store, not a temporary folder
    ours = lambda: sorted(p.name for p in (tmp_path / "tmp").glob("distill-*"))  # noqa: E731
    assert ours() == []  # no distill-run-*, distill-preprocess-*

    client, key = s3.client(), f"{root.split('/', 3)[3]}/shards/shard-00001.safetensors"
    body = client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    client.put_object(Bucket=s3.bucket, Key=key, Body=body[:-1] + bytes([body[-1] ^ 0xFF]))
    code, err = distill(capsys, "train", config, "--set", f"run.output={root}/run2")
    assert code == 2
    assert f"{root}/shards/shard-00001.safetensors: checksum differs from MANIFEST.json" in one_line_error(err)
    assert ours() == []
    assert "Contents" not in client.list_objects_v2(Bucket=s3.bucket, Prefix=f"{key.split('/')[0]}/run2")

    # Preprocessing again (the manifest gone) does not take the replaced object for a finished shard.
    client.delete_object(Bucket=s3.bucket, Key=key.replace("shard-00001.safetensors", "MANIFEST.json"))
    code, err = distill(capsys, "preprocess", config)
    assert code == 0, err
    assert client.get_object(Bucket=s3.bucket, Key=key)["Body"].read() == body
