"""The limits of long-video jobs and the defaults of a job's parameters, stated here once.

settings.py reads them (so this module imports nothing heavy: no torch, no engine); jobs.manager
re-exports :class:`JobLimits`, and the jobs' request schema takes its defaults from here.
"""

from __future__ import annotations

from dataclasses import dataclass

# A job's parameters when the request does not say (http_api.schemas.JobMetadata, JobParameters).
DEFAULT_SEGMENT_SECONDS = 30.0  # length of each captioned segment
DEFAULT_FRAMES_PER_SEGMENT = 16  # frames each caption sees


@dataclass(frozen=True)
class JobLimits:
    """What the server allows a job (README, Configuration: LLAVA_MAX_JOB_*, LLAVA_*_JOBS)."""

    max_frames: int  # frames one caption may see: the service's LLAVA_MAX_FRAMES
    max_video_seconds: float = 4 * 3600.0  # longest video a job may analyse
    max_segments: int = 500  # most segments one job may cut its video into
    max_running: int = 1  # jobs captioning at once; more wait in order
    max_pending: int = 16  # jobs allowed to wait; one more is refused
    captions_in_flight: int = 1  # captions one job keeps in the engine at once


# Seconds a segment may stay claimed by a replica that stopped working on it before another
# replica takes it over (LLAVA_JOB_CLAIM_TIMEOUT_S); replicas renew their claims a few times
# within it, so a slow caption is never taken over, only one whose replica is gone.
DEFAULT_CLAIM_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class SharedJobSettings:
    """Jobs shared by replicas through Redis (README, Long videos: across replicas)."""

    redis_url: str  # LLAVA_REDIS_URL
    claim_timeout_s: float = DEFAULT_CLAIM_TIMEOUT_SECONDS
    # LLAVA_JOB_DIR is on storage every replica sees: uploads are kept there, any replica
    # captions their segments. Otherwise an upload's segments stay with the replica holding it.
    shared_dir: bool = False


def check_redis_url(url: str) -> str:
    """``url`` when redis-py can connect by it (redis://, rediss://, unix://); ValueError if not.

    redis-py is imported here, not at the top: reading the settings without Redis stays light."""
    from redis.connection import parse_url

    parse_url(url)  # raises ValueError naming the scheme or the port it cannot use
    return url
