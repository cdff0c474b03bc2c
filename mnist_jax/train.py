"""`python -m mnist_jax.train --workdir DIR [flags]`: trains a run, or resumes it when DIR holds one.

The loop itself is `training.train_and_evaluate`; this command parses the flags into a `Config`, checks them
against a run already in the workdir, and calls it.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports: glibc reads its malloc settings only at start-up
    from mnist_jax.backend import restart_with_huge_pages

    restart_with_huge_pages()

import argparse
import dataclasses
import time

from mnist_jax import cli, transfer, workdir
from mnist_jax.config import validate
from mnist_jax.training import train_and_evaluate


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return cli.training_parser(
        prog="python -m mnist_jax.train",
        description="Train the CNN on a tfds image dataset; running it again on the same --workdir resumes.",
        epilog="example: python -m mnist_jax.train --workdir runs/mnist --config strong",
    ).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    args = parse_args(argv)
    cli.prepare_devices()
    requested = cli.config_from_args(args)
    validate(requested)  # Bad values are reported as such, even when the workdir holds another run.
    config = workdir.resolve_config(args.workdir, requested, cli.chosen_fields(args))
    options = cli.run_options(args)
    if config.transfer_from:  # a transfer run resumed (or restarted before its first checkpoint) by `train`
        options = dataclasses.replace(options, initial_state=transfer.initial_state_from(config.transfer_from))
    cli.report_final(train_and_evaluate(config, options, started), started, args.workdir)
    return 0


if __name__ == "__main__":
    cli.run_cli(main)
