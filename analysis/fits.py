"""Fits over result tables: U-curves over the allocation ratio rho, saturating power laws, the two-variable
Chinchilla form, iso-FLOP (Approach 2) optima, and the bootstrap that gives every estimate its interval.

Pure functions: arrays in, frozen results out (no torch, no Ray, no plotting). `ValueError` for a caller mistake
(bad shapes, non-finite inputs, fewer points than a fit needs); `FitError` for a fit that fails at run time
(no convergence, a degenerate curve, too many failed bootstrap resamples).

References:
- Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models" (Chinchilla; Approaches 2 and 3).
- Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt" (Epoch AI): Approach 3 as a Huber loss
  (delta = 1e-3) on log loss with the log-sum-exp parametrisation, L-BFGS from a grid of initialisations.
- Open-Athena scaling-law-analysis: fits as pure functions returning frozen results, FitError vs ValueError.
- Engram paper (arXiv 2601.07372) section 3: the U-curve over rho and the log-linear law over memory slots.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import enum
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np
from scipy.interpolate import BSpline
from scipy import stats
from scipy.optimize import minimize

N_RESAMPLES = 1000
LEVEL = 0.95
HUBER_DELTA = 1e-3          # Epoch AI's replication of Approach 3; residuals are in log loss
ALPHA_MAX = 10.0            # exponents beyond this are not a scaling law, they are a step
LOG_BOUND = 50.0            # |log E|, |log A| bound: keeps L-BFGS-B and the batched refiner finite
REFINE_ITERS = 200          # batched Levenberg-Marquardt iterations (warm-started, most converge in < 30)
MAX_FAILED_SHARE = 0.5      # more failed bootstrap resamples than this -> FitError
DROP_WARN_SHARE = 0.05      # more dropped resamples than this: the interval is conditional on the kept ones, warn
U_GRID_POINTS = 401         # resolution of the rho grid on which a U-curve's minimum is located
RHO_MOE = 1.0               # rho = 1 is pure MoE, the baseline of the gain
RHO_TOL = 1e-6
RHO_DISTINCT = 0.02         # share of the rho range within which two values count as one level in a resample
LLAMA3_ISOFLOPS = Path(__file__).parent / "data" / "llama3_isoflops_points.csv"   # public data, see its README
SPLINE_BASIS = 10           # P-spline basis size; the penalty, not the basis, sets the smoothness
SPLINE_LAMBDAS = tuple(np.logspace(-8, 4, 25))   # GCV candidates for the P-spline penalty
EDGE_WINDOW = 0.25          # share of the rho range over which the edge slopes of a verdict are measured
U_METHODS = MappingProxyType({"quadratic": 3, "cubic": 4, "spline": 4})   # method -> distinct rho needed
SEED_RIDGE = 1e-9           # per point; keeps a resample that leaves a seed out solvable (that offset -> 0)
# U-curve verdicts. Fixed before any real sweep was analysed (docs/analysis.md); never tuned to data.
VERDICT_LEVEL = 0.95        # an edge slope's sign counts when at least this share of resamples agree on it
FLAT_TOLERANCE = 0.005      # nats: a curve whose range is surely below this is "flat" (~1/3 of the paper's gain)
DETECT_POWER = 0.8          # power at which the smallest detectable gain is stated
REFERENCE_GAIN = 0.014      # nats: the paper's gain at 6e20 FLOPs; the report says how many seeds would resolve it
MAX_SEEDS_QUOTED = 10_000   # beyond this the seed count is reported as "more than"
DECADE = 10.0               # a positive parameter whose interval spans more than this ratio is not identified
# Approach 3 initialisations (relative to the data; see StartGrid)
E_FRACTIONS = (0.1, 0.5, 0.8, 0.9, 0.97)
A_FRACTIONS = (0.03, 0.3, 1.0, 3.0)
ALPHA_STARTS = (0.05, 0.15, 0.3, 0.6, 1.0, 2.0)
N_LBFGS_STARTS = 8          # L-BFGS runs from the best points of the initialisation grid (see _fit_lse)


class FitError(RuntimeError):
    """A fit that failed at run time: no convergence, a degenerate curve or too many failed resamples."""


# ---------------------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class StartGrid:
    """Where Approach 3's L-BFGS starts, relative to the data: E = e_fraction * min(loss); each term's value at the
    geometric-mean x = a_fraction * (loss range) / n_terms; exponents `alphas`. The objective is evaluated on the
    whole product grid and L-BFGS runs from its `n_lbfgs` best points."""

    e_fractions: tuple[float, ...] = E_FRACTIONS
    a_fractions: tuple[float, ...] = A_FRACTIONS
    alphas: tuple[float, ...] = ALPHA_STARTS
    n_lbfgs: int = N_LBFGS_STARTS

    def __post_init__(self):
        for name in ("e_fractions", "a_fractions", "alphas"):
            values = getattr(self, name)
            if not len(values) or any(not (math.isfinite(v) and v > 0) for v in values):
                raise ValueError(f"start_grid.{name}: expected positive numbers, got {values!r}")
        if any(v >= 1 for v in self.e_fractions):
            raise ValueError(f"start_grid.e_fractions: E starts below the lowest loss, expected < 1, got "
                             f"{self.e_fractions!r}")
        if not (isinstance(self.n_lbfgs, int) and self.n_lbfgs >= 1):
            raise ValueError(f"start_grid.n_lbfgs: expected a positive integer, got {self.n_lbfgs!r}")


@dataclass(frozen=True)
class Estimate:
    """A point estimate and its bootstrap percentile interval at `level`."""

    value: float
    lo: float
    hi: float
    level: float = LEVEL

    def to_dict(self) -> dict:
        return {"value": _finite_or_none(self.value), "lo": _finite_or_none(self.lo),
                "hi": _finite_or_none(self.hi), "level": self.level}

    def __str__(self) -> str:
        if not (math.isfinite(self.lo) and math.isfinite(self.hi)):
            return f"{self.value:.4g} (no interval)"
        return f"{self.value:.4g} [{self.lo:.4g}, {self.hi:.4g}]"


class DropReason(str, enum.Enum):
    """Why a bootstrap resample was dropped (kept resamples alone make the interval)."""

    FEW_DISTINCT = "too few distinct x values left in the resample"
    NON_FINITE = "fit did not converge to finite values"
    NO_VERTEX = "a budget's parabola lost its vertex (opens downward or vertex outside the sampled x)"


@dataclass(frozen=True)
class Bootstrap:
    """How the intervals were made (resampled seeds then points, or points only for a single seed) and which
    resamples were dropped, with the reason. Above DROP_WARN_SHARE dropped, the interval is conditional on the
    kept resamples and `warning` says so."""

    scheme: str                 # "seeds+points" | "points" | "points within budget" | "seeds+points within budget"
    n_resamples: int
    dropped: tuple[tuple[str, int], ...] = ()     # (DropReason value, count), counts > 0 only
    level: float = LEVEL

    @property
    def n_failed(self) -> int:
        return sum(n for _, n in self.dropped)

    @property
    def failed_share(self) -> float:
        return self.n_failed / self.n_resamples if self.n_resamples else 0.0

    @property
    def warning(self) -> str | None:
        if self.failed_share <= DROP_WARN_SHARE:
            return None
        reasons = "; ".join(f"{n} {r}" for r, n in self.dropped)
        return (f"{self.n_failed} of {self.n_resamples} resamples ({self.failed_share:.0%}) dropped ({reasons}): "
                f"the intervals are conditional on the kept {1 - self.failed_share:.0%}")

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, "n_resamples": self.n_resamples, "n_failed": self.n_failed,
                "failed_share": self.failed_share, "dropped": {r: n for r, n in self.dropped},
                "warning": self.warning, "level": self.level}


def _dropped(**counts) -> tuple[tuple[str, int], ...]:
    """(reason, count) pairs from DropReason member names, zero counts left out."""
    return tuple((DropReason[name].value, int(n)) for name, n in counts.items() if n)


class _Sample:
    """Counts over the points a fit was made from (its `loss` and `seed` arrays)."""

    loss: np.ndarray
    seed: np.ndarray

    @property
    def n_points(self) -> int:
        return len(self.loss)

    @property
    def n_seeds(self) -> int:
        return len(np.unique(self.seed))

    @property
    def single_seed(self) -> bool:
        return self.n_seeds == 1


@dataclass(frozen=True)
class UCurveFit(_Sample):
    """Loss over rho for one group (experiment, budget), where its minimum lies, and what the data can claim.

    `verdict` (see `fit_u_curve` and docs/analysis.md for the rule):
    - "interior": the curve falls away from both edges of the sampled range in at least VERDICT_LEVEL of the
      resamples; then `rho_star` is the minimum with its interval.
    - "boundary": the loss is still falling at one edge (`edge`) in that share of resamples: the minimum lies at
      or beyond the sampled range.
    - "concave": the curve bends down (a cap) in that share of resamples: no minimum inside, no U to draw.
    - "flat": the whole curve surely varies by less than `flat_tolerance` nats.
    - "too noisy": none of these is resolved; `detectable_gain` and `seeds_for_reference_gain` say what would be.
    `rho_star` is None unless the verdict is interior; `argmin` is always the fitted curve's minimum on the grid.
    `gain` is loss(rho=1) - loss(argmin): positive when moving budget into memory helps; None when rho=1 was not
    sampled. `p_interior` is the share of resamples whose minimum is strictly inside the range.
    """

    method: str
    seed_offsets: bool          # a per-seed offset was fitted (seeds as blocks)
    verdict: str
    reason: str                 # one sentence: why this verdict
    rho_star: Estimate | None
    argmin: Estimate
    edge: float | None          # the edge of a boundary verdict
    loss_at_optimum: Estimate
    gain: Estimate | None
    p_interior: float
    p_falls_at_lo: float        # share of resamples whose slope at the lowest rho is negative
    p_rises_at_hi: float        # share of resamples whose slope at the highest rho is positive
    p_concave: float            # share of resamples whose slope falls from the low edge to the high edge
    detectable_gain: float      # smallest gain over the top edge the sweep detects at DETECT_POWER (nats)
    seeds_for_reference_gain: int | None    # roughly how many seeds would detect REFERENCE_GAIN; None: no interval
    seeds_for_fitted_gain: int | None       # the same for the fitted gain (None when it is ~0 or unsampled)
    bootstrap: Bootstrap
    rho: np.ndarray = field(repr=False, compare=False)
    loss: np.ndarray = field(repr=False, compare=False)
    seed: np.ndarray = field(repr=False, compare=False)
    grid: np.ndarray = field(repr=False, compare=False)
    curve: np.ndarray = field(repr=False, compare=False)
    curve_lo: np.ndarray = field(repr=False, compare=False)
    curve_hi: np.ndarray = field(repr=False, compare=False)
    boot_argmin: np.ndarray = field(repr=False, compare=False)     # per kept resample
    boot_min_loss: np.ndarray = field(repr=False, compare=False)
    boot_gain: np.ndarray = field(repr=False, compare=False)       # empty when rho = 1 was not sampled
    r2: float = float("nan")
    coefficients: tuple[tuple[str, Estimate], ...] = ()   # quadratic: L = c0 + c1 rho + c2 rho^2; else none

    @property
    def draws_curve(self) -> bool:
        """Whether a plot may draw this fit's curve: not for a cap or an unresolved fit (points only then)."""
        return self.verdict in ("interior", "boundary")

    @property
    def rho_star_edges(self) -> tuple[float, ...]:
        """The edges of the sampled range that rho*'s interval reaches (empty: it lies strictly inside).

        The verdict tests the two edge slopes one at a time, so up to ~10% of resamples may put their minimum at
        an edge and an "interior" rho* can still have an interval that reaches one (8-19% of the interior
        verdicts on the calibration's planted U-curves; docs/analysis.md): the curve turns, but the data do not
        place its minimum away from that edge. Empty when there is no rho*."""
        if self.rho_star is None:
            return ()
        lo, hi = float(self.rho.min()), float(self.rho.max())
        tol = RHO_TOL * max(1.0, hi - lo)
        return tuple(e for e, reached in ((lo, self.rho_star.lo <= lo + tol), (hi, self.rho_star.hi >= hi - tol))
                     if reached)

    def to_dict(self) -> dict:
        return {"method": self.method, "seed_offsets": self.seed_offsets, "verdict": self.verdict,
                "reason": self.reason, "rho_star": None if self.rho_star is None else self.rho_star.to_dict(),
                "argmin": self.argmin.to_dict(), "edge": self.edge,
                "loss_at_optimum": self.loss_at_optimum.to_dict(),
                "gain_vs_rho_1": None if self.gain is None else self.gain.to_dict(),
                "p_interior": self.p_interior, "p_falls_at_lo": self.p_falls_at_lo,
                "p_rises_at_hi": self.p_rises_at_hi, "p_concave": self.p_concave,
                "rho_star_reaches_edges": list(self.rho_star_edges),
                "detectable_gain": _finite_or_none(self.detectable_gain),
                "seeds_for_reference_gain": self.seeds_for_reference_gain, "reference_gain": REFERENCE_GAIN,
                "seeds_for_fitted_gain": self.seeds_for_fitted_gain,
                "r2": _finite_or_none(self.r2), "n_points": self.n_points,
                "coefficients": {name: est.to_dict() for name, est in self.coefficients},
                "n_seeds": self.n_seeds, "bootstrap": self.bootstrap.to_dict()}


