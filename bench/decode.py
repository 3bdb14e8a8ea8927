"""Video decoding: our sampler against the old one, decord alone and PyAV decoding every frame.

    python -m bench.decode [--quick | --long] [--repeats 3] [--workdir .bench-media] [--out results.json]

Generated H.264 videos (libx264 ultrafast, CRF 28, 5 fps, a panning texture with film grain;
cached in ``--workdir``), 1 and 10 minutes long, at 360p, 1080p and 2160p, with a keyframe every 250 or 10
frames. For each video and each number of sampled frames (16, 64), every method runs in a fresh
process, ``--repeats`` times (medians reported):

- ours: ``read_video(path, n, frame_size=(384, 384))`` as the service calls it, in a
  :class:`media.DecodeWorker` child process (default ``chunk_bytes`` and resize threads);
- old: the same call through the code of ``--baseline-rev`` (before this change: decord
  ``get_batch`` chunks of 8 full frames, ``asnumpy``, then resizing), extracted with ``git
  archive`` into the workdir;
- decord: ``VideoReader(path, num_threads=1).get_batch(indices)`` of the same indices, no resize
  (the decoder and thread count our sampler uses): decord's own decoding cost;
- decord 1 by 1: the same frames taken one at a time (``reader[index]``, each dropped at once):
  decord's own memory without a batch, the floor for any sampler built on decord;
- PyAV: every frame of the stream decoded in order, ``to_ndarray("rgb24")`` each (once per video,
  not per frame count; skipped for 10-minute 2160p videos, about 3 minutes a run here).

``--quick`` runs the 1-minute 360p and 2160p videos at 16 frames, ``--long`` the same for the
10-minute ones (the case where decord's read-ahead grows with the file).

Measured: wall time of the call, and the peak RSS of the process that decodes (the worker child
for ours and old, read with ``getrusage(RUSAGE_CHILDREN)`` after it exits) above its RSS just
before the call (imports done). Also the issue's two targets: the decode child's peak growth from
360p to 2160p (16 frames) and the extra time ratio (ours 2160p - 360p) / (decord 2160p - 360p).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BASELINE_REV = "0415c74"  # the commit before read_video held a byte budget instead of 8-frame chunks
FRAME_SIZE = (384, 384)  # what the model's SigLIP tower takes
FPS = 5
MiB = 1024 * 1024
METHODS = ("old", "ours", "decord", "decord-1by1")
RESOLUTIONS = {"360p": (640, 360), "1080p": (1920, 1080), "2160p": (3840, 2160)}


@dataclass(frozen=True)
class Video:
    height: str  # "360p", "1080p", "2160p"
    seconds: int
    gop: int

    @property
    def name(self) -> str:
        return f"{self.height}-{self.seconds // 60}min-gop{self.gop}"


def matrix(quick: bool, long: bool = False) -> tuple[list[Video], list[int]]:
    if quick or long:
        seconds = 600 if long else 60
        return [Video(h, seconds, gop) for gop in (250, 10) for h in ("360p", "2160p")], [16]
    videos = [Video(h, seconds, gop) for seconds in (60, 600) for gop in (250, 10) for h in RESOLUTIONS]
    return videos, [16, 64]


# --- generated videos -------------------------------------------------------------------------


def make_video(path: Path, video: Video) -> Path:
    """A panning texture with film grain, fixed GOP, cached at ``path``.

    The grain (7 patterns in turn, +-3 levels) keeps P-frames realistic: about 130 KB per 2160p
    frame, what a 2160p phone video at 30 fps spends; the pan alone would cost almost nothing.
    """
    if path.exists():
        return path
    import av
    from PIL import Image

    width, height = RESOLUTIONS[video.height]
    rng = np.random.default_rng(0)

    def texture(w: int, h: int) -> np.ndarray:  # smooth blobs, like out-of-focus scenery
        cells = rng.integers(0, 256, (h * 40 // width + 2, w * 40 // width + 2), dtype=np.uint8)
        return np.asarray(Image.fromarray(cells).resize((w, h), Image.Resampling.BICUBIC)).astype(np.int16)

    luma, cb, cr = texture(2 * width, height), texture(width // 2, height // 2), texture(width // 2, height // 2)
    grains = [rng.integers(-3, 4, (height // 2, width // 2), dtype=np.int16) for _ in range(7)]
    grains = [grain.repeat(2, 0).repeat(2, 1) for grain in grains]  # 2x2 grains: less costly to encode
    step = max(2, width // 480)  # pixels per frame, even (chroma moves half as far)
    partial = path.with_suffix(".partial.mp4")
    options = {"preset": "ultrafast", "crf": "28", "g": str(video.gop), "keyint_min": str(video.gop)}
    options["sc_threshold"] = "0"  # keyframes exactly every gop frames
    with av.open(str(partial), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(FPS), options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(video.seconds * FPS):
            x = i * step % width
            planes = [
                luma[:, x : x + width] + grains[i % len(grains)],
                np.roll(cb, -x // 2, axis=1).reshape(height // 4, width),
                np.roll(cr, -x // 2, axis=1).reshape(height // 4, width),
            ]
            yuv = np.concatenate(planes).clip(0, 255).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    partial.rename(path)
    return path


def baseline_code(workdir: Path, rev: str) -> Path:
    """``rev``'s media package, extracted once into the workdir."""
    folder = workdir / f"baseline-{rev}"
    if not (folder / "media" / "video.py").exists():
        folder.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "media"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


