"""The bad-input sweep: each bad input goes through the real command line (`distill.cli.main`), and
each test asserts both the one-line error (exit code 2, naming the key, file or option) and that
nothing was lost or written (files unchanged, no partial output folder, no model built).

The cases are those of docs/RELIABILITY.md, "Clear errors, early". CPU only, no training except
where a test shows what --overwrite does; a tiny real checkpoint is made once for the module.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
import types
import typing
from pathlib import Path

import pandas as pd
import pytest
import yaml

import distill.methods  # noqa: F401  (registers the methods whose configs are swept)
from distill import registry
from distill.cli import main
from distill.config import DataConfig, ModelConfig, RunConfig, StorageConfig, TrainingConfig, ValidationConfig
from distill.errors import InputError
from tiny import tiny_raw

SECRET = "s3cr3t-pw"


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `distill ARGV`, argument errors (SystemExit) included."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(result: tuple[int, str, str], *names: str) -> str:
    """The error line, after checking exit code 2, a single line on stderr, and that it names each of `names`."""
    code, _, err = result
    lines = err.strip().splitlines()
    assert code == 2, f"exit code {code}, stderr: {err}"
    assert len(lines) == 1, f"not one line:\n{err}"
    for name in names:
        assert name in lines[0], f"{name!r} not in {lines[0]!r}"
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: equal snapshots mean nothing was changed."""
    if not folder.exists():
        return {}
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def no_partial_folders(parent: Path) -> bool:
    """No staging folder (`.NAME.partial-*`) or set-aside earlier output (`.NAME.old-*`) is left in `parent`."""
    return not any(".partial-" in p.name or ".old-" in p.name for p in parent.iterdir())


def write_config(tmp_path: Path, raw: dict | None = None, name: str = "run.yaml", **sections) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw if raw is not None else tiny_raw(tmp_path / "run", **sections)))
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Building a model plugin fails the test: each error must come before any model is built."""

    def built(*args, **kwargs):
        raise AssertionError("a model plugin was built before the error")

    monkeypatch.setattr(registry, "get_model", built)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny real DMD2 checkpoint (one iteration), the only training in this module."""
    from distill.training.trainer import Trainer
    from tiny import tiny_config

    run = tmp_path_factory.mktemp("ckpt") / "run"
    Trainer(tiny_config(run, training={"max_steps": 1})).train()
    return run / "checkpoints" / "step-000001"


# ---------------------------------------------------------------------------------------
# 1. Non-finite numbers in every float key
# ---------------------------------------------------------------------------------------


def float_keys() -> list[tuple[str, str, str, str]]:
    """(method, key, --set value, key the error names) for every float key of the config and method configs."""
    shared = {"run": RunConfig, "model": ModelConfig, "training": TrainingConfig, "data": DataConfig,
              "validation": ValidationConfig, "storage": StorageConfig}
    cases = []
    for method in ("dmd2", "flow_matching"):
        sections = {"method_config": registry.get_method(method).config_cls}
        if method == "dmd2":  # the shared sections once
            sections.update(shared)
        for section, cls in sections.items():
            for f in dataclasses.fields(cls):
                tp = typing.get_type_hints(cls)[f.name]
                options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
                key = f"{section}.{f.name}"
                if float in options:  # float, float | None
                    cases.append((method, key, ".inf", key))
                elif any(typing.get_origin(o) is tuple and float in typing.get_args(o) for o in options):
                    cases.append((method, key, "[.nan, 0.5]", f"{key}[0]"))  # betas
    return cases


FLOAT_KEYS = float_keys()


def test_the_sweep_covers_the_float_keys_of_each_section():
    keys = {key for _, key, _, _ in FLOAT_KEYS}
    assert {"training.learning_rate", "training.betas", "model.flow_shift", "storage.backoff_seconds",
            "method_config.real_score_guidance_scale", "method_config.validation_guidance_scale"} <= keys


