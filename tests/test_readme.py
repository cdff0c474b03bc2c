"""The README's commands and flags are the tools' own: every console example parses with its tool's parser, every
`--flag` it names exists, and its table of training flags lists each Config field with its real default and `strong`
value. A renamed flag or a changed default fails here instead of in a reader's terminal."""

import argparse
import dataclasses
import importlib
import re
import shlex
import sys
from unittest import mock

import pytest

from mnist_jax.config import PRESETS, Config

from conftest import REPO

README = (REPO / "README.md").read_text()
TOOLS = ("mnist_jax.train", "mnist_jax.evaluate", "mnist_jax.predict", "mnist_jax.serve", "mnist_jax.sweep",
         "mnist_jax.transfer", "benchmarks/step_throughput.py", "benchmarks/fusion_choice.py",
         "benchmarks/serve_load.py", "benchmarks/predict_agreement.py", "benchmarks/transfer_study.py")
OTHER_PROGRAMS_FLAGS = {"--data-binary"}  # curl's, in the serve example
FLAG_TABLE_HEADING = "### Every training flag"


class _ParserBuilt(Exception):
    """Raised in place of parsing: the tool has built its parser and done nothing else yet."""


def parser_of(tool: str) -> argparse.ArgumentParser:
    """The parser a tool's `main` builds, caught at its `parse_args` call (nothing runs)."""
    if tool.startswith("benchmarks/"):
        sys.path.insert(0, str(REPO / "benchmarks"))
        try:
            module = importlib.import_module(tool.removeprefix("benchmarks/").removesuffix(".py"))
        finally:
            sys.path.remove(str(REPO / "benchmarks"))
    else:
        module = importlib.import_module(tool)
    built = []

    def stop(parser, args=None, namespace=None):
        built.append(parser)
        raise _ParserBuilt

    with mock.patch.object(argparse.ArgumentParser, "parse_args", stop), mock.patch.object(sys, "argv", [tool]):
        with pytest.raises(_ParserBuilt):
            module.main() if module.main.__code__.co_argcount == 0 else module.main([])
    return built[0]


@pytest.fixture(scope="module")
def parsers() -> dict[str, argparse.ArgumentParser]:
    return {tool: parser_of(tool) for tool in TOOLS}


def console_commands() -> list[tuple[str, list[str]]]:
    """(tool, arguments) of every `$ python -m mnist_jax.X ...` or `$ python benchmarks/X.py ...` in a console
    block, continuation lines joined and trailing comments dropped."""
    commands = []
    for block in re.findall(r"```console\n(.*?)```", README, re.S):
        for command in re.findall(r"^\$ ((?:.*\\\n)*.*)", block, re.M):
            words = shlex.split(command.replace("\\\n", " "), comments=True)
            if words[:2] == ["python", "-m"] and words[2].startswith("mnist_jax."):
                commands.append((words[2], words[3:]))
            elif words[0] == "python" and words[1].startswith("benchmarks/"):
                commands.append((words[1], words[2:]))
    return commands


def test_every_console_example_parses_with_its_tools_parser(parsers):
    commands = console_commands()
    assert {tool for tool, _ in commands} >= {"mnist_jax.train", "mnist_jax.evaluate", "mnist_jax.predict",
                                              "mnist_jax.serve", "mnist_jax.sweep", "mnist_jax.transfer"}
    for tool, arguments in commands:
        try:
            parsers[tool].parse_args(arguments)
        except SystemExit:
            pytest.fail(f"README: `{tool} {' '.join(arguments)}` does not parse")


def test_every_flag_the_readme_names_exists(parsers):
    known = set().union(*(parser._option_string_actions for parser in parsers.values()))
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*(?![\w])", README))  # not XLA's --xla_cpu_... options
    assert "--learning-rate" in named and "--tta" in named
    assert named - known - OTHER_PROGRAMS_FLAGS == set()


def _shown(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def flag_table_rows() -> list[str]:
    """The table the README must hold: one row per Config flag, its default, `strong`'s value where it differs,
    and its help text."""
    default, strong = Config(), PRESETS["strong"]
    rows = []
    for field in dataclasses.fields(Config):
        if field.metadata["flag"]:
            name = field.name
            strong_value = getattr(strong, name)
            differs = strong_value != getattr(default, name)
            rows.append(f"| `--{name.replace('_', '-')}` | {_shown(getattr(default, name))} | "
                        f"{_shown(strong_value) if differs else ''} | {field.metadata['help']} |")
    return rows


def test_the_flag_table_lists_every_config_flag_with_its_real_values():
    assert list(PRESETS) == ["default", "strong"]  # a new preset needs its column
    section = README.split(FLAG_TABLE_HEADING, 1)[1].split("\n#", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("| `--")]
    expected = flag_table_rows()
    assert table == expected, "README's flag table should read:\n" + "\n".join(expected)