@dataclass(frozen=True)
class LogLinearFit(_Sample):
    """The paper's form L = a - b ln x (ordinary least squares), over the same bootstrap resamples."""

    a: Estimate
    b: Estimate
    r2: float
    residuals: np.ndarray = field(repr=False, compare=False)
    boot: np.ndarray = field(repr=False, compare=False)     # (n_ok, 2): a, b
    x: np.ndarray = field(repr=False, compare=False)
    loss: np.ndarray = field(repr=False, compare=False)
    seed: np.ndarray = field(repr=False, compare=False)
    bootstrap: Bootstrap | None = None

    def predict(self, x) -> np.ndarray:
        return self.a.value - self.b.value * np.log(np.asarray(x, dtype=float))

    def predict_band(self, x, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
        lnx = np.log(np.asarray(x, dtype=float))
        if not len(self.boot):
            return np.full(lnx.shape, np.nan), np.full(lnx.shape, np.nan)
        return _percentiles(self.boot[:, :1] - self.boot[:, 1:2] * lnx[None, :], level, axis=0)

    def extrapolate(self, x: float, level: float = LEVEL) -> Estimate:
        draws = self.boot[:, 0] - self.boot[:, 1] * np.log(x)
        return Estimate(float(self.predict(x)), *_percentiles(draws, level), level)

    @property
    def noise_r2(self) -> float:
        """The R^2 to expect from seed noise alone (`r2_from_seed_noise`); NaN without a repeated x."""
        return r2_from_seed_noise(self.x, self.loss, self.loss - self.residuals)

    def to_dict(self) -> dict:
        return {"form": "L = a - b ln x", "a": self.a.to_dict(), "b": self.b.to_dict(),
                "r2": _finite_or_none(self.r2), "noise_r2": _finite_or_none(self.noise_r2),
                "n_points": self.n_points, "n_seeds": self.n_seeds,
                **({"bootstrap": self.bootstrap.to_dict()} if self.bootstrap else {})}


@dataclass(frozen=True)
class PowerLawFit(_Sample):
    """L = E + A * x^-alpha fitted with the Huber loss on log L (Chinchilla Approach 3 recipe)."""

    E: Estimate
    A: Estimate
    alpha: Estimate
    r2: float
    loglinear: LogLinearFit
    bootstrap: Bootstrap
    x: np.ndarray = field(repr=False, compare=False)
    loss: np.ndarray = field(repr=False, compare=False)
    seed: np.ndarray = field(repr=False, compare=False)
    residuals: np.ndarray = field(repr=False, compare=False)   # loss - fitted loss, in input order
    boot: np.ndarray = field(repr=False, compare=False)        # (n_ok, 3): E, A, alpha
    unidentified: tuple[tuple[str, str], ...] = ()   # (parameter, reason): no number is quoted for these
    excluded: tuple[int, ...] = ()                   # input indices dropped as outliers before the fit
    huber_delta: float = HUBER_DELTA

    @property
    def identified(self) -> bool:
        """Every parameter pinned down (interval within a decade, R^2 >= 0); else quote the log-linear form."""
        return not self.unidentified

    def predict(self, x) -> np.ndarray:
        return self.E.value + self.A.value * np.asarray(x, dtype=float) ** -self.alpha.value

    def predict_band(self, x, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x, dtype=float)
        if not len(self.boot):
            return np.full(x.shape, np.nan), np.full(x.shape, np.nan)
        draws = self.boot[:, :1] + self.boot[:, 1:2] * x[None, :] ** -self.boot[:, 2:3]
        lo, hi = _percentiles(draws, level, axis=0)
        return lo, hi

    def extrapolate(self, x: float, level: float = LEVEL) -> Estimate:
        lo, hi = self.predict_band(np.array([x]), level)
        return Estimate(float(self.predict(x)), float(lo[0]), float(hi[0]), level)

    def to_dict(self) -> dict:
        return {"form": "L = E + A * x^-alpha", "identified": self.identified,
                "form_used": "power law" if self.identified else "log-linear (power law not identified)",
                **_parameters_dict({"E": self.E, "A": self.A, "alpha": self.alpha}, self.unidentified),
                "r2": _finite_or_none(self.r2),
                "residuals": [float(r) for r in self.residuals], "loglinear": self.loglinear.to_dict(),
                "n_points": self.n_points, "n_seeds": self.n_seeds, "excluded_points": list(self.excluded),
                "huber_delta": self.huber_delta, "bootstrap": self.bootstrap.to_dict()}


def _parameters_dict(params: dict[str, Estimate], unidentified) -> dict:
    """Each parameter with its interval, or with no number and the reason when it is not identified."""
    reasons = dict(unidentified)
    return {name: ({"value": None, "lo": None, "hi": None, "level": est.level, "not_identified": reasons[name]}
                   if name in reasons else est.to_dict()) for name, est in params.items()}


@dataclass(frozen=True)
class ChinchillaFit(_Sample):
    """L = E + A * N^-alpha + B * D^-beta (N: active parameters, D: tokens), Huber on log L."""

    E: Estimate
    A: Estimate
    alpha: Estimate
    B: Estimate
    beta: Estimate
    r2: float
    bootstrap: Bootstrap
    residuals: np.ndarray = field(repr=False, compare=False)
    boot: np.ndarray = field(repr=False, compare=False)        # (n_ok, 5): E, A, alpha, B, beta
    loss: np.ndarray = field(repr=False, compare=False)
    seed: np.ndarray = field(repr=False, compare=False)
    unidentified: tuple[tuple[str, str], ...] = ()
    excluded: tuple[int, ...] = ()
    huber_delta: float = HUBER_DELTA

    @property
    def identified(self) -> bool:
        return not self.unidentified

    @property
    def n_exponent(self) -> Estimate:
        """a in N_opt ~ C^a: beta / (alpha + beta)."""
        draws = self.boot[:, 4] / (self.boot[:, 2] + self.boot[:, 4])
        value = self.beta.value / (self.alpha.value + self.beta.value)
        return Estimate(value, *_percentiles(draws, self.bootstrap.level), self.bootstrap.level)

    @property
    def d_exponent(self) -> Estimate:
        """b in D_opt ~ C^b: alpha / (alpha + beta)."""
        draws = self.boot[:, 2] / (self.boot[:, 2] + self.boot[:, 4])
        value = self.alpha.value / (self.alpha.value + self.beta.value)
        return Estimate(value, *_percentiles(draws, self.bootstrap.level), self.bootstrap.level)

    def predict(self, n, d) -> np.ndarray:
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.E.value + self.A.value * n ** -self.alpha.value + self.B.value * d ** -self.beta.value

    def to_dict(self) -> dict:
        return {"form": "L = E + A * N^-alpha + B * D^-beta", "identified": self.identified,
                **_parameters_dict({k: getattr(self, k) for k in ("E", "A", "alpha", "B", "beta")},
                                   self.unidentified),
                "n_exponent": self.n_exponent.to_dict(), "d_exponent": self.d_exponent.to_dict(),
                "r2": _finite_or_none(self.r2), "n_points": self.n_points, "n_seeds": self.n_seeds,
                "excluded_points": list(self.excluded), "huber_delta": self.huber_delta,
                "bootstrap": self.bootstrap.to_dict()}


@dataclass(frozen=True)
class OptimumScaling:
    """optimum = coefficient * C^exponent, by least squares in log10-log10 (Approach 2's second stage)."""

    coefficient: Estimate
    exponent: Estimate
    budgets: np.ndarray = field(repr=False, compare=False)
    optima: np.ndarray = field(repr=False, compare=False)
    n_draws: int = 0            # bootstrap draws offered
    n_dropped: int = 0          # of them left out: some budget's optimum not finite and positive (no log)

    def predict(self, compute) -> np.ndarray:
        return self.coefficient.value * np.asarray(compute, dtype=float) ** self.exponent.value

    @property
    def warning(self) -> str | None:
        if self.n_draws and self.n_dropped > DROP_WARN_SHARE * self.n_draws:
            return (f"{self.n_dropped} of {self.n_draws} resamples ({self.n_dropped / self.n_draws:.0%}) dropped "
                    f"(a budget's optimum at 0, which has no log): the interval is conditional on the rest")
        return None

    def to_dict(self) -> dict:
        return {"form": "opt = coefficient * C^exponent", "coefficient": self.coefficient.to_dict(),
                "exponent": self.exponent.to_dict(), "budgets": [float(b) for b in self.budgets],
                "optima": [float(o) for o in self.optima], "n_draws": self.n_draws, "n_dropped": self.n_dropped,
                "warning": self.warning}


@dataclass(frozen=True)
class IsoFlopVertex:
    budget: float
    x_star: float               # vertex of the parabola in log10 x
    loss_star: float
    n_points: int
    interior: bool              # the vertex lies within the sampled x range and the parabola opens upward


@dataclass(frozen=True)
class IsoFlopFit:
    """Chinchilla Approach 2: per budget the vertex of a parabola of loss in log10 x, then x* = A * C^b."""

    vertices: tuple[IsoFlopVertex, ...]
    scaling: OptimumScaling
    bootstrap: Bootstrap
    n_seeds: int = 1            # distinct seeds among the points (1: none given)

    @property
    def n_points(self) -> int:
        return sum(v.n_points for v in self.vertices)

    @property
    def n_budgets(self) -> int:
        return len(self.vertices)

    def to_dict(self) -> dict:
        return {"vertices": [{"budget": v.budget, "x_star": v.x_star, "loss_star": v.loss_star,
                              "n_points": v.n_points, "interior": v.interior} for v in self.vertices],
                "scaling": self.scaling.to_dict(), "n_points": self.n_points, "n_budgets": self.n_budgets,
                "n_seeds": self.n_seeds, "bootstrap": self.bootstrap.to_dict()}


# ---------------------------------------------------------------------------------------------------------------
# BLAS threads


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run the enclosed code with the loaded OpenBLAS libraries on one thread, then restore their setting.

    Our matrices are tiny (3x3 to 10x10, L-BFGS's 2m x 2m), so BLAS threads only add wake-ups; on a shared
    2-core machine they made one power-law fit 7-16x slower (1.1-2.4 s against 0.15 s). The setting is
    process-wide while the block runs. A no-op where the libraries cannot be found (non-Linux, other BLAS).
    """
    restore = []
    for path in _loaded_openblas():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get_name, set_name in (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
                                   ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
                                   ("openblas_get_num_threads", "openblas_set_num_threads")):
            get, put = getattr(lib, get_name, None), getattr(lib, set_name, None)
            if get is not None and put is not None:
                get.restype, put.argtypes = ctypes.c_int, [ctypes.c_int]
                restore.append((put, get()))
                put(1)
                break
    try:
        yield
    finally:
        for put, n_threads in restore:
            put(n_threads)


def _loaded_openblas() -> list[str]:
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and "/" in line}
    except OSError:
        return []
    return sorted(paths)


# ---------------------------------------------------------------------------------------------------------------
# Bootstrap


def bootstrap_counts(cluster, n_resamples: int, rng: np.random.Generator,
                     order_by: Sequence = ()) -> np.ndarray:
    """(n_resamples, n) multiplicities of each point in each resample.

    Two stages, so that both seed-to-seed and point-to-point variation enter the interval: draw the clusters
    (seeds) with replacement, then draw n points with replacement from the points of the drawn clusters (a
    cluster drawn twice is twice as likely). With a single cluster this is the plain bootstrap over points.
    order_by: the points' values (x, loss, ...); the draws are made with the points sorted by cluster, then by
    these, and handed back in the caller's order, so that the same data give the same resamples whatever the
    order of its rows (a store lists trials by id, which says nothing about them).
    """
    _, inverse = np.unique(np.asarray(cluster), return_inverse=True)
    n, n_clusters = len(inverse), int(inverse.max()) + 1
    keys = [np.asarray(k, dtype=float) for k in reversed(tuple(order_by))] + [inverse]
    order = np.lexsort(keys)            # the last key sorts first: cluster, then order_by[0], ...
    inverse = inverse[order]
    if n_clusters == 1:
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_resamples)
    else:
        picks_BC = rng.multinomial(n_clusters, np.full(n_clusters, 1.0 / n_clusters), size=n_resamples)
        p_Bn = picks_BC[:, inverse].astype(float)
        p_Bn /= p_Bn.sum(axis=1, keepdims=True)
        counts = rng.multinomial(n, p_Bn)
    out = np.empty_like(counts)
    out[:, order] = counts
    return out


def _scheme(seed: np.ndarray) -> str:
    return "points" if len(np.unique(seed)) == 1 else "seeds+points"


def _percentiles(draws, level: float, axis: int | None = None):
    """Percentile interval; with axis=None over the finite draws (NaN, NaN when there are none), with axis=0
    per column of draws that the caller has already restricted to kept resamples."""
    tail = 100 * (1 - level) / 2
    if axis is None:
        draws = np.asarray(draws, dtype=float).ravel()
        draws = draws[np.isfinite(draws)]
        if not len(draws):
            return float("nan"), float("nan")
        lo, hi = np.percentile(draws, [tail, 100 - tail])
        return float(lo), float(hi)
    lo, hi = np.percentile(draws, [tail, 100 - tail], axis=axis)
    return lo, hi


def _estimate(value: float, draws: np.ndarray, level: float) -> Estimate:
    return Estimate(float(value), *_percentiles(draws, level), level)


def _n_distinct_weighted(x: np.ndarray, w_Bn: np.ndarray, tol: float = 0.0) -> np.ndarray:
    """Number of distinct x values that keep a positive weight in each resample; values within tol of the next
    smaller one count as the same value."""
    values, inverse = np.unique(x, return_inverse=True)
    inverse = np.concatenate([[0], np.cumsum(np.diff(values) > tol)])[inverse]
    present_BU = np.zeros((w_Bn.shape[0], inverse.max() + 1), dtype=bool)
    rows, cols = np.nonzero(w_Bn > 0)
    present_BU[rows, inverse[cols]] = True
    return present_BU.sum(axis=1)


def _check_failed(n_failed: int, n_resamples: int, what: str) -> None:
    if n_resamples and n_failed > MAX_FAILED_SHARE * n_resamples:
        raise FitError(f"{what}: {n_failed} of {n_resamples} bootstrap resamples failed")


# ---------------------------------------------------------------------------------------------------------------
# Input checks (caller mistakes -> ValueError naming the argument)


def _as_1d(name: str, values, n: int | None = None, *, positive: bool = False) -> np.ndarray:
    arr = np.asarray(values, dtype=float).ravel()
    if n is not None and len(arr) != n:
        raise ValueError(f"{name}: expected {n} values, got {len(arr)}")
    bad = int(np.sum(~np.isfinite(arr)))
    if bad:
        raise ValueError(f"{name}: {bad} non-finite values (drop failed/diverged trials before fitting)")
    if positive and np.any(arr <= 0):
        raise ValueError(f"{name}: expected positive values, got min {arr.min():g}")
    return arr


def _rng(rng) -> np.random.Generator:
    """A Generator from a Generator or an integer seed (the same seed, the same resamples)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise ValueError(f"rng: expected a numpy Generator or an integer seed, got {rng!r}")


def _seeds(seed, n: int) -> np.ndarray:
    if seed is None:
        return np.zeros(n, dtype=int)
    arr = np.asarray(seed).ravel()
    if len(arr) != n:
        raise ValueError(f"seed: expected {n} values, got {len(arr)}")
    return arr


def _check_level(level: float, n_resamples: int) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level: expected a number in (0, 1), got {level!r}")
    if n_resamples < 0:
        raise ValueError(f"n_resamples: expected >= 0, got {n_resamples!r}")


# ---------------------------------------------------------------------------------------------------------------
# U-curve over rho


def fit_u_curve(rho, loss, seed=None, *, method: str = "cubic", seed_offsets: bool = True,
                n_resamples: int = N_RESAMPLES, level: float = LEVEL, rng: np.random.Generator | int = 0,
                verdict_level: float = VERDICT_LEVEL, flat_tolerance: float = FLAT_TOLERANCE) -> UCurveFit:
    """Fit loss over rho, locate its minimum and state what the data carry, with bootstrap intervals.

    method "cubic" (the default): a cubic polynomial in rho. It has an interior minimum when the data have one
    and, unlike a parabola, follows a lopsided U (one side steeper than the other), and it has no smoothing to
    choose, so every resample is fitted the same way. In the calibration study (docs/analysis.md) its 90% and
    95% rho* intervals cover planted truths within 5 points of nominal on symmetric, lopsided and near-edge
    U-curves; the parabola's cover 39-46% on a lopsided U.
    method "quadratic": a parabola in rho (a check; biased vertex when the U is lopsided).
    method "spline": a cubic P-spline (SPLINE_BASIS B-splines, third-order difference penalty chosen by GCV on
    the data, then held for every resample). A check only: its intervals under-cover on lopsided truths.
    seed_offsets: trials that share a seed share their data order across rho, so each seed gets its own
    additive offset (seeds as blocks) and the curve is the seeds' average; the seed-to-seed level differences
    then stop blurring the shape. Ignored for a single seed.

    Verdict (fixed before any real sweep was analysed): with s_lo, s_hi the secant slopes over the first and last
    EDGE_WINDOW of the sampled range (or the design's gap at that edge, if wider), "interior" when P(s_lo < 0)
    and P(s_hi > 0) over the resamples both reach verdict_level; "concave" when P(s_hi < s_lo) does; "boundary"
    when P(s_hi > 0) or P(s_lo < 0) is at most 1 - verdict_level (the loss still falls at that edge); "flat" when
    the upper end of the curve range's `level` interval (its 97.5th percentile at 95%) is below flat_tolerance;
    otherwise "too noisy", with the smallest gain the sweep could detect.

    Intervals: resample seeds, then points (points only for a single seed); percentile intervals at `level`.
    Needs at least 3 distinct rho values (quadratic) or 4 (cubic, spline); seeds may repeat a rho value.
    """
    if method not in U_METHODS:
        raise ValueError(f"method: expected one of {list(U_METHODS)}, got {method!r}")
    _check_level(level, n_resamples)
    if not 0.5 < verdict_level < 1:
        raise ValueError(f"verdict_level: expected a number in (0.5, 1), got {verdict_level!r}")
    if not flat_tolerance >= 0:
        raise ValueError(f"flat_tolerance: expected >= 0 nats, got {flat_tolerance!r}")
    rho = _as_1d("rho", rho)
    loss = _as_1d("loss", loss, len(rho))
    seed = _seeds(seed, len(rho))
    n_needed = U_METHODS[method]
    lo_x, hi_x = float(rho.min()), float(rho.max())
    n_distinct = int(_n_distinct_weighted(rho, np.ones((1, len(rho))), RHO_DISTINCT * (hi_x - lo_x))[0])
    if n_distinct < n_needed:
        raise ValueError(f"rho: a {method} U-curve needs at least {n_needed} distinct rho values (closer than "
                         f"{RHO_DISTINCT:.0%} of the range count as one), got {n_distinct}")

    grid = np.linspace(lo_x, hi_x, U_GRID_POINTS)
    counts_Bn = bootstrap_counts(seed, n_resamples, _rng(rng), (rho, loss))
    w_Bn = np.vstack([np.ones(len(rho)), counts_Bn]).astype(float)
    # rho values closer than RHO_DISTINCT of the range are one level for this check: achieved rho can differ by a
    # hair between trials of one target, and a resample whose "fourth level" is such a hair fits a wild cubic
    ok_B = _n_distinct_weighted(rho, w_Bn, RHO_DISTINCT * (hi_x - lo_x)) >= n_needed
    few_B = ~ok_B

    _, seed_code = np.unique(seed, return_inverse=True)
    n_seeds = int(seed_code.max()) + 1
    offsets = bool(seed_offsets) and n_seeds > 1
    if method in ("quadratic", "cubic"):
        degree = 2 if method == "quadratic" else 3
        # centred and scaled to [-1, 1] so that the cubic's normal equations stay well conditioned
        scale = lambda v: (v - 0.5 * (lo_x + hi_x)) / (0.5 * (hi_x - lo_x))
        basis, grid_basis = _poly_basis(scale(rho), degree), _poly_basis(scale(grid), degree)
        shape_pen = np.zeros((degree + 1, degree + 1))
    else:
        basis, grid_basis, shape_pen = _pspline_basis(rho, lo_x, hi_x, grid)
    n_k = basis.shape[1]
    # seeds as blocks: one indicator column per seed but the first; a small ridge decides the split of the
    # common level when a resample leaves the first seed out (the fitted values, all we use, do not depend on it)
    dummies = (seed_code[:, None] == np.arange(1, n_seeds)[None]).astype(float) if offsets else np.zeros((len(rho), 0))
    design = np.hstack([basis, dummies])
    n_d = dummies.shape[1]
    fixed_pen = np.zeros((n_k + n_d, n_k + n_d))
    fixed_pen[n_k:, n_k:] = SEED_RIDGE * len(rho) * np.eye(n_d)
    if method != "spline":
        coef_Bk = _weighted_lstsq(design, loss, w_Bn, fixed_pen, ok_B)
    else:
        shape_full = np.zeros_like(fixed_pen)
        shape_full[:n_k, :n_k] = shape_pen
        # one penalty, the point fit's GCV choice, for every resample: re-chosen per resample, GCV picks an
        # interpolating spline whenever a resample repeats points (no spread left within a rho value) and the
        # curve swings by ~0.1 nats between design points (measured; docs/analysis.md)
        coef_Bk = _pspline_fit(design, loss, w_Bn, shape_full, ok_B, fixed_pen,
                               lam=_gcv_lambda(design, loss, shape_full, fixed_pen))
    # the curve at the seeds' average offset in each resample (weighted by its points)
    with np.errstate(invalid="ignore"):
        offset_Bn = coef_Bk[:, n_k:] @ dummies.T if n_d else np.zeros((len(w_Bn), len(rho)))
        mean_offset_B = np.sum(w_Bn * offset_Bn, axis=1) / w_Bn.sum(axis=1)
        curves_BG = coef_Bk[:, :n_k] @ grid_basis.T + mean_offset_B[:, None]
    if not np.all(np.isfinite(curves_BG[0])):
        raise FitError("U-curve: non-finite fitted curve")
    ok_B &= np.all(np.isfinite(curves_BG), axis=1)
    nonfinite = int(np.sum(~ok_B[1:] & ~few_B[1:]))
    n_failed = int(np.sum(~ok_B[1:]))
    _check_failed(n_failed, n_resamples, "U-curve")

    curves_BG = np.where(ok_B[:, None], curves_BG, np.nan)
    i_min_B = np.argmin(np.where(ok_B[:, None], curves_BG, np.inf), axis=1)
    argmin_B = grid[i_min_B]
    min_loss_B = curves_BG[np.arange(curves_BG.shape[0]), i_min_B]
    interior_B = (i_min_B > 0) & (i_min_B < len(grid) - 1)
    if method == "quadratic":   # the exact vertex, not its nearest grid point (coefficients in rho units)
        c0, c1, c2 = _quadratic_in_rho(coef_Bk[:, :3], lo_x, hi_x).T
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):   # flat or NaN rows: not used
            vertex_B = -c1 / (2 * c2)
            exact_B = interior_B & (c2 > 0) & (vertex_B > lo_x) & (vertex_B < hi_x)
            argmin_B = np.where(exact_B, vertex_B, argmin_B)
            min_loss_B = np.where(exact_B, c0 + c1 * vertex_B + c2 * vertex_B ** 2 + mean_offset_B, min_loss_B)
    # edge slopes as secants over EDGE_WINDOW of the range (or the design's gap at that edge, if wider): a spline's
    # derivative at the very edge is too noisy to test, and the design cannot place a minimum more finely
    values = np.unique(rho)
    window_lo = max(EDGE_WINDOW * (hi_x - lo_x), values[1] - values[0])
    window_hi = max(EDGE_WINDOW * (hi_x - lo_x), values[-1] - values[-2])
    i_lo = int(np.argmin(np.abs(grid - (lo_x + window_lo))))
    i_hi = int(np.argmin(np.abs(grid - (hi_x - window_hi))))
    slope_lo_B = (curves_BG[:, i_lo] - curves_BG[:, 0]) / (grid[i_lo] - grid[0])
    slope_hi_B = (curves_BG[:, -1] - curves_BG[:, i_hi]) / (grid[-1] - grid[i_hi])
    range_B = curves_BG.max(axis=1) - curves_BG.min(axis=1)
    boot = ok_B.copy()
    boot[0] = False
    has_moe = hi_x >= RHO_MOE - RHO_TOL
    gain_B = curves_BG[:, -1] - min_loss_B

    n_boot = int(boot.sum())
    share = (lambda mask: float(np.mean(mask[boot]))) if n_boot else (lambda mask: float("nan"))
    p_lo, p_hi, p_cap = share(slope_lo_B < 0), share(slope_hi_B > 0), share(slope_hi_B < slope_lo_B)
    range_hi = _percentiles(range_B[boot], level)[1] if n_boot else float("nan")
    detect, seeds_ref, seeds_fit = _detectability(curves_BG, boot, interior_B[0], i_min_B[0], gain_B[0],
                                                  has_moe, n_seeds, verdict_level)
    verdict, edge, reason = _u_verdict(p_lo, p_hi, p_cap, range_hi, curves_BG[0], lo_x, hi_x, verdict_level,
                                       flat_tolerance, level, detect, seeds_ref, n_boot)
    argmin = _estimate(argmin_B[0], argmin_B[boot], level)
    band = _percentiles(curves_BG[boot], level, axis=0) if n_boot else (curves_BG[0], curves_BG[0])
    fitted = coef_Bk[0] @ design.T
    return UCurveFit(
        method=method, seed_offsets=offsets, verdict=verdict, reason=reason,
        rho_star=argmin if verdict == "interior" else None, argmin=argmin, edge=edge,
        loss_at_optimum=_estimate(min_loss_B[0], min_loss_B[boot], level),
        gain=_estimate(gain_B[0], gain_B[boot], level) if has_moe else None,
        p_interior=share(interior_B), p_falls_at_lo=p_lo, p_rises_at_hi=p_hi, p_concave=p_cap,
        detectable_gain=detect, seeds_for_reference_gain=seeds_ref, seeds_for_fitted_gain=seeds_fit,
        bootstrap=Bootstrap(_scheme(seed), n_resamples,
                            _dropped(FEW_DISTINCT=int(np.sum(few_B[1:])), NON_FINITE=nonfinite), level),
        rho=rho, loss=loss, seed=seed, grid=grid, curve=curves_BG[0], curve_lo=band[0], curve_hi=band[1],
        boot_argmin=argmin_B[boot], boot_min_loss=min_loss_B[boot],
        boot_gain=gain_B[boot] if has_moe else np.zeros(0), r2=_r2(loss, fitted),
        coefficients=tuple((f"c{i}", _estimate(c[0], c[boot], level))   # c0 at the seeds' average level
                           for i, c in enumerate((_quadratic_in_rho(coef_Bk[:, :3], lo_x, hi_x)
                                                  + np.outer(mean_offset_B, [1.0, 0.0, 0.0])).T))
        if method == "quadratic" else (),
    )


def fit_u_curve_table(table, *, rho_col: str, loss_col: str, seed_col: str | None, **kwargs) -> UCurveFit:
    """`fit_u_curve` on any table (a pandas DataFrame); every column is named by the caller. seed_col=None: the
    rows are independent (one seed); a named seed column turns on seeds-then-points resampling and offsets."""
    _require_columns(table, [rho_col, loss_col] + ([seed_col] if seed_col is not None else []))
    return fit_u_curve(table[rho_col].to_numpy(), table[loss_col].to_numpy(),
                       None if seed_col is None else table[seed_col].to_numpy(), **kwargs)


def _normal_quantile(p: float) -> float:
    return float(stats.norm.ppf(p))


def _detectability(curves_BG, boot, interior: bool, i_min: int, gain: float, has_moe: bool, n_seeds: int,
                   verdict_level: float) -> tuple[float, int | None, int | None]:
    """Smallest detectable gain and the seeds that would detect REFERENCE_GAIN and the fitted gain.

    The contrast is loss(top edge) - loss(r) at a fixed r: the fitted minimum when it is interior, else the
    middle of the range. Its bootstrap standard error se gives the gain detected with probability DETECT_POWER
    by a one-sided test at verdict_level: (z_level + z_power) * se. Standard errors shrink as 1/sqrt(seeds) when
    every seed covers the grid, so detecting a gain g takes about n_seeds * (detectable / g)^2 seeds.
    se is the resamples' interquartile range / (2 z_0.75), a normal's sd: resamples that repeat a few points give
    the cubic heavy tails, and their plain sd was 1.4-3.3x the contrast's sampling sd on planted truths (so 2-10x
    the seeds), against 1.06-1.34x for this one (`analysis.synthetic.detectability_calibration`,
    docs/analysis.md).
    """
    if boot.sum() < 2:
        return float("nan"), None, None
    i_ref = i_min if interior else curves_BG.shape[1] // 2
    q25, q75 = np.percentile(curves_BG[boot, -1] - curves_BG[boot, i_ref], [25, 75])
    se = float((q75 - q25) / (2 * _normal_quantile(0.75)))
    detect = (_normal_quantile(verdict_level) + _normal_quantile(DETECT_POWER)) * se

    def seeds_for(g: float) -> int | None:
        if not g > 0:
            return None
        return int(min(math.ceil(n_seeds * (detect / g) ** 2), MAX_SEEDS_QUOTED))

    fitted_gain = gain if has_moe and gain > detect / 10 else float("nan")
    return detect, seeds_for(REFERENCE_GAIN), seeds_for(fitted_gain)


def _u_verdict(p_lo, p_hi, p_cap, range_hi, curve, lo_x, hi_x, q, flat_tolerance, level, detect, seeds_ref,
               n_boot) -> tuple[str, float | None, str]:
    """(verdict, edge, reason) from the resampled edge slopes; see `fit_u_curve` for the rule."""
    pct = f"{q:.0%}"
    if not n_boot:
        return "too noisy", None, "no bootstrap resamples, so nothing can be claimed"
    if p_lo >= q and p_hi >= q:
        return "interior", None, (f"the curve falls away from both edges (slope < 0 at rho = {lo_x:.3g} in "
                                  f"{p_lo:.0%}, > 0 at rho = {hi_x:.3g} in {p_hi:.0%} of resamples; rule: both "
                                  f">= {pct})")
    if p_cap >= q:
        return "concave", None, (f"the curve bends down (a cap) in {p_cap:.0%} of resamples (rule: >= {pct}): "
                                 "no minimum inside the range")
    still_falls_hi, still_falls_lo = p_hi <= 1 - q, p_lo <= 1 - q
    if still_falls_hi or still_falls_lo:
        if still_falls_hi and still_falls_lo:
            edge = hi_x if curve[-1] <= curve[0] else lo_x
        else:
            edge = hi_x if still_falls_hi else lo_x
        p_edge = 1 - p_hi if edge == hi_x else 1 - p_lo
        return "boundary", edge, (f"the loss still falls toward the edge rho = {edge:.3g} in {p_edge:.0%} of "
                                  f"resamples (rule: >= {pct}): the minimum lies at or beyond the sampled range")
    if range_hi < flat_tolerance:
        return "flat", None, (f"the whole curve varies by less than {flat_tolerance:g} nats (upper "
                              f"{level:.0%} bound of its range {range_hi:.3g})")
    seeds = "" if seeds_ref is None else (f"; a gain of the paper's {REFERENCE_GAIN} nats would be detected with "
                                          f"about {seeds_ref}{'+' if seeds_ref >= MAX_SEEDS_QUOTED else ''} seeds")
    return "too noisy", None, (f"neither an interior minimum nor an edge is resolved (slope < 0 at the low edge "
                               f"in {p_lo:.0%}, > 0 at the high edge in {p_hi:.0%} of resamples; rule: {pct}); "
                               f"smallest gain this sweep could detect ~{detect:.3g} nats{seeds}")


def _poly_basis(x: np.ndarray, degree: int = 2) -> np.ndarray:
    return np.stack([x ** p for p in range(degree + 1)], axis=1)


def _quadratic_in_rho(coef_B3: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Coefficients of a parabola in the scaled variable t = (rho - m) / h back to rho: c0 + c1 rho + c2 rho^2."""
    m, h = 0.5 * (lo + hi), 0.5 * (hi - lo)
    a0, a1, a2 = coef_B3.T
    return np.stack([a0 - a1 * m / h + a2 * m * m / (h * h), a1 / h - 2 * a2 * m / (h * h), a2 / (h * h)], axis=1)


def _pspline_basis(x, lo, hi, grid):
    """Cubic B-spline basis on equally spaced knots (at x and on the grid) and the third-order difference penalty."""
    degree = 3
    inner = np.linspace(lo, hi, SPLINE_BASIS - degree + 1)
    knots = np.concatenate([[lo] * degree, inner, [hi] * degree])
    basis = BSpline.design_matrix(x, knots, degree).toarray()
    grid_basis = BSpline.design_matrix(np.clip(grid, lo, hi), knots, degree).toarray()
    diff = np.diff(np.eye(SPLINE_BASIS), n=3, axis=0)
    return basis, grid_basis, diff.T @ diff


def _pspline_fit(basis_nk, y_n, w_Bn, dtd_kk, ok_B, fixed_kk, lam: float) -> np.ndarray:
    """Penalised weighted least squares, penalty lam * dtd_kk plus `fixed_kk` (the seed offsets' ridge), for
    every row of weights at once. NaN where not ok."""
    penalty = lam * dtd_kk + fixed_kk
    return _weighted_lstsq(basis_nk, y_n, w_Bn, penalty, ok_B)


def _gcv_lambda(basis_nk, y_n, dtd_kk, fixed_kk) -> float:
    """The GCV choice of the P-spline penalty on the unweighted data."""
    gram = basis_nk.T @ basis_nk + (0 if fixed_kk is None else fixed_kk)
    rhs = basis_nk.T @ y_n
    n, best, best_lam = len(y_n), np.inf, SPLINE_LAMBDAS[-1]
    for lam in SPLINE_LAMBDAS:
        try:
            hat = np.linalg.solve(gram + lam * dtd_kk, np.column_stack([basis_nk.T, rhs]))
        except np.linalg.LinAlgError:
            continue
        edf = float(np.trace(basis_nk @ hat[:, :n]))
        rss = float(np.sum((y_n - basis_nk @ hat[:, n]) ** 2))
        gcv = n * rss / (n - edf) ** 2 if edf < n - 1e-9 else np.inf
        if gcv < best:
            best, best_lam = gcv, lam
    return float(best_lam)


def _weighted_lstsq(basis_nk, y_n, w_Bn, penalty_kk, ok_B) -> np.ndarray:
    """Penalised weighted least squares for each row of weights at once; NaN coefficients where not ok."""
    w_Bn = np.where(ok_B[:, None], w_Bn, 1.0)   # keep the batch solvable; those rows are discarded below
    gram_Bkk = np.einsum("bn,nk,nl->bkl", w_Bn, basis_nk, basis_nk, optimize=True) + penalty_kk
    rhs_Bk = (w_Bn * y_n) @ basis_nk
    coef_Bk = np.full(rhs_Bk.shape, np.nan)
    try:
        coef_Bk[:] = np.linalg.solve(gram_Bkk, rhs_Bk[..., None])[..., 0]
    except np.linalg.LinAlgError:   # a singular resample poisons the batched solve: solve one by one
        for b in range(len(coef_Bk)):
            try:
                coef_Bk[b] = np.linalg.solve(gram_Bkk[b], rhs_Bk[b])
            except np.linalg.LinAlgError:
                pass
    coef_Bk[~ok_B] = np.nan
    return coef_Bk


def _r2(y: np.ndarray, fitted: np.ndarray) -> float:
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return float("nan") if ss_tot == 0 else 1.0 - float(np.sum((y - fitted) ** 2)) / ss_tot


def pooled_seed_variance(x, loss) -> float:
    """The variance of trials around the mean of the trials at the same x, pooled over x (n - groups degrees of
    freedom): the seed noise of one trial. NaN when no x is repeated."""
    x = np.asarray(x, dtype=float)
    loss = np.asarray(loss, dtype=float)
    _, group, count = np.unique(x, return_inverse=True, return_counts=True)
    if len(x) <= len(count):
        return float("nan")
    means = np.bincount(group, weights=loss) / count
    return float(np.sum((loss - means[group]) ** 2)) / (len(x) - len(count))


def r2_from_seed_noise(x, loss, fitted) -> float:
    """The R^2 over single trials to expect if the fitted law were exact and trials scattered around it as much as
    trials at the same x scatter around their mean: var(fitted) / (var(fitted) + pooled_seed_variance). More seeds
    leave it where it is (they sharpen the fit's intervals instead). NaN when no x is repeated."""
    within = pooled_seed_variance(x, loss)
    var_fit = float(np.var(np.asarray(fitted, dtype=float)))
    return float("nan") if not var_fit + within > 0 else var_fit / (var_fit + within)


# ---------------------------------------------------------------------------------------------------------------
# Sums of power laws in log space (Approach 3): log L = LSE(e, a_1 - alpha_1 log x_1, ..., a_k - alpha_k log x_k)
#
# theta = [e, a_1, alpha_1, ..., a_k, alpha_k]; the x are divided by their geometric mean first, so one grid of
# initialisations fits every scale (slots ~1e5, compute ~1e20) and A is converted back afterwards.


def _lse(theta_Bp: np.ndarray, logx_nk: np.ndarray):
    """log L-hat (B, n) and the softmax shares of its terms (B, n, k+1)."""
    e_B, a_Bk, alpha_Bk = theta_Bp[:, 0], theta_Bp[:, 1::2], theta_Bp[:, 2::2]
    terms_Bnk = a_Bk[:, None, :] - alpha_Bk[:, None, :] * logx_nk[None, :, :]
    z_Bnm = np.concatenate([np.broadcast_to(e_B[:, None, None], terms_Bnk.shape[:2] + (1,)), terms_Bnk], axis=2)
    zmax_Bn1 = z_Bnm.max(axis=2, keepdims=True)
    ez_Bnm = np.exp(z_Bnm - zmax_Bn1)
    total_Bn1 = ez_Bnm.sum(axis=2, keepdims=True)
    return (zmax_Bn1 + np.log(total_Bn1))[..., 0], ez_Bnm / total_Bn1


def _jacobian(share_Bnm: np.ndarray, logx_nk: np.ndarray) -> np.ndarray:
    """d log L-hat / d theta, (B, n, p)."""
    n_terms = logx_nk.shape[1]
    jac_Bnp = np.empty(share_Bnm.shape[:2] + (1 + 2 * n_terms,))
    jac_Bnp[..., 0] = share_Bnm[..., 0]
    jac_Bnp[..., 1::2] = share_Bnm[..., 1:]
    jac_Bnp[..., 2::2] = -share_Bnm[..., 1:] * logx_nk[None]
    return jac_Bnp


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    """Huber loss divided by delta, so that its slope is at most 1 (keeps L-BFGS's tolerances meaningful)."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r / delta, a - 0.5 * delta)


def _objective(theta_Bp, logx_nk, logy_n, w_Bn, delta: float) -> np.ndarray:
    pred_Bn, _ = _lse(theta_Bp, logx_nk)
    return np.sum(w_Bn * _huber(logy_n[None] - pred_Bn, delta), axis=1)


def _bounds(n_terms: int) -> tuple[np.ndarray, np.ndarray]:
    lo = np.array([-LOG_BOUND] + [-LOG_BOUND, 0.0] * n_terms)
    hi = np.array([LOG_BOUND] + [LOG_BOUND, ALPHA_MAX] * n_terms)
    return lo, hi


def _init_grid(logx_nk: np.ndarray, y: np.ndarray, starts: StartGrid) -> np.ndarray:
    """Initialisations relative to the data: E a fraction of the lowest loss, each term's value at the
    geometric-mean x a fraction of the loss range, exponents from flat to steep (see StartGrid)."""
    n_terms = logx_nk.shape[1]
    span = max(float(y.max() - y.min()), 1e-3 * float(y.min()))
    e_grid = np.log(y.min() * np.asarray(starts.e_fractions, dtype=float))
    a_grid = np.log(span * np.asarray(starts.a_fractions, dtype=float) / n_terms)
    alpha_grid = np.asarray(starts.alphas, dtype=float)
    axes = [e_grid] + [a_grid, alpha_grid] * n_terms
    return np.array(list(itertools.product(*axes)))


def _fit_lse(logx_nk: np.ndarray, y: np.ndarray, what: str, delta: float, starts: StartGrid) -> np.ndarray:
    """Multi-start L-BFGS-B on the Huber objective, then a batched polish; returns theta.

    Epoch AI run L-BFGS from every point of their grid; we evaluate the objective on the whole grid at once and
    run L-BFGS from the N_LBFGS_STARTS best grid points, which finds the same minimum at a fraction of the cost
    (checked: on the Chinchilla-form test data against L-BFGS from 412 of the 2,880 grid points, and on a power
    law from all 120, the objectives agreed to 1e-14).
    """
    logy = np.log(y)
    grid_Gp = _init_grid(logx_nk, y, starts)
    with np.errstate(over="ignore", invalid="ignore"):
        start_obj = _objective(grid_Gp, logx_nk, logy, np.ones((1, len(y))), delta)
    order = np.argsort(np.where(np.isfinite(start_obj), start_obj, np.inf))[:starts.n_lbfgs]
    lo, hi = _bounds(logx_nk.shape[1])
    ones = np.ones((1, len(y)))

    def fun(theta):
        pred_Bn, share_Bnm = _lse(theta[None], logx_nk)
        r = logy - pred_Bn[0]
        psi = np.clip(r, -delta, delta) / delta
        grad = -(psi @ _jacobian(share_Bnm, logx_nk)[0])
        return float(np.sum(_huber(r, delta))), grad

    best_theta, best_obj = None, np.inf
    for theta0 in grid_Gp[order]:
        res = minimize(fun, theta0, jac=True, method="L-BFGS-B", bounds=list(zip(lo, hi)),
                       options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-10})
        if np.isfinite(res.fun) and res.fun < best_obj and np.all(np.isfinite(res.x)):
            best_theta, best_obj = res.x, res.fun
    if best_theta is None:
        raise FitError(f"{what}: L-BFGS found no finite minimum from {len(order)} initialisations")
    polished = _refine(best_theta[None], logx_nk, logy, ones, delta)[0]
    if _objective(polished[None], logx_nk, logy, ones, delta)[0] <= best_obj:
        best_theta = polished
    return best_theta


def _refine(theta_Bp, logx_nk, logy_n, w_Bn, delta: float, n_iter: int = REFINE_ITERS) -> np.ndarray:
    """Minimise the weighted Huber objective for many weight vectors at once (one per bootstrap resample).

    Levenberg-Marquardt on the iteratively reweighted least-squares majoriser of the Huber loss: weights
    min(1, delta/|r|) turn Huber into a weighted square whose minimiser decreases the Huber objective; a step is
    kept only when the true objective falls, otherwise its damping grows. Vectorised over the batch, so 1,000
    resamples cost about as much as a few single fits. Resamples that end non-finite come back as NaN.
    """
    lo, hi = _bounds(logx_nk.shape[1])
    theta = theta_Bp.copy()
    n_batch, n_par = theta.shape
    damping_B = np.full(n_batch, 1e-3)
    obj_B = _objective(theta, logx_nk, logy_n, w_Bn, delta)
    active_B = np.isfinite(obj_B)
    eye = np.eye(n_par)
    for _ in range(n_iter):
        if not active_B.any():
            break
        idx = np.nonzero(active_B)[0]
        th, w = theta[idx], w_Bn[idx]
        pred_Bn, share_Bnm = _lse(th, logx_nk)
        r_Bn = logy_n[None] - pred_Bn
        omega_Bn = w * np.minimum(1.0, delta / np.maximum(np.abs(r_Bn), 1e-300))
        jac_Bnp = _jacobian(share_Bnm, logx_nk)
        jw_Bnp = jac_Bnp * omega_Bn[..., None]
        gram_Bpp = np.einsum("bnp,bnq->bpq", jw_Bnp, jac_Bnp)
        rhs_Bp = np.einsum("bnp,bn->bp", jw_Bnp, r_Bn)
        diag_Bp = np.einsum("bpp->bp", gram_Bpp)
        lhs = gram_Bpp + (damping_B[idx, None, None] * (diag_Bp[:, :, None] * eye) + 1e-12 * eye)
        try:
            step_Bp = np.linalg.solve(lhs, rhs_Bp[..., None])[..., 0]
        except np.linalg.LinAlgError:
            step_Bp = np.stack([np.linalg.lstsq(m, v, rcond=None)[0] for m, v in zip(lhs, rhs_Bp)])
        new = np.clip(th + step_Bp, lo, hi)
        with np.errstate(over="ignore", invalid="ignore"):
            new_obj = _objective(new, logx_nk, logy_n, w, delta)
        accept = np.isfinite(new_obj) & (new_obj <= obj_B[idx])
        gain = np.where(accept, obj_B[idx] - new_obj, 0.0)
        theta[idx[accept]] = new[accept]
        obj_B[idx[accept]] = new_obj[accept]
        damping_B[idx] = np.where(accept, np.maximum(damping_B[idx] / 3, 1e-9), damping_B[idx] * 4)
        converged = (accept & (gain <= 1e-12 * np.maximum(obj_B[idx], 1e-12))) | (damping_B[idx] > 1e10)
        active_B[idx[converged]] = False
    theta[~np.isfinite(obj_B)] = np.nan
    return theta


def _normalise(x_nk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logx_nk = np.log(x_nk)
    ref_k = logx_nk.mean(axis=0)
    return logx_nk - ref_k, ref_k


def _power_terms(theta_Bp: np.ndarray, ref_k: np.ndarray) -> np.ndarray:
    """theta (normalised x) -> [E, A_1, alpha_1, ...] in the caller's units: A = exp(a) * x_ref^alpha."""
    out = np.empty_like(theta_Bp)
    out[:, 0] = np.exp(theta_Bp[:, 0])
    out[:, 2::2] = theta_Bp[:, 2::2]
    out[:, 1::2] = np.exp(theta_Bp[:, 1::2] + theta_Bp[:, 2::2] * ref_k[None])
    return out


def _fit_power_sum(x_nk, y, seed, n_resamples, level, rng, what, delta, starts):
    """Shared body of the one- and two-variable fits: point fit, bootstrap, parameters in caller's units."""
    logx_nk, ref_k = _normalise(x_nk)
    theta = _fit_lse(logx_nk, y, what, delta, starts)
    w_Bn = (bootstrap_counts(seed, n_resamples, rng, (*x_nk.T, y)).astype(float) if n_resamples
            else np.zeros((0, len(y))))
    n_par = theta.shape[0]
    ok_B = np.ones(len(w_Bn), dtype=bool)
    for k in range(x_nk.shape[1]):   # each term needs enough distinct x in the resample to be identified
        ok_B &= _n_distinct_weighted(x_nk[:, k], w_Bn) >= (3 if x_nk.shape[1] == 1 else 2)
    ok_B &= np.count_nonzero(w_Bn, axis=1) >= n_par
    few = int(np.sum(~ok_B))
    boot_theta = np.full((len(w_Bn), n_par), np.nan)
    if ok_B.any():
        boot_theta[ok_B] = _refine(np.repeat(theta[None], ok_B.sum(), axis=0), logx_nk, np.log(y), w_Bn[ok_B],
                                   delta)
    ok_B &= np.all(np.isfinite(boot_theta), axis=1)
    dropped = _dropped(FEW_DISTINCT=few, NON_FINITE=int(np.sum(~ok_B)) - few)
    _check_failed(int(np.sum(~ok_B)), n_resamples, what)
    params = _power_terms(theta[None], ref_k)[0]
    boot = _power_terms(boot_theta[ok_B], ref_k)
    pred = np.exp(_lse(theta[None], logx_nk)[0][0])
    return params, boot, pred, w_Bn, ok_B, dropped


def _outliers(x_nk, y, seed, k: float | None, delta: float, starts: StartGrid, what: str) -> np.ndarray:
    """Indices of points whose log residual from a first fit lies more than k robust standard deviations
    (1.4826 * MAD) from the median residual; empty when k is None. The caller refits without them."""
    if k is None:
        return np.zeros(0, dtype=int)
    if not k > 0:
        raise ValueError(f"exclude_outliers: expected a positive number of robust standard deviations, got {k!r}")
    logx_nk, _ = _normalise(x_nk)
    theta = _fit_lse(logx_nk, y, what, delta, starts)
    r = np.log(y) - _lse(theta[None], logx_nk)[0][0]
    scale = 1.4826 * float(np.median(np.abs(r - np.median(r))))
    if scale == 0:
        return np.zeros(0, dtype=int)
    return np.nonzero(np.abs(r - np.median(r)) > k * scale)[0]


def _unidentified(params: dict[str, Estimate], r2: float) -> tuple[tuple[str, str], ...]:
    """(parameter, reason) for each parameter the data do not pin down: every one when R^2 < 0 (worse than
    the mean), else those whose interval is missing, reaches zero or spans more than a decade (DECADE)."""
    if not r2 >= 0:
        return tuple((name, f"R^2 = {r2:.3g} < 0: the law fits worse than a constant") for name in params)
    out = []
    for name, est in params.items():
        if not (math.isfinite(est.lo) and math.isfinite(est.hi)):
            out.append((name, "no interval"))
        elif est.lo <= 0:
            out.append((name, f"interval [{est.lo:.3g}, {est.hi:.3g}] reaches 0"))
        elif est.hi / est.lo > DECADE:
            out.append((name, f"interval [{est.lo:.3g}, {est.hi:.3g}] spans {math.log10(est.hi / est.lo):.1f} "
                              "decades"))
    return tuple(out)


def fit_power_law(x, loss, seed=None, *, n_resamples: int = N_RESAMPLES, level: float = LEVEL,
                  rng: np.random.Generator | int = 0, huber_delta: float = HUBER_DELTA,
                  start_grid: StartGrid | None = None, exclude_outliers: float | None = None) -> PowerLawFit:
    """L = E + A * x^-alpha over a positive variable x (memory slots, compute, parameters).

    Approach 3 as replicated by Epoch AI: log L-hat = LSE(log E, log A - alpha log x), Huber loss (huber_delta,
    on log L) by L-BFGS from the best points of `start_grid`. exclude_outliers=k drops points more than k robust
    standard deviations from a first fit and refits (`excluded` lists them). Intervals: bootstrap over seeds then
    points (points only for a single seed), each resample warm-started from the point estimate. The paper's
    log-linear form L = a - b ln x is fitted alongside over the same resamples. A parameter whose interval spans
    more than a decade, or every parameter when R^2 < 0, is listed in `unidentified`: quote the log-linear form
    then. Needs 3 distinct x values and 4 points (after exclusion).
    """
    _check_level(level, n_resamples)
    _check_huber(huber_delta)
    starts = start_grid or StartGrid()
    x = _as_1d("x", x, positive=True)
    loss = _as_1d("loss", loss, len(x), positive=True)
    seed = _seeds(seed, len(x))
    if len(np.unique(x)) < 3 or len(x) < 4:
        raise ValueError(f"x: a power law needs at least 3 distinct x values and 4 points, got "
                         f"{len(np.unique(x))} distinct of {len(x)}")
    with single_threaded_blas():
        excluded = _outliers(x[:, None], loss, seed, exclude_outliers, huber_delta, starts, "power law")
        keep = np.setdiff1d(np.arange(len(x)), excluded)
        x, loss, seed = x[keep], loss[keep], seed[keep]
        if len(np.unique(x)) < 3 or len(x) < 4:
            raise FitError(f"power law: {len(excluded)} outliers excluded leave {len(np.unique(x))} distinct x of "
                           f"{len(x)} points; need 3 and 4")
        params, boot, pred, w_Bn, ok_B, dropped = _fit_power_sum(
            x[:, None], loss, seed, n_resamples, level, _rng(rng), "power law", huber_delta, starts)
    if not np.all(np.isfinite(pred)):
        raise FitError("power law: non-finite fitted values")
    est = {name: _estimate(params[i], boot[:, i], level) for i, name in enumerate(("E", "A", "alpha"))}
    r2 = _r2(loss, pred)
    return PowerLawFit(
        **est, r2=r2, loglinear=_fit_loglinear(x, loss, seed, w_Bn[ok_B], level),
        bootstrap=Bootstrap(_scheme(seed), n_resamples, dropped, level),
        x=x, loss=loss, seed=seed, residuals=loss - pred, boot=boot, unidentified=_unidentified(est, r2),
        excluded=tuple(int(i) for i in excluded), huber_delta=huber_delta)


def fit_power_law_table(table, *, x_col: str, loss_col: str, seed_col: str | None, **kwargs) -> PowerLawFit:
    """`fit_power_law` on any table; every column is named by the caller (seed_col=None: independent rows)."""
    _require_columns(table, [x_col, loss_col] + ([seed_col] if seed_col is not None else []))
    return fit_power_law(table[x_col].to_numpy(), table[loss_col].to_numpy(),
                         None if seed_col is None else table[seed_col].to_numpy(), **kwargs)


def _check_huber(delta: float) -> None:
    if not (isinstance(delta, (int, float)) and math.isfinite(delta) and delta > 0):
        raise ValueError(f"huber_delta: expected a positive number (residuals are in log loss), got {delta!r}")


def fit_loglinear(x, loss, seed=None, *, n_resamples: int = N_RESAMPLES, level: float = LEVEL,
                  rng: np.random.Generator | int = 0) -> LogLinearFit:
    """The paper's L = a - b ln x alone, by least squares with the same bootstrap: for groups with too few slot
    counts for the three-parameter power law. Needs 2 distinct x values. With only 2 points (an exact fit), or
    when most resamples lose a distinct x, the estimate comes without an interval (NaN bounds)."""
    _check_level(level, n_resamples)
    x = _as_1d("x", x, positive=True)
    loss = _as_1d("loss", loss, len(x))
    seed = _seeds(seed, len(x))
    if len(np.unique(x)) < 2:
        raise ValueError(f"x: the log-linear form needs at least 2 distinct x values, got {len(np.unique(x))}")
    w_Bn = bootstrap_counts(seed, n_resamples, _rng(rng), (x, loss)).astype(float)
    fit = _fit_loglinear(x, loss, seed, w_Bn, level)
    n_failed = n_resamples - len(fit.boot)
    if len(x) <= 2 or n_failed > MAX_FAILED_SHARE * n_resamples:
        # e.g. two points of one seed: resamples that keep both just repeat the exact fit, so their spread is
        # no interval. Keep the estimate, report no interval (unlike the power law, this fit cannot go wrong).
        fit = dataclasses.replace(fit, a=Estimate(fit.a.value, math.nan, math.nan, level),
                                  b=Estimate(fit.b.value, math.nan, math.nan, level), boot=fit.boot[:0])
    return dataclasses.replace(fit, bootstrap=Bootstrap(_scheme(seed), n_resamples,
                                                        _dropped(FEW_DISTINCT=n_failed), level))


def _fit_loglinear(x, loss, seed, w_Bn, level) -> LogLinearFit:
    lnx = np.log(x)
    basis = np.stack([np.ones_like(lnx), -lnx], axis=1)
    w_all = np.vstack([np.ones(len(x)), w_Bn])
    ok_B = _n_distinct_weighted(x, w_all) >= 2
    coef = _weighted_lstsq(basis, loss, w_all, np.zeros((2, 2)), ok_B)
    boot = coef[1:][ok_B[1:]]
    fitted = basis @ coef[0]
    return LogLinearFit(a=_estimate(coef[0, 0], boot[:, 0], level), b=_estimate(coef[0, 1], boot[:, 1], level),
                        r2=_r2(loss, fitted), residuals=loss - fitted, boot=boot, x=x, loss=loss, seed=seed)


def fit_chinchilla(n, d, loss, seed=None, *, n_resamples: int = N_RESAMPLES, level: float = LEVEL,
                   rng: np.random.Generator | int = 0, huber_delta: float = HUBER_DELTA,
                   start_grid: StartGrid | None = None, exclude_outliers: float | None = None) -> ChinchillaFit:
    """L = E + A * N^-alpha + B * D^-beta by the same Approach 3 recipe (and arguments) as `fit_power_law`.

    Needs at least 2 distinct N, 2 distinct D and 6 points; more are needed for a meaningful fit.
    """
    _check_level(level, n_resamples)
    _check_huber(huber_delta)
    starts = start_grid or StartGrid()
    n = _as_1d("n", n, positive=True)
    d = _as_1d("d", d, len(n), positive=True)
    loss = _as_1d("loss", loss, len(n), positive=True)
    seed = _seeds(seed, len(n))
    if len(np.unique(n)) < 2 or len(np.unique(d)) < 2 or len(n) < 6:
        raise ValueError(f"n, d: the Chinchilla form needs 2 distinct N, 2 distinct D and 6 points, got "
                         f"{len(np.unique(n))}, {len(np.unique(d))} and {len(n)}")
    with single_threaded_blas():
        excluded = _outliers(np.stack([n, d], axis=1), loss, seed, exclude_outliers, huber_delta, starts,
                             "Chinchilla form")
        keep = np.setdiff1d(np.arange(len(n)), excluded)
        n, d, loss, seed = n[keep], d[keep], loss[keep], seed[keep]
        if len(np.unique(n)) < 2 or len(np.unique(d)) < 2 or len(n) < 6:
            raise FitError(f"Chinchilla form: {len(excluded)} outliers excluded leave too few points")
        params, boot, pred, _, _, dropped = _fit_power_sum(
            np.stack([n, d], axis=1), loss, seed, n_resamples, level, _rng(rng), "Chinchilla form", huber_delta,
            starts)
    names = ("E", "A", "alpha", "B", "beta")
    est = {k: _estimate(params[i], boot[:, i], level) for i, k in enumerate(names)}
    r2 = _r2(loss, pred)
    return ChinchillaFit(**est, r2=r2, bootstrap=Bootstrap(_scheme(seed), n_resamples, dropped, level),
                         residuals=loss - pred, boot=boot, loss=loss, seed=seed,
                         unidentified=_unidentified(est, r2), excluded=tuple(int(i) for i in excluded),
                         huber_delta=huber_delta)


def fit_chinchilla_table(table, *, n_col: str, d_col: str, loss_col: str, seed_col: str | None,
                         **kwargs) -> ChinchillaFit:
    """`fit_chinchilla` on any table (a pandas DataFrame). Every column is named by the caller, none assumed:
    seed_col=None says the rows are independent; a named seed column that is missing is an error."""
    _require_columns(table, [n_col, d_col, loss_col] + ([seed_col] if seed_col is not None else []))
    return fit_chinchilla(table[n_col].to_numpy(), table[d_col].to_numpy(), table[loss_col].to_numpy(),
                          None if seed_col is None else table[seed_col].to_numpy(), **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Across budgets: iso-FLOP (Approach 2) and the scaling of an optimum with compute


def fit_optimum_scaling(budgets, optima, boot_optima=None, *, level: float = LEVEL) -> OptimumScaling:
    """optimum = coefficient * C^exponent by least squares of log10 optimum on log10 C.

    `boot_optima` (n_resamples, n_budgets), if given, are bootstrap draws of each budget's optimum; the
    regression is repeated on each draw to give the intervals. Needs 2 distinct budgets.
    """
    c = _as_1d("budgets", budgets, positive=True)
    opt = _as_1d("optima", optima, len(c), positive=True)
    if len(np.unique(c)) < 2:
        raise ValueError(f"budgets: an optimum scaling needs 2 distinct budgets, got {len(np.unique(c))}")
    logc = np.log10(c)
    design = np.stack([np.ones_like(logc), logc], axis=1)
    coef = np.linalg.lstsq(design, np.log10(opt), rcond=None)[0]
    if boot_optima is not None and len(boot_optima):
        draws = np.asarray(boot_optima, dtype=float)
        if draws.ndim != 2 or draws.shape[1] != len(c):
            raise ValueError(f"boot_optima: expected shape (n_resamples, {len(c)}), got {draws.shape}")
        good = np.all(np.isfinite(draws) & (draws > 0), axis=1)
        boot_coef = np.linalg.lstsq(design, np.log10(draws[good]).T, rcond=None)[0].T if good.any() \
            else np.full((1, 2), np.nan)
    else:
        draws, good = np.zeros((0, len(c))), np.zeros(0, dtype=bool)
        boot_coef = np.full((1, 2), np.nan)
    return OptimumScaling(coefficient=_estimate(10 ** coef[0], 10 ** boot_coef[:, 0], level),
                          exponent=_estimate(coef[1], boot_coef[:, 1], level), budgets=c, optima=opt,
                          n_draws=len(draws), n_dropped=int(np.sum(~good)))


def fit_isoflop(compute, x, loss, seed=None, *, n_resamples: int = N_RESAMPLES, level: float = LEVEL,
                rng: np.random.Generator | int = 0) -> IsoFlopFit:
    """Chinchilla Approach 2 on any (compute budget, x, loss) points, x being tokens or parameters.

    Per budget a parabola of loss in log10 x; its vertex is the optimum x*. Budgets whose parabola opens
    downward or whose vertex falls outside the sampled x are marked not interior and left out of the
    regression x* = A * C^b. Intervals: points resampled within each budget (seeds first when `seed` is given),
    vertices and regression redone. A resample in which any used budget loses its vertex is dropped and counted
    in `bootstrap.dropped` with its reason; above DROP_WARN_SHARE `bootstrap.warning` says the interval is
    conditional on the kept resamples.
    """
    _check_level(level, n_resamples)
    compute = _as_1d("compute", compute, positive=True)
    x = _as_1d("x", x, len(compute), positive=True)
    loss = _as_1d("loss", loss, len(compute))
    seed = _seeds(seed, len(compute))
    gen = _rng(rng)
    vertices, boot_cols, few_cols = [], [], []
    for budget in np.unique(compute):
        sel = compute == budget
        u = np.log10(x[sel])
        if len(np.unique(u)) < 3:
            raise ValueError(f"x: budget {budget:g} has {len(np.unique(u))} distinct x values; a parabola needs 3")
        counts_Bn = bootstrap_counts(seed[sel], n_resamples, gen, (x[sel], loss[sel]))
        w_Bn = np.vstack([np.ones(sel.sum()), counts_Bn]).astype(float)
        ok_B = _n_distinct_weighted(u, w_Bn) >= 3
        coef_B3 = _weighted_lstsq(_poly_basis(u), loss[sel], w_Bn, np.zeros((3, 3)), ok_B)
        c0, c1, c2 = coef_B3.T
        with np.errstate(divide="ignore", invalid="ignore"):
            ustar_B = np.where(c2 > 0, -c1 / (2 * c2), np.nan)
        ustar_B = np.where((ustar_B >= u.min()) & (ustar_B <= u.max()), ustar_B, np.nan)
        interior = bool(np.isfinite(ustar_B[0]))
        vertex_u = ustar_B[0] if interior else u[np.argmin(loss[sel])]
        vertices.append(IsoFlopVertex(
            budget=float(budget), x_star=float(10 ** vertex_u),
            loss_star=float(c0[0] + c1[0] * vertex_u + c2[0] * vertex_u ** 2) if interior
            else float(loss[sel].min()),
            n_points=int(sel.sum()), interior=interior))
        if interior:
            boot_cols.append(10 ** ustar_B[1:])
            few_cols.append(~ok_B[1:])
    used = [v for v in vertices if v.interior]
    if len(used) < 2:
        raise FitError(f"iso-FLOP: {len(used)} of {len(vertices)} budgets have an interior vertex; need 2")
    boot = np.stack(boot_cols, axis=1)
    lost_B = ~np.all(np.isfinite(boot), axis=1)
    few_B = np.any(np.stack(few_cols, axis=1), axis=1)
    _check_failed(int(lost_B.sum()), n_resamples, "iso-FLOP")
    scaling = fit_optimum_scaling([v.budget for v in used], [v.x_star for v in used], boot, level=level)
    scheme = "points within budget" if len(np.unique(seed)) == 1 else "seeds+points within budget"
    return IsoFlopFit(vertices=tuple(vertices), scaling=scaling,
                      bootstrap=Bootstrap(scheme, n_resamples, _dropped(FEW_DISTINCT=int(np.sum(lost_B & few_B)),
                                                                        NO_VERTEX=int(np.sum(lost_B & ~few_B))),
                                          level),
                      n_seeds=len(np.unique(seed)))


def fit_isoflop_table(table, *, compute_col: str, x_col: str, loss_col: str, seed_col: str | None = None,
                      **kwargs) -> IsoFlopFit:
    """`fit_isoflop` on any table; the caller names every column (seed_col=None: the points carry no seeds).

    On the public Llama 3 iso-FLOP points (`LLAMA3_ISOFLOPS`, see analysis/data/README.md), whose paper reports
    D* = 0.29 * C^0.53:

    >>> import pandas as pd
    >>> from analysis.fits import LLAMA3_ISOFLOPS, fit_isoflop_table
    >>> fit = fit_isoflop_table(pd.read_csv(LLAMA3_ISOFLOPS), compute_col="compute_budget",
    ...                         x_col="training_tokens", loss_col="validation_loss", n_resamples=1000, rng=0)
    >>> fit.n_budgets, fit.n_points, fit.n_seeds
    (10, 133, 1)
    >>> round(fit.scaling.coefficient.value, 2), round(fit.scaling.exponent.value, 3)
    (0.3, 0.537)
    >>> fit.bootstrap.warning is not None    # ~20% of resamples lose a budget's vertex: said, not hidden
    True
    """
    _require_columns(table, [compute_col, x_col, loss_col] + ([seed_col] if seed_col is not None else []))
    return fit_isoflop(table[compute_col].to_numpy(), table[x_col].to_numpy(), table[loss_col].to_numpy(),
                       None if seed_col is None else table[seed_col].to_numpy(), **kwargs)


@dataclass(frozen=True)
class BudgetTrend:
    """How the optimum moves with compute over the U-curves of one experiment (one per budget)."""

    budgets: np.ndarray = field(compare=False)
    fits: tuple[UCurveFit, ...] = field(compare=False)
    rho_star_scaling: OptimumScaling | None      # over budgets with an interior optimum (needs 2)
    loss_scaling: OptimumScaling | None          # best fitted loss over budgets (needs 2)
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"budgets": [float(b) for b in self.budgets],
                "per_budget": [{"budget": float(b), "verdict": f.verdict,
                                "rho_star": None if f.rho_star is None else f.rho_star.to_dict(),
                                "loss_at_optimum": f.loss_at_optimum.to_dict()}
                               for b, f in zip(self.budgets, self.fits)],
                "rho_star_scaling": None if self.rho_star_scaling is None else self.rho_star_scaling.to_dict(),
                "loss_scaling": None if self.loss_scaling is None else self.loss_scaling.to_dict(),
                "notes": list(self.notes)}


def fit_budget_trend(budgets: Sequence[float], fits: Sequence[UCurveFit], *, level: float = LEVEL,
                     rng: np.random.Generator | int = 0) -> BudgetTrend:
    """rho* and the best loss as functions of compute: per-budget optimum (the U-curve's), then a power law of
    the optimum in C (Approach 2's second stage). Intervals: the regression is redone on the per-budget
    bootstrap draws, paired at random across budgets (the budgets' trials are independent)."""
    budgets = _as_1d("budgets", budgets, positive=True)
    if len(fits) != len(budgets):
        raise ValueError(f"fits: expected one U-curve fit per budget ({len(budgets)}), got {len(fits)}")
    order = np.argsort(budgets)
    budgets, fits = budgets[order], tuple(fits[i] for i in order)
    notes = []
    rng = _rng(rng)
    loss_scaling = rho_scaling = None
    if len(np.unique(budgets)) >= 2:
        loss_draws = _paired_draws([f.boot_min_loss for f in fits], rng)
        loss_scaling = fit_optimum_scaling(budgets, [f.loss_at_optimum.value for f in fits], loss_draws,
                                           level=level)
        inner = [i for i, f in enumerate(fits) if f.verdict == "interior"]
        if len(inner) >= 2 and len(np.unique(budgets[inner])) >= 2:
            rho_draws = _paired_draws([fits[i].boot_argmin for i in inner], rng)
            rho_scaling = fit_optimum_scaling(budgets[inner], [fits[i].rho_star.value for i in inner], rho_draws,
                                              level=level)
        else:
            notes.append(f"rho* scaling not fitted: {len(inner)} of {len(fits)} budgets have an interior optimum "
                         "(need 2)")
    else:
        notes.append("scaling with compute not fitted: fewer than 2 budgets")
    return BudgetTrend(budgets=budgets, fits=fits, rho_star_scaling=rho_scaling, loss_scaling=loss_scaling,
                       notes=tuple(notes))


def _paired_draws(columns: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Stack per-budget draws into (n, n_budgets), shuffling each column so budgets are paired at random."""
    n = min(len(c) for c in columns)
    return np.stack([rng.permutation(c)[:n] for c in columns], axis=1)


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def _require_columns(table, columns: list[str]) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"table: missing columns {missing} (has {list(table.columns)})")


def _finite_or_none(value) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None