@pytest.mark.parametrize("method, key, value, named", FLOAT_KEYS, ids=[f"{m}-{k}" for m, k, _, _ in FLOAT_KEYS])
def test_a_non_finite_number_in_any_float_key_is_refused_naming_it(tmp_path, capsys, method, key, value, named):
    config = write_config(tmp_path, tiny_raw(tmp_path / "run", method=method))
    line = one_line_error(run_cli(capsys, "check-config", config, "--set", f"{key}={value}"), named, "finite")
    assert line.startswith("distill: config error:")


def test_training_with_an_infinite_learning_rate_is_refused_before_anything_is_written(tmp_path, capsys, no_model):
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace("\n  learning_rate: 0.001", "\n  learning_rate: .inf"))
    one_line_error(run_cli(capsys, "train", config), "training.learning_rate", "inf")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------
# 3. A non-empty output (run folder, data set, export folder) is refused unless --overwrite
# ---------------------------------------------------------------------------------------


def earlier_run(run: Path) -> None:
    """What an earlier run left without a checkpoint: its metrics, config, events and validation videos."""
    (run / "tb").mkdir(parents=True)
    (run / "tb" / "events.out.tfevents.1").write_bytes(b"old events")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "critic_loss": 9.0}) + "\n")
    (run / "config.yaml").write_text("run: {name: earlier}\n")
    (run / "validation" / "step-000100").mkdir(parents=True)
    (run / "validation" / "step-000100" / "contact.png").write_bytes(b"png")


def test_a_fresh_run_into_a_folder_holding_an_earlier_run_is_refused(tmp_path, capsys, no_model):
    run = tmp_path / "run"
    earlier_run(run)
    before = snapshot(run)
    line = one_line_error(run_cli(capsys, "train", write_config(tmp_path)), "run.output", str(run), "--overwrite",
                          "--resume")
    assert "metrics.jsonl" in line and "tb/" in line
    assert snapshot(run) == before


