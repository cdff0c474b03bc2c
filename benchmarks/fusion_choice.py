"""Which XLA:CPU YNNPACK fusions make our train step fastest on this CPU, measured in one process.

    python benchmarks/fusion_choice.py                          # the default model, one JAX device per core
    python benchmarks/fusion_choice.py --config strong --cpu-devices 1

`backend.compiler_options` picks the fusions from the CPU's vendor and flags (docs/performance.md); this checks
that pick on the machine at hand. Each candidate compiles the train step `train` runs (the preset's model,
augmentation, optimiser, moving average and label smoothing) once; the same batches then go through every
candidate in alternating windows, so a shared machine's drift slows them all alike (two runs of
`step_throughput.py` a few minutes apart differed by up to 2x on such a machine). The row marked `*` is what
`train` compiles with here. The fastest candidate is a lead, not a verdict: rerun it, and change
`backend.compiler_options` only where a choice wins on every run. `--markdown` prints the table as Markdown for
docs/performance.md.
"""

from __future__ import annotations

if __name__ == "__main__":  # as `python -m mnist_jax.train` runs: glibc's malloc on huge pages (mnist_jax.backend)
    from mnist_jax.backend import restart_with_huge_pages

    restart_with_huge_pages()

import argparse
import functools
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mnist_jax import backend, sharding, steps
from mnist_jax.cli import ArgumentParser, quiet_libraries
from mnist_jax.config import PRESETS
from mnist_jax.model import build_model
from mnist_jax.optim import make_optimizer
from step_throughput import MEAN, NUM_EXAMPLES, STD, alternating_train_speeds, synthetic_split

CANDIDATES = {
    "xla-defaults": {},
    "none": backend.ynn_fusion_options(),
    "dot": backend.ynn_fusion_options("DOT"),
    "dot,reduce": backend.ynn_fusion_options("DOT", "REDUCE"),
    "dot,eltwise,reduce": backend.ynn_fusion_options("DOT", "ELTWISE", "REDUCE"),
    "dot,eltwise,reduce,convolution": backend.ynn_fusion_options("DOT", "ELTWISE", "REDUCE",
                                                                 "INDIVIDUAL_CONVOLUTION"),
}


def random_batches(split, mesh, batch_size: int, count: int) -> list:
    """`count` batches of random examples of `split`, gathered on the device and split over `mesh` as train does."""
    take = jax.jit(steps.take_batch, out_shardings=sharding.batch_sharded(mesh))
    rng = np.random.default_rng(0)
    return [take(split, jnp.asarray(rng.integers(0, NUM_EXAMPLES, batch_size, dtype=np.int32)))
            for _ in range(count)]


def alternating_speeds(compiled: dict, states: dict, batches: list, mesh, rounds: int) -> dict[str, list[float]]:
    """Train images/s of each compiled step in `rounds` windows over `batches`, taking turns window by window so a
    shared machine's drift slows them all alike (after one warm-up window each). `states` holds each step's own
    state, which it donates and gets back."""
    settle = backend.settle(mesh)  # as train runs: several CPU devices must not queue collectives
    batch_size = len(batches[0]["label"])

    def window(name: str) -> float:
        current = states[name]
        start = time.perf_counter()
        for batch in batches:
            current, metrics = compiled[name](current, batch)
            settle(metrics)
        jax.block_until_ready(current)
        states[name] = current
        return len(batches) * batch_size / (time.perf_counter() - start)

    return alternating_train_speeds({name: functools.partial(window, name) for name in compiled}, rounds)


