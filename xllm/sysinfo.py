"""Facts about the machine that several layers read (the kernel build key, benchmark reports)."""

from __future__ import annotations

import platform


def cpuinfo_field(name: str) -> str | None:
    """The first value of `name` in /proc/cpuinfo ("model name", "flags", ...), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's marketing name (or whatever `platform` knows)."""
    return cpuinfo_field("model name") or platform.processor() or platform.machine()
