"""Checkpoints that resume on another number of ranks: `distill reshard` (DeepSpeed's universal checkpoints)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from distill.data.loader import BatchLoader
from distill.run_layout import CheckpointError
from distill.training.reshard import check_resumable, engine_tag, read_by
from test_distributed import launch, launcher_env
from tiny import tiny_raw

DRIVER = Path(__file__).parent / "drivers" / "reshard.py"
SAVED_STEPS, RESUMED_STEPS = 3, 6


def alone(*args: str, status: int = 0) -> subprocess.CompletedProcess:
    """One rank, without the launcher."""
    proc = subprocess.run([sys.executable, *args], env=launcher_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == status, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def train(out: Path, stage: int, steps: int, ranks: int, *flags: str) -> None:
    args = (str(DRIVER), str(out), str(stage), str(steps), *flags)
    launch(*args, ranks=ranks) if ranks > 1 else alone(*args)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.cli", *args], env=launcher_env(), capture_output=True,
                          text=True, timeout=300)


def assert_same_state(saved: dict, resumed: dict) -> None:
    assert resumed["iteration"] == saved["iteration"] == SAVED_STEPS
    assert resumed["weights"].keys() == saved["weights"].keys() and len(saved["weights"]) > 20
    for name, kinds in saved["weights"].items():
        for kind, value in kinds.items():
            assert torch.equal(resumed["weights"][name][kind], value), (name, kind)
    for name, value in resumed["module"].items():  # what the forward reads: the whole fp32 weights
        assert torch.equal(value, saved["weights"][name]["fp32"]), name
    assert resumed["adam_steps"] == saved["adam_steps"] == {"student": [2.0], "critic": [3.0]}
    assert resumed["schedules"] == saved["schedules"] == {"student": 2, "critic": 3}
    if "ema" in saved:
        for key, value in saved["ema"].items():
            assert torch.equal(resumed["ema"][key], value), key


@pytest.mark.multirank
@pytest.mark.parametrize("stage, flags", [(2, ()), (3, ()), (1, ("--lora",))], ids=["2", "3", "1-lora"])
def test_a_resharded_checkpoint_of_two_ranks_resumes_on_one(tmp_path, stage, flags):
    """2 ranks save; resuming on 1 is refused, naming `distill reshard`; after it, 1 rank resumes with the same whole
    weights, Adam moments and step counts, schedules (and EMA), the data position carried over, and trains on. With
    LoRA roles, their adapters are the engines' state (the base is the teacher's)."""
    run = tmp_path / "run"
    train(tmp_path, stage, SAVED_STEPS, 2, *flags)
    checkpoint = run / "checkpoints" / f"step-{SAVED_STEPS:06d}"

    if stage == 2:  # the refusal end to end once (the same check at every stage: test_which_checkpoints_resume...)
        refused = alone(str(DRIVER), str(tmp_path), str(stage), str(RESUMED_STEPS), "--resume", status=3)
        assert (f"refused: {checkpoint}: saved by 2 ranks, this run has 1; under ZeRO stage 2 each rank saved its "
                f"own part of the optimizer states. `distill reshard {checkpoint}` adds states") in refused.stderr

    before = json.loads((checkpoint / "MANIFEST.json").read_text())
    done = cli("reshard", str(run / "checkpoints" / "latest"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1].startswith(f"{checkpoint}: universal engine states of student, critic added")
    manifest = json.loads((checkpoint / "MANIFEST.json").read_text())
    assert manifest["universal"] is True and manifest["world_size"] == 2
    added = {k: r for k, r in manifest["files"].items() if k not in before["files"]}
    assert {k.split("/")[1] for k in added} == {"critic", "student"}
    assert all(k.split("/")[2] == "universal" for k in added)
    assert {k: manifest["files"][k] for k in before["files"]} == before["files"]  # the original states stay
    assert not (checkpoint / ".reshard").exists()
    assert "already" in cli("reshard", str(checkpoint)).stdout

    train(tmp_path, stage, RESUMED_STEPS, 1, "--resume", *flags)
    saved, resumed = (torch.load(tmp_path / f"{kind}.pt") for kind in ("saved", "resumed"))
    assert_same_state(saved, resumed)
    if stage < 3:  # the GAN head converts with the critic's engine; the EMA lives in the exported modules
        assert any(k.startswith("critic.gan_head.") for k in saved["weights"]) and "ema" in saved
    if flags:
        assert all("lora_" in k for k in saved["weights"] if k.startswith("student."))
    # 2 ranks drew 2 samples each of a 3-sample epoch (the second rank's second one a padding repeat): epoch 0 done,
    # then the first sample of epoch 1 each, i.e. 2 of epoch 1; one rank goes on at its 3rd
    assert saved["loader"] == {"epoch": 1, "offset": 1} and resumed["loader"] == {"epoch": 1, "offset": 2}
    rows = json.loads((tmp_path / "resumed.json").read_text())["history"]
    assert [r["step"] for r in rows] == [4, 5, 6]
    assert all(math.isfinite(r["critic_loss"]) for r in rows)
    assert any(math.isfinite(r.get("generator_loss", math.nan)) for r in rows)  # the student trained on too


def assert_grown(tmp_path: Path) -> None:
    """A checkpoint of one rank (2 iterations) resumed on two: the same state, the data position carried over."""
    saved, resumed = (torch.load(tmp_path / f"{kind}.pt") for kind in ("saved", "resumed"))
    for name, kinds in saved["weights"].items():
        for kind, value in kinds.items():
            assert torch.equal(resumed["weights"][name][kind], value), (name, kind)
    assert resumed["adam_steps"] == saved["adam_steps"] == {"student": [1.0], "critic": [2.0]}
    assert resumed["schedules"] == saved["schedules"] == {"student": 1, "critic": 2}
    # one rank drew samples 0 and 1 of the epoch; two ranks go on from sample 2 (the second a padding repeat)
    assert saved["loader"] == {"epoch": 0, "offset": 2} and resumed["loader"] == {"epoch": 0, "offset": 1}
    result = json.loads((tmp_path / "resumed.json").read_text())
    assert result["ranks"] == 2 and [r["step"] for r in result["history"]] == [3, 4, 5, 6]
    assert all(math.isfinite(r["critic_loss"]) for r in result["history"])


@pytest.mark.slow  # about a minute: some 1,900 requests to the loopback S3 server
@pytest.mark.multirank
def test_a_resharded_checkpoint_of_one_rank_in_s3_resumes_on_two(tmp_path, s3):
    """ZeRO-2 the other way, in S3: a checkpoint of one rank, resharded (the engine states downloaded, the universal
    ones uploaded, the manifest replaced last), partitioned anew over two ranks that download it. (A reshard in a
    local store is the 2-to-1 tests'.)"""
    train(tmp_path, 2, SAVED_STEPS - 1, 1, "--endpoint", s3.endpoint)
    prefix = f"{tmp_path.name}/checkpoints/step-{SAVED_STEPS - 1:06d}"
    done = cli("reshard", f"s3://{s3.bucket}/{tmp_path.name}/checkpoints/latest", "--endpoint-url", s3.endpoint)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1].startswith(f"s3://{s3.bucket}/{prefix}: universal engine states of student, "
                                                   f"critic added")
    client = s3.client()
    manifest = json.loads(client.get_object(Bucket=s3.bucket, Key=f"{prefix}/MANIFEST.json")["Body"].read())
    stored = {o["Key"].removeprefix(f"{prefix}/"): o["Size"]
              for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=f"{prefix}/")
              for o in page["Contents"]}
    assert manifest["universal"] and {k: r["bytes"] for k, r in manifest["files"].items()} == {
        k: size for k, size in stored.items() if k != "MANIFEST.json"}
    assert any("/universal/zero/" in k for k in stored)

    train(tmp_path, 2, RESUMED_STEPS, 2, "--resume", "--endpoint", s3.endpoint)
    assert_grown(tmp_path)


