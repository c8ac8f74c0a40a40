"""Two ranks over gloo, started by the deepspeed launcher as a user would."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import numpy as np

from tiny import tiny_raw

pytestmark = pytest.mark.multirank  # two ranks under the deepspeed launcher

DRIVER = Path(__file__).parent / "drivers" / "two_rank.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env() -> dict:
    """This environment without the process group of a Trainer run in this process earlier (init_distributed
    sets RANK, MASTER_PORT, ...), which a child would try to join."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR")}
    return {**env, "OMP_NUM_THREADS": "1"}


def launch(*args: str, timeout: int = 300, ranks: int = 2) -> subprocess.CompletedProcess:
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable))
    env = launcher_env()
    port = free_port()
    cmd = [launcher, "--num_gpus", str(ranks), "--master_port", str(port), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # DeepSpeed's shared-memory all-reduce buffers (66 MB a rank) are gone once the run ends: none piles up in RAM
    left = [p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*")]
    assert not left, left
    return proc


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory) -> Path:
    """The driver's run under ZeRO-3 with a copy of the teacher on each rank (two tests read it)."""
    out = tmp_path_factory.mktemp("zero3")
    launch(str(DRIVER), str(out), "3")
    return out


@pytest.mark.parametrize("stage", [2, 3])  # ZeRO-3 gathers weights in every forward: a k that differs would hang
def test_two_rank_same_k_and_identical_student_weights(tmp_path, request, stage):
    if stage == 3:
        tmp_path = request.getfixturevalue("zero3_run")
    else:
        launch(str(DRIVER), str(tmp_path), str(stage))
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert seen[0]["world_size"] == seen[1]["world_size"] == 2
    assert len(seen[0]["k"]) == 6 and seen[0]["k"] == seen[1]["k"]
    assert len(set(seen[0]["k"])) > 1  # k really varies between iterations
    assert seen[0]["prompts"] != seen[1]["prompts"]  # each rank trains on its own share of the data

    w0, w1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert w0.keys() == w1.keys()
    for key in w0:
        assert torch.equal(w0[key], w1[key]), key


def test_cli_train_under_the_deepspeed_launcher(tmp_path):
    run_dir = tmp_path / "run"
    raw = tiny_raw(run_dir, training={"max_steps": 4, "log_every": 2}, validation={"every": 4, "seeds": [0]},
                   deepspeed={"zero_optimization": {"stage": 1}})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    proc = launch(shutil.which("distill", path=os.path.dirname(sys.executable)), "train", str(config))
    assert "trained 4 iterations" in proc.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert (run_dir / "validation" / "step-000004" / "contact.png").exists()


def test_a_loss_not_finite_on_one_rank_stops_every_rank_with_the_same_error(tmp_path):
    launch(str(Path(__file__).parent / "drivers" / "nonfinite.py"), str(tmp_path), timeout=240)
    said = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert said[0] == said[1]
    assert said[0] == ("critic_loss is not finite (NaN or Inf) on rank 1 at iteration 2; every rank stops "
                       "before the optimizer step; the run has no checkpoint with finite weights")


@pytest.mark.parametrize("ranks, preset, gan", [(4, "small", False), (2, "tiny", True)])
def test_sequence_parallel_trains_and_samples_as_one_rank_does(tmp_path, ranks, preset, gan):
    """parallel.sequence_parallel_size = all ranks (Ulysses): the same losses, student weights and validation video
    as one rank without it (DMD2 with an EMA, ZeRO-2, student updates every other iteration; without and with the
    GAN head, whose later losses show that its own updates agree too). small: 4 heads, so that 4 ranks can split
    them."""
    from PIL import Image, ImageSequence

    driver = Path(__file__).parent / "drivers" / "sequence_parallel.py"
    extra = ["--gan"] if gan else []
    subprocess.run([sys.executable, str(driver), str(tmp_path / "one"), "1", preset, *extra], env=launcher_env(),
                   check=True, capture_output=True, timeout=300)
    launch(str(driver), str(tmp_path / "split"), str(ranks), preset, *extra, ranks=ranks)
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())

    def video(run: str) -> np.ndarray:
        gif = Image.open(tmp_path / run / "validation" / "step-000004" / "p00-s0.gif")
        return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(gif)]).astype(int)

    for rank in range(ranks):
        split = json.loads((tmp_path / "split" / f"rank{rank}.json").read_text())
        assert [row.keys() for row in split["history"]] == [row.keys() for row in one["history"]]
        for row, ours in zip(one["history"], split["history"]):
            for key in (k for k in row if k.endswith("_loss")):
                assert ours[key] == pytest.approx(row[key], rel=1e-5, abs=1e-6), (rank, key)
        for name, value in one["weights"].items():
            assert split["weights"][name] == pytest.approx(value, rel=1e-5), (rank, name)
    assert np.abs(video("split") - video("one")).max() <= 1


