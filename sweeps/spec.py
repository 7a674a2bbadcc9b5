"""The sweep spec: a YAML file -> a validated, frozen `SweepSpec` (the schema is documented in docs/sweep-spec.md).

This is the only module that reads YAML. Validation happens once, here: every mistake raises `SpecError` whose
message is one line starting with the field path (`experiments[1].rho[2]: ...`) or, for a YAML syntax error,
`file:line`. The checks go beyond types: the allocation solver is run for every target (P_tot below P_act is
caught here), every budget must pay for at least one optimiser step, and corpus paths must exist (nothing is
tokenized at load). Paths in a spec are relative to the spec file's folder and are stored absolute, because
Ray workers do not run in the driver's working directory.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Union

import yaml

from engram.accounting import AllocationError, check_fair, moe_model_for_p_tot, solve_allocation
from engram.config import (MAX_SEED, MIX_CORPUS, ConfigError, DataConfig, MemoryConfig, ModelConfig, TrainConfig,
                           TrialConfig, check_keys, from_dict, to_dict)
from sweeps.sizing import memory_for_slots, step_flops, target_p_tot

EXPERIMENT_KINDS = ("allocation", "memory", "search")
SWEEP_MEMORY_KINDS = ("engram", "overencoding", "none")  # none: the memory-free point of a memory experiment
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")   # a folder name: at most 100 characters
# Keys a spec may not set in `train` / `model.memory`: each experiment sets them per trial.
_TRAIN_PER_TRIAL = MappingProxyType({"steps": "each experiment's budget sets the horizon as train.flops",
                    "tokens": "each experiment's budget sets the horizon as train.flops",
                    "flops": "each experiment's budget sets the horizon as train.flops",
                    "seed": "each experiment's seeds set it"})
_MEMORY_PER_TRIAL = MappingProxyType({
    "kind": "each experiment sets the memory kind",
    "slots": "each experiment sets the slot count (allocation: the solver; memory: `slots`)"})


class SpecError(ValueError):
    """A mistake in a sweep spec; the message is one line naming the field path (or file:line)."""


# ---------------------------------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True)
class Resources:
    """What each trial is given and how many run at once. Fractional GPUs share a device."""

    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int | None = None
    max_retries: int = 2

    def __post_init__(self) -> None:
        if not self.cpus_per_trial > 0:
            raise ConfigError(f"cpus_per_trial: expected a positive number, got {self.cpus_per_trial}")
        if self.gpus_per_trial < 0 or (self.gpus_per_trial > 1 and self.gpus_per_trial != int(self.gpus_per_trial)):
            raise ConfigError(f"gpus_per_trial: expected 0, a fraction in (0, 1] or a whole number, "
                              f"got {self.gpus_per_trial}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ConfigError(f"max_concurrent: expected a positive integer or null, got {self.max_concurrent}")
        if not 0 <= self.max_retries <= 100:
            raise ConfigError(f"max_retries: expected an integer in 0..100, got {self.max_retries}")


def _check_target(exp: Any) -> None:
    given = [n for n in ("p_tot_ratio", "p_tot") if getattr(exp, n) is not None]
    if len(given) != 1:
        raise ConfigError(f"p_tot_ratio/p_tot: expected exactly one of them, got "
                          f"{' and '.join(given) if given else 'neither'}")
    value = getattr(exp, given[0])
    if not (math.isfinite(value) and value > (1 if given[0] == "p_tot_ratio" else 0)):
        bound = "a number > 1" if given[0] == "p_tot_ratio" else "a positive number"
        raise ConfigError(f"{given[0]}: expected {bound}, got {value}")


def _check_list(name: str, values: tuple, check: Any, expected: str) -> None:
    if not values:
        raise ConfigError(f"{name}: expected a non-empty list")
    for i, v in enumerate(values):
        if not check(v):
            raise ConfigError(f"{name}[{i}]: expected {expected}, got {v!r}")
    dups = [v for i, v in enumerate(values) if v in values[:i]]
    if dups:
        raise ConfigError(f"{name}[{values.index(dups[0], values.index(dups[0]) + 1)}]: duplicate value {dups[0]!r}")


def _check_budget(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name}: expected a positive number of FLOPs, got {value}")


@dataclass(frozen=True)
class AllocationExperiment:
    """Fixed P_tot (hence P_act) per budget; rho moves the sparse budget between routed experts and Engram slots."""

    name: str
    rho: tuple[float, ...]
    budgets: tuple[float, ...]
    seeds: tuple[int, ...] = (0,)
    p_tot_ratio: float | None = None
    p_tot: float | None = None
    kind: str = "allocation"
    # An axis over the mix corpus (data.corpus: mix): one U-curve per share; None: the share of `data`.
    knowledge_share: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        _check_target(self)
        _check_list("rho", self.rho, lambda r: 0 <= r <= 1, "a number in [0, 1]")
        _check_list("budgets", self.budgets, lambda b: math.isfinite(b) and b > 0, "a positive number of FLOPs")
        _check_list("seeds", self.seeds, lambda s: 0 <= s < MAX_SEED, "an integer in 0..2^32-1")
        if self.knowledge_share is not None:
            _check_list("knowledge_share", self.knowledge_share, lambda s: 0 <= s <= 1, "a number in [0, 1]")

    def data_configs(self, data: DataConfig) -> tuple[DataConfig, ...]:
        """The data of each point of the knowledge_share axis (just `data` without the axis)."""
        if self.knowledge_share is None:
            return (data,)
        return tuple(dataclasses.replace(data, knowledge_share=float(s)) for s in self.knowledge_share)


@dataclass(frozen=True)
class MemoryExperiment:
    """The fixed MoE backbone of `model` plus memory of each kind and slot count (swept over decades)."""

    name: str
    slots: tuple[int, ...]
    budget: float
    memory: tuple[str, ...] = ("engram",)
    seeds: tuple[int, ...] = (0,)
    kind: str = "memory"

    def __post_init__(self) -> None:
        _check_list("memory", self.memory, lambda m: m in SWEEP_MEMORY_KINDS, f"one of {', '.join(SWEEP_MEMORY_KINDS)}")
        _check_list("slots", self.slots, lambda s: s > 0, "a positive integer")
        _check_budget("budget", self.budget)
        _check_list("seeds", self.seeds, lambda s: 0 <= s < MAX_SEED, "an integer in 0..2^32-1")


@dataclass(frozen=True)
class SearchExperiment:
    """Adaptive search (Optuna, seeded) for the best rho in [0, 1] at one budget, `n_trials` trials."""

    name: str
    budget: float
    n_trials: int
    seed: int = 0
    p_tot_ratio: float | None = None
    p_tot: float | None = None
    kind: str = "search"

    def __post_init__(self) -> None:
        _check_target(self)
        _check_budget("budget", self.budget)
        if not 1 <= self.n_trials <= 10_000:
            raise ConfigError(f"n_trials: expected an integer in 1..10000, got {self.n_trials}")
        if not 0 <= self.seed <= MAX_SEED - 1 - self.n_trials:   # Optuna is seeded with seed + trials done
            raise ConfigError(f"seed: expected an integer in 0..2^32-1-n_trials, got {self.seed}")


Experiment = Union[AllocationExperiment, MemoryExperiment, SearchExperiment]
_EXPERIMENT_CLASSES = MappingProxyType(
    {"allocation": AllocationExperiment, "memory": MemoryExperiment, "search": SearchExperiment})


@dataclass(frozen=True)
class FailAttempts:
    """Test-only fault injection: trials whose experiment name or trial_id starts with `match` raise at start
    in their first `times` attempts."""

    match: str
    times: int = 1

    def __post_init__(self) -> None:
        if not self.match:
            raise ConfigError("match: expected an experiment name or trial_id prefix, got an empty string")
        if self.times < 1:
            raise ConfigError(f"times: expected a positive integer, got {self.times}")

    def applies(self, experiment: str, trial_id: str, attempt: int) -> bool:
        """Whether attempt number `attempt` (1-based) of this trial should fail."""
        return (experiment == self.match or trial_id.startswith(self.match)) and attempt <= self.times


@dataclass(frozen=True)
class Testing:
    """Test-only knobs; never part of a trial_id."""

    fail_attempts: FailAttempts | None = None


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep. `train` is a template: its horizon and seed are placeholders that `trial_train`
    replaces per trial (train.flops = the experiment's budget, train.seed = the trial's seed)."""

    name: str
    results_dir: Path
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    resources: Resources
    experiments: tuple[Experiment, ...]
    testing: Testing = Testing()

    @property
    def store_dir(self) -> Path:
        return self.results_dir / self.name

    def experiment(self, name: str) -> Experiment:
        for exp in self.experiments:
            if exp.name == name:
                return exp
        raise KeyError(name)

    def trial_train(self, budget: float, seed: int, tokens: int | None = None) -> TrainConfig:
        """The trial's TrainConfig: horizon train.flops = budget, or, given `tokens` (the plan holds the tokens
        of every trial of an experiment and budget equal: sweeps.plan.reference_tokens), train.tokens."""
        if tokens is not None:
            return dataclasses.replace(self.train, steps=None, tokens=int(tokens), flops=None, seed=seed)
        return dataclasses.replace(self.train, steps=None, tokens=None, flops=float(budget), seed=seed)


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec file. Raises SpecError (one line) for any mistake."""
    path = Path(path)
    raw = _read_yaml(path)
    if raw is None:
        raise SpecError(f"{path}: empty (expected a sweep spec: a mapping with name and experiments)")
    return parse_spec(raw, base_dir=path.resolve().parent)


def load_trial_config(path: str | Path) -> TrialConfig:
    """Read one trial's config (the `engram-sweep train --config` file): a TrialConfig mapping."""
    path = Path(path)
    raw = _read_yaml(path)
    try:
        config = from_dict(TrialConfig, raw)
    except ConfigError as err:
        raise SpecError(str(err)) from None
    return dataclasses.replace(config, data=_resolve_data(config.data, path.resolve().parent, "data"))


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as err:
        raise SpecError(f"{path}: cannot read ({type(err).__name__})") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError(f"{where}: YAML syntax error: {problem}") from None
    except RecursionError:
        raise SpecError(f"{path}: YAML nested too deeply to be a spec") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, but a key given twice in one mapping is an error: YAML keeps the last silently, and a
    second `rho:` would drop the first grid without a word."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue        # an unhashable key: construct_mapping below says so
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_TOP_KEYS = ("name", "results_dir", "data", "model", "train", "resources", "experiments", "testing")


