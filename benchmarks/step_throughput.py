"""Step throughput (images/s) of every training path, against the Flax example's loop, on the backend JAX finds.

    python benchmarks/step_throughput.py                      # batch 32, 128, 512; float32; a table
    python benchmarks/step_throughput.py --batch-sizes 128 --dtypes float32 bfloat16 --json
    python benchmarks/step_throughput.py --config strong --batch-sizes 128   # the strong preset's model

Each train figure is the median of several timed windows after warm-up, the paths taking turns window by window
so a shared machine's drift slows them all alike; every window ends by block_until_ready. Compile time is the
first call's time minus a steady-state call's. The first line names the CPU's vendor and
instruction set and the XLA:CPU library fusions our paths compile with (`backend.compiler_options`; the reference
keeps XLA's defaults); `--markdown` prints the table as Markdown for docs/performance.md. Paths measured:

- reference: the Flax MNIST example's loop: jit(value_and_grad) and a separate jit(apply_gradients), a Python
  loop on the host, batches taken by indexing device arrays of pre-normalised float32 images.
- per_step: what `python -m mnist_jax.train` runs on CPU: uint8 data on device, a jitted gather, and
  the step of `steps.make_train_step` (grad and optax update in one jit, state donated).
- on_device_epoch: what it runs on GPU/TPU: `backend.scan_epoch`, a `lax.scan` over the epoch's steps.
- data_parallel_xN: per_step with each batch split over N devices (only when there are several). On CPU,
  `python -m mnist_jax.train` makes one device per core, so this is what it runs there.
- keras_tensorflow: the classic Keras notebook's stack, the same CNN and optimiser in Keras 3 on TensorFlow
  (oneDNN kernels), steady-state `model.fit` on in-memory float32 arrays, in a worker process of its own
  (`keras_worker.py`); for the default model in float32, when TensorFlow and Keras are installed. It has no eval
  or compile figure.

`--config NAME` measures a preset's model (its augmentation, dropout and batch norm included) with the optimiser
held at the reference's SGD and without the preset's training-recipe extras (moving average of the weights, label
smoothing); the reference loop has no batch-norm state, so it is left out for such a model.
"""

from __future__ import annotations

if __name__ == "__main__":  # as `python -m mnist_jax.train` runs: glibc's malloc on huge pages (mnist_jax.backend)
    from mnist_jax.backend import restart_with_huge_pages

    restart_with_huge_pages()

import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from mnist_jax.cli import ArgumentParser, quiet_libraries
from mnist_jax import backend, sharding, steps
from mnist_jax.config import PRESETS, Config
from mnist_jax.data import Split
from mnist_jax.model import build_model
from mnist_jax.optim import make_optimizer

MEAN, STD = 0.1307, 0.3081
NUM_EXAMPLES = 8192  # synthetic MNIST-shaped data: throughput does not depend on pixel values