def test_overwrite_keeps_the_earlier_run_until_the_models_are_built(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    earlier_run(run)
    before = snapshot(run)

    def fails(*args, **kwargs):
        raise InputError("the model cannot be built")

    monkeypatch.setattr(registry, "get_model", fails)
    one_line_error(run_cli(capsys, "train", write_config(tmp_path), "--overwrite"), "the model cannot be built")
    assert snapshot(run) == before


def test_overwrite_starts_the_run_over_without_the_earlier_files(tmp_path, capsys):
    run = tmp_path / "run"
    earlier_run(run)
    config = write_config(tmp_path, training={"max_steps": 1})
    code, out, err = run_cli(capsys, "train", config, "--overwrite")
    assert code == 0, err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and "critic_loss" in rows[0] and rows[0]["critic_loss"] != 9.0
    assert not (run / "validation").exists() and not (run / "tb" / "events.out.tfevents.1").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["run"]["name"] == "test"


def test_overwrite_never_deletes_an_input_of_the_run(tmp_path, capsys, no_model):
    run = tmp_path / "run"
    (run / "shards").mkdir(parents=True)
    (run / "shards" / "MANIFEST.json").write_text('{"format_version": 1}')
    config = write_config(tmp_path, data={"shards": str(run / "shards")})
    one_line_error(run_cli(capsys, "train", config, "--overwrite"), "run.output", "holds data.shards",
                   "--overwrite would delete")
    assert snapshot(run) == {"shards/MANIFEST.json": b'{"format_version": 1}'}


def test_automated_reruns_start_over_only_an_attempt_of_their_own_config(tmp_path):
    """The pipeline's train task (resume=None) passes --resume where there is a checkpoint, --overwrite where an
    attempt of the same config died before its first one, and neither over another run's files (then refused)."""
    from distill.config import to_dict
    from distill.storage import open_store
    from flows.tasks import start_flags
    from tiny import tiny_config

    run = tmp_path / "run"
    cfg, store = tiny_config(run), open_store(str(run))
    assert start_flags(store, cfg, None) == (False, False)  # a new run
    earlier_run(run)
    assert start_flags(store, cfg, None) == (False, False)  # another run's files: the trainer refuses them
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    assert start_flags(store, cfg, None) == (False, True)  # its own dead attempt: start over
    assert start_flags(store, cfg, False) == (False, False)  # resume=False never overwrites
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest").write_text("step-000002")
    assert start_flags(store, cfg, None) == (True, False)


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
    one_line_error(run_cli(capsys, "train", write_config(tmp_path), "--resume", "--overwrite"),
                   "--overwrite", "--resume")
    assert not (tmp_path / "run").exists()


def test_shapes_over_an_existing_data_set_is_refused_then_replaced_whole(tmp_path, capsys):
    data = tmp_path / "shapes"
    assert run_cli(capsys, "shapes", data, "--count", "2", "--frames", "2")[0] == 0
    before = snapshot(data)
    one_line_error(run_cli(capsys, "shapes", data, "--count", "1", "--frames", "2"), str(data), "not empty",
                   "--overwrite")
    assert snapshot(data) == before
    assert run_cli(capsys, "shapes", data, "--count", "1", "--frames", "2", "--overwrite")[0] == 0
    assert sorted(p.name for p in (data / "videos").iterdir()) == ["000000.mp4"]  # no orphan of the earlier set
    assert len(pd.read_csv(data / "captions.csv")) == 1 and no_partial_folders(tmp_path)


def test_export_into_a_non_empty_folder_is_refused_before_any_model(tmp_path, capsys, checkpoint, no_model):
    out = tmp_path / "exported"
    out.mkdir()
    (out / "stale.bin").write_bytes(b"from an earlier export")
    one_line_error(run_cli(capsys, "export", checkpoint, out), str(out), "not empty", "--overwrite")
    assert snapshot(out) == {"stale.bin": b"from an earlier export"}


def test_export_overwrite_replaces_the_folder_whole(tmp_path, capsys, checkpoint):
    out = tmp_path / "exported"
    out.mkdir()
    (out / "stale.bin").write_bytes(b"from an earlier export")
    latest = checkpoint.parent / "latest"  # a run's checkpoints/latest names its newest checkpoint
    code, printed, err = run_cli(capsys, "export", latest, out, "--overwrite")
    assert code == 0, err
    assert not (out / "stale.bin").exists() and (out / "model_index.json").is_file()
    assert json.loads((out / "distill_export.json").read_text())["step"] == 1 and no_partial_folders(tmp_path)


def test_export_over_the_folder_that_holds_the_checkpoint_is_refused(capsys, checkpoint, no_model):
    run = checkpoint.parent.parent
    before = snapshot(run)
    one_line_error(run_cli(capsys, "export", checkpoint, run, "--overwrite"), str(run),
                   "holds the checkpoint being exported")
    assert snapshot(run) == before


def test_a_failed_export_leaves_no_folder(tmp_path, capsys, checkpoint, monkeypatch):
    from distill.models.wan import WanPlugin

    def half_written(self, modules_folder, out_dir, sampling, *, fuse=False):
        (out_dir / "model_index.json").write_text("{}")
        raise InputError("the export failed half way")

    monkeypatch.setattr(WanPlugin, "export_pipeline", half_written)
    out = tmp_path / "new" / "exported"
    one_line_error(run_cli(capsys, "export", checkpoint, out), "the export failed half way")
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------------
# 5. A key written twice in a YAML file
# ---------------------------------------------------------------------------------------


def test_a_key_written_twice_is_refused_naming_it_and_both_lines(tmp_path, capsys, no_model):
    config = write_config(tmp_path)
    text = config.read_text()
    config.write_text(text + "training:\n  max_steps: 7\n")  # a second `training:` would replace the first
    first = 1 + text.splitlines().index("training:")
    last = len(text.splitlines()) + 1
    for command in ("check-config", "train"):
        one_line_error(run_cli(capsys, command, config), str(config), "training is written twice",
                       f"lines {first} and {last}")
    nested = write_config(tmp_path, name="nested.yaml")
    nested.write_text(nested.read_text().replace("  max_steps: 4\n", "  max_steps: 4\n  max_steps: 8\n"))
    one_line_error(run_cli(capsys, "check-config", nested), "training.max_steps is written twice")
    one_line_error(run_cli(capsys, "check-config", write_config(tmp_path, name="clean.yaml"), "--set",
                           "training={a: 1, a: 2}"),
                   "--set training: a is written twice, on line 1")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------
# 6. init_from (and model.path): a role, an existing folder or checkpoint, s3://, or an explicit hub:<id>
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, value, expected", [
    ("roles.student.init_from", "teachr", ["'teachr' is not a role (", "teacher", "./teachr", "hub:<org>/<name>"]),
    ("roles.student.init_from", "./teachr", ["./teachr: no such folder"]),
    ("roles.teacher.init_from", "runs/none/checkpoints/latest", ["runs/none/checkpoints/latest", "no complete checkpoint"]),
    ("roles.student.init_from", "'hub:'", ["hub: needs a hub id"]),
    ("roles.student.init_from", "https://example.com/w", ["unsupported scheme"]),
    ("model.path", "wan21", ["'wan21' is not a path or a hub id"]),
    ("model.path", "./no-model", ["./no-model: no such folder"]),
    ("model.path", "s3://bucket/model", ["local folder or hub:<id>"]),
], ids=["typo", "missing-folder", "missing-latest", "empty-hub", "http", "model-bare-word", "model-missing",
        "model-s3"])
