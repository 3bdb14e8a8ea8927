"""Screenshots of the web page after an answer, for the README (docs/ui-desktop.png,
docs/ui-phone.png, docs/ui-job.png).

    python -m tools.ui_screenshots [--out docs]

Serves the demo set-up (tiny random-weight checkpoint on CPU, so the answer is gibberish), asks
about a generated 6-second video in Debian's chromium (Playwright, as tests/test_web_ui.py) at a
desktop and a phone width, runs a job on a 3-minute video on the desktop, and saves each page whole.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import av
import numpy as np

from testing.served import served
from testing.tiny import write_tiny_checkpoint

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
WIDTHS = {"desktop": 1280, "phone": 390}


def write_scene(path: Path, seconds: int = 6, fps: int = 10, size: tuple[int, int] = (320, 180)) -> Path:
    """A ball crossing a sky-to-grass gradient: something to look at in the frame strip."""
    width, height = size
    rows = np.linspace(0, 1, height)[:, None, None]
    sky, grass = np.array([120, 170, 235]), np.array([70, 150, 70])
    background = np.where(rows < 0.65, sky * (1 - rows / 2), grass).astype(np.uint8) * np.ones((1, width, 1), np.uint8)
    ys, xs = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "20"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(seconds * fps):
            t = i / (seconds * fps - 1)
            x, y = 20 + t * (width - 40), height * 0.6 - np.sin(t * np.pi) * height * 0.4
            frame = background.copy()
            frame[(xs - x) ** 2 + (ys - y) ** 2 < 14**2] = (230, 60, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def shoot(base: str, video: Path, job_video: Path, out: Path) -> list[Path]:
    from playwright.sync_api import sync_playwright

    saved = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for name, width in WIDTHS.items():
            page = browser.new_page(viewport={"width": width, "height": 900}, device_scale_factor=1)
            page.goto(f"{base}/")
            page.locator("#file").set_input_files(video)
            page.get_by_label("Question", exact=True).fill("What does the red ball do?")
            page.get_by_label("Frames", exact=True).fill("8")
            page.get_by_role("button", name="Ask", exact=True).click()
            page.wait_for_function("document.getElementById('status').textContent === 'Done.'", timeout=120_000)
            path = out / f"ui-{name}.png"
            page.screenshot(path=str(path), full_page=True)
            saved.append(path)
            page.close()
        # Job mode on the desktop: a 3-minute video whose colour changes every minute, in 60 s segments.
        page = browser.new_page(viewport={"width": WIDTHS["desktop"], "height": 900}, device_scale_factor=1)
        page.goto(f"{base}/")
        page.get_by_label("Long video (job)").check()
        page.locator("#file").set_input_files(job_video)
        page.get_by_label("Question", exact=True).fill("When does the colour change?")
        page.get_by_label("Segment (s)").fill("60")
        page.get_by_label("Frames per segment").fill("4")
        page.get_by_role("button", name="Start job").click()
        page.wait_for_function("document.getElementById('status').textContent === 'Done.'", timeout=120_000)
        path = out / "ui-job.png"
        page.screenshot(path=str(path), full_page=True)
        saved.append(path)
        browser.close()
    return saved


def main() -> None:
    from testing.mediafiles import write_minutes_video

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llava-ui-shots-") as work:
        folder = Path(work)
        checkpoint = write_tiny_checkpoint(folder / "tiny-llava-video")
        video = write_scene(folder / "ball.mp4")
        job_video = write_minutes_video(folder / "three-minutes.mp4", 3, size=(160, 120))
        settings = {"max_new_tokens": "40", "job_dir": str(folder / "jobs")}
        with served(checkpoint, folder / "serve.log", **settings) as base:
            for path in shoot(base, video, job_video, args.out):
                print(path)


if __name__ == "__main__":
    main()
