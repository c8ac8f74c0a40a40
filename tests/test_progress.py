"""Progress lines: what they say, and that the flows can read them back."""

from __future__ import annotations

from distill.progress import Progress, format_seconds, parse_line


def test_a_line_every_so_often_read_back_by_parse_line(capsys):
    heard = []
    progress = Progress("preprocess", 10, unit="sample", every=4, bar=True,  # no terminal here: lines, not a bar
                        on_update=lambda done, total: heard.append((done, total)))
    for _ in range(10):
        progress.update(1, {"loss": 0.5})
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert [parse_line(line) for line in lines] == [("preprocess", 4, 10), ("preprocess", 8, 10), ("preprocess", 10, 10)]
    assert lines[0].startswith("preprocess 4/10 (40%) | loss 0.5 | ") and " s/sample | ETA " in lines[0]
    assert " | done in " in lines[-1]
    assert heard[0] == (0, 10) and heard[-1] == (10, 10) and len(heard) == 11  # every update, shown or not


def test_a_job_that_learns_its_size_and_a_silent_rank(capsys):
    progress = Progress("bench", 1, unit="row")
    progress.expect(3)
    progress.update(1, note="teacher-ode-50: 16 videos")
    assert capsys.readouterr().out.startswith("bench 1/4 (25%) | teacher-ode-50: 16 videos | ")
    Progress("train", 4, enabled=False).update(4)
    assert capsys.readouterr().out == ""


def test_parse_line_takes_only_progress_lines():
    assert parse_line("train 150/300 (50%) | dmd_loss 0.1 | 0.4 s/it | ETA 1m00s") == ("train", 150, 300)
    assert parse_line("[2026-12-03 14:29:27,673] [INFO] [launch.py:170:main] dist_world_size=1") is None
    assert parse_line("trained 4 iterations; run folder: x") is None
    assert format_seconds(67) == "1m07s" and format_seconds(3 * 3600 + 60) == "3h01m" and format_seconds(5.4) == "5s"