def parse_spec(raw: Any, base_dir: Path) -> SweepSpec:
    """Validate a parsed spec mapping; relative paths are taken from `base_dir`."""
    try:
        return _parse(raw, base_dir)
    except ConfigError as err:
        raise SpecError(str(err)) from None


def _parse(raw: Any, base_dir: Path) -> SweepSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"spec: expected a mapping with keys {', '.join(_TOP_KEYS)}, got {type(raw).__name__}")
    check_keys(raw, _TOP_KEYS, "", required=("name", "experiments"))
    name = raw["name"]
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"name: expected up to 100 letters, digits, '_', '.', '-' (not starting with '.' or '-'), "
                          f"got {name!r}")
    results_dir = raw.get("results_dir", "results")
    if not isinstance(results_dir, str) or not results_dir:
        raise ConfigError(f"results_dir: expected a folder path, got {results_dir!r}")
    results_dir = os.path.expanduser(results_dir)

    data = _resolve_data(from_dict(DataConfig, raw.get("data"), "data"), base_dir, "data")
    model = _parse_model(raw.get("model"))
    train = _parse_train(raw.get("train"))
    resources = from_dict(Resources, raw.get("resources"), "resources")
    if train.device == "cuda" and resources.gpus_per_trial == 0:
        raise ConfigError("train.device: cuda needs resources.gpus_per_trial above 0 (a trial sees only the GPUs "
                          "Ray gives it; a fraction shares one)")
    testing = from_dict(Testing, raw.get("testing"), "testing")

    experiments_raw = raw["experiments"]
    if not isinstance(experiments_raw, list) or not experiments_raw:
        raise ConfigError("experiments: expected a non-empty list of experiments")
    experiments = tuple(_parse_experiment(e, f"experiments[{i}]") for i, e in enumerate(experiments_raw))
    seen: dict[str, int] = {}
    for i, exp in enumerate(experiments):
        if exp.name in seen:
            raise ConfigError(f"experiments[{i}].name: duplicate experiment name {exp.name!r} "
                              f"(also experiments[{seen[exp.name]}])")
        seen[exp.name] = i

    spec = SweepSpec(name=name, results_dir=(base_dir / results_dir).resolve(), data=data, model=model,
                     train=train, resources=resources, experiments=experiments, testing=testing)
    for i, exp in enumerate(experiments):
        _check_feasible(spec, exp, f"experiments[{i}]")
        if getattr(exp, "knowledge_share", None) is not None and not data.is_mix:
            raise ConfigError(f"experiments[{i}].knowledge_share: sweeps the mix corpus, so data.corpus must be "
                              f"'mix', got {data.corpus!r}")
    return spec


