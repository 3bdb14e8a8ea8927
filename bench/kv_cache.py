"""The engine's decode step and KV memory, old engine against new, in one run.

    python -m bench.kv_cache [--baseline REV] [--long-tokens 8192] [--seconds 4] [--width tiny|real]

Each engine runs in a fresh process on the same checkpoint: the new one from this tree, the old
one from ``--baseline``'s ``llava_custom`` (extracted with ``git archive``, as bench/decode.py
does). In each, with every row decoding (``ignore_eos``), it counts decode steps over
``--seconds`` and reports milliseconds per step for:

- batch 1: one short text question;
- batch 8: eight short text questions;
- mixed: one row holding ``--long-tokens`` prompt tokens (a long text prompt) beside seven short ones;

and, for the mixed batch, the KV bytes the engine holds against the bytes of the tokens it really
holds (every row's prompt and generated tokens, at layers x KV heads x head dim x 2 x dtype size).

``--width real`` uses Qwen2-7B's layer shapes (hidden 3584, 28 query and 4 KV heads of 128,
intermediate 18944, vocabulary 152064) with 2 decoder layers, random weights, 4-bit bitsandbytes as
in production (on CPU), and a 13.6k-token long row (a 64-frame video's prompt); it also profiles a
mixed step and reports the share of its time spent outside matrix products and attention.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHORT_ROWS = 7
NEW_TOKENS = 4000  # more than any window decodes: every row keeps decoding until cancelled


def baseline_code(workdir: Path, rev: str) -> Path:
    """``rev``'s llava_custom package, extracted into the workdir."""
    folder = workdir / f"baseline-{rev}"
    folder.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "llava_custom"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


# --- one engine, in a fresh process --------------------------------------------------------------


def kv_bytes(engine) -> tuple[int, int]:
    """(bytes the engine holds for the running rows' KV, bytes of the tokens they really hold)."""
    scheduler = engine.scheduler
    text = engine.model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    itemsize = engine.model.model.get_input_embeddings().weight.element_size()
    per_token = text.num_hidden_layers * text.num_key_value_heads * head_dim * 2 * itemsize
    requests = scheduler._batch.requests
    if hasattr(scheduler, "runner"):  # the paged engine: whole blocks of its pool
        tokens = sum(request.kv.length for request in requests)
        held = scheduler.kv_tokens_held * scheduler.runner.pool.bytes_per_token
    else:  # the padded engine: its DynamicCache's tensors
        tokens = sum(request.length for request in requests)
        held = sum(layer.keys.nbytes + layer.values.nbytes for layer in scheduler._batch.cache.layers)
    return held, tokens * per_token


def next_step(stats, after: int) -> tuple[int, float]:
    """Wait until the decode step counter passes ``after``; the count and when it moved."""
    while stats.decode_steps == after:
        time.sleep(0.0005)
    return stats.decode_steps, time.perf_counter()


def measure(engine, prepared: list, seconds: float) -> dict:
    """Submit every request, wait until all decode, then count decode steps for ``seconds``."""
    streams = [engine.submit(request) for request in prepared]
    for stream in streams:
        next(iter(stream))
    stats = engine.scheduler.stats
    deadline = time.monotonic() + 600
    while len(engine.scheduler._batch.requests) < len(prepared):  # the last to join is in the batch
        assert time.monotonic() < deadline, "not every row is decoding"
        time.sleep(0.01)
    steps, started = next_step(stats, stats.decode_steps)
    # At least ``seconds`` and three steps (real width on CPU steps slowly), from one step's end to another's.
    last = steps
    while time.perf_counter() - started < seconds or last - steps < 3:
        last, ended = next_step(stats, last)
    count, elapsed = last - steps, ended - started
    held, needed = kv_bytes(engine)
    for stream in streams:
        stream.cancel()
    for stream in streams:
        try:
            stream.result()
        except Exception:  # cancelled, as asked
            pass
    return {"ms_per_step": 1000 * elapsed / count, "steps": count, "kv_held": held, "kv_needed": needed}