def test_a_weights_source_that_is_not_there_is_refused_by_check_config_and_train(tmp_path, capsys, no_model, key,
                                                                                 value, expected):
    config = write_config(tmp_path)
    sets = ["--set", f"{key}={value}"] + (["--set", "model.preset=null"] if key == "model.path" else [])
    start = time.monotonic()
    one_line_error(run_cli(capsys, "check-config", config, *sets), key, *expected)
    one_line_error(run_cli(capsys, "train", config, *sets), key, *expected)
    assert time.monotonic() - start < 10  # no hub lookup, no model
    assert not (tmp_path / "run").exists()


def test_an_explicit_hub_id_and_a_checkpoint_pass_check_config(tmp_path, capsys, checkpoint):
    config = write_config(tmp_path)
    code, out, err = run_cli(capsys, "check-config", config, "--set", "roles.student.init_from=hub:Wan-AI/Wan2.1",
                             "--set", f"roles.teacher.init_from={checkpoint.parent / 'latest'}")
    assert code == 0, err
    assert yaml.safe_load(out)["roles"]["student"]["init_from"] == "hub:Wan-AI/Wan2.1"


# ---------------------------------------------------------------------------------------
# 9. bench / compare / export arguments, checked before anything is loaded; outputs staged
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, named", [
    (["--prompts", "0"], "--prompts"),
    (["--seeds", "-1"], "--seeds"),
    (["--metric", "bogus=/x"], "--metric"),
    (["--metric", "clip=/no/such/weights"], "/no/such/weights"),
    (["--teacher-steps", "0"], "--teacher-steps"),
    (["--teacher-guidance", "nan"], "--teacher-guidance"),
    (["--real-videos", "-1"], "--real-videos"),
    (["--training-iterations", "-2"], "--training-iterations"),
    (["--endpoint-url", f"http://user:{SECRET}@host:9000"], "--endpoint-url"),
], ids=["prompts-0", "seeds-negative", "metric-unknown", "metric-no-weights", "teacher-steps-0", "guidance-nan",
        "real-videos-negative", "training-iterations-negative", "endpoint-with-password"])
