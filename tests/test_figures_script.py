"""scripts/readme_figures.py on a synthetic store (analysis.synthetic): both PNGs written, small; a missing or
empty store is one line and exit status 2, with nothing written."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from analysis.synthetic import write_synthetic_store

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_BYTES = 120_000  # the README's budget per figure


def _script():
    spec = importlib.util.spec_from_file_location("readme_figures", ROOT / "scripts" / "readme_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_writes_both_figures_as_small_pngs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    store = write_synthetic_store(tmp_path / "synthetic")
    out = tmp_path / "figures"
    assert _script().main([str(store), str(out), "--resamples", "100"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["allocation.png", "memory.png"]
    for name in written:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and 1_000 < len(data) < MAX_BYTES, (name, len(data))
    assert capsys.readouterr().out.split() == [str(out / "allocation.png"), str(out / "memory.png")]


def test_an_unknown_experiment_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    store = write_synthetic_store(tmp_path / "synthetic")
    out = tmp_path / "figures"
    assert _script().main([str(store), str(out), "--experiment", "nope", "--resamples", "20"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("readme_figures: error: no fitted allocation U-curve for nope")
    assert "alloc" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("case", ["missing", "no-runs", "empty-runs"])
def test_a_missing_or_empty_store_is_one_line_and_exit_2(case: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    store = tmp_path / "results" / "default"
    if case != "missing":
        store.mkdir(parents=True)
    if case == "empty-runs":
        (store / "runs").mkdir()
    out = tmp_path / "figures"
    assert _script().main([str(store), str(out)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("readme_figures: error: "), captured.err
    assert str(store) in lines[0]
    assert captured.out == "" and not out.exists()


def test_only_one_figure_under_its_own_name(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    store = write_synthetic_store(tmp_path / "synthetic")
    out = tmp_path / "figures"
    assert _script().main([str(store), str(out), "--only", "memory", "--name", "memory-untied.png",
                           "--resamples", "50"]) == 0
    assert [p.name for p in out.iterdir()] == ["memory-untied.png"]
    assert (out / "memory-untied.png").read_bytes().startswith(PNG_MAGIC)
    assert capsys.readouterr().out.split() == [str(out / "memory-untied.png")]


def test_name_without_only_is_a_usage_error(tmp_path: Path) -> None:
    store = write_synthetic_store(tmp_path / "synthetic")
    with pytest.raises(SystemExit) as exc:
        _script().main([str(store), str(tmp_path / "figures"), "--name", "x.png"])
    assert exc.value.code == 2
    assert not (tmp_path / "figures").exists()
