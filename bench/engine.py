"""The engine alone, in-process: what the scheduler gains over plain ``generate()``, and TTFT.

    python -m bench.engine [--tokens 192] [--frames 2]

On a tiny checkpoint on CPU, 8 different video questions (exactly ``--tokens`` new tokens each):

- baseline: transformers' ``model.generate()`` on each in turn (what the engine did before);
- the engine with ``max_batch_size=1`` (one at a time), then 8 submitted at once (batch of 8);
- time to first token of a question submitted while 7 others generate, against an idle engine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.machine import machine
from llava_custom.builder import load_pretrained_model
from llava_custom.engine import Engine, EngineLimits, GenerationSettings, PreparedRequest
from testing.tiny import write_tiny_checkpoint

REQUESTS = 8


def questions(engine: Engine, frames: int, tokens: int) -> list[PreparedRequest]:
    settings = GenerationSettings(max_new_tokens=tokens, ignore_eos=True)
    times = [i * 0.5 for i in range(frames)]
    return [
        engine.prepare_video(
            np.random.default_rng(i).integers(0, 256, (frames, 384, 384, 3), dtype=np.uint8),
            frames * 0.5,
            times,
            f"What happens in video {i}?",
            settings,
        )
        for i in range(REQUESTS)
    ]


def plain_generate(engine: Engine, prepared: list[PreparedRequest], tokens: int) -> float:
    """Seconds for ``generate()`` on each request in turn, as the engine ran before batching."""
    model = engine.model
    started = time.perf_counter()
    with torch.inference_mode():
        for request in prepared:
            model.generate(
                input_ids=request.input_ids,
                attention_mask=torch.ones_like(request.input_ids),
                pixel_values_videos=request.pixel_inputs["pixel_values_videos"],
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
            )
    return time.perf_counter() - started


def engine_run(engine: Engine, prepared: list[PreparedRequest], *, at_once: bool) -> float:
    started = time.perf_counter()
    if at_once:
        streams = [engine.submit(request) for request in prepared]
        for stream in streams:
            stream.result()
    else:
        for request in prepared:
            engine.submit(request).result()
    return time.perf_counter() - started


def first_token_seconds(engine: Engine, request: PreparedRequest) -> float:
    started = time.perf_counter()
    stream = engine.submit(request)
    next(iter(stream))
    elapsed = time.perf_counter() - started
    stream.cancel()
    return elapsed


def time_to_first_token(engine: Engine, prepared: list[PreparedRequest]) -> tuple[float, float]:
    """(idle, while the other 7 generate) seconds to the first token of the same question."""
    idle = min(first_token_seconds(engine, prepared[0]) for _ in range(3))
    others = [engine.submit(request) for request in prepared[1:]]
    for stream in others:
        next(iter(stream))  # all of them are in the batch now
    busy = first_token_seconds(engine, prepared[0])
    for stream in others:
        stream.result()
    return idle, busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=192)
    parser.add_argument("--frames", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llava-bench-") as tmp:
        loaded = load_pretrained_model(str(write_tiny_checkpoint(Path(tmp) / "tiny")), load_4bit=False, device="cpu")
    one_at_a_time = Engine(loaded, EngineLimits(max_batch_size=1))
    batching = Engine(loaded, EngineLimits(max_batch_size=REQUESTS))
    prepared = questions(batching, args.frames, args.tokens)
    engine_run(batching, prepared[:1], at_once=False)  # warm-up
    baseline = plain_generate(batching, prepared, args.tokens)
    sequential = engine_run(one_at_a_time, prepared, at_once=False)
    together = engine_run(batching, prepared, at_once=True)
    idle, busy = time_to_first_token(batching, prepared)
    one_at_a_time.close()
    batching.close()
    total = REQUESTS * args.tokens
    print(f"Machine: {machine()}, torch threads {torch.get_num_threads()}")
    print(f"Workload: {REQUESTS} questions, {args.frames} frames, {args.tokens} new tokens each\n")
    print("| run | seconds | tokens/s | vs generate() |\n|---|---|---|---|")
    for name, seconds in (
        ("generate(), one after another (baseline)", baseline),
        ("engine, max_batch_size=1, one after another", sequential),
        (f"engine, {REQUESTS} at once", together),
    ):
        print(f"| {name} | {seconds:.2f} | {total / seconds:.0f} | x{baseline / seconds:.2f} |")
    print(f"\nTime to first token: idle {idle * 1000:.0f} ms, while 7 others generate {busy * 1000:.0f} ms")


if __name__ == "__main__":
    main()
