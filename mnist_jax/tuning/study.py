"""Where a sweep's Optuna study lives and how it chooses: the storage, the study and its plan, each trial's
sampler and the pruner.

The default storage is a journal file in the sweep folder, SWEEP/study.journal: Optuna's append-only log, written
under a file lock, which any number of worker processes on one machine (or on a shared filesystem) share without a
server; SQLite, the other server-less choice, makes concurrent writers wait on its single database lock and gives
up after a timeout. `--storage URL` takes any Optuna RDB URL: PostgreSQL is the many-machines case.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from typing import Any

import optuna
from optuna.distributions import distribution_to_json

from mnist_jax import workdir
from mnist_jax.config import Config, UserError
from mnist_jax.tuning.space import SearchSpace

JOURNAL_FILE = "study.journal"
FOLDER_FILE = workdir.SWEEP_PLAN_FILE  # the reading tools recognise a sweep by it
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
PLAN_ATTR = "mnist_jax_plan"
TABLE_RACE_ATTEMPTS = 5


@dataclasses.dataclass(frozen=True)
class Plan:
    """What every worker of a study must agree on; the first worker stores it in the study, the others check it."""

    base: Config
    space: SearchSpace
    sampler: str
    pruner: str
    trials: int
    sampler_seed: int

    @property
    def max_epochs(self) -> int:
        """The most epochs a trial trains: the pruners' full budget."""
        distribution = self.space.distributions.get("epochs")
        if isinstance(distribution, optuna.distributions.CategoricalDistribution):
            return max(int(value) for value in distribution.choices)
        return int(distribution.high) if distribution is not None else self.base.epochs

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps({
            "base": dataclasses.asdict(self.base),
            "grid": self.space.grid,
            "distributions": {name: json.loads(distribution_to_json(distribution))
                              for name, distribution in self.space.distributions.items()},
            "sampler": self.sampler,
            "pruner": self.pruner,
            "trials": self.trials,
            "sampler_seed": self.sampler_seed,
        }))


def _rdb_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage at `url`; a missing driver, a malformed URL or an unreachable server is a UserError."""
    import sqlalchemy

    try:
        parsed = sqlalchemy.engine.make_url(url)
        parsed.get_dialect().import_dbapi()
    except ImportError as error:
        raise UserError(f"--storage {url.partition(':')[0]}://...: its database driver is not installed "
                        f"({error}); for PostgreSQL: pip install 'mnist_jax[tune]'") from None
    except sqlalchemy.exc.ArgumentError as error:
        raise UserError(f"--storage: not a database URL ({error})") from None
    for attempt in itertools.count(1):
        try:
            # A trial can last hours, long enough for a server or a firewall to drop an idle connection: each
            # checkout tests its connection first.
            return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as error:
            # Workers started together on a new database race to create Optuna's tables; the losers find them made.
            if attempt < TABLE_RACE_ATTEMPTS:
                time.sleep(attempt)
                continue
            failure = error
        except sqlalchemy.exc.SQLAlchemyError as error:
            failure = error
        reason = str(getattr(failure, "orig", None) or failure).strip().splitlines()[0]
        raise UserError(f"cannot open --storage {parsed.render_as_string(hide_password=True)}: {reason}") from None


def open_storage(sweep_dir: str, url: str | None) -> optuna.storages.BaseStorage:
    """The study's storage: `url`, or the journal file in the sweep folder (created with it)."""
    if url is not None:
        return _rdb_storage(url)
    os.makedirs(sweep_dir, exist_ok=True)
    return optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(os.path.join(sweep_dir, JOURNAL_FILE)))


def bind_folder(sweep_dir: str, name: str) -> None:
    """SWEEP/study.json names the study whose trials the folder holds; another study is refused, since its
    trial-NNN folders would be taken for this one's."""
    path = os.path.join(sweep_dir, FOLDER_FILE)
    if not os.path.exists(path):
        workdir.write_atomic(path, json.dumps({"study": name}) + "\n")
        return
    with open(path) as handle:
        bound = json.load(handle).get("study")
    if bound != name:
        raise UserError(f"{sweep_dir} holds the trials of study {bound!r}, not {name!r}; use another --workdir")


def open_study(storage: optuna.storages.BaseStorage, name: str, plan: Plan) -> optuna.Study:
    """The study `name`, created with `plan` or checked against the plan it holds."""
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True)
    wanted = plan.to_json()
    if PLAN_ATTR not in study.user_attrs:
        study.set_user_attr(PLAN_ATTR, wanted)
    saved = study.user_attrs[PLAN_ATTR]
    if saved != wanted:
        differing = sorted(key for key in set(saved) | set(wanted) if saved.get(key) != wanted.get(key))
        raise UserError(f"study {name!r} holds another sweep (its {', '.join(differing)} differ); "
                        "use another --study or --workdir")
    return study


class AskAndTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, whose `after_trial` stops `Study.optimize` once every point is taken, something
    `Study.tell` cannot do; a sweep's workers stop by counting trials instead."""

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                    state: optuna.trial.TrialState, values: Any) -> None:
        pass


def sampler_for(plan: Plan, trials_so_far: int) -> optuna.samplers.BaseSampler:
    """The sampler of the next new trial. Optuna keeps no sampler state in storage, so TPE and random sampling are
    seeded from `--sampler-seed` plus the trials already in the study: a sweep resumed after a crash draws what an
    uninterrupted one would. The grid sampler keeps one seed, which fixes its order, on every worker."""
    if plan.sampler == "grid":
        return AskAndTellGridSampler(plan.space.grid, seed=plan.sampler_seed)
    seed = plan.sampler_seed + trials_so_far
    if plan.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def pruner_for(plan: Plan) -> optuna.pruners.BasePruner:
    """The pruner by name, with Optuna's defaults: trials report validation accuracy after each epoch (a step)."""
    if plan.pruner == "median":
        return optuna.pruners.MedianPruner()
    if plan.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=plan.max_epochs)
    return optuna.pruners.NopPruner()