def profile_step(engine, prepared: list) -> dict:
    """Share of a mixed decode step outside matrix products and attention (torch.profiler, CPU).

    The scheduler's thread is idle by now, so the rows are prefilled and stepped by the engine's
    runner on this thread, where the profiler sees them."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    runner = engine.scheduler.runner
    rows = []
    with torch.inference_mode():
        for request in prepared:
            row = runner.new_row()
            runner.prefill(row, runner.embed_tokens(request.input_ids), logits=True)
            rows.append(row)
        tokens = torch.full((len(rows),), 5)
        runner.decode(rows, tokens)  # once before, as the profiled steps are not the first
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                runner.decode(rows, tokens)
    for row in rows:
        row.release()
    arithmetic = ("addmm", "aten::mm", "matmul", "bmm", "linear", "scaled_dot_product", "gemv", "gemm", "dequant")
    events = [e for e in prof.key_averages() if e.key.startswith("aten::") or "bitsandbytes" in e.key]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    inside = sum(e.self_cpu_time_total for e in events if any(word in e.key.lower() for word in arithmetic))
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
    return {
        "outside_share": 1 - inside / total,
        "top_ops": [(e.key, round(e.self_cpu_time_total / 3000, 2)) for e in top],  # ms per step
    }


def run_one(checkpoint: str, width: str, long_tokens: int, seconds: float, compile_step: str | None) -> dict:
    import torch

    from llava_custom.builder import load_pretrained_model
    from llava_custom.engine import Engine, EngineLimits, GenerationSettings
    from llava_custom.prompting import Conversation, Turn

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    started = time.perf_counter()
    loaded = load_pretrained_model(checkpoint, load_4bit=width == "real", device="cpu")
    # Room for the old engine's padded batch too (8 rows as long as the longest), so both run the mix.
    limits = EngineLimits(max_batch_size=8, kv_cache_tokens=8 * (long_tokens + NEW_TOKENS + 256))
    if compile_step is not None:  # the old engine has no such setting
        limits = dataclasses.replace(limits, compile=compile_step)
    engine = Engine(loaded, limits)
    engine.warm_up()  # as the service does before it says ready (and compiles the step then)
    ready = time.perf_counter() - started
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS, ignore_eos=True)

    def ask(text: str):
        return engine.prepare_text(Conversation([Turn("user", text)]), settings)

    short = [ask(f"Question {i}: what is in the picture?") for i in range(SHORT_ROWS + 1)]
    words = " ".join(f"w{i % 97}" for i in range(long_tokens))
    long = ask(words)
    while long.prompt_tokens > long_tokens:  # trim to the tokens asked for
        words = words[: int(len(words) * long_tokens / long.prompt_tokens) - 1]
        long = ask(words)
    results = {
        "ready_s": ready,
        "batch 1": measure(engine, short[:1], seconds),
        "batch 8": measure(engine, short, seconds),
        "mixed": measure(engine, [long, *short[:SHORT_ROWS]], seconds),
        "long_prompt_tokens": long.prompt_tokens,
    }
    if hasattr(engine.scheduler, "runner"):  # False when a compiled step failed and fell back to eager
        results["step_compiled"] = engine.scheduler.runner.compiled
    if width == "real" and hasattr(engine.scheduler, "runner"):
        results["profile"] = profile_step(engine, [long, *short[:SHORT_ROWS]])
    engine.close()
    return results


# --- the whole run -------------------------------------------------------------------------------


def write_checkpoint(folder: Path, width: str) -> Path:
    if width == "tiny":
        from testing.tiny import write_tiny_checkpoint

        return write_tiny_checkpoint(folder / "tiny")
    from testing.tiny import LLAVA_VIDEO_7B, write_random_checkpoint

    spec = dataclasses.replace(LLAVA_VIDEO_7B, text_layers=2, vision_layers=1)
    return write_random_checkpoint(folder / "real-width", spec)


def run_child(
    engine: str, checkpoint: Path, args: argparse.Namespace, code: Path | None, compile_step: str | None = None
) -> dict:
    path = [str(code), str(REPO)] if code else [str(REPO)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    command = [sys.executable, "-m", "bench.kv_cache", "--one", str(checkpoint), "--width", args.width]
    command += ["--long-tokens", str(args.long_tokens), "--seconds", str(args.seconds)]
    command += ["--compile", compile_step] if compile_step else []
    done = subprocess.run(command, cwd=code or REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the {engine} engine failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(results: dict) -> str:
    old, new = results["old"], results["new"]
    runs = [("old", old), ("new", new)] + ([("compiled", results["compiled"])] if "compiled" in results else [])
    lines = [
        f"Machine: {results['machine']}; {results['width']} width; long row {new['long_prompt_tokens']} prompt tokens",
        "",
        "| decode step, ms | "
        + " | ".join(name for name, _ in runs)
        + " | new / old |"
        + (" compiled / old |" if len(runs) == 3 else ""),
        "|---" * (len(runs) + 1 + (len(runs) - 1)) + "|",
    ]
    for name in ("batch 1", "batch 8", "mixed"):
        cells = [f"{run[name]['ms_per_step']:.2f}" for _, run in runs]
        ratios = [f"x{run[name]['ms_per_step'] / old[name]['ms_per_step']:.2f}" for _, run in runs[1:]]
        lines.append(f"| {name} | " + " | ".join(cells + ratios) + " |")
    lines.append("| load + warm-up to ready, s | " + " | ".join(f"{run['ready_s']:.1f}" for _, run in runs) + " |")
    for label, run in runs:
        mixed = run["mixed"]
        if label == "compiled" and not run.get("step_compiled", True):
            lines.append("\ncompiled: the compiled step failed and the engine fell back to eager (see its log)")
        lines.append(
            f"\n{label}: mixed step / 8 short = x{mixed['ms_per_step'] / run['batch 8']['ms_per_step']:.2f}; "
            f"KV held for the mix {mixed['kv_held'] / 2**20:.1f} MiB for {mixed['kv_needed'] / 2**20:.1f} MiB of "
            f"tokens (x{mixed['kv_held'] / mixed['kv_needed']:.2f})"
        )
        if "profile" in run:
            share = run["profile"]["outside_share"]
            lines.append(f"{label}: share of a mixed step outside the layers' arithmetic {share:.0%}")
            lines.append(f"{label}: its largest ops, ms per step: {run['profile']['top_ops']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="ad7b400", help="git revision of the old engine")
    parser.add_argument("--width", choices=("tiny", "real"), default="tiny")
    parser.add_argument("--long-tokens", type=int, default=None, help="default: 8192 (tiny), 13600 (real)")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled decode step")
    parser.add_argument("--compile", choices=("on", "off"), help=argparse.SUPPRESS)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.long_tokens = args.long_tokens or (8192 if args.width == "tiny" else 13600)
    if args.one:
        print(json.dumps(run_one(args.one, args.width, args.long_tokens, args.seconds, args.compile)))
        return
    from bench.machine import machine

    with tempfile.TemporaryDirectory(prefix="llava-bench-kv-") as tmp:
        workdir = Path(tmp)
        checkpoint = write_checkpoint(workdir, args.width)
        results = {"machine": machine(), "width": args.width, "baseline": args.baseline}
        results["old"] = run_child("old", checkpoint, args, baseline_code(workdir, args.baseline))
        results["new"] = run_child("new", checkpoint, args, None, "off")
        if not args.no_compile:
            results["compiled"] = run_child("new, compiled", checkpoint, args, None, "on")
    print(report(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
