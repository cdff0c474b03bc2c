"""Hyperparameter sweep: `python -m mnist_jax.sweep --workdir SWEEP --grid name=v1,v2 [name=...] [train flags]`.

Every trial is an ordinary training workdir, SWEEP/trial-NNN/, trained by `training.train_and_evaluate` with the
base config (`--config` preset and flags) plus the trial's grid values. Trials are ranked on validation accuracy,
never on test. `--random N` trains N distinct grid points drawn with `--seed`, instead of the whole grid.

SWEEP/sweep.json records the plan. Running the same command again skips finished trials and resumes the
interrupted one from its last checkpoint; results.csv, results.md and sweep.png are rewritten after each trial.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports: glibc reads its malloc settings only at start-up
    from mnist_jax.backend import restart_with_huge_pages

    restart_with_huge_pages()

import argparse
import csv
import dataclasses
import io
import itertools
import json
import math
import os
import time
from typing import Any, Callable

import numpy as np

from mnist_jax import cli, sharding, workdir
from mnist_jax.config import Config, RunOptions, UserError, validate
from mnist_jax.training import train_and_evaluate

PLAN_FILE = workdir.SWEEP_PLAN_FILE
DEFAULT_VALIDATION_FRACTION = 0.1
Grid = dict[str, list[Any]]


# ------------------------------------------------------------------------------------------------ the plan
def parse_grid(specs: list[str]) -> Grid:
    """`["learning_rate=1e-3,3e-3", "conv-features=32-64,64-128"]` -> {name: [values]}, typed like the flags.

    Tuple-valued fields (conv_features, dense_features) write each value's widths joined by '-'.
    """
    fields = {f.name: f for f in dataclasses.fields(Config) if f.metadata.get("flag", True)}
    grid: Grid = {}
    for spec in specs:
        name, equals, text = spec.partition("=")
        name = name.strip().lstrip("-").replace("-", "_")
        if not equals or not text.strip():
            raise UserError(f"--grid {spec!r}: expected name=value1,value2,...")
        if name not in fields:
            raise UserError(f"--grid {spec!r}: unknown hyperparameter {name!r}; see python -m mnist_jax.train --help")
        if name in grid:
            raise UserError(f"--grid names {name} twice")
        parse = cli.flag_type(fields[name])
        values = []
        for item in text.split(","):
            item = item.strip().replace("-", ",") if isinstance(fields[name].default, tuple) else item.strip()
            try:
                values.append(parse(item))
            except (ValueError, argparse.ArgumentTypeError) as error:
                raise UserError(f"--grid {spec!r}: bad value {item!r} for {name} ({error})") from None
        if len(set(values)) != len(values):
            raise UserError(f"--grid {spec!r}: repeated value")
        grid[name] = values
    return grid


def plan_trials(grid: Grid, random_count: int | None, seed: int) -> list[dict[str, Any]]:
    """The trials' overrides: the whole grid in order, or `random_count` distinct grid points drawn with `seed`."""
    names = list(grid)
    if random_count is None:
        return [dict(zip(names, values)) for values in itertools.product(*grid.values())]
    sizes = [len(grid[name]) for name in names]
    total = math.prod(sizes)
    picks = np.random.default_rng(seed).choice(total, size=min(random_count, total), replace=False)
    trials = []
    for index in picks.tolist():  # mixed-radix decoding: no need to list a huge grid
        values = {}
        for name, size in zip(reversed(names), reversed(sizes)):
            index, digit = divmod(index, size)
            values[name] = grid[name][digit]
        trials.append({name: values[name] for name in names})
    return trials


def trial_configs(base: Config, trials: list[dict[str, Any]]) -> list[Config]:
    """Each trial's full config, validated before anything trains (a bad grid value fails the sweep at once)."""
    configs = []
    for number, overrides in enumerate(trials):
        config = dataclasses.replace(base, **overrides)
        try:
            validate(config)
        except UserError as error:
            raise UserError(f"trial {number} ({describe(overrides)}): {error}") from None
        if config.validation_fraction <= 0:
            raise UserError("a sweep ranks trials on validation accuracy: --validation-fraction must be > 0")
        configs.append(config)
    return configs


def describe(overrides: dict[str, Any]) -> str:
    return " ".join(f"{name}={_text(value)}" for name, value in overrides.items())


def _text(value: Any) -> str:
    return "-".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def save_or_check_plan(sweep_dir: str, plan: dict[str, Any]) -> None:
    """Writes SWEEP/sweep.json, or checks that an existing one describes the same sweep."""
    path = os.path.join(sweep_dir, PLAN_FILE)
    if os.path.exists(path):
        try:
            with open(path) as handle:
                saved = json.load(handle)
        except ValueError as error:
            raise UserError(f"{path} is not a valid sweep plan ({error}); use a new --workdir")
        if saved != plan:
            differing = sorted(k for k in set(saved) | set(plan) if saved.get(k) != plan.get(k))
            raise UserError(f"{sweep_dir} holds another sweep (its {', '.join(differing)} differ); "
                            "use a new --workdir")
        return
    if sharding.is_primary_process():  # in a multi-process sweep the others only check it
        workdir.write_atomic(path, json.dumps(plan, indent=2, sort_keys=True) + "\n")


def _jsonable(plan: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(plan))  # tuples -> lists, as they come back from sweep.json


# ------------------------------------------------------------------------------------------------ results
def trial_name(number: int) -> str:
    return f"trial-{number:03d}"


def trial_dir(sweep_dir: str, number: int) -> str:
    return os.path.join(sweep_dir, trial_name(number))


def wall_seconds(history: list[dict[str, Any]]) -> float:
    """Training wall time summed over every process that worked on the run (elapsed restarts on resume)."""
    total, previous = 0.0, 0.0
    for entry in history:
        elapsed = entry["elapsed_seconds"]
        total += elapsed - previous if elapsed > previous else elapsed
        previous = elapsed
    return total