def synthetic_split(num: int, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    return Split(jnp.asarray(rng.integers(0, 256, (num, 28, 28, 1), dtype=np.uint8)),
                 jnp.asarray(rng.integers(0, 10, num, dtype=np.int32)))


def _time_windows(run_window: Callable[[], object], windows: int) -> list[float]:
    times = []
    for _ in range(windows):
        start = time.perf_counter()
        jax.block_until_ready(run_window())
        times.append(time.perf_counter() - start)
    return times


# ---------------------------------------------------------------------------------------------- reference
def reference_paths(config: Config, split: Split, batch_size: int):
    """The Flax example's training loop, written the way that example writes it."""
    model = build_model(config, 10, 0.0, 1.0)  # fed pre-normalised floats below, as the example does

    @jax.jit
    def apply_model(state, images, labels):
        def loss_fn(params):
            logits = state.apply_fn({"params": params}, images)
            one_hot = jax.nn.one_hot(labels, 10)
            return jnp.mean(optax.softmax_cross_entropy(logits=logits, labels=one_hot)), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return grads, loss, jnp.mean(jnp.argmax(logits, -1) == labels)

    @jax.jit
    def update_model(state, grads):
        return state.apply_gradients(grads=grads)

    @jax.jit
    def eval_logits(params, images):
        return model.apply({"params": params}, images)

    images = (split.images.astype(jnp.float32) / 255.0 - MEAN) / STD  # the example normalises once, up front
    params = model.init(jax.random.PRNGKey(0), images[:1])["params"]
    state = train_state.TrainState.create(apply_fn=lambda v, x: model.apply(v, x), params=params,
                                          tx=optax.sgd(0.1, 0.9))
    holder = {"state": state}

    def train_steps(indices):
        state = holder["state"]
        for idx in indices:
            grads, loss, _ = apply_model(state, images[idx], split.labels[idx])
            state = update_model(state, grads)
        holder["state"] = state
        return state.params

    def eval_steps(indices):
        return [eval_logits(holder["state"].params, images[idx]) for idx in indices]

    return train_steps, eval_steps


# ---------------------------------------------------------------------------------------------- ours
def project_paths(config: Config, split: Split, batch_size: int, mesh):
    model = build_model(config, 10, MEAN, STD)
    state = steps.create_train_state(model, make_optimizer(config, NUM_EXAMPLES // batch_size),
                                     jax.random.PRNGKey(0), (28, 28, 1))
    replicated, batch_sharded = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    split = jax.device_put(split, replicated)
    holder = {"state": jax.device_put(state, replicated)}
    take = jax.jit(steps.take_batch, out_shardings=batch_sharded)
    ones = jax.device_put(jnp.ones(batch_size), batch_sharded)

    compiled = {}
    # The preset's model and augmentation, without its recipe's extras (see the module docstring).
    train_step = steps.make_train_step(dataclasses.replace(config, ema_decay=0.0, label_smoothing=0.0))
    scanned_epoch = backend.scan_epoch(train_step)
    settle = backend.settle(mesh)  # as train runs: several CPU devices must not queue collectives

    def per_step(indices):
        state = holder["state"]
        if "train" not in compiled:  # exactly as train does: compiled with the backend's XLA options
            compiled["train"] = backend.compile_for_backend(train_step, state, take(split, indices[0]))
        for idx in indices:
            state, metrics = compiled["train"](state, take(split, idx))
            settle(metrics)
        holder["state"] = state
        return metrics

    def on_device_epoch(indices):
        holder["state"], metrics = scanned_epoch(holder["state"], split, jnp.stack(indices))
        return metrics

    def eval_steps(indices):
        if "eval" not in compiled:
            compiled["eval"] = backend.compile_for_backend(steps.eval_step, holder["state"], take(split, indices[0]),
                                                           ones)
        return [settle(compiled["eval"](holder["state"], take(split, idx), ones)) for idx in indices]

    return per_step, on_device_epoch, eval_steps


class KerasWorker:
    """`keras_worker.py` in a process of its own: the Keras-on-TensorFlow row's train windows, on command."""

    SCRIPT = Path(__file__).with_name("keras_worker.py")

    def __init__(self, batch_size: int, steps: int) -> None:
        command, env = self.command(batch_size, steps)
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True, env=env)
        self.versions = self._answer()

    @classmethod
    def command(cls, batch_size: int, steps: int, **extra_env: str) -> tuple[list[str], dict[str, str]]:
        """The worker's command line and environment: Keras on TensorFlow, with `extra_env` added."""
        env = {**os.environ, "KERAS_BACKEND": "tensorflow", **extra_env}
        env.pop("TF_ENABLE_ONEDNN_OPTS", None)  # TensorFlow's default: its oneDNN kernels, as a notebook gets them
        return [sys.executable, str(cls.SCRIPT), "--batch-size", str(batch_size), "--steps", str(steps)], env

    def _answer(self) -> dict:
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.SCRIPT.name} ended early (exit code {self._process.wait()})")
        return json.loads(line)

    def window(self) -> float:
        """Images/s of one steady-state fit window."""
        self._process.stdin.write("window\n")
        self._process.stdin.flush()
        answer = self._answer()
        return answer["images"] / answer["seconds"]

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.stdin.write("quit\n")
            self._process.stdin.close()
            self._process.wait(30)


def keras_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None and importlib.util.find_spec("keras") is not None


def compile_seconds(train_fn, index_batches) -> float:
    """The first call's time (compilation included) minus a steady-state call's."""
    first = _time_windows(lambda: train_fn(index_batches[:1]), 1)[0]
    steady = statistics.median(_time_windows(lambda: train_fn(index_batches[:1]), 3))
    return max(first - steady, 0.0)


