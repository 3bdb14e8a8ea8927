"""bench.soak's main logic for about 20 s on a served instance (issue 29): every kind of request
is sent and answered as its kind expects, no 5xx, no hang, nothing left behind once idle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import soak

pytestmark = pytest.mark.served


def test_a_short_soak_answers_every_kind_as_it_expects(tiny_checkpoint: Path) -> None:
    results = soak.soak(minutes=20 / 60, clients=2, sample_seconds=2, checkpoint=tiny_checkpoint)
    report = soak.report(results)

    assert list(results["kinds"]) == list(soak.KINDS)
    assert all(kind["count"] >= 1 for kind in results["kinds"].values()), report
    assert results["faults_5xx"] == 0 and results["hangs"] == 0, report
    assert results["unexpected"] == 0, report
    assert soak.failures(results) == [] and report.endswith("Result: PASS"), report
    # Every resource was sampled during the traffic, and the results are JSON.
    assert len(results["samples"]) >= 4 and results["resources"]["rss_mb"]["first_quarter"] > 0, report
    assert results["resources"]["series"]["first_quarter"] > 0, report  # /metrics was read
    assert "| bad: truncated video | 422 |" in report
    json.dumps(results)
