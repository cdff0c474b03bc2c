"""What every command shares (`cli.py`): flags taken only as spelt, unknown flags named, and stderr kept to our one
line when Orbax abandons the reads of a corrupt checkpoint."""

import gc
import logging
import sys
import time
import types

import pytest

from mnist_jax import checkpoint, cli

from helpers import COMMAND_MODULES, IN_PROCESS, TINY_FLAGS, corrupt_copy, run_main_in_process, run_tool


@pytest.mark.parametrize("tool", COMMAND_MODULES.values())
def test_a_misspelt_flag_is_named_with_the_one_meant(tool):
    """Even where the flag meant is a required one (argparse alone says only that --workdir is missing)."""
    result = run_tool(IN_PROCESS, tool, "--workdr", "x")
    assert result.returncode == 2
    assert result.stderr == f"python -m {tool}: error: unknown flag --workdr (did you mean --workdir?)\n"


@pytest.mark.parametrize("tool", ("mnist_jax.train", "mnist_jax.transfer", "mnist_jax.sweep"))
def test_no_flag_is_guessed_from_its_first_letters(tool, tmp_path):
    """`--epoch 1` was taken as `--epochs 1`."""
    result = run_tool(IN_PROCESS, tool, "--workdir", tmp_path / "w", "--epoch", "1", *TINY_FLAGS)
    assert result.returncode == 2
    assert result.stderr.endswith("error: unknown flag --epoch (did you mean --epochs?)\n"), result.stderr
    assert not (tmp_path / "w").exists()


def test_every_unknown_flag_is_named_and_values_are_not_flags(capsys):
    parser = cli.ArgumentParser(prog="prog")
    for flag in ("--workdir", "--checkpoint", "--split", "--learning-rate"):
        parser.add_argument(flag)
    parser.add_argument_group("more").add_argument("--seed", type=int)
    parser.add_mutually_exclusive_group().add_argument("--model")
    parser.add_argument("images", nargs="*")
    with pytest.raises(SystemExit) as exit_status:
        parser.parse_args(["--workdir", "w", "--chekpoint", "3", "--spilt=test", "-x", "--zzz"])
    assert exit_status.value.code == 2
    assert capsys.readouterr().err == ("prog: error: unknown flags --chekpoint (did you mean --checkpoint?), --spilt "
                                       "(did you mean --split?), -x, --zzz\n")
    # Flags of groups are known; negative numbers and anything after `--` are values, not flags.
    args = parser.parse_args(["--workdir", "w", "--learning-rate=-1e-3", "--seed", "-5", "--model", "m", "--",
                              "-a.png"])
    assert (args.learning_rate, args.seed, args.model, args.images) == ("-1e-3", -5, "m", ["-a.png"])
    assert not parser.allow_abbrev


# --------------------------------------------------------------------------------------------- abandoned reads
def orbax_coroutine():
    """A coroutine whose code lives in a file of Orbax's package, as the abandoned reads' do."""
    namespace = {}
    exec(compile("async def _read_array_index_and_device_put():\n    pass\n",
                 "/venv/site-packages/orbax/checkpoint/_src/serialization/serialization.py", "exec"), namespace)
    return namespace["_read_array_index_and_device_put"]()


def unraisable(error, obj=None):
    return types.SimpleNamespace(exc_type=type(error), exc_value=error, exc_traceback=None, err_msg=None,
                                 object=obj)


@pytest.fixture
def reported(monkeypatch):
    """What reaches the unraisable hook beneath `drop_abandoned_checkpoint_reads`'s, installed for this test."""
    passed = []
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    filters = [list(logger.filters) for logger in loggers]
    monkeypatch.setattr(sys, "unraisablehook", passed.append)
    cli.drop_abandoned_checkpoint_reads()
    yield passed
    for logger, before in zip(loggers, filters):
        logger.filters[:] = before


def test_only_the_abandoned_reads_reports_are_dropped(reported):
    sys.unraisablehook(unraisable(RuntimeError("Event loop is closed")))
    coroutine = orbax_coroutine()
    sys.unraisablehook(unraisable(Exception("Encountered error while reading array index"), coroutine))
    assert reported == []
    ours = unraisable(ValueError("a real problem"))
    sys.unraisablehook(ours)

    async def our_own():
        pass

    own_coroutine, own_error = our_own(), Exception("x")
    sys.unraisablehook(unraisable(own_error, own_coroutine))
    assert [entry.exc_value for entry in reported] == [ours.exc_value, own_error]  # exceptions compare by identity
    assert [entry.object for entry in reported] == [None, own_coroutine]
    coroutine.close(), own_coroutine.close()
    installed, filters = sys.unraisablehook, list(logging.getLogger("asyncio").filters)
    cli.drop_abandoned_checkpoint_reads()  # once per process: a second call adds nothing
    assert sys.unraisablehook is installed and logging.getLogger("asyncio").filters == filters


@pytest.mark.parametrize("logger, message, pathname, kept", [
    ("asyncio", "Task exception was never retrieved\nfuture: <Task finished coro=<async_deserialize() done, defined "
                "at /venv/orbax/checkpoint/_src/serialization/serialization.py:394>>", "", False),
    ("asyncio", "_GatheringFuture exception was never retrieved\nfuture: <_GatheringFuture finished exception="
                "Exception('... See full TensorStore details ...')>", "", False),
    ("asyncio", "Future exception was never retrieved\nfuture: <Future finished exception=ValueError('FAILED_"
                "PRECONDITION: Error reading \"params\" in OCDBT database')>", "", False),
    ("asyncio", "Task exception was never retrieved\nfuture: <Task finished coro=<serve() done, defined at "
                "/repo/mnist_jax/serve/app.py:9>>", "", True),
    ("asyncio", "Executing <Task ...> took 0.5 seconds", "", True),
    ("absl", "Failed to json parse Metadata file", "/venv/orbax/checkpoint/metadata/checkpoint.py", False),
    ("absl", "Something from tfds", "/venv/tensorflow_datasets/core/load.py", True),
])
def test_log_records_of_abandoned_reads_and_orbax_are_dropped(reported, logger, message, pathname, kept):
    record = logging.LogRecord(logger, logging.ERROR, pathname, 1, message, None, None)
    assert all(f.filter(record) for f in logging.getLogger(logger).filters) == kept


def test_a_corrupt_checkpoint_read_again_and_again_reports_nothing_more(reported, tiny_run_in_process, tmp_path):
    """The real thing: each failed restore leaves TensorStore reads in flight on a closed loop. Whatever they
    report reaches neither the hook beneath nor the logs."""
    workdir = corrupt_copy(tiny_run_in_process, tmp_path, "array data overwritten")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger().addHandler(handler)
    try:
        for _ in range(4):
            with pytest.raises(checkpoint.UnreadableCheckpoint):
                checkpoint.restore_model(str(workdir), "latest")
        time.sleep(0.5)  # the abandoned reads finish on TensorStore's threads
        gc.collect()  # and their tasks are collected
    finally:
        logging.getLogger().removeHandler(handler)
    assert reported == []
    assert [r.getMessage() for r in records if r.levelno >= logging.ERROR] == []


def test_run_cli_installs_it(monkeypatch):
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    result = run_main_in_process(lambda argv: 0)
    assert result.returncode == 0
    assert getattr(sys.unraisablehook, "drops_abandoned_reads", False)
