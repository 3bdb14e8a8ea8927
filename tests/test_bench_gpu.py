"""bench.gpu: a real smoke run of the tiny configuration on CPU, its decode-window arithmetic, and
the 7B checkpoint writer's layout (checked on the meta device, nothing drawn)."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.gpu import REQUESTS, StreamTiming, decode_alone, decode_together
from llava_custom.checkpoint import ORIGINAL_KEY_MAPPING, SO400M_ID, read_checkpoint
from llava_custom.modeling import LlavaVideoForConditionalGeneration
from testing import tiny

REPO = Path(__file__).resolve().parents[1]
RUNS = ("batch 1", "follow-up (same input)", f"batch {REQUESTS}")


def test_tiny_run_reports_every_row(tmp_path):
    out = tmp_path / "gpu.json"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "bench.gpu", "--tiny", "--frames", "2,4", "--new-tokens", "4", "--out", str(out)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert "| workload | run |" in done.stdout
    expected = [(workload, run) for workload in ("image 1280x720", "video 2 frames", "video 4 frames") for run in RUNS]
    expected += [("8 short questions", "batch 8"), ("video 4 frames + 7 short questions", "mixed")]
    assert [(row["workload"], row["run"]) for row in results["rows"]] == expected
    for row in results["rows"]:
        numbers = {key: value for key, value in row.items() if not isinstance(value, str)}
        assert len(numbers) == 13 and all(value > 0 for value in numbers.values()), row
        assert row["new_tokens"] == 4 and row["requests"] == (1 if row["run"].startswith(("batch 1", "follow")) else 8)
    mixed = results["mixed"]
    assert mixed["mixed_step_ms"] > 0 and mixed["short_step_ms"] > 0
    # Whole blocks of each row's own tokens: at most one partly filled block per row.
    assert (
        mixed["kv_token_bytes"]
        <= mixed["kv_held_bytes"]
        < mixed["kv_token_bytes"] + 8 * 16 * results["kv_bytes_per_token"]
    )
    assert "beside 7 short questions" in done.stdout
    for item in results["comparisons"]:
        assert item["batch8_vs_batch1_decode"] > 0 and item["follow_up_vs_first_ttft"] > 0
    for key in ("write_s", "load_s", "peak_memory_bytes", "bandwidth_bytes_per_s", "step_weight_bytes"):
        assert results[key] > 0, key
    assert results["attention"] == "sdpa" and results["load_4bit"] is True
    assert results["versions"]["torch"] and results["machine"]


def test_decode_alone_counts_steps_after_the_first_token():
    timing = StreamTiming(submitted=0.0, token_times=[1.0, 1.5, 2.0, 2.5], prompt_tokens=100)
    decode = decode_alone(timing)
    assert decode.tokens_per_s == pytest.approx(2.0) and decode.steps == 3 and decode.rows == 1
    assert decode.context == pytest.approx(102)  # steps attend over 101, 102, 103 tokens


def test_decode_together_measures_while_every_row_decodes():
    # Row 0 starts at t=0 and decodes at 1..9; row 1 joins at t=3 (first token) and decodes at 4..12.
    early = StreamTiming(0.0, [float(t) for t in range(10)], prompt_tokens=50)
    late = StreamTiming(0.0, [float(t) for t in range(3, 13)], prompt_tokens=60)
    decode = decode_together([early, late], decode_steps=12)
    # Together from t=3 to t=9 (row 0's last token): steps at 4..9, two tokens each, in 6 s.
    assert decode.steps == 6 and decode.rows == 2 and decode.tokens_per_s == pytest.approx(2.0)
    assert decode.window.startswith("all 2 rows")
    # Each row's own length, averaged: row 0 (50 + tokens so far, 5..10) and row 1 (60 + 2..7).
    assert decode.context == pytest.approx(statistics.fmean((50 + n + 3 + 60 + n) / 2 for n in range(2, 8)))


def test_decode_together_falls_back_to_the_whole_run():
    early = StreamTiming(0.0, [0.0, 1.0], prompt_tokens=50)
    late = StreamTiming(0.0, [2.0, 3.0], prompt_tokens=50)
    decode = decode_together([early, late], decode_steps=2)
    assert decode.window.startswith("whole run")
    assert decode.tokens_per_s == pytest.approx(2 / 3) and decode.rows == pytest.approx(1)


def test_real_size_checkpoint_reads_back_as_llava_video_7b(tmp_path, monkeypatch):
    """The 7B writer's config and tensor names/shapes, without drawing 16 GB: what the loader's
    config reading gives must build a model of exactly the written shapes (after key renames)."""
    written: dict[str, tuple[int, ...]] = {}

    def record_shapes(shapes, draw, path, shard_bytes) -> None:
        written.update(shapes)
        (path / "model.safetensors").touch()  # what read_checkpoint looks for; nothing is loaded

    monkeypatch.setattr(tiny, "_save_drawn_shards", record_shapes)
    folder = tiny.write_random_checkpoint(tmp_path / "7b", tiny.LLAVA_VIDEO_7B)
    config = json.loads((folder / "config.json").read_text())
    assert config["mm_vision_tower"] == SO400M_ID and config["vocab_size"] == 152064
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"]) == (3584, 28, 4)
    assert config["intermediate_size"] == 18944 and config["mm_hidden_size"] == 1152

    checkpoint = read_checkpoint(str(folder))
    with torch.device("meta"):
        model = LlavaVideoForConditionalGeneration(checkpoint.config)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}

    def renamed(name: str) -> str:
        for pattern, replacement in ORIGINAL_KEY_MAPPING.items():
            name = re.sub(pattern, replacement, name)
        return name

    assert {renamed(name): shape for name, shape in written.items()} == expected
    parameters = sum(torch.Size(shape).numel() for shape in written.values())
    assert 8.0e9 < parameters < 8.1e9  # Qwen2-7B's 7.6 B and so400m's 0.4 B without its last layer
    sizes = {name: torch.Size(shape).numel() * 2 for name, shape in written.items()}
    shards = tiny.plan_shards(sizes, 5 * 10**9)
    assert len(shards) == 4 and all(sum(sizes[name] for name in shard) <= 5 * 10**9 for shard in shards)