@pytest.mark.multirank
def test_a_stage_0_checkpoint_resumes_on_another_number_of_ranks_as_it_is(tmp_path):
    """Without ZeRO every rank saved the whole optimizer state: no reshard needed, and it says so."""
    train(tmp_path, 0, SAVED_STEPS, 2)
    said = cli("reshard", str(tmp_path / "run" / "checkpoints" / "latest"))
    assert said.returncode == 0 and "ZeRO stage 0" in said.stdout
    train(tmp_path, 0, RESUMED_STEPS, 1, "--resume")
    saved, resumed = (torch.load(tmp_path / f"{kind}.pt") for kind in ("saved", "resumed"))
    assert_same_state(saved, resumed)


# -- without ranks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 3), (3, 2), (4, 3), (3, 4)])
@pytest.mark.parametrize("size", [7, 12])
def test_the_data_position_carries_over_with_nothing_skipped_and_fewer_repeats_than_ranks(before, after, size):
    """`before` ranks draw some batches of an epoch, `after` ranks draw the rest of it: every sample is seen; drawn
    twice are the epoch's padding to a multiple of `after` and fewer than `after` samples where the counts do not
    divide. A finished epoch goes on with the next one's start."""
    data = [{"i": i} for i in range(size)]
    for batches in range(math.ceil(size / before) + 1):
        old = [BatchLoader(data, 1, rank=r, world_size=before, seed=3) for r in range(before)]
        seen = [int(next(loader)["i"]) for _ in range(batches) for loader in old]
        new = [BatchLoader(data, 1, rank=r, world_size=after, seed=3) for r in range(after)]
        for loader in new:
            loader.load_resharded([loader.state_dict() for loader in old])
        drawn = batches * before
        if drawn >= size:
            assert [loader.state_dict() for loader in new] == [{"epoch": 1, "offset": 0}] * after
            continue
        offset = new[0].offset
        seen += [int(next(loader)["i"]) for _ in range(math.ceil(size / after) - offset) for loader in new]
        assert sorted(set(seen)) == list(range(size)), (batches, seen)
        assert len(seen) - size == (-size) % after + drawn % after, (batches, seen)


