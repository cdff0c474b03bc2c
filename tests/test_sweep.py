"""The sweep on Optuna: search spaces from the flags, bad input, ranking on validation, pruning, the command that
reproduces the best trial, a killed trial finished from its checkpoint with the parameters an uninterrupted sweep
draws (in this process), and worker processes sharing one study on the embedded journal and on a PostgreSQL server
of the test's own, one of them killed with SIGKILL and started again (e2e)."""

import contextlib
import csv
import dataclasses
import io
import re
import shlex
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from mnist_jax import sweep, train
from mnist_jax.config import Config, RunOptions, UserError
from mnist_jax.tuning import results, space
from mnist_jax.workdir import read_metrics

from helpers import (REPO, SMALL_MODEL, SMALL_MODEL_FLAGS, TINY, TINY_FLAGS, PostgresServer, cli_env,
                     results as without_timings, run_main_in_process, snapshot, train_run)


def journal(sweep_dir) -> optuna.storages.BaseStorage:
    """The default storage of a sweep folder, opened as any Optuna program would."""
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(sweep_dir / "study.journal")))


# ------------------------------------------------------------------------------------------------ the search space
def test_grid_and_search_specs_are_typed_like_the_flags():
    parsed = space.parse_space(
        ["learning_rate=1e-3,0.01", "conv-features=8-16,16", "batch_norm=true,false"],
        ["dropout_rate=0:0.5", "batch_size=64:512:int", "eval_batch_size=100:1000", "--weight-decay=log:1e-5:1e-3",
         "warmup_epochs=0:2:int", "optimizer=adam,adamw"])
    assert parsed.grid == {"learning_rate": [0.001, 0.01], "conv_features": ["8-16", "16"],
                           "batch_norm": [True, False]}
    assert parsed.grid_size == 8
    assert parsed.distributions == {
        "learning_rate": CategoricalDistribution([0.001, 0.01]),
        "conv_features": CategoricalDistribution(["8-16", "16"]),
        "batch_norm": CategoricalDistribution([True, False]),
        "dropout_rate": FloatDistribution(0.0, 0.5),
        "batch_size": IntDistribution(64, 512),
        "eval_batch_size": IntDistribution(100, 1000),  # an integer field's range is one of integers
        "weight_decay": FloatDistribution(1e-5, 1e-3, log=True),
        "warmup_epochs": IntDistribution(0, 2),  # whole epochs of a float field, asked for with :int
        "optimizer": CategoricalDistribution(["adam", "adamw"]),
    }
    config_values = space.overrides({"conv_features": "8-16", "warmup_epochs": 1, "batch_norm": True,
                                     "learning_rate": 0.01})
    assert config_values == {"conv_features": (8, 16), "warmup_epochs": 1.0, "batch_norm": True, "learning_rate": 0.01}
    assert isinstance(config_values["warmup_epochs"], float)


@pytest.mark.parametrize("grid, search, message", [
    (["learning_rate"], [], "expected name=value1,value2"),
    ([], ["dropout_rate"], "expected name=v1,v2,... or name=low:high"),
    (["speed=1,2"], [], "unknown hyperparameter 'speed'"),
    ([], ["freeze=none,features"], "unknown hyperparameter 'freeze'"),  # set by the transfer tool, not a flag
    (["epochs=two"], [], "bad value 'two' for epochs"),
    (["batch_norm=maybe"], [], "bad value 'maybe' for batch_norm"),
    ([], ["batch_norm=0:1"], "bad value '0:1' for batch_norm"),  # no range of a boolean
    (["dropout_rate=0.1,0.1"], [], "repeated value"),
    ([], ["dropout_rate=0.5:0.1"], "the range is empty"),
    ([], ["learning_rate=log:0:0.1"], "a log-uniform range must start above 0"),
    ([], ["batch_size=64:0.5"], "the bounds of batch_size's range must be integers"),
    ([], ["dropout_rate=0:a"], "the bounds of dropout_rate's range must be numbers"),
    ([], ["dropout_rate=0:0.1:0.2"], "a range is low:high"),
    (["dropout_rate=0,0.1"], ["dropout-rate=0:0.5"], "dropout_rate is named twice"),
])
def test_bad_specs(grid, search, message):
    with pytest.raises(UserError, match=re.escape(message)):
        space.parse_space(grid, search)