def _settable(cls: type, per_trial: Any) -> list[str]:
    """The fields of `cls` a sweep spec may set: all but those each experiment sets per trial."""
    return sorted(f.name for f in dataclasses.fields(cls) if f.name not in per_trial)


def _not_settable(per_trial: Any) -> dict[str, str]:
    """What a misspelling of a key each experiment sets is told (engram.config.check_keys's `elsewhere`)."""
    return {key: f"It is not set in a sweep spec: {why}" for key, why in per_trial.items()}


def _parse_model(raw: Any) -> ModelConfig:
    if raw is None:
        raw = {}
    if isinstance(raw, dict) and isinstance(raw.get("memory"), dict):
        for key, why in _MEMORY_PER_TRIAL.items():
            if key in raw["memory"]:
                raise ConfigError(f"model.memory.{key}: not allowed in a sweep spec ({why})")
        check_keys(raw["memory"], _settable(MemoryConfig, _MEMORY_PER_TRIAL), "model.memory",
                   elsewhere=_not_settable(_MEMORY_PER_TRIAL))
    model = from_dict(ModelConfig, raw, "model")
    # Validate the Engram shape now (a MemoryConfig of kind 'none' skips its checks); the slot count is a
    # stand-in large enough to pass the rows-per-table floor.
    shape = dataclasses.replace(model.memory, kind="none", slots=0)
    try:
        dataclasses.replace(model, memory=dataclasses.replace(shape, kind="engram", slots=1 << 40))
    except ConfigError as err:
        msg = str(err)
        raise ConfigError(f"model.{msg}" if msg.startswith("memory.") else f"model.memory.{msg}") from None
    return dataclasses.replace(model, memory=shape)


