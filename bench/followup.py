"""Follow-up questions over HTTP: reuse of decoded media, features and prompt KV against none.

    python -m bench.followup [--rounds 3] [--frames 16] [--tokens 32] [--out results.json]

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="pairs of new videos per service (median)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per answer (make demo's default)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    args = parser.parse_args()
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
