"""Hyperparameter tuning on Optuna: `python -m mnist_jax.sweep --workdir SWEEP (--grid ... | --search ...) [flags]`.

Every trial is an ordinary training workdir, SWEEP/trial-NNN/ (NNN: the Optuna trial's number), trained by
`training.train_and_evaluate` with the base config (`--config` preset and flags) plus the trial's parameters, and
ranked on validation accuracy, never on test. The study lives in SWEEP/study.journal, or in `--storage URL`; every
command started against it is one more worker of the same study (`tuning.worker`), on this machine or another.
Starting the command again after a crash finishes the interrupted trial from its last checkpoint.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports: glibc reads its malloc settings only at start-up
    from mnist_jax.backend import restart_with_huge_pages

    restart_with_huge_pages()

import argparse
import dataclasses
import os
import time
from typing import Callable

import optuna

from mnist_jax import cli, sharding
from mnist_jax.config import RunOptions, UserError
from mnist_jax.tuning import results, space, study, worker

DEFAULT_VALIDATION_FRACTION = 0.1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.training_parser(
        prog="python -m mnist_jax.sweep",
        description="Tune hyperparameters with Optuna: one workdir per trial under SWEEP/trial-NNN/, ranked on "
                    "validation accuracy. Every command started on the same study is one more worker; running it "
                    "again resumes.",
        epilog="example: python -m mnist_jax.sweep --workdir runs/tune --search learning_rate=log:1e-4:1e-2 "
               "dropout_rate=0:0.5 --trials 20 --pruner median",
    )
    group = parser.add_argument_group("the search (docs/usage.md#sweeps-hyperparameter-tuning-on-optuna)")
    group.add_argument("--grid", nargs="+", default=[], metavar="NAME=V1,V2",
                       help="values to try (tuple values: widths joined by '-', e.g. conv_features=32-64,64-128); "
                            "alone, the trials are every combination, each once")
    group.add_argument("--search", nargs="+", default=[], metavar="NAME=SPEC",
                       help="a list V1,V2,..., a range LOW:HIGH (LOW:HIGH:int for integers) or a log-uniform "
                            "range log:LOW:HIGH, for the sampler to draw from")
    group.add_argument("--trials", type=int, metavar="N",
                       help="trials in the study, all workers together (default with --grid alone: the whole grid)")
    group.add_argument("--sampler", choices=study.SAMPLERS,
                       help="grid (the default with --grid alone), tpe (the default otherwise) or random")
    group.add_argument("--sampler-seed", type=int, metavar="N",
                       help="seed of the sampler's draws (default: the training --seed)")
    group.add_argument("--pruner", choices=study.PRUNERS, default="none",
                       help="stop trials whose validation accuracy trails the others' after an epoch: median or "
                            "hyperband (default: none)")
    group.add_argument("--storage", metavar="URL",
                       help="Optuna RDB URL of the study, e.g. postgresql://user:password@host/db (default: "
                            "SWEEP/study.journal)")
    group.add_argument("--study", metavar="NAME", help="study name (default: the --workdir folder's name)")
    group.add_argument("--random", type=int, help=argparse.SUPPRESS)  # replaced by --trials; named in the error
    return parser.parse_args(argv)


def plan_from_args(args: argparse.Namespace) -> study.Plan:
    """The sweep the flags describe, checked before anything is written."""
    if args.random is not None:
        raise UserError("--random N is now --trials N: N distinct grid points, in an order drawn with "
                        "--sampler-seed")
    if not args.grid and not args.search:
        raise UserError("name what to tune: --grid NAME=V1,V2 ... and/or --search NAME=SPEC ...")
    search = space.parse_space(args.grid, args.search)
    both = sorted(set(search.names) & cli.flags_given(args))
    if both:
        raise UserError(f"{', '.join(both)} given both as a flag and in --grid/--search; keep one")
    sampler = args.sampler or ("grid" if not args.search else "tpe")
    if sampler == "grid" and args.search:
        raise UserError("--sampler grid tries --grid values only; give the --search parameters as --grid lists")
    trials = args.trials
    if trials is None:
        if sampler != "grid":
            raise UserError(f"--sampler {sampler} needs --trials N")
        trials = search.grid_size
    if trials <= 0:
        raise UserError(f"--trials must be a positive integer, got {trials}")
    if sampler == "grid" and trials > search.grid_size:
        raise UserError(f"--trials {trials} is more than the grid's {search.grid_size} points")
    base = cli.config_from_args(args)
    if base.validation_fraction <= 0 and args.validation_fraction is None and "validation_fraction" not in search.names:
        base = dataclasses.replace(base, validation_fraction=DEFAULT_VALIDATION_FRACTION)
        print(f"ranking on a validation slice: --validation-fraction {DEFAULT_VALIDATION_FRACTION}", flush=True)
    space.check_space(base, search)
    seed = base.seed if args.sampler_seed is None else args.sampler_seed
    return study.Plan(base, search, sampler, args.pruner, trials, seed)


def run(args: argparse.Namespace, plan: study.Plan, options_for: Callable[[str], RunOptions]) -> optuna.Study | None:
    """One worker of the sweep `plan` (from `args`), until the study is done; returns the study (None on the other
    processes of a multi-process sweep). `options_for(trial workdir)` says how each trial runs."""
    cli.prepare_devices()
    name = args.study or os.path.basename(os.path.normpath(args.workdir))
    if not sharding.is_primary_process():  # the other processes of a multi-process sweep train what 0 claims
        worker.run_worker(args.workdir, None, name, plan, options_for)
        return None
    storage = study.open_storage(args.workdir, args.storage)
    with worker.claim_lock(args.workdir):
        study.bind_folder(args.workdir, name)
        the_study = study.open_study(storage, name, plan)
    worker.run_worker(args.workdir, storage, name, plan, options_for,
                      after_trial=lambda: results.write_results(args.workdir, the_study, plan.space.names))
    return the_study


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    args = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own line per trial
    plan = plan_from_args(args)
    options = cli.run_options(args)
    the_study = run(args, plan, lambda path: dataclasses.replace(options, workdir=path))
    if the_study is None:
        return 0
    rows = results.write_results(args.workdir, the_study, plan.space.names)
    print(results.format_markdown(rows, plan.space.names), end="")
    best = results.best_line(the_study, plan.base, args.workdir, args.data_dir)
    print(best or "no trial has finished yet", f"({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    cli.run_cli(main)
