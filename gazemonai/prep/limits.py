"""Upper bounds on size-like settings: what this machine can hold, said before the work starts.

A size no machine can hold (``--size 100000``, ``image_size [100000, 100000]``) otherwise grows
until the kernel kills the process, minutes later; a Gaussian sigma of ``1e12`` loops for hours.
These helpers turn such values into one line naming the setting, the value and the bound:
:func:`check_memory` compares a *lower bound* of what a value needs with the memory this machine
has free (so a value is only refused when it certainly cannot fit), :func:`check_workers` bounds
process counts by the CPUs.
"""

from __future__ import annotations

import math
import os

from ..errors import InvalidInputError

__all__ = ["available_memory", "check_memory", "check_workers", "format_bytes", "max_workers"]


def available_memory() -> int:
    """Bytes this process can still get: ``MemAvailable`` (else all memory), within its ``ulimit -v``."""
    free = _free_memory()
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        unlimited = limit == resource.RLIM_INFINITY or limit < 0
    except (ImportError, OSError, ValueError):  # no resource module (Windows)
        limit, unlimited = 0, True
    return free if unlimited else min(free, limit)


def _free_memory() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): bound by 1 TiB
        return 1 << 40


def format_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit that keeps it >= 1 (``1.5 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def check_memory(setting: str, value, needed: float, what: str, largest=None, available: int | None = None):
    """Refuse ``value`` of ``setting`` when ``needed`` bytes (a lower bound) exceed the memory free here.

    Args:
        setting: the option or setting name, as the user wrote it (``--size``, ``image_size``).
        value: its value, for the message.
        needed: bytes the value needs at least.
        what: what the bytes are for, e.g. ``"one crop"``.
        largest: the largest value that would fit, for the message (optional).
        available: bytes to compare with (default :func:`available_memory`).

    Raises:
        InvalidInputError: ``"<setting> <value> needs at least … for <what>; this machine has … free
        (largest …)"``.
    """
    available = available_memory() if available is None else int(available)
    if not math.isfinite(needed) or needed > available:
        bound = f" (the largest that fits: {largest})" if largest is not None else ""
        raise InvalidInputError(
            f"{setting} {value!r} needs at least {format_bytes(needed)} for {what}; "
            f"this machine has {format_bytes(available)} free{bound}"
        )


def max_workers() -> int:
    """The most worker processes a setting may ask for: 4 per CPU, at least 16."""
    return max(16, 4 * (os.cpu_count() or 1))


def check_workers(setting: str, value) -> None:
    """Refuse a worker-process count above :func:`max_workers` (each worker is a process with its memory)."""
    bound = max_workers()
    if isinstance(value, int) and not isinstance(value, bool) and value > bound:
        raise InvalidInputError(
            f"{setting} must be <= {bound} (4 worker processes per CPU, at least 16; "
            f"{os.cpu_count()} CPUs here), got {value}"
        )
