"""What a request's fields become in the engine: every route's schema converts itself with the
server's defaults (http_api.schemas), so the same fields decode the same way on every route."""

from __future__ import annotations

import pytest

from http_api.errors import RequestError
from http_api.limits import RequestDefaults
from http_api.schemas import ChatRequest, JobMetadata, JobQuestion, Metadata

DEFAULTS = RequestDefaults(max_new_tokens=32, max_new_tokens_limit=64, num_frames=8, max_frames=16)
FIELDS = {"max_new_tokens": 10, "temperature": 0.5, "top_p": 0.9, "top_k": 3, "seed": 7}
MESSAGES = [{"role": "user", "content": "Hi"}]


def test_the_same_decoding_fields_give_the_same_engine_settings_on_every_route() -> None:
    native = Metadata.model_validate(FIELDS).generation(DEFAULTS)
    job = JobMetadata.model_validate(FIELDS).parameters(DEFAULTS).generation
    question = JobQuestion.model_validate(FIELDS | {"task_id": "0" * 32, "question": "?"}).generation(DEFAULTS)
    chat_fields = {k: v for k, v in FIELDS.items() if k != "max_new_tokens"}
    chat = ChatRequest.model_validate(chat_fields | {"messages": MESSAGES, "max_completion_tokens": 10})
    older = ChatRequest.model_validate(chat_fields | {"messages": MESSAGES, "max_tokens": 10})
    assert native == job == question == chat.generation(DEFAULTS) == older.generation(DEFAULTS)
    assert (native.max_new_tokens, native.temperature, native.top_p, native.top_k, native.seed) == (10, 0.5, 0.9, 3, 7)


def test_absent_fields_take_the_server_defaults_and_limits_name_the_field() -> None:
    plain = Metadata.model_validate({}).generation(DEFAULTS)
    assert (plain.max_new_tokens, plain.temperature, plain.top_p, plain.top_k, plain.stop) == (32, 0.0, 1.0, 0, ())
    assert Metadata.model_validate({}).sampling(DEFAULTS).num_frames == 8
    assert Metadata.model_validate({"num_frames": 3}).sampling(DEFAULTS).num_frames == 3
    with pytest.raises(RequestError, match="num_frames may be at most 16") as refused:
        Metadata.model_validate({"num_frames": 17}).sampling(DEFAULTS)
    assert refused.value.param == "num_frames"
    with pytest.raises(RequestError, match="max_completion_tokens may be at most 64") as refused:
        ChatRequest.model_validate({"messages": MESSAGES, "max_completion_tokens": 65}).generation(DEFAULTS)
    assert refused.value.param == "max_completion_tokens"
    with pytest.raises(RequestError, match="max_tokens may be at most 64"):
        ChatRequest.model_validate({"messages": MESSAGES, "max_tokens": 65}).generation(DEFAULTS)
    logprobs = ChatRequest.model_validate({"messages": MESSAGES, "logprobs": True, "top_logprobs": 2})
    assert logprobs.generation(DEFAULTS).logprobs == 2
    assert ChatRequest.model_validate({"messages": MESSAGES, "stop": "END"}).generation(DEFAULTS).stop == ("END",)
