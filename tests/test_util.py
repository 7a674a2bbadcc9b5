"""engram.util: the one atomic write and the shared formatters."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from engram.util import atomic_write, cpu_model, format_duration, format_si, format_table


def test_atomic_write_replaces_whole_files_and_a_failed_write_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "f.bin"
    atomic_write(path, b"old")
    assert path.read_bytes() == b"old"

    def half_then_crash(f) -> None:
        f.write(b"new but not fini")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, half_then_crash)
    assert path.read_bytes() == b"old" and sorted(p.name for p in path.parent.iterdir()) == ["f.bin"]
    atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and sorted(p.name for p in path.parent.iterdir()) == ["f.bin"]


@pytest.mark.parametrize("seconds, text", [(0.4, "0s"), (45, "45s"), (187, "3m07s"), (3599.6, "1h00m"),
                                           (7500, "2h05m"), (math.inf, "?"), (math.nan, "?")])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_format_si_and_table() -> None:
    assert [format_si(x) for x in (950, 12_345, 4.5e6, 1.07e9)] == ["950", "12.3k", "4.5M", "1.07G"]
    assert format_table(["a", "long header"], [["xyz", "1"], ["q", "22"]]) == [
        "a    long header", "xyz  1", "q    22"]


def test_cpu_model_names_the_generation() -> None:
    name = cpu_model()
    assert name
    if Path("/proc/cpuinfo").exists():
        info = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
        fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in info.splitlines())}
        assert name.startswith(fields["model name"])
        assert f"family {fields['cpu family']}, model {fields['model']}" in name
