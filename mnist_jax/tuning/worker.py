"""A sweep worker: claims the study's trials one at a time and trains each in SWEEP/trial-NNN/ (NNN: the trial's
number), reporting validation accuracy after every epoch to the pruner, until the study holds `--trials` trials
and none is left unfinished.

Workers that die. Each worker holds a lock file of its own, SWEEP/workers/NAME.lock, for as long as it lives, and
names it in every trial it claims (the trial's `worker` user attribute). The kernel releases a dead process's lock
however it died (`kill -9` included), so a RUNNING trial whose worker's lock is free is an orphan: the next claim
takes it over, with its number and parameters, and trains its workdir on from the last checkpoint. Claims are made
under SWEEP/claim.lock, so two workers never take the same orphan, and an orphan is finished before any new trial
is drawn, as the uninterrupted sweep would have. A worker that cannot see a trial's worker lock (another machine,
the sweep folder not shared) leaves that trial to the workers that can: its checkpoints are where they are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import socket
import uuid
from typing import Any, Callable, Iterator

import optuna
from optuna.trial import TrialState

from mnist_jax import workdir
from mnist_jax.config import Config, RunOptions, UserError, validate
from mnist_jax.training import train_and_evaluate
from mnist_jax.tuning import space
from mnist_jax.tuning.study import Plan, pruner_for, sampler_for

WORKERS_DIR = "workers"
CLAIM_LOCK = "claim.lock"
WORKER_ATTR = "worker"
SUMMARY_ATTR = "summary"
ERROR_ATTR = "error"
# A worker records itself in a trial right after asking for it; a RUNNING trial still without a record after this
# long belongs to a worker that died in between.
RECORD_GRACE = datetime.timedelta(minutes=10)
ALL_FIELDS = {f.name for f in dataclasses.fields(Config)}


def trial_name(number: int) -> str:
    return f"trial-{number:03d}"


def trial_dir(sweep_dir: str, number: int) -> str:
    return os.path.join(sweep_dir, trial_name(number))


# ------------------------------------------------------------------------------------------------ locks
@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """Holds an exclusive flock on `path` (created) for the body, waiting for it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def worker_lock(sweep_dir: str) -> Iterator[str]:
    """This worker's lock, held until the body ends; yields its name, unique across machines and restarts. The
    file is removed when the body ends normally, with every claimed trial told; after an error it stays, free, so
    the other workers see that the trial left running has no live worker."""
    name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path = os.path.join(sweep_dir, WORKERS_DIR, f"{name}.lock")
    with _locked(path):
        yield name
    os.unlink(path)


def claim_lock(sweep_dir: str) -> contextlib.AbstractContextManager[None]:
    """SWEEP/claim.lock: the workers sharing the sweep folder claim trials (and create the study) one at a time."""
    return _locked(os.path.join(sweep_dir, CLAIM_LOCK))