def summarize(number: int, overrides: dict[str, Any], config: Config, history: list[dict[str, Any]]) -> dict:
    """One results row: the trial's values and its best epoch by validation accuracy (test read at that epoch)."""
    best = max(history, key=lambda e: (e["validation_accuracy"], -e["epoch"]))
    return {
        "trial": trial_name(number),
        **{name: _text(value) for name, value in overrides.items()},
        "validation_accuracy": best["validation_accuracy"],
        "test_accuracy": best["test_accuracy"],
        "best_epoch": best["epoch"],
        "epochs": f"{len(history)}/{config.epochs}",
        "wall_seconds": round(wall_seconds(history), 1),
    }


def collect(sweep_dir: str, trials: list[dict[str, Any]], configs: list[Config]) -> list[dict[str, Any]]:
    """Rows of every trial with at least one finished epoch, best validation accuracy first."""
    rows = []
    for number, (overrides, config) in enumerate(zip(trials, configs)):
        history = workdir.read_metrics(trial_dir(sweep_dir, number))
        if history:
            rows.append(summarize(number, overrides, config, history))
    return sorted(rows, key=lambda row: (-row["validation_accuracy"], row["trial"]))


def write_results(sweep_dir: str, rows: list[dict[str, Any]], names: list[str]) -> None:
    """results.csv, results.md and sweep.png, each replaced atomically (by process 0 of a multi-process sweep)."""
    if not rows or not sharding.is_primary_process():
        return
    columns = ["rank", "trial", *names, "validation_accuracy", "test_accuracy", "best_epoch", "epochs",
               "wall_seconds"]
    ranked = [{"rank": rank, **row} for rank, row in enumerate(rows, start=1)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(ranked)
    workdir.write_atomic(os.path.join(sweep_dir, workdir.SWEEP_RESULTS_FILE), buffer.getvalue())
    workdir.write_atomic(os.path.join(sweep_dir, "results.md"), format_markdown(ranked, columns))
    from mnist_jax.plots import plot_sweep

    plot_sweep(ranked, names, os.path.join(sweep_dir, "sweep.png"))


def format_markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(name: str, value: Any) -> str:
        return f"{value:.2%}" if name.endswith("accuracy") else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(c, row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ running
def run_sweep(sweep_dir: str, base: Config, grid: Grid, random_count: int | None,
              options_for: Callable[[str], RunOptions]) -> list[dict]:
    """Trains every planned trial not yet finished (resuming an interrupted one); returns the ranked rows."""
    trials = plan_trials(grid, random_count, base.seed)
    configs = trial_configs(base, trials)
    save_or_check_plan(sweep_dir, _jsonable(
        {"base": dataclasses.asdict(base), "grid": grid, "random": random_count, "trials": trials}))
    names = list(grid)
    for number, (overrides, config) in enumerate(zip(trials, configs)):
        path = trial_dir(sweep_dir, number)
        workdir.resolve_config(path, config, {f.name for f in dataclasses.fields(Config)})  # never mix up two runs
        done = len(workdir.read_metrics(path))
        label = f"trial {number + 1}/{len(trials)} ({describe(overrides)})"
        if done >= config.epochs:
            print(f"{label}: finished earlier, skipped", flush=True)
            continue
        print(f"{label} -> {path}", flush=True)
        train_and_evaluate(config, options_for(path))
        write_results(sweep_dir, collect(sweep_dir, trials, configs), names)
    rows = collect(sweep_dir, trials, configs)
    write_results(sweep_dir, rows, names)
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.training_parser(
        prog="python -m mnist_jax.sweep",
        description="Train one run per grid point under SWEEP/trial-NNN/ and rank them on validation accuracy; "
                    "running it again resumes.",
        epilog="example: python -m mnist_jax.sweep --workdir runs/sweep --grid learning_rate=1e-3,3e-3 "
               "dropout_rate=0.2,0.4 --config strong --epochs 4",
    )
    parser.add_argument("--grid", nargs="+", required=True, metavar="NAME=V1,V2",
                        help="hyperparameters and their values (tuple values: widths joined by '-', e.g. "
                             "conv_features=32-64,64-128); the trials are every combination")
    parser.add_argument("--random", type=int, metavar="N",
                        help="train N distinct combinations drawn with --seed instead of all of them")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    args = parse_args(argv)
    cli.prepare_devices()
    grid = parse_grid(args.grid)
    both = sorted(set(grid) & cli.flags_given(args))
    if both:
        raise UserError(f"{', '.join(both)} given both as a flag and in --grid; keep one")
    if args.random is not None and args.random <= 0:
        raise UserError(f"--random must be a positive integer, got {args.random}")
    base = cli.config_from_args(args)
    if base.validation_fraction <= 0 and args.validation_fraction is None and "validation_fraction" not in grid:
        base = dataclasses.replace(base, validation_fraction=DEFAULT_VALIDATION_FRACTION)
        print(f"ranking on a validation slice: --validation-fraction {DEFAULT_VALIDATION_FRACTION}", flush=True)
    options = cli.run_options(args)
    rows = run_sweep(args.workdir, base, grid, args.random,
                     lambda path: dataclasses.replace(options, workdir=path))
    print(format_markdown([{"rank": r, **row} for r, row in enumerate(rows, 1)],
                          ["rank", "trial", *grid, "validation_accuracy", "test_accuracy", "wall_seconds"]), end="")
    if rows:
        print(f"best on validation: {rows[0]['trial']} ({rows[0]['validation_accuracy']:.2%}) -> "
              f"{os.path.join(args.workdir, rows[0]['trial'])}  ({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    cli.run_cli(main)
