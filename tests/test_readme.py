"""The README's and docs' commands and flags are the tools' own: every console example parses with its tool's parser,
every `--flag` they name exists, and docs/usage.md's table of training flags lists each Config field with its real
default and `strong` value. A renamed flag or a changed default fails here instead of in a reader's terminal. The
README stays a product page (at most 250 lines), and nothing in them is dated or points outside the repository."""

import argparse
import dataclasses
import importlib
import os
import re
import shlex
import sys
from pathlib import Path
from unittest import mock

import pytest

from mnist_jax.config import PRESETS, Config

from helpers import REPO, tool_main

README = REPO / "README.md"
USAGE = REPO / "docs" / "usage.md"
DOCUMENTS = [README, *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 250
TOOLS = ("mnist_jax.train", "mnist_jax.evaluate", "mnist_jax.predict", "mnist_jax.serve", "mnist_jax.sweep",
         "mnist_jax.transfer", "benchmarks/step_throughput.py", "benchmarks/fusion_choice.py",
         "benchmarks/serve_load.py", "benchmarks/predict_agreement.py", "benchmarks/transfer_study.py",
         "benchmarks/batchnorm_choice.py", "benchmarks/multiprocess_throughput.py", "mnist_jax.export",
         "benchmarks/export_latency.py", "benchmarks/step_breakdown.py")
OTHER_PROGRAMS_FLAGS = {"--data-binary",  # curl's, in the serve example
                        "--logdir",  # tensorboard's
                        "--directory",  # http.server's, in docs/deploy.md
                        # sbatch's, in docs/multihost.md's SLURM script
                        "--job-name", "--nodes", "--ntasks-per-node", "--cpus-per-task", "--time", "--requeue",
                        "--gpus-per-node", "--array"}
FLAG_TABLE_HEADING = "### Every training flag"
ENVIRONMENT_WORD = re.compile(r"[A-Z_][A-Z0-9_]*=\S*")


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
        main = module.main
    else:
        main = tool_main(tool)
    built = []

    def stop(parser, args=None, namespace=None):
        built.append(parser)
        raise _ParserBuilt

    with mock.patch.object(argparse.ArgumentParser, "parse_args", stop), mock.patch.object(sys, "argv", [tool]):
        with pytest.raises(_ParserBuilt):
            main() if main.__code__.co_argcount == 0 else main([])
    return built[0]


@pytest.fixture(scope="module")
def parsers() -> dict[str, argparse.ArgumentParser]:
    return {tool: parser_of(tool) for tool in TOOLS}


def _relative(path: Path) -> str:
    return str(path.relative_to(REPO))


def console_commands(text: str) -> list[tuple[str, list[str]]]:
    """(tool, arguments) of every `$ mnist-jax X ...` (the tool `mnist_jax.X`), `$ python -m mnist_jax.X ...` or
    `$ python benchmarks/X.py ...` in a console block, continuation lines joined, trailing comments dropped, and
    leading `time` or VAR=value words skipped."""
    commands = []
    for block in re.findall(r"```console\n(.*?)```", text, re.S):
        for command in re.findall(r"^\$ ((?:.*\\\n)*.*)", block, re.M):
            words = shlex.split(command.replace("\\\n", " "), comments=True)
            while words and (words[0] in ("time", "/usr/bin/time") or ENVIRONMENT_WORD.fullmatch(words[0])):
                words = words[1:]  # `time CMD`, `VAR=value CMD`: the command is what follows
            if words[:1] == ["mnist-jax"] and len(words) > 1:
                commands.append((f"mnist_jax.{words[1]}", words[2:]))
            elif words[:2] == ["python", "-m"] and words[2].startswith("mnist_jax."):
                commands.append((words[2], words[3:]))
            elif words[:1] == ["python"] and words[1].startswith("benchmarks/"):
                commands.append((words[1], words[2:]))
    return commands


def test_every_console_example_parses_with_its_tools_parser(parsers):
    commands = {document: console_commands(document.read_text()) for document in DOCUMENTS}
    every = [command for found in commands.values() for command in found]
    assert {tool for tool, _ in every} >= {"mnist_jax.train", "mnist_jax.evaluate", "mnist_jax.predict",
                                           "mnist_jax.serve", "mnist_jax.sweep", "mnist_jax.transfer"}
    # The README's quick start: train -> evaluate -> predict -> serve, with the installed command.
    assert {tool for tool, _ in commands[README]} >= {"mnist_jax.train", "mnist_jax.evaluate", "mnist_jax.predict",
                                                       "mnist_jax.serve"}
    assert "$ mnist-jax train --workdir runs/mnist" in README.read_text()
    for document, found in commands.items():
        for tool, arguments in found:
            if tool not in parsers:
                pytest.fail(f"{_relative(document)}: `{tool}` is no tool (mnist-jax --help lists them)")
            try:
                parsers[tool].parse_args(arguments)
            except SystemExit:
                pytest.fail(f"{_relative(document)}: `{tool} {' '.join(arguments)}` does not parse")


def test_every_flag_the_readme_and_docs_name_exists(parsers):
    known = set().union(*(parser._option_string_actions for parser in parsers.values()))
    named_anywhere = set()
    for document in DOCUMENTS:
        # Not XLA's --xla_cpu_... options, whose underscores end the match.
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*(?![\w])", document.read_text()))
        unknown = named - known - OTHER_PROGRAMS_FLAGS
        assert unknown == set(), f"{_relative(document)} names flags no tool has: {sorted(unknown)}"
        named_anywhere |= named
    assert "--learning-rate" in named_anywhere and "--tta" in named_anywhere


def test_the_readme_is_a_product_page():
    lines = README.read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; details belong in docs/"


def test_nothing_is_dated_or_outside_the_repository():
    for document in DOCUMENTS:
        text = document.read_text()
        assert "../shared" not in text, f"{_relative(document)} names a path users do not have"
        assert re.findall(r"20\d\d-\d\d-\d\d", text) == [], f"{_relative(document)} is dated"


def _shown(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def flag_table_rows() -> list[str]:
    """The table docs/usage.md must hold: one row per Config flag, its default, `strong`'s value where it differs,
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
    usage = USAGE.read_text()
    assert usage.count(FLAG_TABLE_HEADING) == 1
    section = usage.split(FLAG_TABLE_HEADING, 1)[1].split("\n#", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("| `--")]
    expected = flag_table_rows()
    assert table == expected, "docs/usage.md's flag table should read:\n" + "\n".join(expected)


def test_the_workdir_table_names_everything_a_finished_run_holds(tiny_run_in_process):
    section = README.read_text().split("## What a workdir holds", 1)[1].split("\n## ", 1)[0]
    listed = {re.match(r"\| `([^`/<]+)", line).group(1) for line in section.splitlines()
              if re.match(r"\| `[^`]+` \|", line)}
    held = set(os.listdir(tiny_run_in_process)) - {".done"}  # the test session's own marker (helpers.built_once)
    assert held <= listed, sorted(held - listed)
    assert {"run.lock", "checkpoints", "config.json"} <= listed


def test_the_readme_gives_every_exit_code():
    text = README.read_text()
    assert "exit code 2" in text and "`predict` exits 1 when an image" in text


def test_every_parser_takes_flags_only_as_spelt(parsers):
    """No prefix matching: `--epoch 1` must not quietly mean `--epochs 1`."""
    assert [tool for tool, parser in parsers.items() if parser.allow_abbrev] == []