def test_bench_argument_errors_come_before_anything_is_loaded(tmp_path, capsys, no_model, args, named):
    out = tmp_path / "report"
    line = one_line_error(run_cli(capsys, "bench", tmp_path / "run" / "checkpoints" / "step-000001", "--out", out,
                                  *args), "distill bench: error", named)
    assert SECRET not in line and not out.exists()


def test_bench_of_a_path_that_is_not_a_checkpoint(tmp_path, capsys, no_model):
    folder = tmp_path / "not-a-checkpoint"
    folder.mkdir()
    one_line_error(run_cli(capsys, "bench", folder, "--out", tmp_path / "report"), str(folder), "MANIFEST.json")
    one_line_error(run_cli(capsys, "bench", tmp_path / "run" / "checkpoints" / "latest"), "no complete checkpoint")
    assert not (tmp_path / "report").exists() and not (tmp_path / "run").exists()


def test_bench_outside_a_run_needs_out(tmp_path, capsys, checkpoint, no_model):
    elsewhere = tmp_path / "copied"
    shutil.copytree(checkpoint, elsewhere)
    one_line_error(run_cli(capsys, "bench", elsewhere), str(elsewhere), "pass --out")


def test_bench_into_a_file_or_a_folder_of_other_files_is_refused(tmp_path, capsys, checkpoint, no_model):
    file = tmp_path / "report.txt"
    file.write_text("mine")
    one_line_error(run_cli(capsys, "bench", checkpoint, "--out", file), str(file), "is a file")
    assert file.read_text() == "mine"
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "todo.md").write_text("mine")
    one_line_error(run_cli(capsys, "bench", checkpoint, "--out", folder), str(folder), "not empty")
    assert snapshot(folder) == {"todo.md": b"mine"}


def test_a_failed_bench_leaves_the_earlier_report_and_no_partial_folder(tmp_path, capsys, checkpoint, monkeypatch):
    report = checkpoint.parent.parent / "bench" / checkpoint.name
    report.mkdir(parents=True)
    (report / "report.md").write_text("# the earlier report")

    def half_done(uri, spec, out_dir, storage=None, progress=None):
        (out_dir / "videos").mkdir()
        raise InputError("sampling failed half way")

    monkeypatch.setattr("distill.bench.run.run_bench", half_done)
    one_line_error(run_cli(capsys, "bench", checkpoint), "sampling failed half way")
    assert snapshot(report) == {"report.md": b"# the earlier report"} and no_partial_folders(report.parent)
    shutil.rmtree(report.parent)


def test_bench_reads_the_run_data_before_building_models(tmp_path, capsys, checkpoint, no_model, monkeypatch):
    def gone(*args, **kwargs):
        raise InputError("data/shapes/captions.csv: captions table not found")

    monkeypatch.setattr("distill.bench.inference.bench_data", gone)
    one_line_error(run_cli(capsys, "bench", checkpoint, "--out", tmp_path / "report"), "captions table not found")
    assert not (tmp_path / "report").exists()


def reports(tmp_path: Path) -> list[Path]:
    folders = []
    for name, adherence in (("a", 0.9), ("b", 0.8)):
        folder = tmp_path / name
        folder.mkdir()
        pd.DataFrame([{"checkpoint": name, "model": "student", "sampler": "sde", "steps": 4,
                       "adherence_all": adherence}]).to_parquet(folder / "report.parquet")
        folders.append(folder)
    return folders


def test_compare_argument_errors(tmp_path, capsys):
    a, b = reports(tmp_path)
    one_line_error(run_cli(capsys, "compare", a, tmp_path / "missing"), str(tmp_path / "missing"), "no such report")
    one_line_error(run_cli(capsys, "compare", a, tmp_path), str(tmp_path), "not a benchmark report")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    one_line_error(run_cli(capsys, "compare", a, tmp_path / "broken.parquet"), "broken.parquet", "not a readable")
    one_line_error(run_cli(capsys, "compare", a, b, "--tolerance", "nan"), "--tolerance")
    (tmp_path / "out.txt").write_text("mine")
    one_line_error(run_cli(capsys, "compare", a, b, "--out", tmp_path / "out.txt"), "out.txt", "is a file")
    assert (tmp_path / "out.txt").read_text() == "mine"


