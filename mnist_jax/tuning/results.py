"""A sweep's results, read from its study (so any worker, on any machine, writes the same): the trials ranked on
validation accuracy in SWEEP/results.csv and results.md, Optuna's plots as PNGs, and the `train` command that
reproduces the best trial.
"""

from __future__ import annotations

import csv
import io
import os
import shlex
import warnings
from typing import Any

import optuna
from optuna.trial import TrialState

from mnist_jax import workdir
from mnist_jax.config import Config, changed_flags
from mnist_jax.tuning import space
from mnist_jax.tuning.worker import ERROR_ATTR, SUMMARY_ATTR, trial_name

SUMMARY_COLUMNS = ["validation_accuracy", "test_accuracy", "best_epoch", "epochs", "wall_seconds"]
TARGET = "validation accuracy"
PLOTS = {  # file -> Optuna's matplotlib function, the finished trials it needs to say anything, its keywords
    "optimization_history.png": ("plot_optimization_history", 1, {"target_name": TARGET}),
    "intermediate_values.png": ("plot_intermediate_values", 1, {}),
    "param_importances.png": ("plot_param_importances", 2, {"target_name": TARGET}),
    "slice.png": ("plot_slice", 2, {"target_name": TARGET}),
}


def columns(names: list[str]) -> list[str]:
    return ["rank", "trial", "state", *names, *SUMMARY_COLUMNS]


def ranked_rows(study: optuna.Study, names: list[str]) -> list[dict[str, Any]]:
    """One row per trial: finished trials first, best validation accuracy first (never test); then pruned ones,
    likewise; then running and failed ones. Test accuracy is read at the trial's best validation epoch."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        summary = trial.user_attrs.get(SUMMARY_ATTR, {})
        rows.append({
            "trial": trial_name(trial.number),
            "state": trial.state.name.lower(),
            **{name: trial.params.get(name, "") for name in names},
            **{column: summary.get(column, "") for column in SUMMARY_COLUMNS},
            "error": trial.user_attrs.get(ERROR_ATTR, ""),
        })
    order = {TrialState.COMPLETE.name.lower(): 0, TrialState.PRUNED.name.lower(): 1}
    rows.sort(key=lambda row: (order.get(row["state"], 2), -(row["validation_accuracy"] or 0), row["trial"]))
    return [{"rank": rank, **row} for rank, row in enumerate(rows, start=1)]


def format_markdown(rows: list[dict[str, Any]], names: list[str]) -> str:
    def cell(name: str, value: Any) -> str:
        if value == "":
            return ""
        if name.endswith("accuracy"):
            return f"{value:.2%}"
        return f"{value:.4g}" if isinstance(value, float) and name in names else str(value)

    header = columns(names)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c, row[c]) for c in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(sweep_dir: str, study: optuna.Study, names: list[str]) -> list[dict[str, Any]]:
    """results.csv, results.md and the plots, each replaced atomically; returns the ranked rows."""
    rows = ranked_rows(study, names)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*columns(names), "error"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    workdir.write_atomic(os.path.join(sweep_dir, workdir.SWEEP_RESULTS_FILE), buffer.getvalue())
    workdir.write_atomic(os.path.join(sweep_dir, "results.md"), format_markdown(rows, names))
    write_plots(sweep_dir, study, rows, names)
    return rows


def write_plots(sweep_dir: str, study: optuna.Study, rows: list[dict[str, Any]], names: list[str]) -> None:
    """Optuna's plots (history, every trial's per-epoch validation accuracy, pruned ones included, parameter
    importances, slices) and sweep.png (validation and test accuracy of each trial with a finished epoch)."""
    import matplotlib
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as optuna_plots
    from matplotlib.ticker import MaxNLocator

    from mnist_jax.plots import plot_sweep, save_atomically

    measured = [row for row in rows if row["validation_accuracy"] != ""]
    if measured:
        plot_sweep(measured, names, os.path.join(sweep_dir, "sweep.png"))
    finished = sum(row["state"] == TrialState.COMPLETE.name.lower() for row in rows)
    # Optuna draws through pyplot and sets its own style: both stay inside this block.
    with matplotlib.rc_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its plots are experimental, and say so on every call
        for file, (function, needed, keywords) in PLOTS.items():
            if finished < needed:
                continue
            axes = getattr(optuna_plots, function)(study, **keywords)
            first = axes.flat[0] if hasattr(axes, "flat") else axes
            if function == "plot_intermediate_values":
                first.xaxis.set_major_locator(MaxNLocator(integer=True))
                first.set_xlabel("epoch")
                first.set_ylabel(f"{TARGET} (pruned trials included)")
            save_atomically(first.figure, os.path.join(sweep_dir, file), bbox_inches="tight")
            plt.close(first.figure)


def train_command(config: Config, workdir_path: str, data_dir: str | None) -> str:
    """The `train` command that trains `config` again: every field that differs from the training defaults."""
    words = ["python", "-m", "mnist_jax.train", "--workdir", workdir_path]
    if data_dir:
        words += ["--data-dir", data_dir]
    words += changed_flags(config, lambda field: field.metadata["flag"])
    return shlex.join(words)


def best_line(study: optuna.Study, base: Config, sweep_dir: str, data_dir: str | None) -> str | None:
    """The last line of a sweep: its best finished trial and the command that reproduces it, or None."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    best = study.best_trial
    summary = best.user_attrs[SUMMARY_ATTR]
    config = space.trial_config(base, best.params)
    command = train_command(config, f"{os.path.normpath(sweep_dir)}-best", data_dir)
    return (f"best on validation: {trial_name(best.number)} ({summary['validation_accuracy']:.2%}, test "
            f"{summary['test_accuracy']:.2%}) -> {os.path.join(sweep_dir, trial_name(best.number))}; "
            f"again: {command}")
