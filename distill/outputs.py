"""Output folders that one command fills (a data set, an export, a report).

A command checks its output folder before any work: a file there, or a folder that already holds
something, is refused naming it (unless the caller may replace it). The output is then made under
a temporary name beside the target and moved into place only when complete: a failure leaves no
partial folder, and an earlier output is replaced whole, never merged with the new one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from distill.errors import InputError


def check_output_folder(path: str | Path, *, overwrite: bool = False, what: str = "output folder",
                        how: str = "pass --overwrite to replace it",
                        replaceable: Callable[[Path], bool] | None = None) -> Path:
    """Refuse a file at `path`, and a folder holding anything unless `overwrite` (or `replaceable(path)`:
    e.g. an earlier report of the same command)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: is a file; the {what} must be a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite and not (replaceable and replaceable(path)):
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
        raise InputError(f"{path}: the {what} is not empty ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); "
                         f"choose a new folder, or {how}")
    return path


@contextlib.contextmanager
def staged_folder(target: str | Path) -> Iterator[Path]:
    """A fresh folder beside `target` to write into; on success it replaces `target` (whole), on failure it
    is removed, and so are the parent folders made for it."""
    target = Path(target).resolve()  # `.` and `x/..` have a name and a parent to stage beside
    made = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for parent in made:  # innermost first
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
    replace_folder(staging, target)


def replace_folder(new: Path, target: Path) -> None:
    """Move `new` to `target`; an earlier `target` is moved aside first and deleted after."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent)) / "old"
        os.rename(target, old)
    os.rename(new, target)
    if old is not None:
        shutil.rmtree(old.parent)