def test_data_parallel_ranks_train_as_one_rank_with_their_global_batch(tmp_path):
    """Two ranks of batch 2 against one of batch 4, with the same random draws (tests/drivers/data_parallel.py): the
    same student, critic (GAN head included) and EMA weights after two student and four critic updates. DeepSpeed
    averages the ranks' gradients; every loss of DMD2 is a mean over its samples, so the average is one rank's."""
    driver = Path(__file__).parent / "drivers" / "data_parallel.py"
    subprocess.run([sys.executable, str(driver), str(tmp_path / "one"), "1"], env=launcher_env(), check=True,
                   capture_output=True, timeout=300)
    launch(str(driver), str(tmp_path / "two"), "2")
    seen = json.loads((tmp_path / "one" / "rank0.json").read_text())
    one, before = seen["weights"], seen["initial"]
    for rank in (0, 1):
        two = json.loads((tmp_path / "two" / f"rank{rank}.json").read_text())["weights"]
        for role in ("student", "critic", "ema"):
            assert two[role].keys() == one[role].keys()
            for name, value in one[role].items():
                assert two[role][name] == pytest.approx(value, rel=1e-5), (rank, role, name)
    moved = [n for n, v in one["student"].items() if v != pytest.approx(before[n], rel=1e-6)]
    assert len(moved) > len(one["student"]) // 2  # the updates really changed the weights that are compared


def test_the_dmd2_step_bench_under_the_launcher_with_sequence_parallelism(tmp_path):
    """The scaling figures' command (scripts/gpu-results.sh scaling) on two gloo ranks: one report, from rank 0,
    that counts the samples of the data-parallel groups (one here: the two ranks split one video)."""
    proc = launch("--module", "distill.bench.dmd2_step", "--preset", "tiny", "--frames", "5", "--height", "32",
                  "--width", "32", "--text-dim", "32", "--iterations", "3", "--warmup", "1",
                  "--output", str(tmp_path / "run"), "--json", str(tmp_path / "step.json"),
                  "--set", "parallel.sequence_parallel_size=2")
    result = json.loads((tmp_path / "step.json").read_text())
    assert result["ranks"] == 2 and result["sequence_parallel_size"] == 2
    assert result["seconds_per_sample"] == pytest.approx(result["mean_seconds_per_iteration"])  # batch 1, one group
    assert proc.stdout.count('"seconds_per_sample"') == 1


def test_a_sharded_teacher_under_zero3_gives_the_replicated_teachers_run(tmp_path, zero3_run):
    """roles.teacher.shard: the frozen teacher's weights partitioned over the ranks (ZeRO-3 without an optimizer);
    the same losses and student weights as with a copy of the teacher on every rank."""
    launch(str(DRIVER), str(tmp_path / "sharded"), "3", "--shard-teacher")
    runs = {"replicated": zero3_run, "sharded": tmp_path / "sharded"}
    seen = {run: json.loads((path / "rank0.json").read_text()) for run, path in runs.items()}
    assert seen["sharded"]["teacher_partitioned"] and not seen["replicated"]["teacher_partitioned"]
    assert seen["sharded"]["k"] == seen["replicated"]["k"]

    def losses(run):
        rows = [json.loads(line) for line in (runs[run] / "metrics.jsonl").read_text().splitlines()]
        return [(row["step"], key, value) for row in rows for key, value in sorted(row.items()) if key.endswith("_loss")]

    sharded, replicated = losses("sharded"), losses("replicated")
    assert [r[:2] for r in sharded] == [r[:2] for r in replicated] and len(sharded) >= 6
    assert [r[2] for r in sharded] == pytest.approx([r[2] for r in replicated], rel=1e-5)