def _parse_train(raw: Any) -> TrainConfig:
    if raw is None:
        raw = {}
    if isinstance(raw, dict):
        for key, why in _TRAIN_PER_TRIAL.items():
            if key in raw:
                raise ConfigError(f"train.{key}: not allowed in a sweep spec ({why})")
        check_keys(raw, _settable(TrainConfig, _TRAIN_PER_TRIAL), "train", elsewhere=_not_settable(_TRAIN_PER_TRIAL))
        raw = {**raw, "steps": 1}  # placeholder horizon, replaced per trial by SweepSpec.trial_train
    return from_dict(TrainConfig, raw, "train")


def _parse_experiment(raw: Any, path: str) -> Experiment:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(raw).__name__}")
    kind = raw.get("kind")
    if "kind" not in raw:   # a misspelt `kind` is named as written
        check_keys(raw, sorted({f.name for c in _EXPERIMENT_CLASSES.values() for f in dataclasses.fields(c)}), path)
    if not isinstance(kind, str) or kind not in _EXPERIMENT_CLASSES:
        raise ConfigError(f"{path}.kind: expected one of {', '.join(EXPERIMENT_KINDS)}, got {kind!r}")
    cls = _EXPERIMENT_CLASSES[kind]
    fields = dataclasses.fields(cls)
    check_keys(raw, sorted(f.name for f in fields), path, note=f" (kind {kind})",
               required=[f.name for f in fields
                         if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING])
    name = raw["name"]
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"{path}.name: expected up to 100 letters, digits, '_', '.', '-' (not starting with '.' "
                          f"or '-'), got {name!r}")
    for key in ("rho", "budgets", "seeds", "slots", "memory", "knowledge_share"):
        if key in raw and not isinstance(raw[key], list) and key in {f.name for f in dataclasses.fields(cls)}:
            raise ConfigError(f"{path}.{key}: expected a list, got {raw[key]!r}")
    return from_dict(cls, raw, path)