def test_compare_replaces_an_earlier_comparison_whole(tmp_path, capsys):
    a, b = reports(tmp_path)
    out = tmp_path / "compare"
    out.mkdir()
    (out / "compare.md").write_text("# the earlier comparison")
    (out / "stale.csv").write_text("x")
    assert run_cli(capsys, "compare", a, b, "--out", out)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["compare.csv", "compare.html", "compare.md", "compare.parquet",
                                                      "compare.png", "regressions.json"]
    assert no_partial_folders(tmp_path)


def test_export_argument_errors(tmp_path, capsys, checkpoint, no_model):
    file = tmp_path / "out.bin"
    file.write_bytes(b"mine")
    one_line_error(run_cli(capsys, "export", checkpoint, file), str(file), "is a file")
    one_line_error(run_cli(capsys, "export", tmp_path, tmp_path / "new"), str(tmp_path), "MANIFEST.json")
    assert file.read_bytes() == b"mine" and not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------------
# 10. Files that are not configs, --set values that are not YAML, tables that are not CSV
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, expected", [
    (None, "is a folder, not a config file"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not a text file"),
    (b"", "the config file is empty"),
    (b"- run\n- model\n", "expected a mapping of sections"),
    (b"run: {name: [1, 2}\n", "not valid YAML at line 1"),
], ids=["directory", "binary", "empty", "top-level-list", "broken-yaml"])
def test_a_config_file_that_is_not_a_config_is_named(tmp_path, capsys, no_model, content, expected):
    path = tmp_path / "run.yaml"
    path.mkdir() if content is None else path.write_bytes(content)
    for command in ("check-config", "train", "preprocess"):
        one_line_error(run_cli(capsys, command, path), str(path), expected)


@pytest.mark.parametrize("override, expected", [
    ("training.learning_rate=[", "--set training.learning_rate: not valid YAML"),
    ("training.max_steps={a: 1", "--set training.max_steps: not valid YAML"),
    (".learning_rate=1", "no empty key"),
    ("training.max_steps", "expected key.path=value"),
], ids=["unclosed-list", "unclosed-mapping", "empty-key", "no-equals"])
def test_a_set_value_that_is_not_yaml_names_the_key(tmp_path, capsys, no_model, override, expected):
    one_line_error(run_cli(capsys, "train", write_config(tmp_path), "--set", override), expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("sets, expected", [
    (["model.preset=bogus"], "model.preset: unknown preset 'bogus'"),
    (["data.shards=/no/shards"], "/no/shards: no MANIFEST.json"),
    (["data.videos=/some/videos", "data.prompts=[]"], "must be preprocessed first"),
    (["training.device=cuda"], "training.device: cuda was asked for"),
    (["training.mixed_precision=bf16"], "training.mixed_precision: bf16"),
    (["deepspeed.zero_optimization=3"], "deepspeed.zero_optimization"),
    (["validation.seeds=[-1]"], "validation.seeds: a seed must be in [0, 2**32)"),
    (["run.seed=99999999999"], "run.seed"),
], ids=["unknown-preset", "shards-missing", "videos-not-preprocessed", "cuda-absent", "bf16-on-cpu", "zero-not-a-mapping",
        "seed-negative", "seed-overflows"])
def test_check_config_makes_every_check_train_makes_before_building_models(tmp_path, capsys, no_model, sets,
                                                                           expected):
    if any(s.startswith("training.device=cuda") for s in sets):
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is visible")  # the check holds only where there is none (CI, this suite)
    config = write_config(tmp_path)
    overrides = [a for s in sets for a in ("--set", s)]
    for command in ("check-config", "train"):
        one_line_error(run_cli(capsys, command, config, *overrides), expected)
    assert not (tmp_path / "run").exists()


def test_shards_into_a_file_are_refused(tmp_path, capsys, no_model):
    file = tmp_path / "shards"
    file.write_text("mine")
    data = {"prompts": ["a red circle"], "prompt_only": True, "shards": str(file)}
    one_line_error(run_cli(capsys, "preprocess", write_config(tmp_path, data=data)), "data.shards", "is a file")
    assert file.read_text() == "mine"


def preprocess_config(tmp_path: Path, table: bytes, name: str = "captions.csv") -> Path:
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / name).write_bytes(table)
    data = {"videos": str(videos), "captions_file": name, "shards": str(tmp_path / "shards"), "num_frames": 1,
            "height": 16, "width": 16}
    return write_config(tmp_path, data=data)


