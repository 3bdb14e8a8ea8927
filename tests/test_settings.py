"""Settings: the model's id in the OpenAI API, and the limit objects handed to the other parts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

import settings
from llava_custom.limits import EngineLimits
from media.fetch import FetchLimits
from settings import Settings, explain


@pytest.fixture(autouse=True)
def no_llava_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The session's served-app fixtures leave LLAVA_* variables set; these tests read defaults."""
    for name in [name for name in os.environ if name.startswith("LLAVA_")]:
        monkeypatch.delenv(name)


def test_model_id_is_the_hub_id_or_the_folder_name_unless_set(tmp_path: Path) -> None:
    assert Settings(model="lmms-lab/LLaVA-Video-7B-Qwen2").model_id == "lmms-lab/LLaVA-Video-7B-Qwen2"
    (tmp_path / "my-checkpoint").mkdir()
    assert Settings(model=str(tmp_path / "my-checkpoint")).model_id == "my-checkpoint"
    assert Settings(model=str(tmp_path / "my-checkpoint"), served_model_name="llava-video").model_id == "llava-video"


def test_defaults_are_those_of_the_limit_objects() -> None:
    settings = Settings()
    assert settings.engine_limits() == EngineLimits()
    fetch = settings.fetch_limits()
    default = FetchLimits(max_bytes=fetch.max_bytes)
    assert (fetch.connect_timeout, fetch.read_timeout, fetch.total_timeout, fetch.max_redirects) == (
        default.connect_timeout,
        default.read_timeout,
        default.total_timeout,
        default.max_redirects,
    )
    assert fetch.max_data_url_bytes == default.max_data_url_bytes


def test_jobs_are_shared_through_redis_only_when_its_url_is_set() -> None:
    from jobs.limits import DEFAULT_CLAIM_TIMEOUT_SECONDS, SharedJobSettings

    assert Settings().shared_jobs() is None  # one machine: the file store, no server needed
    assert Settings(redis_url=" ").shared_jobs() is None
    shared = Settings(redis_url="rediss://user:secret@redis:6380/2", job_dir_shared=True).shared_jobs()
    assert shared == SharedJobSettings("rediss://user:secret@redis:6380/2", DEFAULT_CLAIM_TIMEOUT_SECONDS, True)


def test_guard_limits_follow_the_settings() -> None:
    limits = Settings(max_batch_size=3, max_pending_requests=2, max_upload_bytes=5_000_000).guard_limits()
    assert limits.max_in_flight == 5 and limits.max_upload_bytes == 5_000_000


@pytest.mark.parametrize(
    "env",
    [
        {"LLAVA_NUM_FRAMES": "100"},
        {"LLAVA_URL_ALLOWLIST": "not a host!"},
        {"LLAVA_API_KEY": "  "},
        {"LLAVA_WARMUP_FRAMES": "65"},
    ],
)
def test_invalid_settings_are_refused(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError):
        Settings()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"LLAVA_DEVICE": "gpu"}, "LLAVA_DEVICE='gpu': Input should be 'auto', 'cuda' or 'cpu'"),
        ({"LLAVA_NUM_FRAMES": "100"}, "LLAVA_NUM_FRAMES=100 exceeds LLAVA_MAX_FRAMES=64: lower LLAVA_NUM_FRAMES"),
        ({"LLAVA_SHUTDOWN_GRACE_SECONDS": "-1"}, "LLAVA_SHUTDOWN_GRACE_SECONDS='-1'"),
        ({"LLAVA_REDIS_URL": "http://redis:6379"}, "LLAVA_REDIS_URL='http://redis:6379': Redis URL must specify one"),
        ({"LLAVA_REDIS_URL": "redis://redis:port/0"}, "Port could not be cast to integer value"),
    ],
)
def test_an_invalid_setting_is_explained_in_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as error:
        Settings()
    text = explain(error.value)
    assert expected in text and "\n" not in text


@pytest.mark.parametrize(
    ("env", "secret"),
    [
        ({"LLAVA_REDIS_URL": "redis://:s3cret@redis:port/0"}, "s3cret"),
        ({"LLAVA_REDIS_URL": "rediss://user:s3cret@redis:99999999/0"}, "s3cret"),
        ({"LLAVA_API_KEY": "   "}, "   "),
    ],
)
def test_an_invalid_setting_never_shows_a_password_or_the_api_key(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], secret: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as error:
        Settings()
    text = explain(error.value)
    (name,) = env
    assert f"{name}=" in text and "***" in text and repr(secret) not in text and "s3cret" not in text, text


def test_each_unknown_llava_variable_is_warned_about_naming_the_closest_setting() -> None:
    environ = {"LLAVA_MAX_FRAMS": "8", "LLAVA_MODEL": "x", "LLAVA_SHOE_SIZE": "9", "OTHER_MAX_FRAMS": "8"}
    warnings = settings.unknown_variables(environ)
    assert warnings == [
        "LLAVA_MAX_FRAMS is not a setting of this service and is ignored; did you mean LLAVA_MAX_FRAMES?",
        "LLAVA_SHOE_SIZE is not a setting of this service and is ignored; see README, Configuration",
    ]
    assert settings.unknown_variables({f"LLAVA_{name.upper()}": "1" for name in Settings.model_fields}) == []
