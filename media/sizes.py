"""Byte counts as messages print them: "22.3 MiB", "64 MiB", "1 GiB", "900 bytes".

Every message that names a size (limits in the guard, the fetcher, the settings' start-up line)
uses :func:`format_bytes`, so that the same limit reads the same everywhere.
"""

from __future__ import annotations

_UNITS = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def format_bytes(count: int) -> str:
    """``count`` in the largest binary unit it reaches, with at most one decimal (none when it is 0)."""
    for unit, size in _UNITS:
        if count >= size:
            return f"{count / size:.1f}".removesuffix(".0") + f" {unit}"
    return "1 byte" if count == 1 else f"{count} bytes"