@pytest.mark.parametrize("table, expected", [
    (b'video,caption\n"a.mp4,a red circle\n', "not a readable captions table"),
    (b"\xff\xfe\x00v\x00i\x00d\x00e\x00o", "not a text CSV file"),
    (b"", "the captions table is empty"),
    (b"clip,text\na.mp4,a red circle\n", "missing column(s) video, caption"),
], ids=["unclosed-quote", "utf16", "empty", "wrong-columns"])
def test_a_malformed_captions_table_is_named_before_anything_is_encoded(tmp_path, capsys, no_model, table, expected):
    config = preprocess_config(tmp_path, table)
    one_line_error(run_cli(capsys, "preprocess", config), str(tmp_path / "videos" / "captions.csv"), expected)
    assert not (tmp_path / "shards").exists()


# ---------------------------------------------------------------------------------------
# 11. Caption rows that point outside the data folder
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("video", ["/etc/hostname", "../outside.mp4", "videos/../../outside.mp4"])
def test_a_caption_row_outside_the_data_folder_is_refused(tmp_path, capsys, no_model, video):
    config = preprocess_config(tmp_path, f"video,caption\n{video},a red circle moving left\n".encode())
    one_line_error(run_cli(capsys, "preprocess", config), "captions.csv, row 1", repr(video), "leaves the data folder")
    assert not (tmp_path / "shards").exists()


# ---------------------------------------------------------------------------------------
# 12. Credentials: never in a URL, never echoed; missing ones fail at once
# ---------------------------------------------------------------------------------------


def test_a_password_in_the_endpoint_url_is_refused_without_echoing_it(tmp_path, capsys, no_model):
    config = write_config(tmp_path, storage={"endpoint_url": f"http://minio:{SECRET}@127.0.0.1:9000"})
    for command in ("check-config", "train"):
        code, out, err = run_cli(capsys, command, config)
        one_line_error((code, out, err), "storage.endpoint_url", "user name or password", "AWS")
        assert SECRET not in err + out
    assert not (tmp_path / "run").exists()
    line = one_line_error(run_cli(capsys, "export", tmp_path, tmp_path / "out", "--endpoint-url",
                                  f"https://k:{SECRET}@s3.example.com"), "--endpoint-url")
    assert SECRET not in line


def test_missing_credentials_fail_at_once(tmp_path, capsys, monkeypatch, no_model):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role on a test machine
    from s3_server import free_port

    config = write_config(tmp_path, run={"name": "test", "output": "s3://bucket/run"},
                          storage={"endpoint_url": f"http://127.0.0.1:{free_port()}", "region": "us-east-1"})
    working_folders = set(Path(tempfile.gettempdir()).glob("distill-run-*"))
    start = time.monotonic()
    one_line_error(run_cli(capsys, "train", config), "s3://bucket/run", "no complete AWS credentials",
                   "AWS_ACCESS_KEY_ID")
    assert time.monotonic() - start < 3  # four attempts with backoff took 7 s
    assert set(Path(tempfile.gettempdir()).glob("distill-run-*")) == working_folders


