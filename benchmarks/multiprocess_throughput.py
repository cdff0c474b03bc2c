"""What the cross-process all-reduce costs: the train step on 2 processes x 1 device against 1 process x 2 devices.

    python benchmarks/multiprocess_throughput.py              # batch 128, 3 rounds of each, alternating
    python benchmarks/multiprocess_throughput.py --markdown   # the table in docs/performance.md

Both configurations run the default model's step as `train` runs it (`backend.EpochRunner` over a 1-D mesh of two
devices, each batch split over them); they differ only in where the two devices live. In the first, two processes
joined through `jax.distributed` over 127.0.0.1 (as `docs/multihost.md` starts them) each hold one device, and the
gradients are summed across processes (gloo over TCP); in the second, one process holds both devices and sums them
in memory. Each round starts fresh workers of each configuration in turn, so a shared machine's drift slows both
alike; each worker times `--windows` windows of `--steps` steps after a warm-up, and process 0 reports them.
"""

from __future__ import annotations

if __name__ == "__main__":  # as `python -m mnist_jax.train` runs: glibc's malloc on huge pages (mnist_jax.backend)
    from mnist_jax.backend import restart_with_huge_pages

    restart_with_huge_pages()

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import numpy as np

CONFIGURATIONS = {"2 processes x 1 device": (2, 1), "1 process x 2 devices": (1, 2)}


def worker(batch_size: int, steps_per_window: int, windows: int) -> None:
    """One process of a configuration: joins the run the environment describes, then times the train step on a
    mesh of every device; process 0 prints each window's images/s as one JSON line."""
    import jax

    from mnist_jax import backend, cli, sharding, steps
    from mnist_jax.config import Config
    from mnist_jax.model import build_model
    from mnist_jax.optim import make_optimizer
    from step_throughput import MEAN, NUM_EXAMPLES, STD, synthetic_split

    cli.prepare_devices()
    mesh = sharding.make_mesh(None, batch_size)
    config = Config(batch_size=batch_size)
    split = sharding.place_replicated(synthetic_split(NUM_EXAMPLES), mesh)
    state = steps.create_train_state(build_model(config, 10, MEAN, STD),
                                     make_optimizer(config, NUM_EXAMPLES // batch_size), jax.random.PRNGKey(0),
                                     (28, 28, 1))
    state = sharding.place_replicated(state, mesh)
    runner = backend.EpochRunner(steps.make_train_step(config), state, split, batch_size, mesh)
    rows = np.random.default_rng(0).integers(0, NUM_EXAMPLES, (steps_per_window, batch_size))
    state, _ = runner.run(state, split, rows[:2])  # warm-up: the first steps pay for allocation
    speeds = []
    for _ in range(windows):
        start = time.perf_counter()
        state, _ = runner.run(state, split, rows)
        speeds.append(steps_per_window * batch_size / (time.perf_counter() - start))
    if jax.process_index() == 0:
        print(json.dumps({"devices": mesh.devices.size, "processes": jax.process_count(), "speeds": speeds}),
              flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_configuration(processes: int, devices_each: int, args: argparse.Namespace) -> list[float]:
    """Starts the workers of one configuration and returns process 0's window speeds."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_each}"}
    port = _free_port()
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--batch-size", str(args.batch_size),
               "--steps", str(args.steps), "--windows", str(args.windows)]
    procs = []
    for index in range(processes):
        cluster_env = ({"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(processes),
                        "JAX_PROCESS_ID": str(index)} if processes > 1 else {})
        procs.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**env, **cluster_env}))
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (_, stderr) in zip(procs, outputs):
        if proc.returncode != 0:
            raise SystemExit(f"a worker failed (exit {proc.returncode}): {stderr.strip()[-2000:]}")
    lines = [line for line in outputs[0][0].splitlines() if line.startswith("{")]
    return json.loads(lines[-1])["speeds"]


def measure(args: argparse.Namespace) -> list[dict]:
    from mnist_jax import backend

    speeds: dict[str, list[float]] = {name: [] for name in CONFIGURATIONS}
    for _ in range(args.rounds):
        for name, (processes, devices_each) in CONFIGURATIONS.items():
            speeds[name] += run_configuration(processes, devices_each, args)
    flags = backend.cpu_flags()
    return [{"configuration": name, "batch_size": args.batch_size,
             "train_images_per_second": statistics.median(speeds[name]), "slowest": min(speeds[name]),
             "fastest": max(speeds[name]), "windows": len(speeds[name]), "cpu_vendor": backend.cpu_vendor(),
             "cpu_avx512": "avx512f" in flags if flags else None}
            for name in CONFIGURATIONS]


def format_table(rows: list[dict], markdown: bool) -> str:
    first, reference = rows[0], rows[-1]["train_images_per_second"]
    avx512 = {True: ", AVX-512", False: ", no AVX-512", None: ""}[first["cpu_avx512"]]
    title = (f"{first['cpu_vendor'] or 'unknown CPU'}{avx512}: default model, batch {first['batch_size']}, "
             f"{first['windows']} windows each")
    cells = [(r["configuration"], f"{r['train_images_per_second']:,.0f}", f"{r['slowest']:,.0f}",
              f"{r['fastest']:,.0f}", f"{r['train_images_per_second'] / reference:.2f}") for r in rows]
    if markdown:
        lines = [title, "", "| configuration | train img/s | slowest | fastest | vs one process |",
                 "| --- | ---: | ---: | ---: | ---: |"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])
    header = f"{'configuration':<24} {'train img/s':>11} {'slowest':>8} {'fastest':>8} {'vs one process':>14}"
    lines = [title, header, "-" * len(header)]
    return "\n".join(lines + [f"{a:<24} {b:>11} {c:>8} {d:>8} {e:>14}" for a, b, c, d, e in cells])


def main(argv: list[str] | None = None) -> int:
    from mnist_jax.cli import ArgumentParser, quiet_libraries

    quiet_libraries()
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=128, help="global batch, split over the two devices")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=3, help="timed windows per worker start")
    parser.add_argument("--rounds", type=int, default=3, help="starts of each configuration, alternating")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    output.add_argument("--markdown", action="store_true", help="a Markdown table (for docs/performance.md)")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.steps, args.windows, args.rounds) <= 0 or args.batch_size % 2:
        parser.error("--steps, --windows and --rounds must be positive, --batch-size positive and even")
    if args.worker:
        worker(args.batch_size, args.steps, args.windows)
        return 0
    rows = measure(args)
    print("\n".join(json.dumps(row) for row in rows) if args.json else format_table(rows, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