def test_loader_states_that_differ_between_ranks_are_refused():
    loader = BatchLoader([0, 1, 2], 1, rank=0, world_size=1, seed=0)
    with pytest.raises(ValueError, match="differ"):
        loader.load_resharded([{"epoch": 0, "offset": 1}, {"epoch": 0, "offset": 2}])


def test_which_checkpoints_resume_on_another_number_of_ranks():
    zero2 = {"world_size": 2, "zero_stage": 2}
    check_resumable(zero2, 2, "ckpt")
    check_resumable({**zero2, "universal": True}, 3, "ckpt")
    check_resumable({"world_size": 2, "zero_stage": 0}, 1, "ckpt")
    with pytest.raises(CheckpointError, match=r"ckpt: saved by 2 ranks, this run has 4; .*`distill reshard ckpt`"):
        check_resumable(zero2, 4, "ckpt")
    for stage in (1, 3):
        with pytest.raises(CheckpointError, match=rf"this run has 1; under ZeRO stage {stage} each rank saved"):
            check_resumable({"world_size": 2, "zero_stage": stage}, 1, "ckpt")
    assert engine_tag(zero2, 2) == engine_tag({**zero2, "universal": True}, 2) == "state"
    assert engine_tag({**zero2, "universal": True}, 1) == "universal"
    assert engine_tag({"world_size": 2, "zero_stage": 0}, 1) == "state"


def test_a_resume_reads_one_kind_of_engine_states():
    records = {"config.yaml": {}, "roles/student/state/mp_rank_00_model_states.pt": {},
               "roles/student/zero_to_fp32.py": {}, "roles/student/universal/zero/w/fp32.pt": {},
               "export/transformer/config.json": {}}
    assert sorted(read_by(records, "state")) == ["config.yaml", "export/transformer/config.json",
                                                 "roles/student/state/mp_rank_00_model_states.pt",
                                                 "roles/student/zero_to_fp32.py"]
    assert sorted(read_by(records, "universal")) == ["config.yaml", "export/transformer/config.json",
                                                     "roles/student/universal/zero/w/fp32.pt",
                                                     "roles/student/zero_to_fp32.py"]


def test_a_conversion_that_fails_names_the_checkpoint_and_role_and_changes_nothing(tmp_path, capsys):
    from distill.cli import main

    checkpoint = tmp_path / "run" / "checkpoints" / "step-000002"
    (checkpoint / "roles" / "student" / "state").mkdir(parents=True)  # no DeepSpeed files in it
    raw = tiny_raw(str(tmp_path / "run"), deepspeed={"zero_optimization": {"stage": 2}})
    (checkpoint / "config.yaml").write_text(yaml.safe_dump(raw))
    manifest = {"format": 3, "name": "step-000002", "step": 2, "world_size": 2, "zero_stage": 2, "roles": ["student"],
                "files": {}}
    (checkpoint / "MANIFEST.json").write_text(json.dumps(manifest))
    assert main(["reshard", str(checkpoint)]) == 2
    said = capsys.readouterr().err.splitlines()[-1]  # after DeepSpeed's own lines
    assert said.startswith(f"distill: input error: {checkpoint} (role 'student'): DeepSpeed's ds_to_universal "
                           f"failed on state/: FileNotFoundError: can't find *_optim_states.pt files"), said
    assert json.loads((checkpoint / "MANIFEST.json").read_text()) == manifest
    assert sorted(p.name for p in checkpoint.iterdir()) == ["MANIFEST.json", "config.yaml", "roles"]
