"""A served demo with LLAVA_API_KEY: who gets in, with which clients; and what /metrics shows."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import openai
import pytest
from conftest import TEST_API_KEY

pytestmark = pytest.mark.served
KEY = TEST_API_KEY  # of the session's `keyed` instance (conftest), shared with the web page's tests


def post_clip(base: str, media_dir: Path, headers: dict[str, str]) -> httpx.Response:
    with (media_dir / "clip.mp4").open("rb") as clip:
        return httpx.post(
            f"{base}/analyze_video",
            files={"video": ("clip.mp4", clip)},
            data={"metadata": '{"num_frames": 2}'},
            headers=headers,
            timeout=120,
        )


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_without_the_right_key_requests_get_401(keyed, media_dir, headers) -> None:
    response = post_clip(keyed, media_dir, headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["status"] == "failed" and "key" in response.json()["error"]
    chat = httpx.post(f"{keyed}/v1/chat/completions", json={"messages": []}, headers=headers, timeout=30)
    assert chat.status_code == 401 and chat.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{keyed}/v1/models", headers=headers, timeout=30).status_code == 401
    job = httpx.post(f"{keyed}/jobs/submit", json={"video_url": "http://127.0.0.1/x.mp4"}, headers=headers, timeout=30)
    assert job.status_code == 401 and job.json()["status"] == "failed"
    assert httpx.get(f"{keyed}/jobs/status?task_id={'0' * 32}", headers=headers, timeout=30).status_code == 401


def test_the_right_key_gets_in_from_every_client(keyed, media_dir, file_server) -> None:
    assert post_clip(keyed, media_dir, {"Authorization": f"Bearer {KEY}"}).status_code == 200
    sdk = openai.OpenAI(base_url=f"{keyed}/v1", api_key=KEY, max_retries=0, timeout=120)
    model = sdk.models.list().data[0].id
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"{file_server}/photo.jpg"}}]}]
    assert sdk.chat.completions.create(model=model, messages=messages).choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed}/v1", api_key="wrong", max_retries=0).models.list()
    import bentoml

    with bentoml.SyncHTTPClient(keyed, token=KEY, timeout=120) as client:
        assert client.analyze_image(image_url=f"{file_server}/photo.jpg")["status"] == "success"


def test_health_and_metrics_need_no_key(keyed) -> None:
    for path in ("/livez", "/readyz", "/metrics"):
        assert httpx.get(f"{keyed}{path}", timeout=30).status_code == 200, path


def test_the_route_table_decides_which_routes_need_the_key(keyed) -> None:
    """Every route http_api.routes marks open answers without the key, every other one is a 401."""
    from http_api.routes import ROUTES

    for route in ROUTES:
        path = route.path + ("index.html" if route.path == "/ui/" else "x" if route.prefix else "")
        status = httpx.get(f"{keyed}{path}", timeout=30).status_code
        assert (status == 401) == route.needs_key, (path, status)
    assert httpx.get(f"{keyed}/no-such-route", timeout=30).status_code == 401  # anything else needs it too


def test_the_api_description_is_open_and_a_client_without_a_token_is_told_why(keyed, file_server) -> None:
    """/docs, /docs.json and BentoML's /schema.json describe the API and hold no data: open, so
    that a browser opens /docs and BentoML's client gets as far as the call's 401."""
    docs = httpx.get(f"{keyed}/docs", timeout=30)
    assert docs.status_code == 200 and "swagger-ui" in docs.text
    assert "Metadata" in httpx.get(f"{keyed}/docs.json", timeout=30).json()["components"]["schemas"]
    assert httpx.get(f"{keyed}/schema.json", timeout=30).status_code == 200
    import bentoml

    with (
        bentoml.SyncHTTPClient(keyed, timeout=120) as client,
        pytest.raises(bentoml.exceptions.BentoMLException) as info,
    ):
        client.analyze_image(image_url=f"{file_server}/photo.jpg")
    assert "API key" in str(info.value) and "schema" not in str(info.value)


def metric(text: str, name: str, labels: str = "") -> float:
    found = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, flags=re.M)
    assert found, f"{name}{labels} not in /metrics"
    return float(found.group(1))


def test_metrics_move_with_a_request(keyed, media_dir) -> None:
    before = httpx.get(f"{keyed}/metrics", timeout=30).text
    assert post_clip(keyed, media_dir, {"Authorization": f"Bearer {KEY}"}).status_code == 200
    after = httpx.get(f"{keyed}/metrics", timeout=30).text
    route = '{route="/analyze_video",status="200"}'
    assert metric(after, "llava_requests_total", route) == metric(before, "llava_requests_total", route) + 1
    assert metric(after, "llava_requests_total", '{route="/analyze_video",status="401"}') >= 3
    for name in ("llava_prompt_tokens_total", "llava_generated_tokens_total", "llava_visual_tokens_total"):
        assert metric(after, name) > metric(before, name), name
    assert metric(after, "llava_frames_decoded_total") - metric(before, "llava_frames_decoded_total") in (0, 2)
    for name in ("llava_queue_wait_seconds_count", "llava_prefill_seconds_count", "llava_generate_seconds_count"):
        assert metric(after, name) == metric(before, name) + 1, name
    assert metric(after, "llava_decode_seconds_count", '{kind="video"}') >= 1
    assert metric(after, "llava_requests_running") == 0 and metric(after, "llava_requests_waiting") == 0
    hits = metric(after, "llava_cache_hits_total", '{cache="features"}')
    misses = metric(after, "llava_cache_misses_total", '{cache="features"}')
    assert hits + misses >= 1 and metric(after, "llava_cache_bytes", '{cache="features"}') > 0
    assert "bentoml_service_request_total" in after or "bentoml_" in after  # BentoML's own are kept


def test_job_routes_are_counted_per_route_not_per_job(keyed) -> None:
    """The task id is in the query: no metric series (ours or BentoML's) per job."""
    headers = {"Authorization": f"Bearer {KEY}"}
    for task in ("0" * 32, "1" * 32):
        for route in ("status", "get"):
            response = httpx.get(f"{keyed}/jobs/{route}", params={"task_id": task}, headers=headers, timeout=30)
            assert response.status_code == 404
    text = httpx.get(f"{keyed}/metrics", timeout=30).text
    assert metric(text, "llava_requests_total", '{route="/jobs/status",status="404"}') >= 2
    assert metric(text, "llava_requests_total", '{route="/jobs/get",status="404"}') >= 2
    assert "0" * 32 not in text and "1" * 32 not in text


def test_the_route_table_gives_the_metric_labels(keyed) -> None:
    """Each route is counted under its label in http_api.routes; the rest as "other"; /metrics not at all."""
    from http_api.routes import ROUTES

    headers = {"Authorization": f"Bearer {KEY}"}
    statuses = {}
    for route in ROUTES:
        if not route.prefix and route.metric not in (None, "other"):
            statuses[route.metric] = httpx.get(f"{keyed}{route.path}", headers=headers, timeout=30).status_code
    text = httpx.get(f"{keyed}/metrics", timeout=30).text
    for label, status in statuses.items():
        assert metric(text, "llava_requests_total", f'{{route="{label}",status="{status}"}}') >= 1, label
    httpx.get(f"{keyed}/docs.json", timeout=30)
    text = httpx.get(f"{keyed}/metrics", timeout=30).text
    assert metric(text, "llava_requests_total", '{route="other",status="200"}') >= 1
    assert 'route="/metrics"' not in text and 'route="/docs.json"' not in text


def test_bentomls_request_metrics_are_labelled_by_route_not_by_file_id_or_unknown_path(keyed) -> None:
    """BentoML's own request metrics made a series per path: per stored file's id, per scanned path."""
    import secrets

    headers = {"Authorization": f"Bearer {KEY}"}
    ids = [f"file-{secrets.token_hex(16)}" for _ in range(3)]
    unknown = [f"/no-such-{secrets.token_hex(8)}" for _ in range(3)]
    before = httpx.get(f"{keyed}/metrics", timeout=30).text
    label = '{endpoint="/v1/files/{id}",http_response_code="404"'
    counted = sum(
        float(line.split()[-1])
        for line in before.splitlines()
        if line.startswith(f"bentoml_service_request_total{label}")
    )
    for file_id in ids:
        assert httpx.get(f"{keyed}/v1/files/{file_id}", headers=headers, timeout=30).status_code == 404
        assert httpx.delete(f"{keyed}/media/{file_id}", headers=headers, timeout=30).status_code == 404
    for path in unknown:
        httpx.get(f"{keyed}{path}", headers=headers, timeout=30)
    text = httpx.get(f"{keyed}/metrics", timeout=30).text
    assert not [line for line in text.splitlines() if any(part in line for part in ids + unknown)]
    now = sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(f"bentoml_service_request_total{label}")
    )
    assert now == counted + 3
    assert 'bentoml_service_request_total{endpoint="/media/{id}",http_response_code="404"' in text
    assert 'bentoml_service_request_total{endpoint="other"' in text
