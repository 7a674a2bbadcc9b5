"""scripts/r2_ceiling.py: the log-linear R^2 over single trials tends to var(fit) / (var(fit) + seed variance),
not to 1, as seeds are added; the script prints that per memory experiment and fails in one line on a bad store."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from analysis.synthetic import write_synthetic_store

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("r2_ceiling", ROOT / "scripts" / "r2_ceiling.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def _trials(n_seeds: int, b: float, sd: float, rng: np.random.Generator):
    slots = np.repeat([500, 2800, 16000], n_seeds)
    return slots, 4.0 - b * np.log(slots) + rng.normal(0, sd, len(slots))


def test_many_seeds_bring_r2_to_the_ceiling_not_to_one() -> None:
    mod = _script()
    rng = np.random.default_rng(0)
    b, sd = 0.01, 0.01
    true_var = np.var(b * np.log([500, 2800, 16000]))  # equal trials per point: the fitted values' variance
    planted = true_var / (true_var + sd ** 2)
    assert 0.5 < planted < 0.8
    c = mod.r2_ceiling(*_trials(2000, b, sd, rng))
    assert c.b == pytest.approx(b, abs=5e-4) and c.seed_sd == pytest.approx(sd, rel=0.03)
    assert c.expected_r2 == pytest.approx(planted, abs=0.02)
    assert c.r2 == pytest.approx(planted, abs=0.02)  # 6000 trials, and R^2 is still far from 0.9
    few = [mod.r2_ceiling(*_trials(2, b, sd, rng)).r2 for _ in range(400)]
    assert np.mean(few) < 0.9 and abs(np.median(few) - planted) < 0.15


def test_the_seed_sd_for_a_target_gives_that_target() -> None:
    mod = _script()
    c = mod.r2_ceiling(*_trials(4, 0.02, 0.01, np.random.default_rng(1)))
    sd = c.seed_sd_for(0.9)
    assert c.fitted_sd ** 2 / (c.fitted_sd ** 2 + sd ** 2) == pytest.approx(0.9)
    exact = mod.r2_ceiling([500, 500, 2800, 2800, 16000, 16000],
                           [4.0, 4.0, 3.9, 3.9, 3.75, 3.75])  # no seed noise at all
    assert exact.expected_r2 == 1.0 and exact.seed_sd == 0.0


def test_unrepeated_points_and_two_slot_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="a repeated one"):
        _script().r2_ceiling([500, 2800, 16000], [4.0, 3.9, 3.8])
    with pytest.raises(ValueError, match="3 distinct slot counts"):  # a line meets two means whatever the law
        _script().r2_ceiling([500, 500, 16000, 16000], [4.0, 4.01, 3.8, 3.79])


def test_prints_a_line_per_memory_experiment(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    store = write_synthetic_store(tmp_path / "synthetic")
    assert _script().main([str(store)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines and all("R^2 to expect" in line for line in lines if "skipped" not in line)
    assert any(line.startswith("memory (engram) @ ") for line in lines)


def test_a_missing_store_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert _script().main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("r2_ceiling: error:") and "nope" in err[0]
