"""When does transfer learning pay? Scratch vs transfer (frozen features, full fine-tune) at N training examples.

    python benchmarks/transfer_study.py --workdir runs/transfer-study

For each direction (MNIST -> fashion_mnist, fashion_mnist -> MNIST), each N in --sizes and each seed, it trains
three runs on a class-balanced subset of N target training examples: from scratch, from the source's best
checkpoint with the conv features frozen, and from it fully fine-tuned. The two sources are trained once with
the default recipe into WORKDIR/sources/. Every run is an ordinary workdir under WORKDIR/runs/, trained
in-process with `train_and_evaluate`, so an interrupted study picks up where it stopped (finished runs are
read back, not retrained). Each run's score is its final test accuracy on the full test split (never the best
epoch: choosing by test accuracy would flatter every method).

Writes WORKDIR/transfer_study.md (mean ± std over seeds), WORKDIR/transfer_study.json (every run) and
WORKDIR/transfer_study.png (accuracy vs N per method, one panel per direction).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any

from mnist_jax import backend, transfer, workdir
from mnist_jax.cli import ArgumentParser, quiet_libraries
from mnist_jax.config import Config, RunOptions
from mnist_jax.training import train_and_evaluate

DIRECTIONS = (("mnist", "fashion_mnist"), ("fashion_mnist", "mnist"))
METHODS = ("scratch", "transfer-frozen", "transfer-finetune")


def recipe(size: int) -> dict[str, int]:
    """Batch size and epochs for N examples: a comparable number of steps (~150-400) whatever N is.

    An epoch of 100 examples is 5 steps, so small N needs many epochs; each epoch also costs a full test pass
    and a checkpoint, which is what bounds the epochs of the smallest N on a 2-core CPU.
    """
    if size <= 100:
        return {"batch_size": 20, "epochs": 30}  # 5 steps/epoch: 150 steps, 30 passes over the data
    if size <= 1000:
        return {"batch_size": 50, "epochs": 15}  # 20 steps/epoch: 300 steps
    return {"batch_size": 128, "epochs": max(1, round(400 * 128 / size))}  # 10,000: 78 steps/epoch, 5 epochs


def run_config(target: str, size: int, seed: int) -> Config:
    """The training settings every method shares at this N and seed (the default recipe otherwise)."""
    return Config(dataset=target, train_examples=size, seed=seed, keep_checkpoints=1, **recipe(size))


def train_source(root: str, dataset: str, data_dir: str | None) -> str:
    """The source run for `dataset`, trained once with the default recipe (a finished one is reused)."""
    path = os.path.join(root, "sources", dataset)
    history = train_and_evaluate(Config(dataset=dataset), RunOptions(workdir=path, data_dir=data_dir,
                                                                     progress=False))
    print(f"source {dataset}: test accuracy {history[-1]['test_accuracy']:.2%}", flush=True)
    return path


def train_one(root: str, source_dir: str, source: str, target: str, method: str, size: int, seed: int,
              data_dir: str | None) -> dict[str, Any]:
    """One run of the grid; returns its result row."""
    base = run_config(target, size, seed)
    # The recipe is part of the path: a changed recipe trains new runs instead of resuming old ones.
    run_dir = os.path.join(root, "runs", target, f"n{size}-b{base.batch_size}-e{base.epochs}",
                           method if method == "scratch" else f"{method}-from-{source}", f"seed{seed}")
    options = RunOptions(workdir=run_dir, data_dir=data_dir, progress=False, plots=False)
    if method != "scratch":
        freeze = "features" if method == "transfer-frozen" else "none"
        base = transfer.plan(run_dir, source_dir, dataclasses.replace(base, freeze=freeze), set(), data_dir)
        options = dataclasses.replace(options, initial_state=transfer.initial_state_from(source_dir))
    started = time.time()
    history = train_and_evaluate(base, options)
    return {
        "source": source, "target": target, "method": method, "train_examples": size, "seed": seed,
        "batch_size": base.batch_size, "epochs": base.epochs, "steps": history[-1]["step"],
        "test_accuracy": history[-1]["test_accuracy"], "best_epoch_test_accuracy":
        max(h["test_accuracy"] for h in history), "wall_seconds": time.time() - started, "workdir": run_dir,
    }


def summarise(rows: list[dict[str, Any]]) -> dict[tuple[str, str, int, str], tuple[float, float, int]]:
    """(source, target, N, method) -> (mean, sample std, count) of the final test accuracy over seeds."""
    groups: dict[tuple[str, str, int, str], list[float]] = {}
    for row in rows:
        key = (row["source"], row["target"], row["train_examples"], row["method"])
        groups.setdefault(key, []).append(row["test_accuracy"])
    return {k: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for k, v in groups.items()}


def markdown_table(summary, sizes: list[int]) -> str:
    """One row per direction and N, one column per method: mean ± std of test accuracy (%) over seeds."""
    lines = ["| direction | N | " + " | ".join(METHODS) + " |", "| --- | ---: |" + " ---: |" * len(METHODS)]
    for source, target in DIRECTIONS:
        for size in sizes:
            cells = []
            for method in METHODS:
                mean, std, count = summary.get((source, target, size, method), (float("nan"), 0.0, 0))
                cells.append(f"{100 * mean:.2f} ± {100 * std:.2f}" if count else "-")
            lines.append(f"| {source} -> {target} | {size:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def verdicts(summary, sizes: list[int]) -> str:
    """Per direction and N: does the better transfer method beat scratch by more than the seed-to-seed spread?

    "Spread" is the larger of the two methods' sample standard deviations over seeds; a gain within it is not
    called a win.
    """
    lines = []
    for source, target in DIRECTIONS:
        for size in sizes:
            keys = [(source, target, size, m) for m in METHODS]
            if not all(k in summary for k in keys):
                continue
            scratch = summary[keys[0]]
            best_key = max(keys[1:], key=lambda k: summary[k][0])
            best = summary[best_key]
            gain, spread = 100 * (best[0] - scratch[0]), 100 * max(best[1], scratch[1])
            verdict = "beats scratch" if gain > spread else ("loses to scratch" if -gain > spread else
                                                              "within the seed spread of scratch")
            lines.append(f"- {source} -> {target}, N={size:,}: better transfer ({best_key[3]}) "
                         f"{gain:+.2f} pp vs scratch, spread {spread:.2f} pp: {verdict}")
    return "\n".join(lines) + "\n"


def plot(summary, sizes: list[int], path: str) -> None:
    """Accuracy vs N (log x), one line with seed-spread error bars per method, one panel per direction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(DIRECTIONS), figsize=(6 * len(DIRECTIONS), 4.2))
    for axis, (source, target) in zip(axes, DIRECTIONS):
        for method in METHODS:
            points = [(n, *summary[(source, target, n, method)][:2]) for n in sizes
                      if (source, target, n, method) in summary]
            if points:
                ns, means, stds = zip(*points)
                axis.errorbar(ns, [100 * m for m in means], yerr=[100 * s for s in stds], marker="o", capsize=4,
                              label=method)
        axis.set_xscale("log")
        axis.set_xlabel(f"{target} training examples (N)")
        axis.set_ylabel("test accuracy (%)")
        axis.set_title(f"{source} -> {target}")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_reports(root: str, rows: list[dict[str, Any]], sizes: list[int], wall: float) -> None:
    summary = summarise(rows)
    header = (f"Final test accuracy (%) on the full test split, mean ± sample std over seeds "
              f"({len(rows)} runs, {wall / 60:.1f} min).\n\n")
    report = header + markdown_table(summary, sizes) + "\n" + verdicts(summary, sizes)
    workdir.write_atomic(os.path.join(root, "transfer_study.md"), report)
    workdir.write_atomic(os.path.join(root, "transfer_study.json"), json.dumps(rows, indent=1) + "\n")
    plot(summary, sizes, os.path.join(root, "transfer_study.png"))


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="cache of sources and runs; the reports land here")
    parser.add_argument("--data-dir", help="tfds data directory holding mnist and fashion_mnist")
    parser.add_argument("--sizes", default="100,1000,10000", help="N values, comma-separated")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per (direction, N, method)")
    parser.add_argument("--report-only", type=float, metavar="WALL_SECONDS",
                        help="only rewrite the reports from WORKDIR/transfer_study.json (the study took this long)")
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.sizes.split(",")]
    if args.report_only is not None:
        with open(os.path.join(args.workdir, "transfer_study.json")) as handle:
            write_reports(args.workdir, json.load(handle), sizes, args.report_only)
        return 0
    quiet_libraries()
    backend.use_every_cpu_core()
    started = time.time()
    sources = {name: train_source(args.workdir, name, args.data_dir) for name in {s for s, _ in DIRECTIONS}}
    rows: list[dict[str, Any]] = []
    for seed in range(args.seeds):  # seed outermost: after the first seed the full table exists, and its time
        for size in sizes:  # times the seed count is the study's
            for source, target in DIRECTIONS:
                for method in METHODS:
                    row = train_one(args.workdir, sources[source], source, target, method, size, seed,
                                    args.data_dir)
                    rows.append(row)
                    print(f"{source}->{target} N={size} seed={seed} {method}: {row['test_accuracy']:.2%} "
                          f"({row['wall_seconds']:.0f} s, total {(time.time() - started) / 60:.1f} min)",
                          flush=True)
        write_reports(args.workdir, rows, sizes, time.time() - started)
    print(f"study done in {(time.time() - started) / 60:.1f} min -> {args.workdir}/transfer_study.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
