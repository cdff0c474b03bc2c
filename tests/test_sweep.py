"""The hyperparameter sweep: grid parsing, trial planning, results ranked on validation, resume after kill -9."""

import csv
import json
import signal
import subprocess
import sys
import time

import pytest

from mnist_jax import sweep
from mnist_jax.config import Config, UserError
from mnist_jax.workdir import read_metrics

from helpers import REPO, TINY_FLAGS, cli_env, run_main_in_process, run_module


def test_grid_values_are_typed_like_the_flags():
    grid = sweep.parse_grid(["learning_rate=1e-3,0.01", "conv-features=8-16,16", "batch_norm=true,false",
                             "--epochs=2"])
    assert grid == {"learning_rate": [0.001, 0.01], "conv_features": [(8, 16), (16,)],
                    "batch_norm": [True, False], "epochs": [2]}


@pytest.mark.parametrize("spec, message", [
    ("learning_rate", "expected name=value1,value2"),
    ("speed=1,2", "unknown hyperparameter 'speed'"),
    ("freeze=features", "unknown hyperparameter 'freeze'"),  # set by the transfer tool, not a training flag
    ("epochs=two", "bad value 'two' for epochs"),
    ("batch_norm=maybe", "bad value 'maybe' for batch_norm"),
    ("dropout_rate=0.1,0.1", "repeated value"),
])
def test_bad_grid_specs(spec, message):
    with pytest.raises(UserError, match=message):
        sweep.parse_grid([spec])


def test_full_grid_in_order_and_random_draws_are_distinct_grid_points():
    grid = {"a": [1, 2, 3], "b": ["x", "y"], "c": [0.5, 0.25]}
    full = sweep.plan_trials(grid, None, seed=0)
    assert len(full) == 12 and full[0] == {"a": 1, "b": "x", "c": 0.5} and full[1] == {"a": 1, "b": "x", "c": 0.25}
    drawn = sweep.plan_trials(grid, 5, seed=3)
    assert len(drawn) == 5 and all(trial in full for trial in drawn)
    assert len({json.dumps(t) for t in drawn}) == 5
    assert sweep.plan_trials(grid, 5, seed=3) == drawn  # same seed, same trials
    assert any(sweep.plan_trials(grid, 5, seed=s) != drawn for s in range(4, 8))
    assert sorted(map(json.dumps, sweep.plan_trials(grid, 50, seed=0))) == sorted(map(json.dumps, full))


def test_a_bad_value_fails_the_whole_sweep_before_training():
    with pytest.raises(UserError, match=r"trial 1 \(learning_rate=0.0\): --learning-rate must be > 0"):
        sweep.trial_configs(Config(validation_fraction=0.1), [{"learning_rate": 0.1}, {"learning_rate": 0.0}])
    with pytest.raises(UserError, match="--validation-fraction must be > 0"):
        sweep.trial_configs(Config(), [{"learning_rate": 0.1}])


def test_wall_time_adds_up_across_resumed_processes():
    history = [{"elapsed_seconds": s} for s in (10.0, 20.0, 7.0, 15.0)]  # killed after 20 s, resumed
    assert sweep.wall_seconds(history) == 10 + 10 + 7 + 8


@pytest.mark.parametrize("args, message", [
    (("--grid", "nonsense=1"), "unknown hyperparameter 'nonsense'"),
    (("--grid", "epochs=1,zero"), "bad value 'zero' for epochs"),
    (("--grid", "epochs=1,0"), "--epochs must be a positive integer"),
    (("--grid", "epochs=1,2", "--epochs", "3"), "epochs given both as a flag and in --grid"),
    (("--grid", "epochs=1", "--validation-fraction", "0"), "--validation-fraction must be > 0"),
    (("--grid", "epochs=1", "--random", "0"), "--random must be a positive integer"),
])
def test_cli_rejects_bad_grids_with_one_line(tmp_path, args, message):
    result = run_main_in_process(sweep.main, "--workdir", tmp_path / "s", *args)  # `python -m mnist_jax.sweep`
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "s").exists()


SWEEP_ARGS = ("--grid", "learning_rate=0.003,0.01", "--epochs", "2", "--validation-fraction", "0.25", *TINY_FLAGS)