# ---------------------------------------------------------------------------------------
# 13. Guidance scales and timesteps in sane ranges
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, key, value, expected", [
    ("dmd2", "method_config.real_score_guidance_scale", "1e30", "must be in [0.0, 30.0]"),
    ("dmd2", "method_config.real_score_guidance_scale", "-1", "must be in [0.0, 30.0]"),
    ("dmd2", "method_config.dmd_denoising_steps", "[5000, 250]", "outside [0, 1000]"),
    ("dmd2", "method_config.max_timestep_ratio", "1.5", "must be in [0, 1]"),
    ("dmd2", "method_config.min_timestep_ratio", "-0.1", "must be in [0, 1]"),
    ("dmd2", "method_config.gan_max_timestep_ratio", "0", "must be in (0, 1]"),
    ("dmd2", "method_config.timestep_shift", "0", "must be in (0, 20.0]"),
    ("dmd2", "model.flow_shift", "1e6", "at most 20.0"),
    ("flow_matching", "method_config.validation_guidance_scale", "1e30", "must be in [0.0, 30.0]"),
], ids=["guidance-huge", "guidance-negative", "step-beyond-T", "max-ratio", "min-ratio", "gan-ratio", "dmd-shift",
        "flow-shift", "fm-guidance"])
def test_guidance_and_timesteps_outside_their_range_are_refused(tmp_path, capsys, no_model, method, key, value,
                                                                expected):
    config = write_config(tmp_path, tiny_raw(tmp_path / "run", method=method))
    one_line_error(run_cli(capsys, "train", config, "--set", f"{key}={value}"), key.split("[")[0], expected)
    assert not (tmp_path / "run").exists()


def test_bench_teacher_guidance_is_bounded(tmp_path, capsys, no_model):
    one_line_error(run_cli(capsys, "bench", tmp_path, "--teacher-guidance", "1e30"), "--teacher-guidance", "[0, 30]")


# ---------------------------------------------------------------------------------------
# 14. shapes and bench command lines
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, named", [
    (["--count", "0"], "--count"),
    (["--frames", "1"], "--frames"),
    (["--height", "8"], "--height"),
    (["--workers", "0"], "--workers"),
    (["--backgrounds", "stripes"], "stripes"),
], ids=["count-0", "frames-1", "height-8", "workers-0", "background-unknown"])
def test_shapes_argument_errors_write_nothing(tmp_path, capsys, args, named):
    line = one_line_error(run_cli(capsys, "shapes", tmp_path / "shapes", *args), named)
    assert line.startswith("distill shapes: error:") and not (tmp_path / "shapes").exists()


@pytest.mark.parametrize("args, expected", [
    (["--iterations", "0"], "argument --iterations: must be at least 1"),
    (["--set", "model.preset=bogus"], "config error: model.preset: unknown preset 'bogus'"),
], ids=["iterations-0", "bad-config"])
def test_the_training_throughput_tool_errors_in_one_line(tmp_path, capsys, no_model, args, expected):
    from distill.bench.training import main as throughput_main

    with pytest.raises(SystemExit) as exit_:
        throughput_main([str(write_config(tmp_path)), *args])
    one_line_error((exit_.value.code, "", capsys.readouterr().err), "python -m distill.bench.training", expected)


def test_shapes_help_names_its_program(capsys):
    code, out, _ = run_cli(capsys, "shapes", "--help")
    assert code == 0 and out.startswith("usage: distill shapes ")


def test_every_bench_option_has_help(capsys):
    code, out, _ = run_cli(capsys, "bench", "--help")
    assert code == 0
    lines = out.splitlines()
    options = [i for i, line in enumerate(lines) if line.startswith("  --")]
    assert len(options) >= 11
    for i in options:  # argparse puts help after two spaces on the line, or on the indented line below
        inline = "  " in lines[i].strip()
        below = i + 1 < len(lines) and lines[i + 1].startswith(" " * 10)
        assert inline or below, f"{lines[i].split()[0]} has no help text"
