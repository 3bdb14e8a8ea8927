"""The real model's size on a GPU: LLaVA-Video-7B-Qwen2's architecture, random weights, 4-bit.

    python -m bench.gpu [--frames 16,32,64] [--new-tokens 128] [--bandwidth BYTES_PER_S]
                        [--workdir DIR] [--out gpu.json]
    python -m bench.gpu --tiny --frames 2,4 --new-tokens 4 --out gpu.json   # CPU smoke run

Writes a checkpoint of the published model's architecture and file layout (the lmms-lab original:
Qwen2-7B, SigLIP so400m, mlp2x_gelu projector, ``mm_*`` config, about 16 GB of bfloat16 in 5 GB
safetensors shards with ``model.safetensors.index.json``) with random weights drawn on the GPU
(testing.tiny.write_random_checkpoint), loads it through our loader as the service does (nf4,
Flash Attention 2 when installed, else SDPA) and drives the engine directly:

- workloads: one 1280x720 image; videos of each ``--frames`` count (random uint8 frames already at
  the tower's 384x384, so no decoding);
- for each: a first question alone (batch 1); a second question about the same frames (follow-up:
  features and prompt KV reused, as the service does for media seen before); 8 different inputs
  submitted at once (batch 8).
  Every request generates exactly ``--new-tokens`` tokens (``ignore_eos``);
- time to first token (from the submit call to the first Delta of the stream), decode tokens/s
  (after the first token; for batch 8 while all 8 rows decode together), peak memory;
- decode against the memory-bandwidth bound: a decode step reads at least the language model's
  weights (4-bit packed with their quantisation constants, norms, the float16 lm_head), one
  embedding row per sequence and each row's KV cache; bound = rows x bandwidth / those bytes.

It imports only llava_custom (torch, transformers, bitsandbytes, safetensors, PIL, numpy), never
bentoml, decord, media or service.py: the GPU machine has none of those.
"""

from __future__ import annotations

import os

# Before huggingface_hub is imported: nothing here downloads (the so400m tower's config is built
# into the loader; the tiny run's tower is written into the local cache).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import bisect  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402

from bench.machine import machine  # noqa: E402
from llava_custom.builder import LoadedModel, load_pretrained_model  # noqa: E402
from llava_custom.engine import (  # noqa: E402
    Engine,
    EngineLimits,
    GenerationSettings,
    MediaRef,
    ReuseCache,
    TokenStream,
)
from llava_custom.prompting import Conversation, Turn  # noqa: E402
from llava_custom.reuse import image_key, video_key  # noqa: E402
from testing.tiny import LLAVA_VIDEO_7B, TinySpec, write_random_checkpoint  # noqa: E402

REQUESTS = 8  # the concurrent rows
IMAGE_SIZE = (1280, 720)  # (width, height)
VIDEO_SECONDS = 60.0  # frames are sampled uniformly over a video this long
QUESTIONS = {"image": "Describe this image in detail.", "video": "What happens in this video?"}
SHORT_QUESTION = "Name a colour."
FOLLOW_UP = "What colour is the largest object, and where is it?"
# Peak memory bandwidth by device name, first match wins (so more specific names come first).
NOMINAL_BANDWIDTH = (
    ("GH200", 4.0e12),
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB", 1.935e12),
    ("A100", 1.555e12),
    ("L40S", 0.864e12),
    ("A10G", 0.6e12),
    ("L4", 0.3e12),
    ("RTX 4090", 1.008e12),
)
GIB = 1024**3


def log(message: str) -> None:
    print(f"[bench.gpu] {message}", file=sys.stderr, flush=True)


# --- measuring one stream ---------------------------------------------------------------------


@dataclass
class StreamTiming:
    """When one request was submitted and when each of its tokens arrived (perf_counter seconds)."""

    submitted: float
    token_times: list[float]
    prompt_tokens: int

    @property
    def first(self) -> float:
        return self.token_times[0]

    @property
    def ttft(self) -> float:
        return self.first - self.submitted


def read_stream(stream: TokenStream, submitted: float) -> StreamTiming:
    """Iterate ``stream`` to its end, timing every Delta (each carries one token)."""
    times: list[float] = []
    prompt_tokens = 0
    for delta in stream:
        times.append(time.perf_counter())
        if delta.answer is not None:
            prompt_tokens = delta.answer.prompt_tokens
    return StreamTiming(submitted, times, prompt_tokens)


