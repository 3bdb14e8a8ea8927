"""testing.tiny's readable demo checkpoint: the random model's answers hold no control characters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import engine_with

from llava_custom.builder import load_pretrained_model
from llava_custom.engine import GenerationSettings
from testing.tiny import build_tokenizer, unreadable_token_ids, write_tiny_checkpoint


def unreadable(text: str) -> list[str]:
    return [ch for ch in text if not ch.isprintable() and ch != "\n" or ch == "\ufffd"]


def test_the_unreadable_tokens_are_control_bytes_lone_bytes_and_rows_past_the_tokenizer() -> None:
    tokenizer = build_tokenizer()
    ids = unreadable_token_ids(tokenizer, len(tokenizer) + 6)
    by_text = {tokenizer.decode([token_id]): token_id for token_id in range(len(tokenizer))}
    assert by_text["\x00"] in ids and by_text["\x0e"] in ids and by_text["\t"] in ids
    assert by_text["a"] not in ids and by_text["\n"] not in ids and by_text[" "] not in ids
    assert not set(ids) & set(tokenizer.all_special_ids)  # the answer still ends
    assert set(range(len(tokenizer), len(tokenizer) + 6)) <= set(ids)


@pytest.fixture(scope="module")
def answers(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, list[str]]:
    """Greedy and sampled answers about random frames, from the checkpoint with and without ``readable``."""
    found = {}
    for readable in (False, True):
        path = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny", readable=readable)
        loaded = load_pretrained_model(str(path), load_4bit=False, device="cpu")
        with engine_with(loaded, max_batch_size=8) as engine:
            streams = []
            for seed in range(8):
                frames = np.random.default_rng(seed).integers(0, 256, (2, 384, 384, 3), dtype=np.uint8)
                # Greedy and sampled at temperature 1, in turn.
                settings = GenerationSettings(max_new_tokens=48, ignore_eos=True, temperature=seed % 2, seed=seed)
                streams.append(engine.submit_video(frames, 1.0, [0.0, 0.5], f"What happens in clip {seed}?", settings))
            texts = [stream.result().text for stream in streams]
        found[readable] = texts
    return found


def test_the_readable_checkpoint_answers_without_control_characters(answers: dict[bool, list[str]]) -> None:
    assert any(unreadable(text) for text in answers[False])  # what the demo answered before
    assert all(text and not unreadable(text) for text in answers[True]), answers[True]


def test_the_tests_checkpoint_is_written_as_before(tmp_path: Path) -> None:
    """Without ``readable`` the weights are those the golden data's fingerprints were made from."""
    plain = write_tiny_checkpoint(tmp_path / "plain")
    again = write_tiny_checkpoint(tmp_path / "again", readable=False)
    assert (plain / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
