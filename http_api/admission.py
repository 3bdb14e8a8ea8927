"""Admission: how many requests may be in the service at once, beyond which one is refused.

A request counts from the moment its body has fully arrived until it is answered. The limit is
the running batch plus the requests allowed to wait (LLAVA_MAX_BATCH_SIZE +
LLAVA_MAX_PENDING_REQUESTS): one more gets a 503 with Retry-After at once instead of queueing
behind them, so a client learns in milliseconds that it should come back, and the service's
memory holds no more than that many decoded inputs.
"""

from __future__ import annotations


class ServiceBusy(Exception):
    """Refused: ``limit`` requests are already in flight."""


class Admission:
    """A counter of requests in flight, used on the event loop only (no lock needed)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the in-flight limit must be at least 1, got {limit}")
        self.limit = limit
        self.in_flight = 0

    def admit(self) -> None:
        """Count one more request, or raise ServiceBusy when the limit is reached."""
        if self.in_flight >= self.limit:
            raise ServiceBusy(f"the service is busy ({self.in_flight} requests in progress); retry in a few seconds")
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1
