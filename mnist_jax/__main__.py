"""`mnist-jax COMMAND [ARGS ...]`: every tool behind one installed command (also `python -m mnist_jax COMMAND`).

`mnist-jax train ARGS` runs the very `main`, with the very parser, that `python -m mnist_jax.train ARGS` runs,
under the same error contract (`cli.run_cli`). The training commands first restart onto glibc's huge pages, as their
`python -m` forms do, before anything heavy is imported; this module imports nothing heavy itself.
"""

from __future__ import annotations

import importlib
import sys
from typing import NamedTuple

from mnist_jax.cli import INSTALLED_COMMAND as PROG, run_cli  # light: cli imports no JAX


class Command(NamedTuple):
    module: str  # the module whose `main` runs it: what `python -m` runs
    summary: str  # one line for `mnist-jax --help`
    trains: bool = False  # a training command: restarts onto huge pages first


COMMANDS = {
    "train": Command("mnist_jax.train", "train (or resume) a run in a workdir", trains=True),
    "evaluate": Command("mnist_jax.evaluate", "accuracy, per-class precision/recall/F1, confusion matrix, plots; "
                                              "ensembles, test-time augmentation"),
    "predict": Command("mnist_jax.predict", "classify PNG/JPEG files of digits"),
    "serve": Command("mnist_jax.serve.__main__", "a web page to draw digits on, and a JSON API"),
    "export": Command("mnist_jax.export.__main__", "TFLite, ONNX, a SavedModel and an offline web app, each "
                                                   "verified by its runtime"),
    "sweep": Command("mnist_jax.sweep", "a resumable hyperparameter sweep, trials ranked on validation accuracy",
                     trains=True),
    "transfer": Command("mnist_jax.transfer", "fine-tune a trained run on another dataset", trains=True),
}


def help_text() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} COMMAND [ARGS ...]", "",
             "Convolutional image classification on MNIST with JAX. Each command is also `python -m "
             "mnist_jax.COMMAND`.", "", "commands:"]
    lines += [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    lines += ["", f"`{PROG} COMMAND --help` lists a command's flags."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Runs `argv[0]`'s command on the rest of `argv` (default: this process's arguments), then exits."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(help_text())
        sys.exit(0)
    command = COMMANDS.get(argv[0]) if argv else None
    if command is None:
        given = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"error: {given}; choose one of {', '.join(COMMANDS)} ({PROG} --help says what each does)",
              file=sys.stderr)
        sys.exit(2)
    if command.trains:
        from mnist_jax.backend import restart_with_huge_pages

        restart_with_huge_pages()  # replaces this process with the same command line when it applies
    run_cli(importlib.import_module(command.module).main, argv[1:])


if __name__ == "__main__":
    main()