def _resolve_data(data: DataConfig, base_dir: Path, path: str) -> DataConfig:
    """Make a corpus path absolute and check that it exists (a glob must match at least one file)."""
    if data.corpus in ("stdlib", MIX_CORPUS):
        return data
    corpus = os.path.expanduser(data.corpus)
    if not os.path.isabs(corpus):
        corpus = os.path.normpath(os.path.join(base_dir, corpus))
    if glob.has_magic(corpus):
        if not glob.glob(corpus, recursive=True):
            raise ConfigError(f"{path}.corpus: no file matches {data.corpus!r} (relative to {base_dir})")
    elif not os.path.exists(corpus):
        raise ConfigError(f"{path}.corpus: no such file or folder {data.corpus!r} (relative to {base_dir})")
    return dataclasses.replace(data, corpus=corpus)


# ---------------------------------------------------------------------------------------------------------------
# Feasibility (runs the allocation solver through sweeps.sizing; nothing is tokenized or built)


def _check_feasible(spec: SweepSpec, exp: Experiment, path: str) -> None:
    batch_size = spec.train.batch_size
    if isinstance(exp, MemoryExperiment):
        for i, slots in enumerate(exp.slots):
            for kind in exp.memory:
                try:
                    model = dataclasses.replace(spec.model, memory=memory_for_slots(spec.model, slots, kind))
                except ConfigError as err:
                    raise ConfigError(f"{path}.slots[{i}]: {str(err).split(': ', 1)[-1]} (memory {kind})") from None
                need = step_flops(model, batch_size)
                if exp.budget < need:
                    raise ConfigError(f"{path}.budget: expected at least {need:.3g} FLOPs (one step of the "
                                      f"{kind} model with {slots} slots), got {exp.budget:.3g}")
        return

    target_field = "p_tot" if exp.p_tot is not None else "p_tot_ratio"
    try:
        p_tot = target_p_tot(spec.model, exp)
        moe_model_for_p_tot(spec.model, p_tot)  # P_tot below P_act of the smallest MoE fails here
        check_fair(solve_allocation(spec.model, p_tot, 1.0))  # a P_tot target whole experts cannot meet
    except (AllocationError, ValueError) as err:
        raise ConfigError(f"{path}.{target_field}: {err}") from None
    rhos = exp.rho if isinstance(exp, AllocationExperiment) else (0.0, 1.0)
    budgets = exp.budgets if isinstance(exp, AllocationExperiment) else (exp.budget,)
    for i, rho in enumerate(rhos):
        where = f"{path}.rho[{i}]" if isinstance(exp, AllocationExperiment) else f"{path}.{target_field}"
        try:
            alloc = solve_allocation(spec.model, p_tot, rho)
            if isinstance(exp, AllocationExperiment):
                check_fair(alloc)  # P_tot and P_act within FAIR_TOLERANCE, or the spec is refused
            # A search's rhos that miss the tolerance are refused one by one when suggested (told to Optuna as
            # failures, sweeps.plan.plan_search_trial); its rho = 1 model was checked above.
            model = alloc.config
        except (AllocationError, ValueError) as err:
            raise ConfigError(f"{where}: infeasible allocation at rho={rho:g}: {err}") from None
        need = step_flops(model, batch_size)
        for j, budget in enumerate(budgets):
            if budget < need:
                bpath = f"{path}.budgets[{j}]" if isinstance(exp, AllocationExperiment) else f"{path}.budget"
                raise ConfigError(f"{bpath}: expected at least {need:.3g} FLOPs (one step at rho={rho:g}), "
                                  f"got {budget:.3g}")


