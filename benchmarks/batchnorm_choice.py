"""Does our batch norm (`model.BatchNorm`, one multiply-add) still beat `flax.linen.BatchNorm` in the train step?

    python benchmarks/batchnorm_choice.py                   # the strong preset's step, one batch-norm group
    python benchmarks/batchnorm_choice.py --cpu-devices 1 --markdown

`model.BatchNorm` exists only because it was measured faster than Flax's on XLA:CPU; this keeps that claim
checkable. Both variants train the `strong` preset's model (its augmentation, optimiser, moving average and label
smoothing) with `--batch-norm-groups 1`, the one setting Flax's batch norm also computes (with one group ours is
Flax's maths, tested in tests/test_model.py). Each step is compiled once the way `train` compiles it, and the same
batches go through both in alternating windows, so a shared machine's drift slows them alike. The fastest is a
lead, not a verdict: rerun it before changing the model.
"""

from __future__ import annotations

if __name__ == "__main__":  # as `python -m mnist_jax.train` runs: glibc's malloc on huge pages (mnist_jax.backend)
    from mnist_jax.backend import restart_with_huge_pages

    restart_with_huge_pages()

import dataclasses
import json
import statistics
import sys
import time

import flax.linen as nn
import jax

from mnist_jax import backend, sharding, steps
from mnist_jax.cli import ArgumentParser, quiet_libraries
from mnist_jax.config import PRESETS
from mnist_jax.model import CNN, build_model
from mnist_jax.optim import make_optimizer
from fusion_choice import add_window_flags, alternating_speeds, random_batches, use_window_flags
from step_throughput import MEAN, NUM_EXAMPLES, STD, synthetic_split


class FlaxBatchNormCNN(CNN):
    """The same CNN with `flax.linen.BatchNorm` in place of ours (same variable names and initial values)."""

    def _maybe_batch_norm(self, x: jax.Array, train: bool, layer: str) -> jax.Array:
        if not self.batch_norm:
            return x
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                            name=f"{layer}_bn")(x)


VARIANTS = {"mnist_jax BatchNorm": CNN, "flax.linen.BatchNorm": FlaxBatchNormCNN}


def measure(batch_size: int, steps_per_window: int, rounds: int) -> list[dict]:
    """Train images/s of each variant: its median over `rounds` windows, and the slowest and fastest window."""
    config = dataclasses.replace(PRESETS["strong"], batch_norm_groups=1, batch_size=batch_size)
    mesh = sharding.make_mesh(None, batch_size)
    replicated = sharding.replicated(mesh)
    batches = random_batches(jax.device_put(synthetic_split(NUM_EXAMPLES), replicated), mesh, batch_size,
                             steps_per_window)
    compiled, states, compile_seconds = {}, {}, {}
    ours = build_model(config, 10, MEAN, STD)
    for name, module in VARIANTS.items():
        model = module(**{f.name: getattr(ours, f.name) for f in dataclasses.fields(CNN)
                          if f.name not in ("parent", "name")})
        state = steps.create_train_state(model, make_optimizer(config, NUM_EXAMPLES // batch_size),
                                         jax.random.PRNGKey(0), (28, 28, 1), moving_average=config.ema_decay > 0)
        states[name] = jax.device_put(state, replicated)
        start = time.perf_counter()
        compiled[name] = backend.compile_for_backend(steps.make_train_step(config), states[name], batches[0])
        compile_seconds[name] = time.perf_counter() - start
    speeds = alternating_speeds(compiled, states, batches, mesh, rounds)
    flags = backend.cpu_flags()
    return [{"batch_norm": name, "devices": mesh.devices.size, "batch_size": batch_size,
             "train_images_per_second": statistics.median(speeds[name]), "slowest": min(speeds[name]),
             "fastest": max(speeds[name]), "compile_seconds": compile_seconds[name],
             "backend": jax.default_backend(), "cpu_vendor": backend.cpu_vendor(),
             "cpu_avx512": "avx512f" in flags if flags else None}
            for name in VARIANTS]


def format_table(rows: list[dict], markdown: bool) -> str:
    first = rows[0]
    avx512 = {True: ", AVX-512", False: ", no AVX-512", None: ""}[first["cpu_avx512"]]
    title = (f"{first['backend']} ({first['cpu_vendor'] or 'unknown CPU'}{avx512}): `--config strong "
             f"--batch-norm-groups 1`, batch {first['batch_size']}, {first['devices']} device(s)")
    if markdown:
        lines = [title, "", "| batch norm | train img/s | slowest | fastest | compile s |",
                 "| --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['batch_norm']} | {r['train_images_per_second']:,.0f} | {r['slowest']:,.0f} | "
                  f"{r['fastest']:,.0f} | {r['compile_seconds']:.1f} |" for r in rows]
        return "\n".join(lines)
    header = f"{'batch norm':<24} {'train img/s':>11} {'slowest':>8} {'fastest':>8} {'compile s':>9}"
    lines = [title.replace("`", ""), header, "-" * len(header)]
    lines += [f"{r['batch_norm']:<24} {r['train_images_per_second']:>11,.0f} {r['slowest']:>8,.0f} "
              f"{r['fastest']:>8,.0f} {r['compile_seconds']:>9.1f}" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    add_window_flags(parser, rounds=6)
    args = parser.parse_args(argv)
    use_window_flags(parser, args)
    rows = measure(args.batch_size, args.steps, args.rounds)
    print("\n".join(json.dumps(row) for row in rows) if args.json else format_table(rows, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
