"""A full-page screenshot of a report page in headless Chromium (scripts/ensure-chromium), once its videos play.

    python scripts/screenshot.py runs/demo/student/bench/compare/compare.html docs/images/demo-compare.png [--width 1280]
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from playwright.sync_api import sync_playwright


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page")
    parser.add_argument("out")
    parser.add_argument("--width", type=int, default=1280)
    args = parser.parse_args()
    chromium = subprocess.run([str(Path(__file__).parent / "ensure-chromium")], capture_output=True, text=True,
                              check=True).stdout.strip().splitlines()[-1]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": args.width, "height": 900})
        page.goto(Path(args.page).resolve().as_uri())
        page.wait_for_function("() => Array.from(document.querySelectorAll('video')).every(v => v.readyState >= 2)")
        # Every video paused at its middle frame and drawn into a canvas in its place: a full-page screenshot paints
        # video layers out of the viewport black, a canvas it paints.
        page.evaluate("""() => Promise.all(Array.from(document.querySelectorAll('video')).map(v => new Promise(done => {
            v.pause();
            v.addEventListener('seeked', () => {
                const still = document.createElement('canvas');
                still.width = v.videoWidth; still.height = v.videoHeight;
                still.style.width = v.clientWidth + 'px'; still.style.imageRendering = 'pixelated';
                still.getContext('2d').drawImage(v, 0, 0);
                v.replaceWith(still);
                done();
            }, {once: true});
            v.currentTime = v.duration / 2; })))""")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    print(args.out)


if __name__ == "__main__":
    main()