# ---------------------------------------------------------------------------------------------------------------
# The resolved spec as a plain mapping / YAML text (written beside the results)


def spec_to_dict(spec: SweepSpec) -> dict[str, Any]:
    """A plain mapping that `parse_spec` reads back into an equal spec (paths are absolute)."""
    model = to_dict(spec.model)
    for key in _MEMORY_PER_TRIAL:
        model["memory"].pop(key)
    train = to_dict(spec.train)
    for key in _TRAIN_PER_TRIAL:
        train.pop(key)
    out: dict[str, Any] = {
        "name": spec.name, "results_dir": str(spec.results_dir), "data": to_dict(spec.data), "model": model,
        "train": train, "resources": to_dict(spec.resources),
        "experiments": [{k: v for k, v in to_dict(e).items() if v is not None} for e in spec.experiments],
    }
    if spec.testing != Testing():
        out["testing"] = to_dict(spec.testing)
    return out


def dump_spec(spec: SweepSpec) -> str:
    return yaml.safe_dump(spec_to_dict(spec), sort_keys=False)


# ---------------------------------------------------------------------------------------------------------------
# A spec against the one its store already holds

# An experiment's grid may grow or change between runs into one store (more seeds, rho points, budgets, slot counts,
# memory kinds, search trials): its new trials are new points of the same curves. Anything else changes what an
# existing curve means.
GRID_KEYS = frozenset({"rho", "budgets", "budget", "seeds", "seed", "slots", "memory", "n_trials", "knowledge_share"})


def stored_spec_conflicts(spec: SweepSpec, stored: Any) -> list[str]:
    """How `spec` differs from the spec its store holds (`stored`: the parsed spec.yaml) in what defines the trials
    already there: every field of data, model and train, and every non-grid field (GRID_KEYS) of an experiment
    present in both. One line per field, 'field: X in the store, Y in this spec'. Keys the stored spec lacks (written
    before the field existed) are not compared. A new experiment name is no conflict."""
    if not isinstance(stored, dict):
        return []
    new = spec_to_dict(spec)
    out: list[str] = []

    def compare(path: str, old: Any, now: Any) -> None:
        if isinstance(old, dict) and isinstance(now, dict):
            for key in old:
                if key in now:
                    compare(f"{path}.{key}", old[key], now[key])
        elif old != now:
            out.append(f"{path}: {old!r} in the store, {now!r} in this spec")

    for section in ("data", "model", "train"):
        if isinstance(stored.get(section), dict):
            compare(section, stored[section], new[section])
    old_exps = {e.get("name"): e for e in stored.get("experiments") or [] if isinstance(e, dict)}
    for i, exp in enumerate(new["experiments"]):
        old = old_exps.get(exp["name"])
        if old is not None:   # every non-grid key of either (a None field is left out of the YAML)
            for key in sorted((set(old) | set(exp)) - GRID_KEYS):
                compare(f"experiments[{i}].{key}", old.get(key), exp.get(key))
    return out