Ask = Callable[[str], TokenStream]  # submits one question about one input


def run_at_once(asks: list[Ask], question: str) -> list[StreamTiming]:
    """Submit one question per input back to back, each stream read by its own thread."""
    with ThreadPoolExecutor(len(asks)) as readers:
        futures = []
        for ask in asks:
            submitted = time.perf_counter()
            futures.append(readers.submit(read_stream, ask(question), submitted))
        return [future.result() for future in futures]


@dataclass(frozen=True)
class Decode:
    """Decode speed over a stretch of steps, with what the bandwidth bound needs to know of it."""

    tokens_per_s: float
    steps: int
    rows: float  # sequences per step
    context: float  # mean KV length per row (tokens) the steps attended over
    window: str  # which steps were measured


def decode_alone(timing: StreamTiming) -> Decode:
    """Steps after the first token (which the prefill gives) of a request decoding on its own."""
    steps = len(timing.token_times) - 1
    seconds = timing.token_times[-1] - timing.first
    # Step j attends over the prompt and j tokens: the mean is prompt + (steps + 1) / 2.
    return Decode(steps / seconds, steps, 1, timing.prompt_tokens + (steps + 1) / 2, "alone")


def decode_together(timings: list[StreamTiming], decode_steps: int) -> Decode:
    """Steps in which every request decodes: from the last one's first token to the first one's end.

    Requests join the batch one by one (prefills run one at a time between decode steps), so the
    steps are counted on the last request to join; each row attends over its own prompt plus the
    tokens it has so far (the paged KV cache reads no padding), averaged over rows and steps. When
    the first request ends before the last one joins (too few new tokens), it falls back to the
    whole run: every decode token over the time from the first first token to the last token,
    prefills included, with the mean batch size from the scheduler's step counter
    (``decode_steps`` steps ran for these requests).
    """
    last = max(timings, key=lambda timing: timing.first)
    end = min(timing.token_times[-1] for timing in timings)
    steps = [moment for moment in last.token_times[1:] if moment <= end]
    if steps:
        widths = [
            statistics.fmean(
                timing.prompt_tokens + bisect.bisect_right(timing.token_times, moment) for timing in timings
            )
            for moment in steps
        ]
        rate = len(timings) * len(steps) / (steps[-1] - last.first)
        return Decode(rate, len(steps), len(timings), statistics.fmean(widths), f"all {len(timings)} rows decoding")
    tokens = sum(len(timing.token_times) - 1 for timing in timings)
    seconds = max(timing.token_times[-1] for timing in timings) - min(timing.first for timing in timings)
    context = statistics.fmean(timing.prompt_tokens + len(timing.token_times) / 2 for timing in timings)
    window = "whole run, prefills included (the rows never decoded all together: raise --new-tokens)"
    return Decode(tokens / seconds, decode_steps, tokens / max(decode_steps, 1), context, window)


# --- the memory-bandwidth bound ---------------------------------------------------------------


@dataclass(frozen=True)
class StepBytes:
    """Bytes one decode step must read at least, apart from the KV cache."""

    weights: int  # language-model weights (quantised ones with their constants) and lm_head
    embedding_row: int  # one input embedding row, per sequence
    kv_per_token: int  # K and V of one token in every layer, per sequence

    def per_step(self, rows: float, context: float) -> float:
        return self.weights + rows * (self.embedding_row + context * self.kv_per_token)

    def bound_tokens_per_s(self, decode: Decode, bandwidth: float) -> float:
        return decode.rows * bandwidth / self.per_step(decode.rows, decode.context)


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def quant_state_bytes(state: object) -> int:
    """bitsandbytes' QuantState: absmax (uint8 with double quantisation), code, offset, nested state."""
    if state is None:
        return 0
    own = sum(
        tensor_bytes(value)
        for value in (getattr(state, name, None) for name in ("absmax", "code", "offset"))
        if isinstance(value, torch.Tensor)
    )
    return own + quant_state_bytes(getattr(state, "state2", None))


def step_bytes(loaded: LoadedModel) -> StepBytes:
    model = loaded.model
    language = model.model.language_model
    embedding = language.get_input_embeddings().weight
    weights = sum(
        tensor_bytes(tensor) + quant_state_bytes(getattr(tensor, "quant_state", None))
        for tensor in [*language.parameters(), *language.buffers()]
        if tensor is not embedding
    )
    weights += sum(tensor_bytes(tensor) for tensor in model.lm_head.parameters())
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * loaded.dtype.itemsize
    return StepBytes(weights, embedding.shape[1] * embedding.element_size(), kv)


