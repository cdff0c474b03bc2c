"""`mnist-jax COMMAND ...`, the installed command: each command is its `python -m` form's own `main` and parser, bad
commands get one line and exit code 2, and the training commands still restart onto huge pages. The e2e tests run
the console script that `pip install -e ".[dev]"` puts beside this Python (CI has it; elsewhere they skip)."""

import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mnist_jax import __main__ as command
from mnist_jax import cli
from mnist_jax.backend import HUGE_PAGES_OPT_OUT

from helpers import (COMMAND_MODULES, REPO, TINY_FLAGS, TINY_RUN_FLAGS, cli_env, digit_png, huge_pages_apply,
                     read_jsonl, results, run_module, tool_main, unavailable, without_huge_page_settings)

SCRIPT = Path(sys.executable).parent / "mnist-jax"


def run_command(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_status:
        command.main(list(argv))
    out, err = capsys.readouterr()
    return exit_status.value.code, out, err


def test_help_lists_every_command_on_one_line(capsys):
    status, out, _ = run_command(capsys, "--help")
    assert status == 0
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert listed == list(COMMAND_MODULES) == list(command.COMMANDS)
    assert out.startswith("usage: mnist-jax COMMAND [ARGS ...]")


@pytest.mark.parametrize("argv, message", [((), "error: no command given; choose one of train, evaluate"),
                                           (("trian", "--workdir", "w"), "error: unknown command 'trian'")])
def test_a_missing_or_unknown_command_is_one_line_and_exit_2(capsys, argv, message):
    status, out, err = run_command(capsys, *argv)
    assert status == 2 and out == "" and err.startswith(message) and err.count("\n") == 1


@pytest.mark.parametrize("name", list(COMMAND_MODULES))
def test_each_command_runs_its_python_m_forms_main(name):
    assert importlib.import_module(command.COMMANDS[name].module).main is tool_main(COMMAND_MODULES[name])
    assert command.COMMANDS[name].trains == (name in ("train", "sweep", "transfer"))


def test_a_command_runs_under_the_error_contract_with_its_typed_name(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv(HUGE_PAGES_OPT_OUT, "0")  # the restart would replace the test process
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "bin" / "mnist-jax"), "train"])
    status, out, err = run_command(capsys, "train", "--help")
    assert status == 0 and out.startswith("usage: mnist-jax train [-h] --workdir WORKDIR")
    status, _, err = run_command(capsys, "predict", "--workdir", str(tmp_path / "none"), "x.png")
    assert status == 2 and err.startswith("error: no checkpoints found") and err.count("\n") == 1
    status, _, err = run_command(capsys, "train", "--epochs", "2")
    assert status == 2 and err == "mnist-jax train: error: the following arguments are required: --workdir\n"


def test_usage_names_the_command_as_it_was_typed(monkeypatch):
    for argv0, expected in (("/venv/bin/mnist-jax", "mnist-jax evaluate"),
                            (os.path.join("site", "mnist_jax", "__main__.py"), "python -m mnist_jax evaluate"),
                            (os.path.join("site", "mnist_jax", "evaluate.py"), "python -m mnist_jax.evaluate"),
                            (os.path.join("site", "mnist_jax", "serve", "__main__.py"), "python -m mnist_jax.evaluate"),
                            ("", "python -m mnist_jax.evaluate")):
        monkeypatch.setattr(sys, "argv", [argv0])
        assert cli.invoked_as("python -m mnist_jax.evaluate") == expected
        assert cli.invoked_as("python benchmarks/x.py") == "python benchmarks/x.py"


# ---------------------------------------------------------------------------------------------- the installed script
@pytest.fixture
def script() -> Path:
    if not SCRIPT.exists():
        unavailable(f"{SCRIPT} is not installed (pip install -e \".[dev]\" writes it)")
    return SCRIPT


def run_script(script: Path, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(script), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=cli_env(), cwd=REPO)


@pytest.mark.e2e
def test_the_installed_script_lists_its_commands_and_rejects_unknown_ones(script):
    listing = run_script(script, "--help")
    assert listing.returncode == 0 and "  transfer  fine-tune a trained run" in listing.stdout
    unknown = run_script(script, "fit")
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: unknown command 'fit'")
    usage = run_script(script, "export", "--help")
    assert usage.returncode == 0 and usage.stdout.startswith("usage: mnist-jax export")


@pytest.mark.e2e
def test_mnist_jax_train_restarts_onto_huge_pages_and_trains_as_python_m_does(script, tiny_run, tiny_data_dir,
                                                                              tmp_path):
    """The same run as tiny_run (trained by `python -m mnist_jax.train`): the same metrics, bit for bit; and the
    process that trains it has replaced itself (same pid) with the huge-page environment."""
    workdir = tmp_path / "w"
    env = without_huge_page_settings(cli_env())
    process = subprocess.Popen([str(script), "train", "--workdir", str(workdir), "--data-dir", str(tiny_data_dir),
                                *TINY_FLAGS, *TINY_RUN_FLAGS], env=env, cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    environments = []
    while process.poll() is None:
        try:
            environments.append(Path(f"/proc/{process.pid}/environ").read_bytes().split(b"\0"))
        except OSError:
            break
        if b"GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in environments[-1]:
            break
        time.sleep(0.02)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    restarted = any(b"GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in environment for environment in environments)
    assert restarted == huge_pages_apply()
    assert "final test accuracy" in stdout
    assert results(read_jsonl(workdir / "metrics.jsonl")) == results(read_jsonl(tiny_run / "metrics.jsonl"))


@pytest.mark.e2e
def test_mnist_jax_predict_prints_what_python_m_prints(script, tiny_run, tmp_path):
    image = tmp_path / "digit.png"
    image.write_bytes(digit_png(3))
    short, long = (run_script(script, "predict", "--workdir", tiny_run, image, "missing.png"),
                   run_module("mnist_jax.predict", "--workdir", tiny_run, image, "missing.png"))
    assert short.returncode == long.returncode == 1
    assert short.stdout == long.stdout and "digit.png: " in short.stdout
    assert short.stderr == long.stderr
