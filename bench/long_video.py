"""Long videos as jobs on the demo: total time, segments per second, memory, interactive latency.

    python -m bench.long_video [--minutes 5 20] [--segment-seconds 30] [--frames 16] [--tokens 32] [--out F]

Serves the demo (tiny checkpoint on CPU, `bentoml serve`, loopback) twice in one run, with one
caption of a job in the engine at a time (LLAVA_JOB_CAPTIONS_IN_FLIGHT=1, the default: a segment
is decoded after the previous caption is done) and with two (the next segment decodes while a
caption generates, and the two batch). Each service runs one job per
length on generated videos whose content changes every minute (testing/mediafiles), uploaded, and
reports the job's total time, segments per second and the peak resident memory of the whole
server (main process, worker, decode children) while it ran. Each service also answers
interactive questions about a short clip, idle and while a job runs (median latency).

Then, in-process: decoding one segment (16 frames) in the middle of 5, 20 and 60-minute videos
(and an hour at 30 fps), probing the file for each segment (the baseline) or remembering the probe
(now): each probe scans every packet of the file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

from bench.machine import machine
from testing.served import served

MiB = 1024 * 1024


def server_memory(base: str) -> int:
    """Resident bytes of the `bentoml serve` process listening at ``base`` and its descendants."""
    port = base.rsplit(":", 1)[1]
    root = next(p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] and port in p.info["cmdline"])
    total = 0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += process.memory_info().rss
    return total


class JobRunner:
    def __init__(self, base: str, segment_seconds: float, frames: int, tokens: int) -> None:
        self.base = base
        self.metadata = {
            "segment_seconds": segment_seconds,
            "frames_per_segment": frames,
            "max_new_tokens": tokens,
            "ignore_eos": True,
        }
        self.client = httpx.Client(timeout=600)

    def run(self, video: Path) -> dict:
        """One job on ``video``: seconds from submit to completed, segments, peak memory."""
        peak = [server_memory(self.base)]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak.append(server_memory(self.base))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.perf_counter()
        try:
            with video.open("rb") as file:
                response = self.client.post(
                    f"{self.base}/jobs/submit",
                    files={"video": (video.name, file, "video/mp4")},
                    data={"metadata": json.dumps(self.metadata)},
                )
            if response.status_code != 202:
                raise RuntimeError(f"submit failed: {response.status_code} {response.text}")
            task_id = response.json()["task_id"]
            while (status := self.client.get(f"{self.base}/jobs/status", params={"task_id": task_id}).json())[
                "ended_at"
            ] is None:
                time.sleep(0.2)
        finally:
            done.set()
            sampler.join()
        seconds = time.perf_counter() - started
        if status["status"] != "completed":
            raise RuntimeError(f"job ended {status['status']}: {status['error']}")
        segments = status["progress"]["segments_total"]
        return {"seconds": seconds, "segments": segments, "per_second": segments / seconds, "peak": max(peak)}

    def interactive(self, clip: Path, count: int) -> float:
        """Median seconds of ``count`` questions about ``clip`` (new question each, same clip)."""
        times = []
        for index in range(count):
            metadata = {"prompt": f"Question {index}: what happens?", "max_new_tokens": 32, "ignore_eos": True}
            started = time.perf_counter()
            with clip.open("rb") as file:
                response = self.client.post(
                    f"{self.base}/analyze_video",
                    files={"video": (clip.name, file, "video/mp4")},
                    data={"metadata": json.dumps(metadata)},
                )
            if response.status_code != 200:
                raise RuntimeError(f"question failed: {response.status_code} {response.text}")
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    def interactive_during_job(self, video: Path, clip: Path, count: int) -> float:
        result: dict = {}
        job = threading.Thread(target=lambda: result.update(self.run(video)))
        job.start()
        time.sleep(2)  # the job is captioning
        latency = self.interactive(clip, count)
        job.join()
        return latency


def timed_segment(path: Path, frames: int, start: float, seconds: float) -> float:
    import media

    began = time.perf_counter()
    media.read_video(path, frames, start_time=start, end_time=start + seconds, frame_size=(384, 384))
    return time.perf_counter() - began


def segment_decoding(videos: dict[str, Path], frames: int, segment_seconds: float) -> dict:
    """Seconds to decode one segment in the middle of each video (in-process, median of 3): with the
    file probed for every segment (the baseline, as before probes were remembered) and with the
    probe remembered from the segment before (now); and the probe alone."""
    import media
    from media.container import _probe

    found = {}
    for name, path in videos.items():
        middle = media.video_duration(path) / 2

        cold, warm, probe = [], [], []
        for _ in range(3):
            _probe.cache_clear()
            cold.append(timed_segment(path, frames, middle, segment_seconds))
            warm.append(timed_segment(path, frames, middle, segment_seconds))
            _probe.cache_clear()
            began = time.perf_counter()
            media.video_duration(path)
            probe.append(time.perf_counter() - began)
        found[name] = {key: statistics.median(v) for key, v in (("cold", cold), ("warm", warm), ("probe", probe))}
    return found


def report(results: dict) -> str:
    lines = [f"Machine: {results['machine']}", f"Workload: {results['workload']}", ""]
    lines += ["| video | in flight 1 (default) | in flight 2 | peak memory (1 / 2) |", "|---|---|---|---|"]
    for minutes in results["minutes"]:
        one, two = results["in_flight_1"][str(minutes)], results["in_flight_2"][str(minutes)]
        lines.append(
            f"| {minutes} min, {one['segments']} segments | {one['seconds']:.1f} s ({one['per_second']:.2f} seg/s) | "
            f"{two['seconds']:.1f} s ({two['per_second']:.2f} seg/s), x{two['seconds'] / one['seconds']:.2f} | "
            f"{one['peak'] / MiB:.0f} / {two['peak'] / MiB:.0f} MiB |"
        )
    lines += ["", "Interactive question (short clip, 32 tokens), median of 5:"]
    for in_flight, seen in results["interactive"].items():
        idle, busy = seen["idle"], seen["during_job"]
        lines.append(
            f"- captions in flight {in_flight}: idle {idle:.2f} s, while the longest video's job runs {busy:.2f} s "
            f"(x{busy / idle:.2f})"
        )
    lines += [
        "",
        "| one segment (middle) | probe alone | probing every segment (before) | probe remembered (now) |",
        "|---|---|---|---|",
    ]
    for name, times in results["segment_decoding"].items():
        lines.append(
            f"| {name} | {times['probe']:.3f} s | {times['cold']:.3f} s | {times['warm']:.3f} s "
            f"(x{times['warm'] / times['cold']:.2f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--segment-seconds", type=float, default=30)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per caption (make demo's default)")
    parser.add_argument("--decode-minutes", type=int, nargs="+", default=[5, 20, 60])
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    args = parser.parse_args()
    from testing.mediafiles import write_minutes_video, write_video
    from testing.tiny import write_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="llava-bench-") as tmp:
        folder = Path(tmp)
        checkpoint = write_tiny_checkpoint(folder / "tiny-llava-video")
        videos = {m: write_minutes_video(folder / f"{m}min.mp4", m) for m in sorted(set(args.minutes))}
        clip = write_video(folder / "clip.mp4", frames=100, fps=25, size=(640, 360))
        results: dict = {
            "machine": machine(),
            "workload": (
                f"288x216 H.264 at 2 fps, {args.segment_seconds:g} s segments, {args.frames} frames and "
                f"{args.tokens} new tokens per caption; uploads"
            ),
            "minutes": sorted(videos),
            "interactive": {},
        }
        for in_flight in (1, 2):
            settings = {"job_captions_in_flight": str(in_flight), "job_dir": str(folder / "jobs")}
            with served(checkpoint, folder / f"in-flight-{in_flight}.log", **settings) as base:
                runner = JobRunner(base, args.segment_seconds, args.frames, args.tokens)
                # Warm-up on the longest video: allocators, kernels, and every decode process has
                # decoded (each grows to its chunk budget once), so peaks compare lengths only.
                runner.run(videos[max(videos)])
                results[f"in_flight_{in_flight}"] = {str(m): runner.run(path) for m, path in videos.items()}
                results["interactive"][str(in_flight)] = {
                    "idle": runner.interactive(clip, 5),
                    "during_job": runner.interactive_during_job(videos[max(videos)], clip, 5),
                }
        for path in videos.values():
            path.unlink()
        decode_videos = {
            f"{m} min, 2 fps": write_minutes_video(folder / f"decode-{m}min.mp4", m, size=(160, 120))
            for m in args.decode_minutes
        }
        # An hour at 30 fps (108,000 packets to scan), small frames to keep the file small.
        decode_videos["60 min, 30 fps"] = write_minutes_video(
            folder / "decode-hour-30fps.mp4", 60, fps=30, size=(64, 48), noise=False
        )
        results["segment_decoding"] = segment_decoding(decode_videos, args.frames, args.segment_seconds)
    print(report(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
