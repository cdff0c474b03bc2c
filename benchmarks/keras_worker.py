"""The classic notebook's stack, Keras on TensorFlow, training the default model: a worker that
`step_throughput.py` starts and times in windows alternating with its own rows.

    python benchmarks/keras_worker.py --batch-size 128 --steps 20 --seed 0

It builds the Flax example's CNN in Keras (conv 32 3x3 'same' -> relu -> avg-pool 2 -> conv 64 -> relu ->
avg-pool 2 -> dense 256 -> relu -> dense 10), compiled with SGD(0.1, momentum 0.9) and sparse categorical
cross-entropy on logits, with accuracy as its metric, as the notebook compiles it; the data are synthetic
MNIST-shaped images held in memory as normalised float32, as the notebook holds MNIST. Then it reads commands on
stdin, one per line, and answers each on stdout:

- `window`: one `model.fit` over `--steps` steps of `--batch-size`; the answer is the seconds its steady state took,
  from the end of its first step to the end of the fit (the first step builds the iterator), and the images in it;
- `quit`: exit.

TensorFlow runs with its defaults (oneDNN on, intra-op threads on every core); the parent's environment (huge-page
malloc) is inherited. Kept out of step_throughput's own process so the two runtimes never share a thread pool.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

NUM_EXAMPLES = 8192
MEAN, STD = 0.1307, 0.3081


def build(batch_size: int, steps: int, seed: int):
    """(model, images, labels): the compiled Keras model and its in-memory data (enough for one window)."""
    import keras
    import numpy as np

    keras.utils.set_random_seed(seed)
    layers = keras.layers
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        layers.Conv2D(32, 3, padding="same", activation="relu"),
        layers.AveragePooling2D(2),
        layers.Conv2D(64, 3, padding="same", activation="relu"),
        layers.AveragePooling2D(2),
        layers.Flatten(),
        layers.Dense(256, activation="relu"),
        layers.Dense(10),
    ])
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    rng = np.random.default_rng(seed)
    count = max(NUM_EXAMPLES, (steps + 1) * batch_size)
    images = ((rng.integers(0, 256, (count, 28, 28, 1)) / 255.0 - MEAN) / STD).astype(np.float32)
    labels = rng.integers(0, 10, count).astype(np.int32)
    return model, images, labels


def run_window(model, images, labels, batch_size: int, steps: int) -> tuple[float, int]:
    """(seconds, images) of one fit's steady state: from its first step's end to the fit's end."""
    import keras

    marks: dict[str, float] = {}

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 0:
                marks["first"] = time.perf_counter()

        def on_train_end(self, logs=None):  # fit has read the last step's logs: every step has finished
            marks["end"] = time.perf_counter()

    model.fit(images, labels, batch_size=batch_size, epochs=1, steps_per_epoch=steps + 1, shuffle=False,
              verbose=0, callbacks=[Clock()])
    return marks["end"] - marks["first"], steps * batch_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per window")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.batch_size, args.steps) <= 0:
        parser.error("--batch-size and --steps must be positive")
    import keras
    import tensorflow as tf

    model, images, labels = build(args.batch_size, args.steps, args.seed)
    print(json.dumps({"ready": True, "keras": keras.__version__, "tensorflow": tf.__version__}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            break
        if command != "window":
            print(json.dumps({"error": f"unknown command {command!r}"}), flush=True)
            continue
        seconds, count = run_window(model, images, labels, args.batch_size, args.steps)
        print(json.dumps({"seconds": seconds, "images": count}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
