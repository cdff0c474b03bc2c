"""A sweep's search space from the command line, as Optuna distributions, and a trial's parameters as a Config.

`--grid NAME=V1,V2 ...` lists values (every combination is a trial of the grid sampler); `--search NAME=SPEC ...`
gives a list (`conv_features=32-64,64-128`), a range (`dropout_rate=0:0.5`, `batch_size=64:512:int`) or a
log-uniform range (`learning_rate=log:1e-4:1e-1`). Values are typed like the training flags; a tuple's widths join
with '-'. Optuna stores parameters as numbers, strings and booleans, so a tuple travels as its text ("32-64").
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
from typing import Any, Iterator

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from mnist_jax import cli
from mnist_jax.config import Config, UserError, validate

FIELDS = {f.name: f for f in dataclasses.fields(Config) if f.metadata.get("flag", True)}
# Every combination of the parameters' extreme values is validated before anything trains, up to this many.
CHECKED_COMBINATIONS = 4096


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """The parameters a sweep varies: `grid` (name -> values, as Optuna stores them) and, for every parameter,
    its distribution (a grid parameter's is the list of its values)."""

    grid: dict[str, list[Any]]
    distributions: dict[str, BaseDistribution]

    @property
    def names(self) -> list[str]:
        return list(self.distributions)

    @property
    def grid_size(self) -> int:
        return math.prod(map(len, self.grid.values()))


def _name(spec: str, flag: str) -> tuple[str, str]:
    """`"conv-features=8-16"` -> ("conv_features", "8-16"), with the field known and a value given."""
    name, equals, text = spec.partition("=")
    name = name.strip().lstrip("-").replace("-", "_")
    if not equals or not text.strip():
        raise UserError(f"{flag} {spec!r}: expected name=value1,value2,..." if flag == "--grid" else
                        f"{flag} {spec!r}: expected name=v1,v2,... or name=low:high or name=log:low:high")
    if name not in FIELDS:
        raise UserError(f"{flag} {spec!r}: unknown hyperparameter {name!r}; see python -m mnist_jax.train --help")
    return name, text.strip()


def _is_tuple(name: str) -> bool:
    return isinstance(FIELDS[name].default, tuple)


def _is_number(name: str) -> bool:
    default = FIELDS[name].default
    return isinstance(default, (int, float)) and not isinstance(default, bool)


def _values(name: str, text: str, spec: str, flag: str) -> list[Any]:
    """A comma-separated list, each value parsed like the flag and stored as Optuna stores it."""
    parse = cli.flag_type(FIELDS[name])
    values = []
    for item in text.split(","):
        item = item.strip()
        try:
            value = parse(item.replace("-", ",")) if _is_tuple(name) else parse(item)
        except (ValueError, argparse.ArgumentTypeError) as error:
            raise UserError(f"{flag} {spec!r}: bad value {item!r} for {name} ({error})") from None
        values.append("-".join(map(str, value)) if _is_tuple(name) else value)
    if len(set(values)) != len(values):
        raise UserError(f"{flag} {spec!r}: repeated value")
    return values


def _range(name: str, text: str, spec: str) -> BaseDistribution:
    """`low:high`, `low:high:int`, `log:low:high` or `log:low:high:int`: floats for a float field unless `:int`."""
    parts = text.split(":")
    log = parts[0].strip() == "log"
    integer = parts[-1].strip() == "int" or isinstance(FIELDS[name].default, int)
    bounds = parts[1 if log else 0: -1 if parts[-1].strip() == "int" else None]
    if len(bounds) != 2:
        raise UserError(f"--search {spec!r}: a range is low:high, low:high:int or log:low:high")
    try:
        low, high = (int(b) if integer else float(b) for b in bounds)
    except ValueError:
        kind = "integers" if integer else "numbers"
        raise UserError(f"--search {spec!r}: the bounds of {name}'s range must be {kind}") from None
    if not low < high:
        raise UserError(f"--search {spec!r}: the range is empty (low must be below high)")
    if log and low <= 0:
        raise UserError(f"--search {spec!r}: a log-uniform range must start above 0")
    return IntDistribution(low, high, log=log) if integer else FloatDistribution(low, high, log=log)


def parse_space(grid_specs: list[str], search_specs: list[str]) -> SearchSpace:
    """The parameters of `--grid` and `--search`, in the order given; a UserError for any bad spec."""
    grid: dict[str, list[Any]] = {}
    distributions: dict[str, BaseDistribution] = {}
    for flag, specs in (("--grid", grid_specs), ("--search", search_specs)):
        for spec in specs:
            name, text = _name(spec, flag)
            if name in distributions:
                raise UserError(f"{name} is named twice in --grid/--search; keep one")
            if flag == "--search" and ":" in text and _is_number(name):
                distributions[name] = _range(name, text, spec)
                continue
            values = _values(name, text, spec, flag)
            if flag == "--grid":
                grid[name] = values
            distributions[name] = CategoricalDistribution(values)
    return SearchSpace(grid, distributions)


def overrides(params: dict[str, Any]) -> dict[str, Any]:
    """A trial's parameters as Config values: tuples from their text, numbers as their field's type."""
    values = {}
    for name, value in params.items():
        if _is_tuple(name):
            value = tuple(int(width) for width in str(value).split("-"))
        elif _is_number(name):
            value = type(FIELDS[name].default)(value)
        values[name] = value
    return values


def trial_config(base: Config, params: dict[str, Any]) -> Config:
    return dataclasses.replace(base, **overrides(params))


def describe(params: dict[str, Any]) -> str:
    return " ".join(f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}"
                    for name, value in params.items())


def _extremes(distribution: BaseDistribution) -> list[Any]:
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    return [distribution.low, distribution.high]


def corners(space: SearchSpace) -> Iterator[dict[str, Any]]:
    """Every combination of each parameter's extreme values: all of a list's, a range's two ends."""
    names = space.names
    for values in itertools.product(*(_extremes(space.distributions[name]) for name in names)):
        yield dict(zip(names, values))


def check_space(base: Config, space: SearchSpace) -> None:
    """Validates the configs at the space's corners (the first `CHECKED_COMBINATIONS`), so a value out of range
    fails the sweep before anything is written; the sweep ranks on validation, which must be held out."""
    for params in itertools.islice(corners(space), CHECKED_COMBINATIONS):
        config = trial_config(base, params)
        try:
            validate(config)
        except UserError as error:
            raise UserError(f"{describe(params)}: {error}") from None
        if config.validation_fraction <= 0:
            raise UserError("a sweep ranks trials on validation accuracy: --validation-fraction must be > 0")