def bandwidth(option: float | None, device: torch.device) -> tuple[float, str]:
    """Bytes/s: ``--bandwidth``, else the device's nominal peak, else a measured copy."""
    if option:
        return option, "--bandwidth"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in NOMINAL_BANDWIDTH:
            if key in name:
                return value, f"nominal for {key}"
    return measured_copy_bandwidth(device), "measured (tensor copy, bytes read + written)"


def measured_copy_bandwidth(device: torch.device) -> float:
    size = (256 if device.type == "cuda" else 64) * 1024**2
    source = torch.ones(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(5):
        target.copy_(source)
    synchronize(device)
    return 2 * 5 * size / (time.perf_counter() - started)


# --- memory -----------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int:
    """Peak GPU memory allocated by torch since the last reset; on CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- workloads --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    modality: str  # "image" or "video"
    frames: int = 0
    image_size: tuple[int, int] = IMAGE_SIZE  # (width, height)

    def ask(self, engine: Engine, seed: int, settings: GenerationSettings) -> Ask:
        """A function submitting a question about one input of this workload, new for each seed.
        As the service does, an input seen before is recalled (features) instead of passed again."""
        rng = np.random.default_rng(seed)
        if self.modality == "image":
            image = synthetic_image(rng, self.image_size)
            key = image_key(f"bench-{seed}")

            def ask_image(question: str) -> TokenStream:
                media = engine.recall(key)
                pixels = None if media else image
                return engine.submit_image(pixels, question, settings, media or MediaRef(key))

            return ask_image
        width, height = engine.frame_size
        frames = rng.integers(0, 256, (self.frames, height, width, 3), dtype=np.uint8)
        times = [index * VIDEO_SECONDS / self.frames for index in range(self.frames)]
        key = video_key(f"bench-{seed}", self.frames)

        def ask_video(question: str) -> TokenStream:
            media = engine.recall(key)
            pixels = None if media else frames
            return engine.submit_video(pixels, VIDEO_SECONDS, times, question, settings, media or MediaRef(key))

        return ask_video

    def visual_tokens(self, loaded: LoadedModel) -> int:
        if self.modality == "image":
            return loaded.model.image_layout.num_image_tokens(self.image_size[1], self.image_size[0])
        return loaded.model.video_layout.num_video_tokens(self.frames)


def synthetic_image(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A colour gradient with noise, ``size`` = (width, height)."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    gradient = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=-1)
    noise = rng.integers(0, 48, gradient.shape)
    return Image.fromarray(((gradient + noise) % 256).astype(np.uint8))


def workloads(frame_counts: list[int]) -> list[Workload]:
    image = Workload(f"image {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}", "image")
    return [image] + [Workload(f"video {frames} frames", "video", frames) for frames in frame_counts]


# --- the benchmark ----------------------------------------------------------------------------


@dataclass
class Row:
    workload: str
    run: str  # "batch 1", "follow-up (same input)", "batch 8"
    requests: int
    prompt_tokens: int  # per request (the longest of the batch)
    new_tokens: int  # per request
    ttft_s: float  # median over the requests
    ttft_max_s: float
    decode_tokens_per_s: float  # all rows together
    decode_steps: int
    decode_rows: float
    context_tokens: float
    bound_tokens_per_s: float
    of_bound: float
    peak_memory_bytes: int
    wall_s: float
    decode_window: str


class Bench:
    def __init__(self, engine: Engine, device: torch.device, costs: StepBytes, bandwidth: float, new_tokens: int):
        self.engine, self.device, self.costs, self.bandwidth = engine, device, costs, bandwidth
        self.settings = GenerationSettings(max_new_tokens=new_tokens, ignore_eos=True)

    def warm_up(self) -> None:
        """Every kernel shape family once (vision tower on frames and tiles, prefill, decode at
        batch 1 and several rows) on small inputs, so that no row pays first-call costs."""
        settings = GenerationSettings(max_new_tokens=3, ignore_eos=True)
        video = Workload("warm-up", "video", 2)
        run_at_once([video.ask(self.engine, seed, settings) for seed in (1, 2)], QUESTIONS["video"])
        image = Workload("warm-up", "image", image_size=(512, 384))
        run_at_once([image.ask(self.engine, 3, settings)], QUESTIONS["image"])

    def mixed(self, longest: Workload, seed: int) -> tuple[list[Row], dict]:
        """Eight short text questions, then the longest video beside seven of them: the decode step
        of each, and the KV the engine held for the mix against its tokens' own bytes."""

        def short(index: int) -> Ask:
            return lambda question: self.engine.submit_text(
                Conversation([Turn("user", f"{question} ({index})")]), self.settings
            )

        shorts = [short(index) for index in range(REQUESTS)]
        rows = [self.row(Workload("8 short questions", "text"), f"batch {REQUESTS}", shorts, SHORT_QUESTION)]
        stats = self.engine.scheduler.stats
        stats.peak_kv_tokens_held = stats.kv_tokens_at_peak = 0
        mix = [longest.ask(self.engine, seed, self.settings), *shorts[1:]]
        rows.append(self.row(Workload(f"{longest.name} + 7 short questions", "video"), "mixed", mix, SHORT_QUESTION))
        step_ms = [1000 * row.decode_rows / row.decode_tokens_per_s for row in rows]
        kv = {
            "short_step_ms": step_ms[0],
            "mixed_step_ms": step_ms[1],
            "kv_held_bytes": stats.peak_kv_tokens_held * self.costs.kv_per_token,
            "kv_token_bytes": stats.kv_tokens_at_peak * self.costs.kv_per_token,
        }
        return rows, kv

    def workload(self, workload: Workload, seed: int) -> list[Row]:
        """First question alone, the follow-up about the same input, then 8 new inputs at once."""
        question = QUESTIONS[workload.modality]
        first = workload.ask(self.engine, seed, self.settings)
        rows = [self.row(workload, "batch 1", [first], question)]
        rows.append(self.row(workload, "follow-up (same input)", [first], FOLLOW_UP))
        batch = [workload.ask(self.engine, seed + 1 + index, self.settings) for index in range(REQUESTS)]
        rows.append(self.row(workload, f"batch {REQUESTS}", batch, question))
        return rows

    def row(self, workload: Workload, run: str, asks: list[Ask], question: str) -> Row:
        log(f"{workload.name}: {run}")
        synchronize(self.device)
        reset_peak_memory(self.device)
        steps_before = self.engine.scheduler.stats.decode_steps
        started = time.perf_counter()
        timings = run_at_once(asks, question)
        wall = time.perf_counter() - started
        if len(timings) == 1:
            decode = decode_alone(timings[0])
        else:
            decode = decode_together(timings, self.engine.scheduler.stats.decode_steps - steps_before)
        bound = self.costs.bound_tokens_per_s(decode, self.bandwidth)
        ttfts = [timing.ttft for timing in timings]
        return Row(
            workload=workload.name,
            run=run,
            requests=len(timings),
            prompt_tokens=max(timing.prompt_tokens for timing in timings),
            new_tokens=min(len(timing.token_times) for timing in timings),
            ttft_s=statistics.median(ttfts),
            ttft_max_s=max(ttfts),
            decode_tokens_per_s=decode.tokens_per_s,
            decode_steps=decode.steps,
            decode_rows=decode.rows,
            context_tokens=decode.context,
            bound_tokens_per_s=bound,
            of_bound=decode.tokens_per_s / bound,
            peak_memory_bytes=peak_memory(self.device),
            wall_s=wall,
            decode_window=decode.window,
        )


def comparisons(rows: list[Row]) -> list[dict]:
    """Per workload: batch-8 / batch-1 decode tokens/s, follow-up / first time to first token."""
    result = []
    for name in dict.fromkeys(row.workload for row in rows if row.run == "batch 1"):
        runs = {row.run.split(" (")[0]: row for row in rows if row.workload == name}
        alone, follow_up, batch = runs["batch 1"], runs["follow-up"], runs[f"batch {REQUESTS}"]
        result.append(
            {
                "workload": name,
                "batch8_vs_batch1_decode": batch.decode_tokens_per_s / alone.decode_tokens_per_s,
                "follow_up_vs_first_ttft": follow_up.ttft_s / alone.ttft_s,
            }
        )
    return result


def versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}
    for package in ("bitsandbytes", "flash-attn", "accelerate"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
        return f"{torch.cuda.get_device_name(device)} ({memory / GIB:.0f} GiB); host {machine()}"
    return machine()


@contextmanager
def checkpoint_folder(workdir: Path | None) -> Iterator[Path]:
    """``workdir`` (kept) or a temporary directory removed afterwards."""
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix="llava-bench-gpu-") as folder:
        yield Path(folder)


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    if args.tiny:
        spec, device, shard_bytes = TinySpec(), torch.device("cpu"), 10**6
    elif torch.cuda.is_available():
        spec, device, shard_bytes = LLAVA_VIDEO_7B, torch.device("cuda"), 5 * 10**9
    else:
        raise SystemExit("no CUDA GPU is visible: the real-size run needs one (--tiny runs the CPU smoke test)")
    name = "tiny-llava-video-random" if args.tiny else "llava-video-7b-qwen2-random"
    with checkpoint_folder(args.workdir) as folder:
        log(f"writing random weights to {folder / name} (drawn on {device})")
        checkpoint = write_random_checkpoint(folder / name, spec, device=device, shard_bytes=shard_bytes)
        write_s = time.perf_counter() - started
        checkpoint_bytes = sum(file.stat().st_size for file in checkpoint.glob("*.safetensors"))
        if device.type == "cuda":
            torch.cuda.empty_cache()
        reset_peak_memory(device)
        log(f"wrote {size(checkpoint_bytes)} in {write_s:.1f} s; loading (4-bit: {args.load_4bit})")
        loading = time.perf_counter()
        loaded = load_pretrained_model(str(checkpoint), load_4bit=args.load_4bit, device=device.type)
        synchronize(device)
        load_s = time.perf_counter() - loading
    load_peak = peak_memory(device)
    costs = step_bytes(loaded)
    bytes_per_s, bandwidth_source = bandwidth(args.bandwidth, device)
    all_workloads = workloads(args.frames)
    longest = max(workload.visual_tokens(loaded) for workload in all_workloads)
    # Room for 8 of the longest prompts (visual tokens plus a generous text part) and their answers.
    limits = EngineLimits(
        max_batch_size=REQUESTS,
        max_waiting=REQUESTS,
        kv_cache_tokens=REQUESTS * (longest + 1024 + args.new_tokens),
        request_timeout=3600.0,
    )
    # The service's default cache sizes (LLAVA_FEATURE_CACHE_BYTES, LLAVA_PREFIX_CACHE_BYTES).
    engine = Engine(loaded, limits, ReuseCache(2 * 1024**3, 2 * 1024**3))
    try:
        bench = Bench(engine, device, costs, bytes_per_s, args.new_tokens)
        log(f"loaded in {load_s:.1f} s ({loaded.attn_implementation}); warming up")
        bench.warm_up()
        rows = []
        for index, workload in enumerate(all_workloads):
            rows += bench.workload(workload, seed=1000 * (index + 1))
        mixed_rows, mixed = bench.mixed(all_workloads[-1], seed=99_000)
        rows += mixed_rows
    finally:
        engine.close()
    text = loaded.model.config.text_config
    return {
        "machine": describe_machine(device),
        "device": device.type,
        "versions": versions(),
        "model": "tiny (testing.tiny.TinySpec)" if args.tiny else "LLaVA-Video-7B-Qwen2 architecture",
        "config": {
            "text_hidden": text.hidden_size,
            "text_layers": text.num_hidden_layers,
            "text_heads": text.num_attention_heads,
            "text_kv_heads": text.num_key_value_heads,
            "text_intermediate": text.intermediate_size,
            "vocab_rows": text.vocab_size,
            "vision_hidden": loaded.model.config.vision_config.hidden_size,
            "vision_layers": loaded.model.config.vision_config.num_hidden_layers,
        },
        "attention": loaded.attn_implementation,
        "load_4bit": loaded.load_4bit,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "checkpoint_bytes": checkpoint_bytes,
        "write_s": write_s,
        "load_s": load_s,
        "load_peak_memory_bytes": load_peak,
        "peak_memory_bytes": max([load_peak] + [row.peak_memory_bytes for row in rows]),
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS of the process",
        "bandwidth_bytes_per_s": bytes_per_s,
        "bandwidth_source": bandwidth_source,
        "step_weight_bytes": costs.weights,
        "kv_bytes_per_token": costs.kv_per_token,
        "new_tokens": args.new_tokens,
        "rows": [asdict(row) for row in rows],
        "comparisons": comparisons(rows),
        "mixed": mixed,
        "total_s": time.perf_counter() - started,
    }


