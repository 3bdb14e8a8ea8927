"""Load benchmark of the served demo: continuous batching against one request at a time.

    python -m bench.load [--tokens 192] [--frames 2] [--out results.json]

Starts `bentoml serve` on a tiny checkpoint (CPU, loopback only) twice, one after the other: the
service as configured (LLAVA_MAX_BATCH_SIZE=8) and the baseline that decodes one request at a
time (LLAVA_MAX_BATCH_SIZE=1, the old engine's behaviour). Against each it measures, over real
HTTP with a bounded number of requests:

- 8 different videos sent one after another, then all 8 at once (repeated, median reported);
- closed-loop concurrency 1/4/8/16: requests/s, generated tokens/s, p50/p99 latency;
- how long a 1-token request (its time to first token, over HTTP) takes while 7 others generate,
  against the same request on an idle service;
- the 8-videos comparison again with 16 frames per video (prefill-heavy).

Every request asks for exactly ``--tokens`` new tokens (``ignore_eos``) so that token counts are
the same in every run. Results are printed as Markdown and optionally written as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.machine import machine
from testing.served import served

VIDEOS = 8


class Client:
    """Sends video questions and records latency and generated tokens."""

    def __init__(self, base: str, videos: list[Path], frames: int, tokens: int) -> None:
        self.base, self.videos, self.frames, self.tokens = base, videos, frames, tokens
        self.local = threading.local()

    def ask(self, index: int, tokens: int | None = None) -> tuple[float, int]:
        """(seconds, completion tokens) of one question about video ``index``."""
        client = getattr(self.local, "client", None) or httpx.Client(timeout=600)
        self.local.client = client
        metadata = {
            "prompt": f"What happens in video {index}?",
            "num_frames": self.frames,
            "max_new_tokens": tokens or self.tokens,
            "ignore_eos": True,
        }
        video = self.videos[index % len(self.videos)]
        started = time.perf_counter()
        response = client.post(
            f"{self.base}/analyze_video",
            files={"video": (video.name, video.read_bytes(), "video/mp4")},
            data={"metadata": json.dumps(metadata)},
        )
        elapsed = time.perf_counter() - started
        body = response.json()
        if response.status_code != 200:
            raise RuntimeError(f"request failed: {response.status_code} {body}")
        return elapsed, body["usage"]["completion_tokens"]

    def run(self, count: int, concurrency: int) -> dict:
        """``count`` requests from ``concurrency`` clients, each sending its next as soon as one returns."""
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(self.ask, range(count)))
        wall = time.perf_counter() - started
        latencies = sorted(seconds for seconds, _ in results)
        tokens = sum(count for _, count in results)
        return {
            "requests": count,
            "concurrency": concurrency,
            "wall_s": wall,
            "requests_per_s": count / wall,
            "tokens_per_s": tokens / wall,
            "p50_s": statistics.median(latencies),
            "p99_s": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
        }

    def late_first_token(self, others: int = 7) -> dict:
        """Latency of a 1-token request on an idle service, and while ``others`` requests generate."""
        idle = min(self.ask(0, tokens=1)[0] for _ in range(3))
        with ThreadPoolExecutor(others) as pool:
            running = [pool.submit(self.ask, 1 + i) for i in range(others)]
            time.sleep(0.2 * others**0.5)  # let them all start generating
            busy, _ = self.ask(0, tokens=1)
            still_running = sum(not future.done() for future in running)
            for future in running:
                future.result()
        return {"idle_s": idle, "while_busy_s": busy, "others_still_running": still_running}


def median_run(runs: list[dict]) -> dict:
    """The run with the median wall time (2 cores shared with the service: single runs are noisy)."""
    return sorted(runs, key=lambda run: run["wall_s"])[len(runs) // 2]


def bench_service(base: str, videos: list[Path], frames: int, tokens: int, repeats: int) -> dict:
    client = Client(base, videos, frames, tokens)
    client.run(VIDEOS, VIDEOS)  # warm-up: every video, every batch size
    pairs = [(client.run(VIDEOS, 1), client.run(VIDEOS, VIDEOS)) for _ in range(repeats)]
    sweep = [client.run(max(8, 2 * c), c) for c in (1, 4, 8, 16)]
    heavy = Client(base, videos, 16, tokens)
    heavy.ask(0)
    heavy_pairs = [(heavy.run(VIDEOS, 1), heavy.run(VIDEOS, VIDEOS)) for _ in range(repeats)]
    return {
        "eight_sequential": median_run([sequential for sequential, _ in pairs]),
        "eight_at_once": median_run([together for _, together in pairs]),
        "eight_ratios": [sequential["wall_s"] / together["wall_s"] for sequential, together in pairs],
        "sweep": sweep,
        "late_request": client.late_first_token(),
        "sixteen_frames_sequential": median_run([sequential for sequential, _ in heavy_pairs]),
        "sixteen_frames_at_once": median_run([together for _, together in heavy_pairs]),
    }


def write_inputs(folder: Path) -> tuple[Path, list[Path]]:
    """A tiny checkpoint and 8 different short videos (320x240, 3 s and a bit more each)."""
    from testing.mediafiles import write_video
    from testing.tiny import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(folder / "tiny-llava-video")
    videos = [write_video(folder / f"video{i}.mp4", frames=30 + i, fps=10, size=(320, 240)) for i in range(VIDEOS)]
    return checkpoint, videos


def report(results: dict) -> str:
    lines = [f"Machine: {results['machine']}", f"Workload: {results['workload']}", ""]
    header = "| | batch 1 (baseline) | continuous batching | ratio |\n|---|---|---|---|"
    base, ours = results["baseline"], results["batched"]

    def row(name: str, a: float, b: float, unit: str, higher_better: bool = True) -> str:
        ratio = b / a if higher_better else a / b
        return f"| {name} | {a:.2f} {unit} | {b:.2f} {unit} | x{ratio:.2f} |"

    lines.append(header)
    for label, key in (("8 videos one after another", "eight_sequential"), ("8 videos at once", "eight_at_once")):
        lines.append(row(f"{label}: requests/s", base[key]["requests_per_s"], ours[key]["requests_per_s"], "req/s"))
        lines.append(row(f"{label}: tokens/s", base[key]["tokens_per_s"], ours[key]["tokens_per_s"], "tok/s"))
    for key, label in (
        ("sixteen_frames_sequential", "16 frames, one after another"),
        ("sixteen_frames_at_once", "16 frames, 8 at once"),
    ):
        lines.append(row(f"{label}: tokens/s", base[key]["tokens_per_s"], ours[key]["tokens_per_s"], "tok/s"))
    late_base, late_ours = base["late_request"], ours["late_request"]
    lines.append(row("1-token request, idle service", late_base["idle_s"], late_ours["idle_s"], "s", False))
    lines.append(
        row("1-token request while 7 generate", late_base["while_busy_s"], late_ours["while_busy_s"], "s", False)
    )
    lines += ["", "Concurrency sweep (closed loop):", ""]
    columns = ["concurrency", "requests"]
    for name in ("batch 1", "batching"):
        columns += [f"{name} req/s", f"{name} tok/s", f"{name} p50 / p99 s"]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|---" * len(columns) + "|")
    for a, b in zip(base["sweep"], ours["sweep"], strict=True):
        lines.append(
            f"| {a['concurrency']} | {a['requests']} | {a['requests_per_s']:.2f} | {a['tokens_per_s']:.0f} | "
            f"{a['p50_s']:.2f} / {a['p99_s']:.2f} | {b['requests_per_s']:.2f} | {b['tokens_per_s']:.0f} | "
            f"{b['p50_s']:.2f} / {b['p99_s']:.2f} |"
        )
    for name, data in (("continuous batching", ours), ("batch 1", base)):
        ratios = ", ".join(f"x{ratio:.2f}" for ratio in data["eight_ratios"])
        lines.append(f"\n{name}: 8 at once / 8 one after another, each repeat: {ratios}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=192, help="new tokens per request")
    parser.add_argument("--frames", type=int, default=2, help="frames per video (the headline workload)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the 8-videos comparisons (median)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llava-bench-") as tmp:
        folder = Path(tmp)
        checkpoint, videos = write_inputs(folder)
        results = {
            "machine": machine(),
            "workload": f"{args.frames} frames and {args.tokens} new tokens per request; 16-frame rows likewise",
        }
        for name, batch in (("baseline", 1), ("batched", 8)):
            with served(checkpoint, folder / f"{name}.log", max_batch_size=str(batch)) as base:
                results[name] = bench_service(base, videos, args.frames, args.tokens, args.repeats)
    print(report(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
