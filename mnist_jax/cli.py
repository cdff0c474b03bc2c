"""What the commands share: the training flags built from the Config fields, the run options and final report of
the commands that train (train, transfer, sweep), and the error contract.

Every tool's `main` runs inside `run_cli`, which turns a `UserError` into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import os
import re
import sys
import time
import types
from typing import Any, Callable

from mnist_jax.config import PRESETS, Config, RunOptions, UserError, preset

FLAG_LIKE = re.compile(r"--?[A-Za-z]")  # a flag's shape: not a value such as -5 or -1e-3


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
    """argparse, but a usage error is one line and exit code 2 without the usage dump; a flag is never guessed from
    its first letters (`--epoch 1` is not `--epochs 1`); and a flag it does not know is named first, with the
    nearest one it does (argparse would only say that the flag meant was missing); and the usage names the command
    as it was typed (`invoked_as`)."""

    def __init__(self, *args: Any, prog: str | None = None, **kwargs: Any) -> None:
        self.flags: set[str] = set()  # every option string, as the arguments are added
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, prog=invoked_as(prog) if prog else None, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.flags.update(action.option_strings)
        return action

    def add_argument_group(self, *args: Any, **kwargs: Any) -> Any:
        return self._recorded(super().add_argument_group(*args, **kwargs))

    def add_mutually_exclusive_group(self, **kwargs: Any) -> Any:
        return self._recorded(super().add_mutually_exclusive_group(**kwargs))

    def _recorded(self, group: Any) -> Any:
        """`group`, whose arguments' option strings land in `flags` too."""
        add = group.add_argument

        def add_argument(*args: Any, **kwargs: Any) -> argparse.Action:
            action = add(*args, **kwargs)
            self.flags.update(action.option_strings)
            return action

        group.add_argument = add_argument
        return group

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        words = [str(word) for word in (sys.argv[1:] if args is None else args)]
        options = words[: words.index("--")] if "--" in words else words  # after `--`, only values
        unknown = [word.split("=", 1)[0] for word in options if FLAG_LIKE.match(word)]
        unknown = [flag for flag in dict.fromkeys(unknown) if flag not in self.flags]
        if unknown:
            self.error(f"unknown flag{'s' if len(unknown) > 1 else ''} {', '.join(map(self._suggest, unknown))}")
        return super().parse_args(words, namespace)

    def _suggest(self, flag: str) -> str:
        nearest = difflib.get_close_matches(flag, sorted(self.flags), n=1)
        return f"{flag} (did you mean {nearest[0]}?)" if nearest else flag

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def training_parser(prog: str, description: str, epilog: str) -> ArgumentParser:
    """The flags of the commands that train (run options plus one flag per Config field): train, transfer, sweep."""
    parser = ArgumentParser(prog=prog, description=description, epilog=epilog)
    parser.add_argument("--workdir", required=True, help="run directory: config, metrics, checkpoints, plots")
    parser.add_argument("--data-dir", help="tfds data directory (default: $TFDS_DATA_DIR, else tfds's default)")
    parser.add_argument("--devices", type=int,
                        help="devices to split each batch over (default: all JAX sees; on CPU, one per core)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar on a terminal either (elsewhere there is none): one log line per epoch")
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
    drop_abandoned_checkpoint_reads()


def _from_orbax(filename: str | None) -> bool:
    return "orbax" in os.path.normpath(filename or "").split(os.sep)


def _orbax_in_traceback(traceback: types.TracebackType | None) -> bool:
    while traceback is not None:
        if _from_orbax(traceback.tb_frame.f_code.co_filename):
            return True
        traceback = traceback.tb_next
    return False


_ORBAX_READ_MARKS = ("orbax", "TensorStore", "OCDBT")


class _OrbaxReadNoise(logging.Filter):
    """Drops Orbax's own log lines (a checkpoint it cannot read is our one-line error already) and asyncio's
    reports of the reads it abandoned."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "absl":
            return not _from_orbax(record.pathname)
        message = record.getMessage()
        if not message.partition("\n")[0].endswith("exception was never retrieved"):  # a task's, a future's ...
            return True
        traceback = record.exc_info[2] if record.exc_info else None
        # A task names its coroutine's file; a bare future only TensorStore's message.
        return not (_orbax_in_traceback(traceback) or any(mark in message for mark in _ORBAX_READ_MARKS))


def drop_abandoned_checkpoint_reads() -> None:
    """When one array of a checkpoint fails to read, Orbax closes the event loop of the restore at once, while
    TensorStore still reads the others. Those reads then report, at random later moments, tens of tracebacks on
    stderr after the tool's one-line error: their completions meet a closed loop (unraisable "Event loop is
    closed"), and their abandoned coroutines and tasks are collected unfinished ("Exception ignored in",
    "Task exception was never retrieved"). Nothing can wait for them (the loop is Orbax's and already closed), so
    this drops exactly those reports, through Python's hooks for them; every other one goes through. Once per
    process."""
    if getattr(sys.unraisablehook, "drops_abandoned_reads", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        closed_loop = isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == (
            "Event loop is closed")
        code = getattr(unraisable.object, "cr_code", None)  # a coroutine collected unfinished
        if not (closed_loop or (code is not None and _from_orbax(code.co_filename))):
            previous(unraisable)

    hook.drops_abandoned_reads = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
    noise = _OrbaxReadNoise()
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(noise)


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