def add_window_flags(parser: argparse.ArgumentParser, rounds: int) -> None:
    """The flags of a benchmark timed in alternating windows, and its output format."""
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed window")
    parser.add_argument("--rounds", type=int, default=rounds,
                        help="windows per candidate, alternating (median reported)")
    parser.add_argument("--cpu-devices", type=int, default=None,
                        help="split the CPU into this many JAX devices (default: one per core, as train does)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    output.add_argument("--markdown", action="store_true", help="a Markdown table (for docs/performance.md)")


def use_window_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks `add_window_flags`'s values and makes the devices they ask for (before any JAX computation)."""
    if min(args.batch_size, args.steps, args.rounds) <= 0 or (args.cpu_devices is not None and args.cpu_devices <= 0):
        parser.error("--batch-size, --steps, --rounds and --cpu-devices must be positive")
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    else:
        backend.use_every_cpu_core()  # as `python -m mnist_jax.train` does


def measure(preset: str, batch_size: int, steps_per_window: int, rounds: int) -> list[dict]:
    """Train images/s of every candidate: its median over `rounds` windows, and the slowest and fastest window."""
    config = PRESETS[preset]
    mesh = sharding.make_mesh(None, batch_size)
    replicated = sharding.replicated(mesh)
    model = build_model(config, 10, MEAN, STD)
    state = steps.create_train_state(model, make_optimizer(config, NUM_EXAMPLES // batch_size),
                                     jax.random.PRNGKey(0), (28, 28, 1), moving_average=config.ema_decay > 0)
    state = jax.device_put(state, replicated)
    train_step = steps.make_train_step(config)  # the step train runs: the preset's augmentation and recipe
    split = jax.device_put(synthetic_split(NUM_EXAMPLES), replicated)
    batches = random_batches(split, mesh, batch_size, steps_per_window)
    compiled, states, compile_seconds = {}, {}, {}
    for name, options in CANDIDATES.items():
        start = time.perf_counter()
        compiled[name] = train_step.lower(state, batches[0]).compile(options)
        compile_seconds[name] = time.perf_counter() - start
        states[name] = jax.tree_util.tree_map(jnp.copy, state)  # each candidate donates its own copy
    speeds = alternating_speeds(compiled, states, batches, mesh, rounds)
    chosen = backend.compiler_options(jax.default_backend(), batch_norm=config.batch_norm)
    return [{"fusions": name, "config": preset, "devices": mesh.devices.size, "batch_size": batch_size,
             "train_images_per_second": statistics.median(speeds[name]), "slowest": min(speeds[name]),
             "fastest": max(speeds[name]), "compile_seconds": compile_seconds[name],
             "chosen": options == chosen, "cpu_vendor": backend.cpu_vendor(),
             "cpu_avx512": "avx512f" in backend.cpu_flags() if backend.cpu_flags() else None}
            for name, options in CANDIDATES.items()]


def format_table(rows: list[dict]) -> str:
    first = rows[0]
    avx512 = {True: ", AVX-512", False: ", no AVX-512", None: ""}[first["cpu_avx512"]]
    header = f"  {'YNNPACK fusions':<32} {'train img/s':>11} {'slowest':>8} {'fastest':>8} {'compile s':>9}"
    lines = [f"{first['cpu_vendor'] or 'unknown CPU'}{avx512}, --config {first['config']}, batch "
             f"{first['batch_size']}, {first['devices']} device(s); * = what train compiles with here",
             header, "-" * len(header)]
    for r in rows:
        lines.append(f"{'*' if r['chosen'] else ' '} {r['fusions']:<32} {r['train_images_per_second']:>11,.0f} "
                     f"{r['slowest']:>8,.0f} {r['fastest']:>8,.0f} {r['compile_seconds']:>9.1f}")
    return "\n".join(lines)


def format_markdown(rows: list[dict]) -> str:
    """The table as Markdown, under a line naming the CPU and what was measured (for docs/performance.md)."""
    first = rows[0]
    avx512 = {True: ", AVX-512", False: ", no AVX-512", None: ""}[first["cpu_avx512"]]
    lines = [f"{first['cpu_vendor'] or 'unknown CPU'}{avx512}: `--config {first['config']}`, batch "
             f"{first['batch_size']}, {first['devices']} device(s); **bold** = what train compiles with here",
             "", "| YNNPACK fusions | train img/s | slowest | fastest | compile s |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        name = f"**{r['fusions']}**" if r["chosen"] else r["fusions"]
        lines.append(f"| {name} | {r['train_images_per_second']:,.0f} | {r['slowest']:,.0f} | {r['fastest']:,.0f} | "
                     f"{r['compile_seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=tuple(PRESETS), default="default",
                        help="the preset whose train step is measured (default: default)")
    add_window_flags(parser, rounds=8)
    args = parser.parse_args(argv)
    use_window_flags(parser, args)
    if jax.default_backend() != "cpu":
        parser.error(f"YNNPACK fusions are XLA:CPU options; this backend is {jax.default_backend()}")
    rows = measure(args.config, args.batch_size, args.steps, args.rounds)
    if args.json:
        print("\n".join(json.dumps(row) for row in rows))
    else:
        print(format_markdown(rows) if args.markdown else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