def size(count: int) -> str:
    return f"{count / 1e9:.2f} GB" if count >= 10**8 else f"{count / 1e6:.2f} MB"


def report(results: dict) -> str:
    found = results["versions"]
    memory = "peak GPU memory" if results["device"] == "cuda" else "peak RSS"
    lines = [
        f"Machine: {results['machine']}",
        f"Versions: torch {found['torch']}, transformers {found['transformers']}, bitsandbytes "
        f"{found['bitsandbytes']}, flash-attn {found['flash-attn']}, Python {found['python']}",
        f"Model: {results['model']}, random weights; 4-bit: {results['load_4bit']}, dtype {results['dtype']}, "
        f"attention {results['attention']}",
        f"Checkpoint: {size(results['checkpoint_bytes'])} written in {results['write_s']:.1f} s; "
        f"loaded in {results['load_s']:.1f} s ({memory} after loading {results['load_peak_memory_bytes'] / GIB:.2f} "
        f"GiB, whole run {results['peak_memory_bytes'] / GIB:.2f} GiB)",
        f"Bound: {results['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s ({results['bandwidth_source']}); a decode step "
        f"reads {size(results['step_weight_bytes'])} of weights + "
        f"{results['kv_bytes_per_token'] / 1024:.0f} KiB of KV cache per token of context per row",
        f"Every request generates {results['new_tokens']} tokens; TTFT of batch {REQUESTS} is median / max "
        "of its requests",
        "",
        f"| workload | run | prompt tokens | TTFT s | decode tok/s | context | bound tok/s | of bound | {memory} GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        ttft = f"{row['ttft_s']:.3f}"
        if row["requests"] > 1:
            ttft += f" / {row['ttft_max_s']:.3f}"
        lines.append(
            f"| {row['workload']} | {row['run']} | {row['prompt_tokens']} | {ttft} | "
            f"{row['decode_tokens_per_s']:.1f} | {row['context_tokens']:.0f} | {row['bound_tokens_per_s']:.0f} | "
            f"{row['of_bound']:.1%} | {row['peak_memory_bytes'] / GIB:.2f} |"
        )
    lines += ["", f"| workload | decode batch {REQUESTS} / batch 1 | follow-up TTFT / first TTFT |", "|---|---|---|"]
    for item in results["comparisons"]:
        lines.append(
            f"| {item['workload']} | x{item['batch8_vs_batch1_decode']:.2f} | x{item['follow_up_vs_first_ttft']:.2f} |"
        )
    mixed = results["mixed"]
    ratio = mixed["mixed_step_ms"] / mixed["short_step_ms"]
    lines.append(
        f"\nOne video of the longest workload beside 7 short questions: a decode step {mixed['mixed_step_ms']:.1f} ms "
        f"against {mixed['short_step_ms']:.1f} ms for 8 short questions (x{ratio:.2f}); "
        f"KV held {mixed['kv_held_bytes'] / GIB:.2f} GiB for {mixed['kv_token_bytes'] / GIB:.2f} GiB of tokens "
        f"(x{mixed['kv_held_bytes'] / max(mixed['kv_token_bytes'], 1):.2f})."
    )
    partial = {row["decode_window"] for row in results["rows"] if row["decode_window"].startswith("whole run")}
    if partial:
        lines.append(f"\nBatch rows measured over the {partial.pop()}.")
    lines.append(f"\nTotal {results['total_s']:.0f} s.")
    return "\n".join(lines)


def frame_counts(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("--frames takes positive frame counts separated by commas, e.g. 16,32,64")
    return counts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny config on CPU (smoke run)")
    parser.add_argument("--frames", type=frame_counts, default=[16, 32, 64], help="video frame counts (16,32,64)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens each request generates (128)")
    parser.add_argument("--bandwidth", type=float, help="memory bandwidth in bytes/s (default: by GPU name)")
    parser.add_argument("--load-4bit", action=argparse.BooleanOptionalAction, default=True, help="nf4 (default)")
    parser.add_argument("--workdir", type=Path, help="where the weights go (kept); default a temp dir")
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (decode speed is measured after the first token)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    results = run(args)
    print(report(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