def eval_speed(eval_fn, index_batches, windows: int, batch_size: int) -> float:
    eval_fn(index_batches[:1])
    return len(index_batches) * batch_size / statistics.median(_time_windows(lambda: eval_fn(index_batches), windows))


def alternating_train_speeds(windows_of: dict[str, Callable[[], float]], windows: int) -> dict[str, list[float]]:
    """Images/s of every path's train windows, the paths taking turns window by window after one warm-up each."""
    for window in windows_of.values():
        window()
    speeds: dict[str, list[float]] = {name: [] for name in windows_of}
    for _ in range(windows):
        for name, window in windows_of.items():
            speeds[name].append(window())
    return speeds


def run(batch_sizes, dtypes, steps_per_window: int, windows: int, implementations, preset: str = "default"
        ) -> list[dict]:
    device = jax.devices()[0]
    platform = jax.default_backend()
    fusions, avx512, vendor = None, None, None  # what the CPU path compiles with, and on what
    if platform == "cpu":
        flags, vendor = backend.cpu_flags(), backend.cpu_vendor()
        avx512 = "avx512f" in flags if flags else None
        fusions = backend.compiler_options(platform, batch_norm=PRESETS[preset].batch_norm, flags=flags,
                                           vendor=vendor).get(
            "xla_cpu_experimental_ynn_fusion_type", "XLA defaults").replace("LIBRARY_FUSION_TYPE_", "")
    rows = []
    split = synthetic_split(NUM_EXAMPLES)
    for dtype in dtypes:
        for batch_size in batch_sizes:
            config = dataclasses.replace(PRESETS[preset], batch_size=batch_size, dtype=dtype, optimizer="sgd",
                                         learning_rate=0.1, schedule="constant")
            rng = np.random.default_rng(batch_size)
            index_batches = [jnp.asarray(rng.integers(0, NUM_EXAMPLES, batch_size, dtype=np.int32))
                             for _ in range(steps_per_window)]
            paths = {}  # name -> (train_fn, eval_fn)
            if "reference" in implementations and not config.batch_norm:
                paths["reference"] = reference_paths(dataclasses.replace(config, dtype="float32"), split, batch_size)
            per_step, on_device, eval_fn = project_paths(config, split, batch_size, sharding.make_mesh(1))
            if "per_step" in implementations:
                paths["per_step"] = (per_step, eval_fn)
            if "on_device_epoch" in implementations:
                paths["on_device_epoch"] = (on_device, eval_fn)
            if "data_parallel" in implementations and jax.device_count() > 1 and batch_size % jax.device_count() == 0:
                mesh = sharding.make_mesh(None, batch_size)
                parallel, _, eval_parallel = project_paths(config, split, batch_size, mesh)
                paths[f"data_parallel_x{jax.device_count()}"] = (parallel, eval_parallel)
            figures = {name: {"compile_seconds": compile_seconds(train_fn, index_batches),
                              "eval_images_per_second": eval_speed(eval_fn, index_batches, windows, batch_size)}
                       for name, (train_fn, eval_fn) in paths.items()}
            images = len(index_batches) * batch_size

            def timed(train_fn):
                return lambda: images / _time_windows(lambda: train_fn(index_batches), 1)[0]

            windows_of = {name: timed(train_fn) for name, (train_fn, _) in paths.items()}
            keras = None
            if "keras_tensorflow" in implementations and preset == "default" and dtype == "float32" \
                    and keras_available():
                keras = KerasWorker(batch_size, steps_per_window)
                windows_of["keras_tensorflow"] = keras.window
                figures["keras_tensorflow"] = {"compile_seconds": None, "eval_images_per_second": None}
            try:
                speeds = alternating_train_speeds(windows_of, windows)
            finally:
                if keras is not None:
                    keras.close()
            for name, values in speeds.items():
                figures[name]["train_images_per_second"] = statistics.median(values)
            reference = figures.get("reference", {}).get("train_images_per_second")
            keras_speed = figures.get("keras_tensorflow", {}).get("train_images_per_second")
            for name, figure in figures.items():
                stack = (f"keras {keras.versions['keras']} / tensorflow {keras.versions['tensorflow']}"
                         if name == "keras_tensorflow" else f"jax {jax.__version__}")
                rows.append({
                    "implementation": name, "stack": stack, "config": preset, "batch_size": batch_size,
                    "dtype": "float32" if name in ("reference", "keras_tensorflow") else dtype, **figure,
                    "backend": platform, "device_kind": device.device_kind, "cpu_vendor": vendor,
                    "cpu_avx512": avx512, "ynn_fusions": fusions,
                    "speedup_vs_reference": figure["train_images_per_second"] / reference if reference else None,
                    "speedup_vs_keras": figure["train_images_per_second"] / keras_speed if keras_speed else None,
                })
    return rows


