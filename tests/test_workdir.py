"""The workdir's files: written atomically with the user's umask; the folders mistaken for a run (a run's
checkpoints, a sweep, a folder of runs) recognised by every tool; and a finished run trained further."""

import json
import os
import shlex
import shutil
import stat

import numpy as np
import optax
import pytest

from mnist_jax import datacache, workdir
from mnist_jax.tuning import study
from mnist_jax.config import Config, UserError, plural
from mnist_jax.train import main as train_main
from mnist_jax.transfer import main as transfer_main

from helpers import (IN_PROCESS, READING_TOOLS, SMALL_MODEL_FLAGS, TINY_FLAGS, read_jsonl, run_main_in_process,
                     run_tool, snapshot)


@pytest.fixture
def umask():
    """A group-writable umask (002) for the test, so a file made with it (0664) differs from a private one (0600)
    and from one made with a fixed 0644."""
    previous = os.umask(0o002)
    yield 0o002
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --------------------------------------------------------------------------------------------- the umask
@pytest.mark.parametrize("mask", [0o002, 0o022, 0o077])
def test_write_atomic_gives_the_mode_open_gives(mask, tmp_path):
    previous = os.umask(mask)
    try:
        workdir.write_atomic(str(tmp_path / "new" / "a.json"), "{}\n")
        with open(tmp_path / "reference", "w") as handle:  # what any program's file gets
            handle.write("x")
    finally:
        os.umask(previous)
    assert mode(tmp_path / "new" / "a.json") == mode(tmp_path / "reference") == 0o666 & ~mask
    assert os.listdir(tmp_path / "new") == ["a.json"]


def test_a_failed_write_leaves_the_old_file_and_no_debris(tmp_path):
    path = tmp_path / "metrics.jsonl"
    workdir.write_atomic(str(path), b"old\n")
    with pytest.raises(TypeError):
        workdir.write_atomic(str(path), ["not", "bytes"])  # type: ignore[arg-type]
    assert path.read_bytes() == b"old\n" and os.listdir(tmp_path) == ["metrics.jsonl"]


def test_every_file_of_a_run_its_evaluation_and_a_sweeps_results_follows_the_umask(umask, tiny_data_dir, tmp_path,
                                                                                    monkeypatch):
    """config.json, metrics.jsonl and curves.png were 0600 (tempfile's mode kept through the rename), eval/* and
    the sweep's results too; checkpoints and run.lock follow the umask as well."""
    monkeypatch.setenv(datacache.CACHE_VARIABLE, str(tmp_path / "cache"))  # its entries are written here
    run = tmp_path / "run"
    trained = run_main_in_process(train_main, "--workdir", run, "--data-dir", tiny_data_dir, *TINY_FLAGS,
                                  "--epochs", "1", "--train-examples", "64", *SMALL_MODEL_FLAGS)
    assert trained.returncode == 0, trained.stderr
    evaluated = run_tool(IN_PROCESS, "mnist_jax.evaluate", "--workdir", run, "--data-dir", tiny_data_dir)
    assert evaluated.returncode == 0, evaluated.stderr
    write_sweep_results(tmp_path / "sweep", [(0.003, 0.9)])
    prepared = tmp_path / "prepared"  # a decoded split's cache entry
    prepared.mkdir()
    (prepared / "data.tfrecord").write_bytes(b"records")
    datacache.load_or_decode(str(prepared), "test", 2, lambda: (np.zeros((2, 28, 28, 1), np.uint8),
                                                                np.zeros(2, np.int32)))
    files = {os.path.relpath(os.path.join(root, name), tmp_path): mode(os.path.join(root, name))
             for root, _, names in os.walk(tmp_path) for name in names}
    folders = {os.path.relpath(root, tmp_path): mode(root) for root, _, _ in os.walk(tmp_path) if root != str(tmp_path)}
    for name in ("run/config.json", "run/metrics.jsonl", "run/curves.png", "run/run.lock",
                 "run/eval/test/report.json", "run/eval/test/predictions.npz", "run/eval/test/confusion_matrix.png",
                 "sweep/results.csv", "sweep/results.md", "sweep/sweep.png"):
        assert files[name] == 0o664, name
    assert [name for name in files if name.startswith("cache/")]
    assert {m for m in files.values()} == {0o664} and {m for m in folders.values()} == {0o775}


