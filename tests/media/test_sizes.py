"""media.sizes: one way to print a byte count, with at most one decimal."""

from __future__ import annotations

import re

import pytest

from http_api.guard import GuardLimits, _too_large_message
from media import format_bytes
from settings import Settings


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 bytes"),
        (1, "1 byte"),
        (1023, "1023 bytes"),
        (1024, "1 KiB"),
        (1536, "1.5 KiB"),
        (2 * 1024 * 1024, "2 MiB"),
        (67 * 1024 * 1024 // 3, "22.3 MiB"),
        (1024**3, "1 GiB"),
        (8192 * 1024 * 1024, "8 GiB"),
    ],
)
def test_sizes_read_in_the_largest_unit_with_at_most_one_decimal(count: int, text: str) -> None:
    assert format_bytes(count) == text


def test_the_default_json_body_limit_reads_with_one_decimal() -> None:
    json_limit = Settings(max_data_url_bytes=16 * 1024 * 1024).max_json_body_bytes  # the default: 22.33 MiB
    limits = GuardLimits(max_upload_bytes=1, max_json_bytes=json_limit, max_in_flight=1)
    assert _too_large_message("application/json", limits) == "the JSON body is larger than 22.3 MiB"


def test_the_start_up_line_prints_no_size_with_more_than_one_decimal() -> None:
    line = Settings(max_upload_bytes=10**9, max_job_bytes=3 * 10**9).describe_limits()
    sizes = re.findall(r"(\d+(?:\.\d+)?) (?:KiB|MiB|GiB)", line)
    assert sizes and all(len(size.partition(".")[2]) <= 1 for size in sizes)
    assert "953.7 MiB" in line and "2.8 GiB" in line
