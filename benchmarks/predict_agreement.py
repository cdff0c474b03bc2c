"""Does `predict` on image files agree with `evaluate`? The MNIST test set written out as PNG files.

    python benchmarks/predict_agreement.py --workdir runs/mnist

Writes each test image as a file in three forms (as it is: light on dark; inverted: black ink on white; RGBA:
white ink whose alpha is the digit, on a transparent canvas), classifies the files through
`predict.predict_files` (so through the full MNIST-style preprocessing), and compares each form's accuracy with
the accuracy on the raw arrays, which is what `evaluate` reports.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
from PIL import Image

from mnist_jax.cli import ArgumentParser, quiet_libraries
from mnist_jax.checkpoint import restore_model
from mnist_jax.data import load_split_numpy, resolve_data_dir
from mnist_jax.inference import make_predict_fn
from mnist_jax.predict import predict_files

FORMS = {
    "as is (light on dark PNG)": lambda g: Image.fromarray(g),
    "inverted (black on white PNG)": lambda g: Image.fromarray(255 - g),
    "RGBA (white ink, alpha = digit)": lambda g: Image.fromarray(
        np.dstack([np.full_like(g, 255)] * 3 + [g]), "RGBA"),
}


def main() -> None:
    quiet_libraries()
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--data-dir")
    parser.add_argument("--count", type=int, default=10_000, help="how many test images (default: all)")
    args = parser.parse_args()
    model = restore_model(args.workdir, "best")
    images, labels = load_split_numpy(model.config.dataset, "test", resolve_data_dir(args.data_dir))
    images, labels = images[: args.count], labels[: args.count]
    reference = float(np.mean(make_predict_fn(model)(images).argmax(-1) == labels))
    print(f"evaluate (raw arrays): {reference:.2%} on {len(labels):,} test images")
    with tempfile.TemporaryDirectory() as directory:
        for name, make in FORMS.items():
            paths = []
            for i, image in enumerate(images[..., 0]):
                paths.append(os.path.join(directory, f"{i}.png"))
                make(image).save(paths[-1])
            start = time.time()
            results = predict_files(args.workdir, paths)
            accuracy = float(np.mean([r["prediction"] for r in results] == labels))
            print(f"predict, {name:<32} {accuracy:.2%}  ({accuracy - reference:+.2%} points, "
                  f"{time.time() - start:.1f} s for {len(paths):,} files)")


if __name__ == "__main__":
    main()