def machine_line(first: dict, config: str) -> str:
    """'backend cpu (cpu, GenuineIntel, AVX-512), YNNPACK fusions: ..., --config default': what the rows ran on."""
    vendor = f", {first['cpu_vendor']}" if first["cpu_vendor"] else ""
    avx512 = {True: ", AVX-512", False: ", no AVX-512", None: ""}[first["cpu_avx512"]]
    fusions = f"YNNPACK fusions: {first['ynn_fusions']}, " if first["ynn_fusions"] else ""
    return (f"backend {first['backend']} ({first['device_kind']}{vendor}{avx512}), {fusions}"
            f"{config.format(first['config'])}")


def _cells(r: dict) -> tuple[str, str, str, str, str]:
    """train img/s, eval img/s, compile s, vs reference, vs keras: '-' where a row has no such figure."""
    def ratio(value):
        return f"{value:.2f}x" if value else "-"

    return (f"{r['train_images_per_second']:,.0f}",
            "-" if r["eval_images_per_second"] is None else f"{r['eval_images_per_second']:,.0f}",
            "-" if r["compile_seconds"] is None else f"{r['compile_seconds']:.2f}",
            ratio(r["speedup_vs_reference"]), ratio(r["speedup_vs_keras"]))


def format_table(rows: list[dict]) -> str:
    header = f"{'implementation':<20} {'batch':>5} {'dtype':>8} {'train img/s':>12} {'eval img/s':>12} " \
             f"{'compile s':>9} {'vs ref':>7} {'vs keras':>8}"
    lines = [machine_line(rows[0], "--config {}"), header, "-" * len(header)]
    for r in rows:
        train, evaluation, compiled, reference, keras = _cells(r)
        lines.append(f"{r['implementation']:<20} {r['batch_size']:>5} {r['dtype']:>8} {train:>12} {evaluation:>12} "
                     f"{compiled:>9} {reference:>7} {keras:>8}")
    return "\n".join(lines)


def format_markdown(rows: list[dict]) -> str:
    """The table as Markdown, under a line naming the backend, the CPU and the fusions (for docs/performance.md)."""
    lines = [machine_line(rows[0], "`--config {}`"), "",
             "| implementation | batch | dtype | train img/s | eval img/s | compile s | vs reference | vs keras |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['implementation']} | {r['batch_size']} | {r['dtype']} | " + " | ".join(_cells(r)) + " |")
    return "\n".join(lines)


IMPLEMENTATIONS = ("reference", "per_step", "on_device_epoch", "data_parallel", "keras_tensorflow")


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=tuple(PRESETS), default="default",
                        help="the preset whose model is measured (default: default)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=20, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=5, help="timed windows (the median is reported)")
    parser.add_argument("--implementations", nargs="+", choices=IMPLEMENTATIONS,
                        help="default: all; on CPU all but on_device_epoch, which runs ~50x slower there")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    output.add_argument("--markdown", action="store_true", help="a Markdown table (for docs/performance.md)")
    parser.add_argument("--cpu-devices", type=int, default=None,
                        help="split the CPU into this many JAX devices (to measure data_parallel on one machine)")
    args = parser.parse_args(argv)
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    else:
        backend.use_every_cpu_core()  # as `python -m mnist_jax.train` does
    if min(args.batch_sizes) <= 0 or args.steps <= 0 or args.windows <= 0:
        parser.error("batch sizes, --steps and --windows must be positive")
    implementations = args.implementations or [
        name for name in IMPLEMENTATIONS if name != "on_device_epoch" or jax.default_backend() != "cpu"]
    rows = run(args.batch_sizes, args.dtypes, args.steps, args.windows, implementations, args.config)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(format_markdown(rows) if args.markdown else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
