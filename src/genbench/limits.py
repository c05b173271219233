"""One memory limit for everything a user's input can make genbench allocate.

A width in a config file, an `--image-size`, a sample count, an idx header or a weights file can
each ask for more memory than the machine has; the allocator would then fail deep inside torch
with a traceback, or the kernel would kill the process after minutes of swapping. Every size that
comes from input is checked against this limit first, and the message names what needed the
memory, how much, the limit, and how to raise it.

The limit is `GENBENCH_MEMORY_LIMIT` (bytes, or with a suffix: 512M, 8G, 1.5T) when set, else half
of this machine's physical memory.
"""

from __future__ import annotations

import os
import re

from .errors import GenbenchError

ENV_VAR = "GENBENCH_MEMORY_LIMIT"
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on Linux/macOS: assume a small laptop
        return 8 * 2**30


def memory_limit() -> tuple[int, str]:
    """(bytes, where it comes from)."""
    raw = os.environ.get(ENV_VAR, "").strip()
    if raw:
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?", raw, flags=re.IGNORECASE)
        if not m or float(m.group(1)) <= 0:
            raise GenbenchError(f"{ENV_VAR}={raw!r}: expected a size such as 8G, 512M or a number of bytes")
        return int(float(m.group(1)) * _UNITS[m.group(2).upper()]), f"{ENV_VAR}={raw}"
    return physical_memory() // 2, "half of this machine's memory"


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def check_memory(nbytes: float, what: str) -> None:
    """Refuse `what` when it would need more than the memory limit (before anything is allocated)."""
    limit, origin = memory_limit()
    if nbytes > limit:
        raise GenbenchError(
            f"{what} would need about {format_bytes(nbytes)}, more than genbench's memory limit of "
            f"{format_bytes(limit)} ({origin}); if this machine really has the memory, raise the limit "
            f"with {ENV_VAR}=<size>, e.g. {ENV_VAR}={max(1, int(nbytes * 1.5 / 2**30))}G"
        )