def _worker_is_dead(sweep_dir: str, name: str) -> bool:
    """Whether the worker's lock file is here and free; False when it is held or cannot be seen."""
    try:
        fd = os.open(os.path.join(sweep_dir, WORKERS_DIR, f"{name}.lock"), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def orphaned(sweep_dir: str, trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a RUNNING trial's worker is known to be dead."""
    name = trial.user_attrs.get(WORKER_ATTR)
    if name is None:
        return datetime.datetime.now() - trial.datetime_start > RECORD_GRACE
    return _worker_is_dead(sweep_dir, name)


# ------------------------------------------------------------------------------------------------ claims
@dataclasses.dataclass
class Claim:
    """A trial this worker trains: Optuna's handle (process 0 only), its number and parameters, and the epochs
    already reported to the study (by a worker that died)."""

    trial: optuna.trial.Trial | None
    number: int
    params: dict[str, Any]
    reported: set[int]
    taken_over: bool


def claim(sweep_dir: str, storage: optuna.storages.BaseStorage, study_name: str, plan: Plan,
          worker: str) -> Claim | None:
    """The next trial to train: an orphan, taken over, else a new one while the study holds fewer than
    `plan.trials`; None when the sweep is done for this worker."""
    with claim_lock(sweep_dir):
        study = optuna.load_study(study_name=study_name, storage=storage, pruner=pruner_for(plan))
        trials = study.get_trials(deepcopy=False)
        orphan = next((t for t in trials if t.state == TrialState.RUNNING and orphaned(sweep_dir, t)), None)
        if orphan is not None:
            # Optuna has no call to reopen a running trial; its Trial object on the stored trial is the handle
            # `ask` would give, with the same number, parameters and reports.
            trial_id = storage.get_trial_id_from_study_id_trial_number(
                storage.get_study_id_from_name(study_name), orphan.number)
            trial = optuna.trial.Trial(study, trial_id)
            dead = orphan.user_attrs.get(WORKER_ATTR)
            if dead is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(sweep_dir, WORKERS_DIR, f"{dead}.lock"))
            reported = set(orphan.intermediate_values)
        elif len(trials) < plan.trials or any(t.state == TrialState.WAITING for t in trials):
            study.sampler = sampler_for(plan, len(trials))
            trial = study.ask(plan.space.distributions)  # a waiting (enqueued) trial first
            reported = set()
        else:
            return None
        trial.set_user_attr(WORKER_ATTR, worker)
        return Claim(trial, trial.number, dict(trial.params), reported, orphan is not None)


# ------------------------------------------------------------------------------------------------ one trial
def summarize(history: list[dict[str, Any]], epochs: int) -> dict[str, Any]:
    """A trial's result: its best epoch by validation accuracy (test read at that epoch), epochs, wall time."""
    best = max(history, key=lambda entry: (entry["validation_accuracy"], -entry["epoch"]))
    return {
        "validation_accuracy": best["validation_accuracy"],
        "test_accuracy": best["test_accuracy"],
        "best_epoch": best["epoch"],
        "epochs": f"{len(history)}/{epochs}",
        "wall_seconds": round(wall_seconds(history), 1),
    }


def wall_seconds(history: list[dict[str, Any]]) -> float:
    """Training wall time summed over every process that worked on the run (elapsed restarts on resume)."""
    total, previous = 0.0, 0.0
    for entry in history:
        elapsed = entry["elapsed_seconds"]
        total += elapsed - previous if elapsed > previous else elapsed
        previous = elapsed
    return total


def report(claim: Claim, history: list[dict[str, Any]], epochs: int) -> bool:
    """Reports the epochs the study has not heard of (process 0); whether the pruner stops the trial there."""
    for entry in history:
        if entry["epoch"] not in claim.reported:
            claim.trial.report(entry["validation_accuracy"], entry["epoch"])
            claim.reported.add(entry["epoch"])
    claim.trial.set_user_attr(SUMMARY_ATTR, summarize(history, epochs))
    return len(history) < epochs and claim.trial.should_prune()


def agreed(key: str, decide: Callable[[], str]) -> str:
    """`decide()` on this process, or in a multi-process sweep process 0's answer on every process."""
    import jax

    if jax.process_count() == 1:
        return decide()
    from mnist_jax.distributed import cluster

    return cluster.from_primary(f"mnist_jax/sweep/{key}", decide)


def train_trial(sweep_dir: str, plan: Plan, claim: Claim, options_for: Callable[[str], RunOptions]) -> str:
    """Trains (or finishes) the claimed trial and tells the study how it ended (process 0); returns how, in words.
    An `after_epoch` in the caller's options runs first, and stops the trial as the pruner would."""
    path = trial_dir(sweep_dir, claim.number)
    config = space.trial_config(plan.base, claim.params)
    primary = claim.trial is not None
    try:
        validate(config)  # a combination the space allows but the recipe does not: this trial fails, the sweep goes on
    except UserError as error:
        if primary:
            claim.trial.set_user_attr(ERROR_ATTR, str(error))
            claim.trial.study.tell(claim.trial, state=TrialState.FAIL)
        return f"failed: {error}"
    workdir.resolve_config(path, config, ALL_FIELDS)  # a folder holding another run is refused, never mixed in

    options = options_for(path)

    def after_epoch(history: list[dict[str, Any]]) -> bool:
        if options.after_epoch is not None and options.after_epoch(history):
            return True
        stop = agreed(f"prune/{claim.number}/{len(history)}",
                      lambda: "stop" if report(claim, history, config.epochs) else "")
        return bool(stop)

    history = train_and_evaluate(config, dataclasses.replace(options, after_epoch=after_epoch))
    if not primary:
        return "trained"
    report(claim, history, config.epochs)  # a run found complete trains nothing and reports nothing by itself
    summary = summarize(history, config.epochs)
    if len(history) < config.epochs:
        claim.trial.study.tell(claim.trial, state=TrialState.PRUNED)
        return f"pruned after epoch {len(history)} (validation accuracy {history[-1]['validation_accuracy']:.2%})"
    claim.trial.study.tell(claim.trial, summary["validation_accuracy"])
    return f"finished: validation accuracy {summary['validation_accuracy']:.2%} at epoch {summary['best_epoch']}"


def run_worker(sweep_dir: str, storage: optuna.storages.BaseStorage | None, study_name: str, plan: Plan,
               options_for: Callable[[str], RunOptions],
               after_trial: Callable[[], None] = lambda: None) -> int:
    """Claims and trains trials until the study is done (`storage`: process 0's; None on the others of a
    multi-process sweep, which train what process 0 claims); returns how many this worker trained."""
    trained, primary = 0, storage is not None
    with worker_lock(sweep_dir) if primary else contextlib.nullcontext("") as worker:
        while True:
            current = claim(sweep_dir, storage, study_name, plan, worker) if primary else None
            text = agreed(f"claim/{trained}", lambda: json.dumps(
                None if current is None else {"number": current.number, "params": current.params}))
            if json.loads(text) is None:
                return trained
            if current is None:
                shared = json.loads(text)
                current = Claim(None, shared["number"], shared["params"], set(), False)
            if primary:
                how = " (taken over from a worker that died)" if current.taken_over else ""
                print(f"{trial_name(current.number)} ({space.describe(current.params)}){how} -> "
                      f"{trial_dir(sweep_dir, current.number)}", flush=True)
            outcome = train_trial(sweep_dir, plan, current, options_for)
            trained += 1
            if primary:
                print(f"{trial_name(current.number)} {outcome}", flush=True)
                after_trial()
