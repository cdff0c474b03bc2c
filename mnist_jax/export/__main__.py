"""Export for deployment: `python -m mnist_jax.export --workdir DIR [--checkpoint best] [--formats all] [--out PATH]`.

Writes a checkpoint's model as files that run without JAX: `.tflite` (float32, float16, int8) for LiteRT on
phones, `.onnx` for ONNX Runtime, a SavedModel for TF Serving, and `web/`, an offline drawing app for any static
host. Each file is checked by its own runtime on the whole test split before it is kept, and `export.json` lists
what was written and how it scored. The work is `pipeline.export`. It needs the `[export]` extra, and without it
says so in one line (`extras`); `pipeline` imports the export libraries only where it uses them.
"""

from __future__ import annotations

from mnist_jax import extras
from mnist_jax.cli import ArgumentParser, run_cli
from mnist_jax.export import webruntime
from mnist_jax.export.pipeline import FORMATS, export, parse_formats


def parse_args(argv: list[str] | None):
    parser = ArgumentParser(
        prog="python -m mnist_jax.export",
        description="Export a trained model to TFLite, ONNX, a TF SavedModel and an offline web app; each file is "
                    "verified against JAX on the test split.",
        epilog="example: python -m mnist_jax.export --workdir runs/mnist --formats tflite_int8,web",
    )
    parser.add_argument("--workdir", required=True, help="a training workdir")
    parser.add_argument("--checkpoint", default="best", help="best, latest or a step number (default: best)")
    parser.add_argument("--formats", default="all", type=parse_formats,
                        help=f"comma-separated, from: {', '.join(FORMATS)} (default: all)")
    parser.add_argument("--out", help="the export folder (default: WORKDIR/export)")
    parser.add_argument("--data-dir", help="tfds data directory holding the run's dataset (default: $TFDS_DATA_DIR "
                                           "or ~/tensorflow_datasets); its test split checks every file")
    parser.add_argument("--onnxruntime-web", metavar="DIR",
                        help=f"the dist folder of ONNX Runtime Web {webruntime.VERSION} for the web app (default: "
                             f"${webruntime.DIRECTORY_VARIABLE}, else a checkout's node_modules, else a per-user "
                             "cache that export fills from the npm registry, checked against package-lock.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    extras.require("export", "export")
    _, failures = export(args.workdir, args.checkpoint, args.formats, args.out, args.data_dir, args.onnxruntime_web)
    return 1 if failures else 0


if __name__ == "__main__":
    run_cli(main)