# --------------------------------------------------------------------------------------------- not a run
def write_sweep_results(folder, trials: list[tuple[float, float]]) -> None:
    """The results `sweep` writes for a study whose finished trials had these (learning rate, validation
    accuracy): a real Optuna study in memory, trial N the Nth pair."""
    import optuna

    from mnist_jax.tuning import results, worker

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    finished = optuna.create_study(direction="maximize")
    for rate, accuracy in trials:
        summary = {"validation_accuracy": accuracy, "test_accuracy": accuracy, "best_epoch": 3, "epochs": "3/3",
                   "wall_seconds": 1.0}
        finished.add_trial(optuna.trial.create_trial(
            params={"learning_rate": rate}, value=accuracy, user_attrs={worker.SUMMARY_ATTR: summary},
            distributions={"learning_rate": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)}))
    results.write_results(str(folder), finished, ["learning_rate"])


@pytest.fixture
def sweep_folder(tiny_run_in_process, tmp_path):
    """A sweep's folder as `sweep` leaves it: study.json, results.csv ranking trial-001 first (written from a real
    Optuna study of two finished trials), two trial runs."""
    folder = tmp_path / "sweep"
    for trial in ("trial-000", "trial-001"):
        shutil.copytree(tiny_run_in_process, folder / trial)
    study.bind_folder(str(folder), "sweep")
    write_sweep_results(folder, [(0.003, 0.98), (0.01, 0.99)])
    return folder


def test_the_sweep_module_and_the_hints_agree_on_its_files():
    assert study.FOLDER_FILE == workdir.SWEEP_PLAN_FILE


@pytest.mark.parametrize("tool", READING_TOOLS)
def test_a_reading_tool_on_a_sweep_names_its_best_trial(tool, sweep_folder, tiny_data_dir):
    extra = ("digit.png",) if tool == "mnist_jax.predict" else ()
    result = run_tool(IN_PROCESS, tool, "--workdir", sweep_folder, *extra)
    assert result.returncode == 2
    assert result.stderr == (f"error: {sweep_folder} is a sweep, not a run: use one of its trials (trial-000, "
                             f"trial-001), e.g. {sweep_folder / 'trial-001'} (the best on validation)\n")


def test_a_folder_of_runs_is_named_as_such(tiny_run_in_process, tmp_path):
    for name in ("a", "b", "c", "d", "e"):
        shutil.copytree(tiny_run_in_process / "checkpoints", tmp_path / name / "checkpoints")
    result = run_tool(IN_PROCESS, "mnist_jax.evaluate", "--workdir", tmp_path)
    assert result.returncode == 2
    assert result.stderr == (f"error: {tmp_path} holds no run of its own but 5 in its folders (a, b, c, d and 1 "
                             "more): use one of them\n")


@pytest.mark.parametrize("inside", ["checkpoints", "checkpoints/60", "checkpoints-corrupt"])
def test_a_reading_tool_inside_a_runs_checkpoints_names_the_run(inside, tiny_run_in_process, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run_in_process, run)
    (run / "checkpoints-corrupt").mkdir()
    result = run_tool(IN_PROCESS, "mnist_jax.predict", "--workdir", run / inside, "digit.png")
    assert result.returncode == 2
    assert result.stderr == f"error: {run / inside} is inside the checkpoints of the run {run}: use {run}\n"


def test_an_empty_folder_still_says_train_there_first(tmp_path):
    result = run_tool(IN_PROCESS, "mnist_jax.evaluate", "--workdir", tmp_path)
    assert result.stderr == (f"error: no checkpoints found: {tmp_path / 'checkpoints'} does not exist (train with "
                             f"--workdir {tmp_path} first)\n")