def assert_results_rank_the_trials_on_validation(sweep_dir, stdout):
    """results.csv: one row per trial, ranked on validation, values equal to each trial's own metrics; results.md
    and sweep.png beside it; the best trial named on stdout."""
    with open(sweep_dir / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["rank"] for row in rows] == ["1", "2"]
    assert sorted(row["learning_rate"] for row in rows) == ["0.003", "0.01"]
    assert float(rows[0]["validation_accuracy"]) >= float(rows[1]["validation_accuracy"])
    for row in rows:
        history = read_metrics(str(sweep_dir / row["trial"]))
        best = max(history, key=lambda e: (e["validation_accuracy"], -e["epoch"]))
        assert float(row["validation_accuracy"]) == best["validation_accuracy"]
        assert float(row["test_accuracy"]) == best["test_accuracy"]
        assert int(row["best_epoch"]) == best["epoch"] and row["epochs"] == "2/2"
        saved = json.loads((sweep_dir / row["trial"] / "config.json").read_text())
        assert saved["learning_rate"] == float(row["learning_rate"]) and saved["epochs"] == 2
    markdown = (sweep_dir / "results.md").read_text().splitlines()
    assert markdown[0].startswith("| rank | trial | learning_rate | validation_accuracy") and len(markdown) == 4
    assert (sweep_dir / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"best on validation: {rows[0]['trial']}" in stdout


def test_sweep_in_process_ranks_its_trials_and_skips_them_when_run_again(tiny_data_dir, tmp_path):
    """The sweep command's main (its `run_sweep`) in this process, on a small model: the fast tier's part of the
    kill -9 test below."""
    sweep_dir = tmp_path / "sweep"
    args = ("--workdir", sweep_dir, "--data-dir", tiny_data_dir, *SWEEP_ARGS, "--conv-features", "8,16",
            "--dense-features", "32")
    result = run_main_in_process(sweep.main, *args)
    assert result.returncode == 0, result.stderr
    assert "trial 1/2 (learning_rate=0.003) ->" in result.stdout and "trial 2/2 (learning_rate=0.01) ->" in result.stdout
    assert [e["epoch"] for e in read_metrics(str(sweep_dir / "trial-001"))] == [1, 2]
    assert_results_rank_the_trials_on_validation(sweep_dir, result.stdout)

    # Run again: nothing to train; another grid in the same directory is refused.
    again = run_main_in_process(sweep.main, *args)
    assert again.returncode == 0 and again.stdout.count("finished earlier, skipped") == 2
    other = run_main_in_process(sweep.main, *args[:4], "--grid", "learning_rate=0.003,0.03", *args[6:])
    assert other.returncode == 2 and "holds another sweep (its grid, trials differ)" in other.stderr


@pytest.mark.e2e
def test_killed_sweep_skips_finished_trials_and_resumes_the_interrupted_one(tiny_data_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "-m", "mnist_jax.sweep", "--workdir", str(sweep_dir), "--data-dir",
               str(tiny_data_dir), *SWEEP_ARGS]
    process = subprocess.Popen(command, env=cli_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    second = sweep_dir / "trial-001" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if second.exists() and second.read_text().strip():  # trial 0 finished, trial 1 one epoch in
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the sweep finished before it could be killed"
    first_checkpoints = {p: p.stat().st_mtime_ns for p in (sweep_dir / "trial-000").rglob("*") if p.is_file()}

    result = subprocess.run(command, env=cli_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "trial 1/2 (learning_rate=0.003): finished earlier, skipped" in result.stdout
    assert "resumed from" in result.stdout and "at epoch 1" in result.stdout
    # The finished trial was not touched; the interrupted one has each epoch exactly once.
    assert {p: p.stat().st_mtime_ns for p in first_checkpoints} == first_checkpoints
    assert [e["epoch"] for e in read_metrics(str(sweep_dir / "trial-001"))] == [1, 2]

    assert_results_rank_the_trials_on_validation(sweep_dir, result.stdout)

    # Run again: nothing to train; another grid in the same directory is refused.
    again = run_module("mnist_jax.sweep", "--workdir", sweep_dir, "--data-dir", tiny_data_dir, *SWEEP_ARGS)
    assert again.returncode == 0 and again.stdout.count("finished earlier, skipped") == 2
    other = run_module("mnist_jax.sweep", "--workdir", sweep_dir, "--data-dir", tiny_data_dir,
                       *SWEEP_ARGS[:1], "learning_rate=0.003,0.03", *SWEEP_ARGS[2:])
    assert other.returncode == 2 and "holds another sweep (its grid, trials differ)" in other.stderr
