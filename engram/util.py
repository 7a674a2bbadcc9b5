"""Small helpers with one home: atomic file writes, and the formatting of durations, counts and text tables.

Here, in the lowest layer, so that engram/ (checkpoints, progress lines) and sweeps/ (the results store, the
plan, the CLI) share one version of each. No torch, no Ray.
"""

from __future__ import annotations

import math
import os
import platform
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

TEMP_PREFIX = "."  # temporary names start with it (readers of a results store skip such files) ...
TEMP_SUFFIX = ".tmp"  # ... and end with this (what `ResultStore.temp_files` looks for)


def atomic_write(path: Path, data: bytes | Callable[[BinaryIO], None]) -> None:
    """Write `path` so that it is, at every moment, either its old content or the whole new one.

    The bytes (or what `data(file)` writes) go to a temporary name in the same folder, reach the disk (fsync)
    and only then take the final name (`os.replace`, atomic on POSIX): a crash leaves, at worst, a
    `.<name>.<random>.tmp` file. A failed write removes its temporary file and raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes):
                f.write(data)
            else:
                data(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def format_duration(seconds: float) -> str:
    """45s, 3m07s, 2h05m; "?" when unknown (not finite)."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_si(x: float) -> str:
    """A count with an SI suffix and 3 significant digits: 950, 12.3k, 4.5M, 1.07G."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns two spaces apart, the header first; trailing spaces trimmed."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    return ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in [list(header), *rows]]


def cpuinfo() -> dict[str, str]:
    """The first processor's fields of Linux's /proc/cpuinfo ("model name", "cpu family", "flags", ...); empty
    where there is none."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model() -> str | None:
    """This machine's CPU as /proc/cpuinfo names it, with its family and model numbers (a VM's model name can be
    as bare as "AMD EPYC"; the numbers tell its generation): "AMD EPYC (family 26, model 2)"; the platform's
    processor string where there is no /proc/cpuinfo; None when neither says anything. bf16 trials of the same
    code and seed can end apart on different CPUs (LOG.md, D9), so every stored trial records it (sweeps.store)."""
    fields = cpuinfo()
    name = fields.get("model name")
    if name:
        numbers = ", ".join(f"{label} {fields[key]}" for key, label in (("cpu family", "family"), ("model", "model"))
                            if fields.get(key))
        return f"{name} ({numbers})" if numbers else name
    return platform.processor() or platform.machine() or None
