"""This process's memory: its peak resident set so far, and (on Linux) the peak of a stretch of work.

Linux keeps the peak resident set (``VmHWM``) and lets a process reset it to the current size by writing
``5`` to ``/proc/self/clear_refs``; that is how a round of a long run gets its own peak. Elsewhere the
stretch peaks are None and only the process peak (``getrusage``) is known.
"""
from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Optional

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
#: The highest peak seen before a reset: resetting ``VmHWM`` also lowers what ``getrusage`` reports.
_PEAK_BEFORE_RESETS = [0.0]


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes), stretch resets included."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, _PEAK_BEFORE_RESETS[0])


def status_mb(field: str) -> Optional[float]:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MB; None where there is no such file."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    """Start a new stretch: the peak (``VmHWM``) becomes the current resident size. False where unsupported."""
    before = status_mb("VmHWM")
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    _PEAK_BEFORE_RESETS[0] = max(_PEAK_BEFORE_RESETS[0], before or 0.0)
    return True
