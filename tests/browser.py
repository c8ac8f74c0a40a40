"""Pages in a real browser: Debian's headless Chromium (scripts/ensure-chromium installs it when missing), driven
by Playwright. Screenshots go to $TEST_ARTIFACTS (default runs/test-artifacts/), kept after the run."""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", REPO / "runs" / "test-artifacts"))
PHONE = {"width": 390, "height": 844}

# What a page shows, read in the page: every video (loaded far enough to play, its length), every image (decoded).
PAGE_STATE = """() => ({
  videos: Array.from(document.querySelectorAll("video")).map(v => ({
    src: v.getAttribute("src"), readyState: v.readyState, duration: v.duration, error: v.error && v.error.code})),
  images: Array.from(document.images).map(i => ({src: i.src.slice(0, 60), complete: i.complete,
                                                  naturalWidth: i.naturalWidth})),
  overflow: document.documentElement.scrollWidth - window.innerWidth,
})"""


@functools.cache
def chromium() -> str:
    """The Chromium binary; the test is skipped, with the reason, where it cannot be installed."""
    proc = subprocess.run([str(REPO / "scripts" / "ensure-chromium")], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"no headless Chromium here: {proc.stderr.strip()}")
    return proc.stdout.strip().splitlines()[-1]


@contextlib.contextmanager
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: tests run as root in CI; autoplay: the pages start their muted videos themselves anyway.
        engine = playwright.chromium.launch(executable_path=chromium(),
                                            args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        try:
            yield engine
        finally:
            engine.close()


def wait_until_loaded(page, timeout_ms: int = 30_000) -> dict:
    """The page's state once every video can play and every image is complete (or the timeout passed)."""
    page.wait_for_load_state("load")
    with contextlib.suppress(Exception):  # on timeout, the state says what did not load
        page.wait_for_function("""() => Array.from(document.querySelectorAll("video")).every(v => v.readyState >= 2 || v.error)
            && Array.from(document.images).every(i => i.complete)""", timeout=timeout_ms)
    return page.evaluate(PAGE_STATE)


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def assert_all_loaded(state: dict) -> None:
    bad_videos = [v for v in state["videos"] if v["readyState"] < 2 or not v["duration"] > 0 or v["error"]]
    bad_images = [i for i in state["images"] if not i["complete"] or i["naturalWidth"] == 0]
    assert not bad_videos, bad_videos[:5]
    assert not bad_images, bad_images[:5]
