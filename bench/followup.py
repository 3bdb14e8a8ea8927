"""Follow-up questions over HTTP: reuse of decoded media, features and prompt KV against none;
and with ``--upload-once``, a large video sent with every question against sent once.

    python -m bench.followup [--rounds 3] [--frames 16] [--tokens 32] [--out results.json]
    python -m bench.followup --upload-once 200 [--questions 5] [--frames 16] [--tokens 32]

``--upload-once MB``: one served demo, one video of about MB megabytes (1280x720 noise, H.264),
asked ``--questions`` different questions twice over: each question uploading the video again
(as before the media store), then the video uploaded once to ``POST /media`` and every question
sent by ``media_id``. Wall time per question and bytes sent per mode; the figure that matters is a
follow-up (questions 2 on) by id against a re-uploaded follow-up (both hit the reuse caches: the
difference is sending and hashing the bytes).

Serves the demo set-up (tiny checkpoint on CPU, `bentoml serve`, loopback) twice in one run:
the baseline with both reuse caches off (LLAVA_FEATURE_CACHE_BYTES=0, LLAVA_PREFIX_CACHE_BYTES=0,
every request decodes, encodes and prefills in full, as before reuse) and the service as
configured by default. Each round uses a 1280x720 video of its own (new bytes) and measures:

- upload: the first question, then a follow-up with a different question;
- URL: the first question by URL of another new video, then a follow-up by the same URL.

It also measures the service's overhead per request: an upload answered over HTTP (reuse off)
against the same work called in-process (media.read_video + Engine.submit_video, no HTTP, no
decode child). Medians over the rounds; every request asks for exactly ``--tokens`` new tokens.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from bench.machine import machine
from testing.served import served

QUESTIONS = ("What happens in this video?", "What colour is the biggest object?")


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def file_server(folder: Path) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}"


def write_inputs(folder: Path, videos: int) -> tuple[Path, list[Path]]:
    """A tiny checkpoint and ``videos`` different 1280x720 videos, 4 s at 25 fps each."""
    from testing.mediafiles import write_video
    from testing.tiny import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(folder / "tiny-llava-video")
    paths = [write_video(folder / f"video{i}.mp4", frames=100 + i, fps=25, size=(1280, 720)) for i in range(videos)]
    return checkpoint, paths


class Asker:
    def __init__(self, base: str, files: str, frames: int, tokens: int) -> None:
        self.base, self.files, self.frames, self.tokens = base, files, frames, tokens
        self.client = httpx.Client(timeout=600)

    def ask(self, video: Path, question: str, *, by_url: bool) -> float:
        """Seconds for one answer about ``video``, uploaded or by URL."""
        metadata = {"prompt": question, "num_frames": self.frames, "max_new_tokens": self.tokens, "ignore_eos": True}
        started = time.perf_counter()
        if by_url:
            body = {"video_url": f"{self.files}/{video.name}", "metadata": metadata}
            response = self.client.post(f"{self.base}/analyze_video", json=body)
        else:
            response = self.client.post(
                f"{self.base}/analyze_video",
                files={"video": (video.name, video.read_bytes(), "video/mp4")},
                data={"metadata": json.dumps(metadata)},
            )
        elapsed = time.perf_counter() - started
        if response.status_code != 200:
            raise RuntimeError(f"request failed: {response.status_code} {response.text}")
        return elapsed

    def rounds(self, videos: list[Path]) -> dict:
        """First question and follow-up, by upload and by URL; each pair on new bytes."""
        self.ask(videos[-1], QUESTIONS[0], by_url=False)  # warm-up: first request after start-up
        keys = ("upload_first", "upload_follow", "url_first", "url_follow")
        samples: dict[str, list[float]] = {key: [] for key in keys}
        for upload_video, url_video in zip(videos[0:-1:2], videos[1:-1:2], strict=True):
            samples["upload_first"].append(self.ask(upload_video, QUESTIONS[0], by_url=False))
            samples["upload_follow"].append(self.ask(upload_video, QUESTIONS[1], by_url=False))
            samples["url_first"].append(self.ask(url_video, QUESTIONS[0], by_url=True))
            samples["url_follow"].append(self.ask(url_video, QUESTIONS[1], by_url=True))
        return {key: statistics.median(values) for key, values in samples.items()} | {"samples": samples}


def direct_seconds(checkpoint: Path, video: Path, frames: int, tokens: int, rounds: int) -> float:
    """The pipeline called in-process (decode, prepare, generate), median of ``rounds``."""
    from llava_custom.builder import load_pretrained_model
    from llava_custom.engine import Engine, GenerationSettings
    from media import read_video

    engine = Engine(load_pretrained_model(str(checkpoint), load_4bit=False, device="cpu"))
    settings = GenerationSettings(max_new_tokens=tokens, ignore_eos=True)
    times = []
    try:
        for index in range(rounds + 1):
            started = time.perf_counter()
            sampled = read_video(video, frames, frame_size=engine.frame_size)
            info = sampled.info
            question = QUESTIONS[index % 2]
            engine.submit_video(sampled.frames, info.video_duration, info.frame_times, question, settings).result()
            times.append(time.perf_counter() - started)
    finally:
        engine.close()
    return statistics.median(times[1:])  # the first includes one-off warm-up


def report(results: dict) -> str:
    base, ours = results["no_reuse"], results["reuse"]
    lines = [
        f"Machine: {results['machine']}",
        f"Workload: {results['workload']}",
        "",
        "| | no reuse (baseline) | reuse (default) |",
        "|---|---|---|",
    ]
    for key, label in (
        ("upload_first", "first question, upload"),
        ("upload_follow", "follow-up, upload"),
        ("url_first", "first question, URL"),
        ("url_follow", "follow-up, URL"),
    ):
        lines.append(f"| {label} | {base[key]:.3f} s | {ours[key]:.3f} s |")
    for kind in ("upload", "url"):
        lines.append(
            f"| follow-up / first, {kind} | x{base[f'{kind}_follow'] / base[f'{kind}_first']:.2f} | "
            f"x{ours[f'{kind}_follow'] / ours[f'{kind}_first']:.2f} |"
        )
    overhead = results["overhead"]
    lines += [
        "",
        f"Service overhead per request (reuse off, upload): HTTP {overhead['http_s']:.3f} s against the pipeline "
        f"in-process {overhead['direct_s']:.3f} s: {overhead['http_s'] - overhead['direct_s']:+.3f} s "
        f"(x{overhead['http_s'] / overhead['direct_s']:.2f}).",
    ]
    return "\n".join(lines)


UPLOAD_ONCE_QUESTIONS = (
    "What happens in this video?",
    "What colour is the top of the picture?",
    "Is anyone in the video?",
    "What changes over time?",
    "Describe the last minute.",
    "Is it day or night?",
    "What is in the background?",
    "Summarise it in one line.",
)


def upload_once(megabytes: float, questions: int, frames: int, tokens: int) -> dict:
    """Every question re-uploading a ~``megabytes`` MB video against one upload and questions by id."""
    from testing.mediafiles import write_minutes_video
    from testing.tiny import write_tiny_checkpoint

    asked = UPLOAD_ONCE_QUESTIONS[:questions]
    with tempfile.TemporaryDirectory(prefix="llava-bench-") as tmp:
        folder = Path(tmp)
        checkpoint = write_tiny_checkpoint(folder / "tiny-llava-video")
        # About 600 KB a frame at 2 fps (noise compresses poorly).
        video = write_minutes_video(folder / "big.mp4", megabytes / 600_000 * 1e6 / 120, fps=2, size=(1280, 720))
        size = video.stat().st_size
        limits = {
            "max_upload_bytes": str(4 * size),
            "media_store_bytes": str(4 * size),
            "media_dir": str(folder / "media"),
            "decode_timeout": "600",
        }
        results: dict = {
            "machine": machine(),
            "workload": f"one {size / 1e6:.0f} MB 1280x720 H.264 video ({video.stat().st_size} bytes), "
            f"{len(asked)} questions, {frames} frames, {tokens} new tokens per answer",
            "video_bytes": size,
        }
        with served(checkpoint, folder / "upload-once.log", **limits) as base, httpx.Client(timeout=1200) as client:

            def question(prompt: str, **body: object) -> float:
                metadata = {"prompt": prompt, "num_frames": frames, "max_new_tokens": tokens, "ignore_eos": True}
                started = time.perf_counter()
                if "media_id" in body:
                    response = client.post(f"{base}/analyze_video", json={**body, "metadata": metadata})
                else:
                    with video.open("rb") as file:  # streamed from disk, as curl -F sends it
                        response = client.post(
                            f"{base}/analyze_video", files={"video": file}, data={"metadata": json.dumps(metadata)}
                        )
                elapsed = time.perf_counter() - started
                if response.status_code != 200:
                    raise RuntimeError(f"request failed: {response.status_code} {response.text}")
                return elapsed

            reupload = [question(prompt) for prompt in asked]
            started = time.perf_counter()
            with video.open("rb") as file:
                stored = client.post(f"{base}/media", files={"file": file}).json()
            upload_seconds = time.perf_counter() - started
            by_id = [question(prompt, media_id=stored["id"]) for prompt in asked]
        results["reupload"] = {"seconds": reupload, "bytes_sent": size * len(asked)}
        results["once"] = {"upload_s": upload_seconds, "seconds": by_id, "bytes_sent": size}
    return results


def report_upload_once(results: dict) -> str:
    again, once = results["reupload"], results["once"]
    follow_again = statistics.median(again["seconds"][1:])
    follow_id = statistics.median(once["seconds"][1:])
    lines = [
        f"Machine: {results['machine']}",
        f"Workload: {results['workload']}",
        "",
        "| | every question uploads the video | uploaded once, then by media_id |",
        "|---|---|---|",
        f"| upload to POST /media | - | {once['upload_s']:.3f} s |",
    ]
    for number, (a, b) in enumerate(zip(again["seconds"], once["seconds"], strict=True), start=1):
        lines.append(f"| question {number} | {a:.3f} s | {b:.3f} s |")
    total_once = once["upload_s"] + sum(once["seconds"])
    lines += [
        f"| all questions (and the upload) | {sum(again['seconds']):.3f} s | {total_once:.3f} s |",
        f"| bytes sent | {again['bytes_sent'] / 1e6:.0f} MB | {once['bytes_sent'] / 1e6:.0f} MB |",
        "",
        f"A follow-up by id: {follow_id:.3f} s against {follow_again:.3f} s re-uploaded "
        f"(x{follow_id / follow_again:.3f}, median of questions 2 on; target x0.1).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upload-once", type=float, metavar="MB", help="re-upload against upload once, this big")
    parser.add_argument("--questions", type=int, default=5, help="questions about the video (--upload-once)")
    parser.add_argument("--rounds", type=int, default=3, help="pairs of new videos per service (median)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per answer (make demo's default)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    args = parser.parse_args()
    if args.upload_once:
        results = upload_once(args.upload_once, args.questions, args.frames, args.tokens)
        print(report_upload_once(results))
        if args.out:
            args.out.write_text(json.dumps(results, indent=2))
        return
    with tempfile.TemporaryDirectory(prefix="llava-bench-") as tmp:
        folder = Path(tmp)
        # Two services x (2 videos per round) + one warm-up video each; services never share bytes.
        checkpoint, videos = write_inputs(folder, 2 * (2 * args.rounds + 1))
        half = len(videos) // 2
        server, files = file_server(folder)
        results: dict = {
            "machine": machine(),
            "workload": f"1280x720 H.264 videos, {args.frames} frames, {args.tokens} new tokens per answer",
        }
        try:
            off = {"feature_cache_bytes": "0", "prefix_cache_bytes": "0"}
            for name, settings, own in (("no_reuse", off, videos[:half]), ("reuse", {}, videos[half:])):
                with served(checkpoint, folder / f"{name}.log", url_allowlist="127.0.0.1", **settings) as base:
                    asker = Asker(base, files, args.frames, args.tokens)
                    results[name] = asker.rounds(own)
                    if name == "no_reuse":
                        http = [asker.ask(own[0], QUESTIONS[i % 2], by_url=False) for i in range(args.rounds)]
            direct = direct_seconds(checkpoint, videos[0], args.frames, args.tokens, args.rounds)
            results["overhead"] = {"http_s": statistics.median(http), "direct_s": direct}
        finally:
            server.shutdown()
    print(report(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