# --- one measurement, in a fresh process -------------------------------------------------------


def rss(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def measure_one(method: str, path: Path, frames: int) -> dict:
    """Run ``method`` once in this process; wall seconds and peak RSS growth of the decoding process."""
    if method in ("ours", "old"):
        from media import DecodeWorker  # ours or old: whichever media package comes first on sys.path

        worker = DecodeWorker(time_limit=3600)
        child = worker.run(os.getpid)  # the child has started and imported everything
        before = rss(child)
        started = time.perf_counter()
        video = worker.read_video(path, frames, frame_size=FRAME_SIZE, max_pixels=7680 * 4320)
        wall = time.perf_counter() - started
        worker.close()  # waits for the child: its peak is now in RUSAGE_CHILDREN
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        assert video.frames.shape == (len(video.frame_indices), FRAME_SIZE[1], FRAME_SIZE[0], 3)
    elif method in ("decord", "decord-1by1"):
        from decord import VideoReader, cpu

        before = rss()
        started = time.perf_counter()
        reader = VideoReader(str(path), ctx=cpu(0), num_threads=1)
        count = len(reader)
        # The sampler's indices: np.linspace(0, total - 1, n, dtype=int), n capped at total.
        indices = np.linspace(0, count - 1, min(frames, count), dtype=int).tolist()
        if method == "decord":
            assert reader.get_batch(indices).shape[0] == len(indices)
        else:  # one frame at a time, each dropped at once: decord's own memory, no batch
            for index in indices:
                assert reader[index].shape[2] == 3
        wall = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    elif method == "pyav":
        import av

        before = rss()
        started = time.perf_counter()
        decoded = 0
        with av.open(str(path)) as container:
            for frame in container.decode(container.streams.video[0]):
                frame.to_ndarray(format="rgb24")
                decoded += 1
        wall = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    else:
        raise ValueError(f"unknown method {method}")
    return {"wall_s": wall, "peak_rss": peak, "growth": peak - before}


def run_child(method: str, path: Path, frames: int, code: Path) -> dict:
    """``measure_one`` in a fresh process whose ``media`` package is the one under ``code``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code), str(REPO)])}
    command = [sys.executable, "-m", "bench.decode", "--one", method, str(path), str(frames)]
    # The working directory comes first on sys.path (and the worker child inherits it).
    done = subprocess.run(command, cwd=code, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{method} on {path.name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the whole run -------------------------------------------------------------------------------


def bench(workdir: Path, quick: bool, repeats: int, rev: str, long: bool = False) -> dict:
    videos, frame_counts = matrix(quick, long)
    workdir.mkdir(parents=True, exist_ok=True)
    old_code = baseline_code(workdir, rev)
    rows = []
    for video in videos:
        started = time.perf_counter()
        path = make_video(workdir / f"{video.name}.mp4", video)
        print(f"{video.name}: {path.stat().st_size / MiB:.0f} MiB ({time.perf_counter() - started:.0f} s)", flush=True)
        methods = [("old", old_code), ("ours", REPO), ("decord", REPO), ("decord-1by1", REPO)]
        for frames in frame_counts:
            cell = {"video": video.name, "height": video.height, "seconds": video.seconds, "gop": video.gop}
            cell["frames"] = frames
            for method, code in methods:
                runs = [run_child(method, path, frames, code) for _ in range(repeats)]
                cell[method] = summary(runs)
                print(f"  {frames} frames, {method}: {fmt(cell[method])}", flush=True)
            rows.append(cell)
        if not (quick or long) and not (video.seconds >= 600 and video.height == "2160p"):
            # PyAV decodes every frame whatever the frame count: once per video.
            runs = [run_child("pyav", path, 0, REPO) for _ in range(repeats if video.seconds < 600 else 1)]
            for cell in rows:
                if cell["video"] == video.name:
                    cell["pyav"] = summary(runs)
            print(f"  every frame, pyav: {fmt(summary(runs))}", flush=True)
    return {"rows": rows, "targets": targets(rows), "repeats": repeats, "quick": quick or long, "baseline_rev": rev}


def summary(runs: list[dict]) -> dict:
    return {
        "wall_s": statistics.median(run["wall_s"] for run in runs),
        "growth": statistics.median(run["growth"] for run in runs),
        "runs": runs,
    }


def targets(rows: list[dict]) -> list[dict]:
    """360p -> 2160p at 16 frames, per duration and GOP: peak growth and extra-time ratio."""
    found = []
    for low in rows:
        if low["height"] != "360p" or low["frames"] != 16:
            continue
        high = next(
            (
                row
                for row in rows
                if row["height"] == "2160p" and row["frames"] == 16
                if (row["seconds"], row["gop"]) == (low["seconds"], low["gop"])
            ),
            None,
        )
        if high is None:
            continue
        target = {"seconds": low["seconds"], "gop": low["gop"]}
        for method in METHODS:
            target[f"{method}_growth"] = high[method]["growth"] - low[method]["growth"]
            target[f"{method}_extra_s"] = high[method]["wall_s"] - low[method]["wall_s"]
        for method in ("old", "ours"):
            target[f"{method}_ratio"] = target[f"{method}_extra_s"] / target["decord_extra_s"]
        found.append(target)
    return found


def fmt(result: dict) -> str:
    return f"{result['wall_s']:.2f} s, +{result['growth'] / MiB:.0f} MiB"


def report(results: dict) -> str:
    lines = [
        f"Machine: {results['machine']}. Medians of {results['repeats']} runs"
        + (" (PyAV on 10-minute videos: 1 run)" if not results["quick"] else "")
        + f"; old = {results['baseline_rev']}.",
        "",
        "| video | frames | old | ours | decord get_batch | decord 1 by 1 | PyAV every frame |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        pyav = fmt(row["pyav"]) if "pyav" in row else "skipped"
        cells = " | ".join(fmt(row[method]) for method in METHODS)
        lines.append(f"| {row['video']} | {row['frames']} | {cells} | {pyav} |")
    lines += [
        "",
        "360p -> 2160p, 16 frames (targets: ours <= 300 MB more peak RSS; extra time <= 1.5x decord's):",
        "",
        "| video | peak growth: old | ours | decord get_batch | decord 1 by 1 "
        "| extra time: old | ours | decord get_batch | old / decord | ours / decord |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in results["targets"]:
        lines.append(
            f"| {t['seconds'] // 60} min, gop {t['gop']} | "
            + " | ".join(f"{t[f'{m}_growth'] / 1e6:+.0f} MB" for m in METHODS)
            + " | "
            + " | ".join(f"{t[f'{m}_extra_s']:+.2f} s" for m in ("old", "ours", "decord"))
            + f" | x{t['old_ratio']:.2f} | x{t['ours_ratio']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1-minute 360p and 2160p videos, 16 frames, no PyAV")
    parser.add_argument("--long", action="store_true", help="the same for 10-minute videos (the issue's hard case)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (median reported)")
    parser.add_argument("--workdir", type=Path, default=REPO / ".bench-media", help="generated videos (cached)")
    parser.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision whose media/ is the old code")
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "PATH", "FRAMES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        method, path, frames = args.one
        print(json.dumps(measure_one(method, Path(path).resolve(), int(frames))))
        return
    from bench.machine import machine

    results = {"machine": machine()} | bench(
        args.workdir.resolve(), args.quick, args.repeats, args.baseline_rev, args.long
    )
    print(report(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