@pytest.mark.parametrize("args, message", [
    ((), "name what to tune: --grid NAME=V1,V2 ... and/or --search NAME=SPEC ..."),
    (("--grid", "nonsense=1"), "unknown hyperparameter 'nonsense'"),
    (("--grid", "epochs=1,0"), "--epochs must be a positive integer, got 0"),
    (("--search", "dropout_rate=0:1", "--trials", "2"), "--dropout-rate must be in [0, 1), got 1.0"),
    (("--search", "warmup_epochs=0:3", "--trials", "2"), "--warmup-epochs must be in [0, epochs), got 3.0"),
    (("--grid", "epochs=1,2", "--epochs", "3"), "epochs given both as a flag and in --grid/--search"),
    (("--grid", "epochs=1", "--validation-fraction", "0"), "--validation-fraction must be > 0"),
    (("--search", "dropout_rate=0:0.5"), "--sampler tpe needs --trials N"),
    (("--grid", "epochs=1,2", "--trials", "3"), "--trials 3 is more than the grid's 2 points"),
    (("--grid", "epochs=1,2", "--trials", "0"), "--trials must be a positive integer"),
    (("--grid", "epochs=1", "--search", "dropout_rate=0:0.5", "--sampler", "grid"), "--sampler grid tries --grid"),
    (("--grid", "epochs=1,2", "--random", "1"), "--random N is now --trials N"),
    (("--grid", "epochs=1", "--storage", "nonsense"), "--storage: not a database URL"),
    (("--grid", "epochs=1", "--storage", "postgresql+pg8000://me@127.0.0.1/db"),
     "--storage postgresql+pg8000://...: its database driver is not installed"),
    (("--grid", "epochs=1", "--storage", "postgresql://me:secret@127.0.0.1:1/db"),  # nothing listens on port 1
     "cannot open --storage postgresql://me:***@127.0.0.1:1/db: "),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    result = run_main_in_process(sweep.main, "--workdir", tmp_path / "s", *args)  # `python -m mnist_jax.sweep`
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "secret" not in result.stderr
    assert not (tmp_path / "s").exists()


def test_a_postgresql_storage_without_its_driver_names_the_extra_that_installs_it(tmp_path, monkeypatch):
    """SQLAlchemy reads postgresql:// as psycopg. A None in sys.modules is Python's own way of making an import
    fail, as it does on a machine without the [tune] extra."""
    monkeypatch.setitem(sys.modules, "psycopg", None)
    result = run_main_in_process(sweep.main, "--workdir", tmp_path / "s", "--grid", "epochs=1,2",
                                 "--storage", "postgresql://me@db.example/tuning")
    assert result.returncode == 2
    assert result.stderr.startswith("error: --storage postgresql://...: its database driver is not installed")
    assert result.stderr.strip().endswith("for PostgreSQL: pip install 'mnist_jax[tune]'")
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------------------ results
def test_trials_rank_on_validation_finished_ones_first_then_pruned_then_the_rest():
    study = optuna.create_study(direction="maximize")
    rate = {"learning_rate": FloatDistribution(1e-4, 1.0, log=True)}

    def add(state, learning_rate, validation=None, test=None, epochs="3/3", **attrs):
        summary = {} if validation is None else {"validation_accuracy": validation, "test_accuracy": test,
                                                 "best_epoch": 1, "epochs": epochs, "wall_seconds": 1.5}
        study.add_trial(optuna.create_trial(
            state=state, value=validation if state == TrialState.COMPLETE else None,
            params={"learning_rate": learning_rate}, distributions=rate,
            user_attrs={"summary": summary, **attrs} if summary else attrs))

    add(TrialState.COMPLETE, 0.001, validation=0.95, test=0.99)  # the best test accuracy: it ranks on validation
    add(TrialState.PRUNED, 0.1, validation=0.99, test=0.98, epochs="1/3")
    add(TrialState.COMPLETE, 0.003, validation=0.97, test=0.90)
    add(TrialState.FAIL, 0.5, error="--batch-size 512 is larger than the training split")
    add(TrialState.RUNNING, 0.01, validation=0.98, test=0.97, epochs="2/3")
    rows = results.ranked_rows(study, ["learning_rate"])
    assert [(row["rank"], row["trial"], row["state"]) for row in rows] == [
        (1, "trial-002", "complete"), (2, "trial-000", "complete"), (3, "trial-001", "pruned"),
        (4, "trial-004", "running"), (5, "trial-003", "fail")]
    assert rows[0]["test_accuracy"] == 0.90 and rows[2]["epochs"] == "1/3"
    assert rows[4]["error"] == "--batch-size 512 is larger than the training split"
    markdown = results.format_markdown(rows, ["learning_rate"]).splitlines()
    assert markdown[0] == ("| rank | trial | state | learning_rate | validation_accuracy | test_accuracy | "
                           "best_epoch | epochs | wall_seconds |")
    assert markdown[2] == "| 1 | trial-002 | complete | 0.003 | 97.00% | 90.00% | 1 | 3/3 | 1.5 |"
    assert markdown[6] == "| 5 | trial-003 | fail | 0.5 |  |  |  |  |  |"


def test_wall_time_adds_up_across_resumed_processes():
    from mnist_jax.tuning.worker import wall_seconds

    history = [{"elapsed_seconds": s} for s in (10.0, 20.0, 7.0, 15.0)]  # killed after 20 s, resumed
    assert wall_seconds(history) == 10 + 10 + 7 + 8


# ------------------------------------------------------------------------------------------------ the pruning hook
def test_the_per_epoch_hook_stops_a_run_at_a_checkpoint_and_judges_a_resumed_one_first(tiny_data_dir, tmp_path):
    """`RunOptions.after_epoch`, the training loop's hook that a sweep prunes with: called after each epoch's
    checkpoint and once with a resumed run's restored epochs; True ends the run there."""
    config = Config(dataset=TINY, batch_size=32, eval_batch_size=100, epochs=3, **SMALL_MODEL)
    workdir, seen = tmp_path / "run", []

    def hook(stop_at):
        return lambda history: seen.append(len(history)) or len(history) == stop_at

    stopped = train_run(config, workdir, tiny_data_dir, after_epoch=hook(2))
    assert [e["epoch"] for e in stopped] == [1, 2] and seen == [1, 2]
    assert [e["epoch"] for e in read_metrics(workdir)] == [1, 2]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())[-1] == "40"  # epoch 2

    seen.clear()
    assert train_run(config, workdir, tiny_data_dir, after_epoch=hook(2)) == stopped and seen == [2]  # nothing trains
    seen.clear()
    finished = train_run(config, workdir, tiny_data_dir, after_epoch=hook(None))
    assert seen == [2, 3] and [e["epoch"] for e in finished] == [1, 2, 3]
    assert without_timings(finished) == without_timings(train_run(config, tmp_path / "uninterrupted", tiny_data_dir))


# ------------------------------------------------------------------------------------------------ sweeps in process
def test_sweep_prunes_a_hopeless_trial_and_prints_the_command_that_trains_the_best_again(tiny_data_dir, tmp_path):
    """Hyperband's first rung keeps only the best trial so far after epoch 1: a learning rate of 1e-7 drawn after
    0.01 stops there. The command's main, in this process on one device, so the retrained run is bit-identical."""
    sweep_dir = tmp_path / "sweep"
    args = ("--workdir", sweep_dir, "--data-dir", tiny_data_dir, *TINY_FLAGS, *SMALL_MODEL_FLAGS, "--epochs", "2",
            "--validation-fraction", "0.25", "--pruner", "hyperband", "--grid", "learning_rate=1e-7,0.01")
    result = run_main_in_process(sweep.main, *args)
    assert result.returncode == 0, result.stderr
    first, second = optuna.load_study(study_name="sweep", storage=journal(sweep_dir)).trials
    assert (first.params, second.params) == ({"learning_rate": 0.01}, {"learning_rate": 1e-7}), \
        "Optuna's grid sampler now orders this grid otherwise: pick the --sampler-seed that puts 1e-7 second"
    assert (first.state, second.state) == (TrialState.COMPLETE, TrialState.PRUNED)
    assert "trial-001 pruned after epoch 1" in result.stdout
    assert [e["epoch"] for e in read_metrics(sweep_dir / "trial-001")] == [1]  # stopped at once, workdir kept
    assert (sweep_dir / "trial-001" / "checkpoints").is_dir()
    assert second.intermediate_values == {1: read_metrics(sweep_dir / "trial-001")[0]["validation_accuracy"]}

    with open(sweep_dir / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["rank"], row["trial"], row["state"], row["epochs"]) for row in rows] == [
        ("1", "trial-000", "complete", "2/2"), ("2", "trial-001", "pruned", "1/2")]
    for row in rows:  # each row is its trial's best validation epoch, with test read at that epoch
        history = read_metrics(sweep_dir / row["trial"])
        best = max(history, key=lambda e: (e["validation_accuracy"], -e["epoch"]))
        assert float(row["validation_accuracy"]) == best["validation_accuracy"]
        assert float(row["test_accuracy"]) == best["test_accuracy"] and int(row["best_epoch"]) == best["epoch"]
    assert first.value == float(rows[0]["validation_accuracy"])
    assert (sweep_dir / "results.md").read_text().startswith("| rank | trial | state | learning_rate |")
    for plot in ("optimization_history.png", "intermediate_values.png", "sweep.png"):
        assert (sweep_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot

    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith(f"best on validation: trial-000 ({float(rows[0]['validation_accuracy']):.2%}, test ")
    command = shlex.split(last.partition("again: ")[2].rpartition(" (")[0])
    assert command[:5] == ["python", "-m", "mnist_jax.train", "--workdir", f"{sweep_dir}-best"]
    assert "--learning-rate" in command and command[command.index("--learning-rate") + 1] == "0.01"
    retrained = run_main_in_process(train.main, *command[3:], "--no-progress")
    assert retrained.returncode == 0, retrained.stderr
    assert without_timings(read_metrics(f"{sweep_dir}-best")) == without_timings(read_metrics(sweep_dir / "trial-000"))

    # Run again: the study is done and nothing trains. Another search, or another study, in this folder is refused.
    again = run_main_in_process(sweep.main, *args)
    assert again.returncode == 0 and "->" not in again.stdout.split("| rank")[0], again.stdout
    other = run_main_in_process(sweep.main, *args[:-1], "learning_rate=1e-7,0.03")
    assert other.returncode == 2 and "holds another sweep (its distributions, grid differ)" in other.stderr
    renamed = run_main_in_process(sweep.main, *args, "--study", "another")
    assert renamed.returncode == 2 and "holds the trials of study 'sweep', not 'another'" in renamed.stderr


class WorkerKilled(BaseException):
    """Ends a worker in this process as SIGKILL ends one: nothing catches it, no trial is told, the worker's lock
    file stays (free) and its lock on the trial's workdir goes."""


def test_a_killed_trial_is_finished_from_its_checkpoint_with_what_an_uninterrupted_sweep_draws(tiny_data_dir,
                                                                                             tmp_path):
    import jax

    jax.devices()  # the backend is up before the sweep, so it cannot change this process's device count

    def run(folder, kill_in=None):
        """One worker of the same TPE sweep; with `kill_in`, killed after that trial's first checkpoint, before the
        study hears of the epoch. Seeds as parameters: the trials differ without compiling again."""
        args = sweep.parse_args([
            "--workdir", str(folder), "--data-dir", str(tiny_data_dir), *TINY_FLAGS, *SMALL_MODEL_FLAGS,
            "--epochs", "2", "--validation-fraction", "0.25", "--train-examples", "96", "--search", "seed=0:1000",
            "--trials", "3"])

        def options_for(path):
            options = RunOptions(workdir=path, data_dir=str(tiny_data_dir), devices=1, progress=False, plots=False,
                                 tensorboard=False)
            if kill_in and path.endswith(kill_in):
                def killed(history):
                    raise WorkerKilled
                options = dataclasses.replace(options, after_epoch=killed)
            return options

        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            study = sweep.run(args, sweep.plan_from_args(args), options_for)
        return study, output.getvalue()

    uninterrupted, _ = run(tmp_path / "uninterrupted")
    folder = tmp_path / "killed"
    with pytest.raises(WorkerKilled):
        run(folder, kill_in="trial-001")
    killed = optuna.load_study(study_name="killed", storage=journal(folder)).trials
    assert [t.state for t in killed] == [TrialState.COMPLETE, TrialState.RUNNING]
    assert killed[1].intermediate_values == {}  # the study never heard of the checkpointed epoch
    assert [e["epoch"] for e in read_metrics(folder / "trial-001")] == [1]
    finished = snapshot(folder / "trial-000")

    resumed, stdout = run(folder)  # a new worker: it takes the orphan over before drawing trial 2
    assert re.search(r"^trial-001 \(seed=\d+\) \(taken over from a worker that died\) ->", stdout, re.M), stdout
    assert "resumed from" in stdout and "at epoch 1" in stdout
    assert stdout.index("trial-001") < stdout.index("trial-002")
    assert snapshot(folder / "trial-000") == finished
    assert [e["epoch"] for e in read_metrics(folder / "trial-001")] == [1, 2]
    assert list((folder / "workers").iterdir()) == []  # the dead worker's lock went with its trial, the new one's too

    def outcome(study):
        return [(t.number, t.state, t.params, t.value, t.intermediate_values) for t in study.trials]

    assert outcome(resumed) == outcome(uninterrupted)
    assert len({t.params["seed"] for t in resumed.trials}) == 3
    for number in range(3):
        assert (without_timings(read_metrics(folder / f"trial-{number:03d}"))
                == without_timings(read_metrics(tmp_path / "uninterrupted" / f"trial-{number:03d}")))


# ------------------------------------------------------------------------------------------------ workers (e2e)
def claimed_trials(stdout_path) -> list[str]:
    return re.findall(r"^(trial-\d{3}) \(.*\) -> ", stdout_path.read_text(), re.M)


@pytest.mark.e2e
@pytest.mark.parametrize("backend", ["journal", "postgresql"])
def test_two_workers_share_a_study_and_a_killed_one_is_finished_from_its_checkpoint(backend, tiny_data_dir, tmp_path,
                                                                                   request):
    """Two `python -m mnist_jax.sweep` commands on one study: the embedded journal, or a PostgreSQL server of the
    test's own. One is killed with SIGKILL in the middle of a trial and started again: the trial is finished from
    its checkpoint (by whichever worker claims next), every grid point is trained once, and the study ends with
    the grid's trials, all complete."""
    storage = []
    if backend == "postgresql":
        server = PostgresServer()
        request.addfinalizer(server.stop)
        storage = ["--storage", server.url]
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "-m", "mnist_jax.sweep", "--workdir", str(sweep_dir), "--data-dir", str(tiny_data_dir),
               *TINY_FLAGS, "--epochs", "3", "--validation-fraction", "0.25", "--grid", "seed=0,1,2,3,4", *storage]

    def start(name):
        with open(tmp_path / f"{name}.stdout", "w") as stdout, open(tmp_path / f"{name}.stderr", "w") as stderr:
            return subprocess.Popen(command, env=cli_env(), cwd=REPO, stdout=stdout, stderr=stderr)

    workers = {"a": start("a"), "b": start("b")}
    victim = None
    deadline = time.time() + 300
    while time.time() < deadline and workers["a"].poll() is None:
        claimed = claimed_trials(tmp_path / "a.stdout")
        if claimed:
            epochs = len(read_metrics(sweep_dir / claimed[-1]))
            if 1 <= epochs < 3:  # a's current trial is a checkpoint in
                victim = claimed[-1]
                break
        time.sleep(0.05)
    workers["a"].send_signal(signal.SIGKILL)
    workers["a"].wait()
    assert victim is not None and workers["a"].returncode == -signal.SIGKILL, (tmp_path / "a.stderr").read_text()
    epochs_at_kill = len(read_metrics(sweep_dir / victim))

    workers["again"] = start("again")
    for name in ("b", "again"):
        assert workers[name].wait(timeout=600) == 0, (tmp_path / f"{name}.stderr").read_text()

    logs = {name: (tmp_path / f"{name}.stdout").read_text() for name in ("a", "b", "again")}
    taken_over = [name for name in ("b", "again")
                  if re.search(rf"^{victim} \(.*\) \(taken over from a worker that died\) -> ", logs[name], re.M)]
    assert len(taken_over) == 1, logs
    # Resumed from its checkpoint (or found complete, had the kill come after its last one).
    resumed = re.search(rf"resumed from \S*{victim} at epoch (\d)|run complete: 3 epochs already trained in "
                        rf"\S*{victim}", logs[taken_over[0]])
    assert resumed and int(resumed.group(1) or 3) >= epochs_at_kill, logs[taken_over[0]]
    assert claimed_trials(tmp_path / "b.stdout"), "worker b trained nothing: the workers did not share the study"

    loaded = optuna.load_study(study_name="sweep", storage=server.url if storage else journal(sweep_dir))
    assert [t.state for t in loaded.trials] == [TrialState.COMPLETE] * 5
    assert sorted(t.params["seed"] for t in loaded.trials) == [0, 1, 2, 3, 4]  # no grid point twice
    for trial in loaded.trials:  # each epoch of each trial trained once
        assert [e["epoch"] for e in read_metrics(sweep_dir / f"trial-{trial.number:03d}")] == [1, 2, 3]
    with open(sweep_dir / "results.csv") as handle:
        assert sorted(row["state"] for row in csv.DictReader(handle)) == ["complete"] * 5