@pytest.mark.parametrize("tool", ["mnist_jax.train", "mnist_jax.transfer"])
def test_training_into_a_runs_checkpoints_or_a_sweep_is_refused_and_changes_nothing(tool, tiny_run_in_process,
                                                                                    sweep_folder, tiny_data_dir,
                                                                                    tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run_in_process, run)
    before = snapshot(tmp_path)
    source = ("--from", tiny_run_in_process) if tool == "mnist_jax.transfer" else ()
    for target, message in ((run / "checkpoints", f"is inside the checkpoints of the run {run}; give the new run "
                                                  "a folder of its own"),
                            (sweep_folder, "is a sweep's folder (it holds study.json); its trials train with python "
                                           "-m mnist_jax.sweep: give the new run a folder of its own")):
        result = run_tool(IN_PROCESS, tool, "--workdir", target, "--data-dir", tiny_data_dir, *source, *TINY_FLAGS)
        assert result.returncode == 2, result.stderr
        assert result.stderr == f"error: --workdir {target} {message}\n"
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------------- training further
def test_continue_command_spells_out_the_runs_settings():
    saved = Config(dataset="fashion_mnist", conv_features=(8, 16), learning_rate=0.01, batch_norm=True,
                   augment_rotation=10.0, freeze="none", epochs=3)
    command = workdir.continue_command("runs/my run/", saved, 9)
    assert command == ("python -m mnist_jax.transfer --from 'runs/my run' --workdir 'runs/my run-more' --epochs 9 "
                       "--dataset fashion_mnist --learning-rate 0.01 --augment-rotation 10.0")  # no architecture


def test_a_finished_run_trained_longer_is_refused_with_the_command_that_does_it(tiny_run_in_process,
                                                                                 tiny_data_dir, tmp_path):
    """The schedule's length is part of the run (one_cycle anneals to ~0 at its end), so training on means a new
    schedule: the refusal's command starts one from the run's best weights, and the new run's learning rate
    follows a fresh 4-epoch one-cycle schedule from step 0."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run_in_process, run)
    before = snapshot(run)
    result = run_main_in_process(train_main, "--workdir", run, "--data-dir", tiny_data_dir, *TINY_FLAGS,
                                 "--learning-rate", "0.003", "--epochs", "4")
    assert result.returncode == 2 and snapshot(run) == before
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {run} holds a run of 3 epochs, the length its learning-rate schedule was made "
                           "for, so it cannot be trained longer in place; to train on, start a new run from its "
                           "best weights on a new schedule of 4 epochs: python -m mnist_jax.transfer ")
    command = shlex.split(line.split(": ", 3)[-1])
    assert command[:3] == ["python", "-m", "mnist_jax.transfer"]
    assert command[command.index("--workdir") + 1] == f"{run}-more"
    continued = run_main_in_process(transfer_main, *command[3:], "--data-dir", tiny_data_dir, "--no-progress")
    assert continued.returncode == 0, continued.stderr
    config = json.loads((tmp_path / "run-more" / "config.json").read_text())
    assert config["epochs"] == 4 and config["transfer_from"] == str(run)
    assert {k: config[k] for k in ("dataset", "batch_size", "learning_rate")} == {
        k: json.loads((run / "config.json").read_text())[k] for k in ("dataset", "batch_size", "learning_rate")}
    history = read_jsonl(tmp_path / "run-more" / "metrics.jsonl")
    fresh = optax.cosine_onecycle_schedule(transition_steps=80, peak_value=0.003, pct_start=10 / 80)
    assert [h["step"] for h in history] == [20, 40, 60, 80]  # its own step count, from 0
    np.testing.assert_allclose([h["learning_rate"] for h in history], [fresh(s - 1) for s in (20, 40, 60, 80)],
                               rtol=1e-6)
    assert history[0]["learning_rate"] > 100 * read_jsonl(run / "metrics.jsonl")[-1]["learning_rate"]


def test_fewer_epochs_or_other_changes_get_the_plain_refusal(tiny_run_in_process):
    saved = workdir.read_config(str(tiny_run_in_process))
    for chosen, requested in (({"epochs"}, Config(epochs=2)), ({"epochs", "learning_rate"},
                                                               Config(epochs=5, learning_rate=0.1))):
        with pytest.raises(UserError, match="holds a run with other settings"):
            workdir.resolve_config(str(tiny_run_in_process), requested, chosen)
    assert saved.epochs == 3


def test_a_finished_one_epoch_run_says_1_epoch(named_run_in_process, named_data_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(named_run_in_process, run)
    config = json.loads((run / "config.json").read_text())
    result = run_main_in_process(train_main, "--workdir", run, "--data-dir", named_data_dir, "--no-progress")
    assert result.returncode == 0 and config["epochs"] == 1, result.stderr
    assert f"\nrun complete: 1 epoch already trained in {run}\n" in result.stdout
    assert (plural(1, "epoch"), plural(3, "epoch"), plural(10_000, "test example")) == (
        "1 epoch", "3 epochs", "10,000 test examples")
