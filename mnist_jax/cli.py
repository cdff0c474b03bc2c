"""What the commands share: the training flags built from the Config fields, the run options and final report of
the commands that train (train, transfer, sweep), and the error contract.

Every tool's `main` runs inside `run_cli`, which turns a `UserError` into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any, Callable

from mnist_jax.config import PRESETS, Config, RunOptions, UserError, preset


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def flag_type(field: dataclasses.Field) -> Callable[[str], Any]:
    """The parser of a Config field's command-line text: its default's type (tuples: comma-separated ints)."""
    if isinstance(field.default, bool):
        return _bool
    if isinstance(field.default, tuple):
        return _int_tuple
    return type(field.default)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Config field (--learning-rate for learning_rate), with the field's help and default."""
    group = parser.add_argument_group("hyperparameters (stored in DIR/config.json)")
    for field in dataclasses.fields(Config):
        if not field.metadata.get("flag", True):
            continue
        default = field.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        group.add_argument(
            "--" + field.name.replace("_", "-"),
            type=flag_type(field),
            default=None,
            metavar=field.name.upper(),
            help=f"{field.metadata['help']} (default: {shown})",
        )


def add_preset_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", choices=tuple(PRESETS), metavar="NAME",
                        help=f"start from a named preset, one of {', '.join(PRESETS)}; flags given beside it "
                             "override single fields (default: default)")


def flags_given(args: argparse.Namespace) -> set[str]:
    """The Config fields set by a flag on this command line."""
    return {f.name for f in dataclasses.fields(Config) if getattr(args, f.name, None) is not None}


def chosen_fields(args: argparse.Namespace) -> set[str]:
    """The Config fields the user chose on the command line: the flags given, and with --config every field
    that has a flag (a preset states them all, so resuming another run's workdir with it is caught)."""
    if getattr(args, "config", None):
        return flags_given(args) | {f.name for f in dataclasses.fields(Config) if f.metadata.get("flag", True)}
    return flags_given(args)


def config_from_args(args: argparse.Namespace) -> Config:
    """The chosen preset (default: Config()) with every flag the user gave applied on top."""
    base = preset(args.config) if getattr(args, "config", None) else Config()
    return dataclasses.replace(base, **{name: getattr(args, name) for name in flags_given(args)})


INSTALLED_COMMAND = "mnist-jax"  # the console script (pyproject.toml), `mnist_jax/__main__.py`


def invoked_as(prog: str) -> str:
    """A tool's name as the user typed it: `python -m mnist_jax.train` is `mnist-jax train` in a process started by
    the installed command (and `python -m mnist_jax train` by its module form); any other name stays."""
    tool = prog.removeprefix("python -m mnist_jax.")
    if tool == prog:
        return prog
    started_by = os.path.normpath(sys.argv[0]).split(os.sep)[-2:] if sys.argv and sys.argv[0] else []
    if started_by[-1:] == [INSTALLED_COMMAND]:
        return f"{INSTALLED_COMMAND} {tool}"
    if started_by == ["mnist_jax", "__main__.py"]:
        return f"python -m mnist_jax {tool}"
    return prog


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2 without the usage dump, and the usage names the
    command as it was typed (`invoked_as`)."""

    def __init__(self, *args: Any, prog: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, prog=invoked_as(prog) if prog else None, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def training_parser(prog: str, description: str, epilog: str) -> ArgumentParser:
    """The flags of the commands that train (run options plus one flag per Config field): train, transfer, sweep."""
    parser = ArgumentParser(prog=prog, description=description, epilog=epilog)
    parser.add_argument("--workdir", required=True, help="run directory: config, metrics, checkpoints, plots")
    parser.add_argument("--data-dir", help="tfds data directory (default: $TFDS_DATA_DIR, else tfds's default)")
    parser.add_argument("--devices", type=int,
                        help="devices to split each batch over (default: all JAX sees; on CPU, one per core)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (one log line per epoch)")
    add_preset_flag(parser)
    add_config_flags(parser)
    return parser


def run_options(args: argparse.Namespace) -> RunOptions:
    """The RunOptions that `training_parser`'s flags describe."""
    return RunOptions(workdir=args.workdir, data_dir=args.data_dir, devices=args.devices,
                      progress=not args.no_progress)


def prepare_devices() -> None:
    """The devices a training command runs on: one per CPU core (`backend`), and every host's when the environment
    describes a multi-host run. Before any JAX computation."""
    import jax

    from mnist_jax import backend
    from mnist_jax.distributed import cluster

    backend.chosen_fusions(os.environ)  # a bad MNIST_JAX_CPU_FUSIONS fails now, not after the data loads
    backend.use_every_cpu_core()
    settings = cluster.cluster_settings(os.environ)
    if settings is not None:
        print(cluster.joining_message(settings), flush=True)
        cluster.join(settings)
        print(f"process {jax.process_index()} of {jax.process_count()}, {jax.device_count()} devices", flush=True)


def report_final(history: list[dict[str, Any]], started: float, workdir: str) -> None:
    """The training commands' last line: the final test accuracy (and with test-time augmentation) and the time."""
    if history:
        last = history[-1]
        tta = (f", {last['test_tta_accuracy']:.2%} with test-time augmentation" if "test_tta_accuracy" in last
               else "")
        print(f"final test accuracy {last['test_accuracy']:.2%}{tta} "
              f"({time.time() - started:.1f} s) -> {workdir}", flush=True)


def quiet_libraries() -> None:
    """TensorFlow, tfds and Orbax log warnings meant for their own developers; our users get our messages."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Runs a tool's main with the project's error contract, then exits with its status."""
    quiet_libraries()
    try:
        status = main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status or 0)
