"""The scheduler's waiting requests and their order (after vLLM's ``v1/core/sched/request_queue.py``).

Interactive requests are served first-come first-served, and all of them go ahead of background
requests (a long-video job's captions), which are first-come first-served among themselves: a
question asked while a job runs waits for no caption that has not started yet.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

R = TypeVar("R")


class RequestQueue(Generic[R]):
    """FIFO per class, interactive before background. Not thread-safe: the scheduler guards it."""

    def __init__(self, is_background: Callable[[R], bool]) -> None:
        self._is_background = is_background
        self._requests: deque[R] = deque()

    def add(self, request: R) -> None:
        if self._is_background(request):
            self._requests.append(request)
            return
        position = next((i for i, r in enumerate(self._requests) if self._is_background(r)), len(self._requests))
        self._requests.insert(position, request)

    def peek(self) -> R | None:
        return self._requests[0] if self._requests else None

    def pop(self) -> R:
        return self._requests.popleft()

    def remove_if(self, ended: Callable[[R], bool]) -> None:
        """Drop the requests for which ``ended`` is true (it may end them, e.g. fail their stream)."""
        self._requests = deque(r for r in self._requests if not ended(r))

    def drain(self) -> list[R]:
        requests, self._requests = list(self._requests), deque()
        return requests

    def __len__(self) -> int:
        return len(self._requests)

    def __iter__(self) -> Iterator[R]:
        return iter(self._requests)
