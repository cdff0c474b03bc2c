"""What an exported model costs to run: per format, file size, single-image latency (p50, p99) on one thread after
warm-up, throughput on batches of 256, test accuracy; JAX's `predict` beside them; and, with `--browser`, the
web app's model run in Debian's chromium (ONNX Runtime Web, WebAssembly, one thread).

    python -m mnist_jax.export --workdir runs/mnist
    python benchmarks/export_latency.py --workdir runs/mnist --browser --markdown

Reads WORKDIR/export/export.json (or `--export DIR`), so it times exactly the files `export` verified; the test
accuracies are the ones export measured on the whole test split. The process is pinned to one core and every
runtime is given one thread. The TFLite files take one image at a time (as on a
phone), so their batch-256 figure is 256 single-image calls.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import json
import os
import threading
import time
from typing import Any, Callable, Iterator

import numpy as np

from mnist_jax.export import runtimes
from mnist_jax.checkpoint import restore_model
from mnist_jax.cli import ArgumentParser, quiet_libraries
from mnist_jax.data import load_split_numpy, resolve_data_dir
from mnist_jax.inference import make_predict_fn

BATCH = 256
CHROMIUM = "/usr/bin/chromium"
BROWSER_TIMING = """async ([digits, warmup]) => {
    const session = await window.mnistModel;
    const times = [];
    for (let i = 0; i < digits.length; i++) {
        const input = new ort.Tensor("uint8", Uint8Array.from(digits[i]), [1, 28, 28, 1]);
        const started = performance.now();
        await session.run({ images: input });
        if (i >= warmup) times.push(performance.now() - started);
    }
    return times;
}"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="the trained run whose export is timed")
    parser.add_argument("--export", help="the export folder (default: WORKDIR/export)")
    parser.add_argument("--data-dir", help="tfds data directory (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    parser.add_argument("--images", type=int, default=1000, help="single-image calls timed per format (default 1000)")
    parser.add_argument("--warmup", type=int, default=50, help="untimed calls first (default 50)")
    parser.add_argument("--browser", action="store_true", help="also time the web app's model in chromium")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    return parser.parse_args(argv)


def time_format(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray, warmup: int) -> dict[str, float]:
    """Single-image latency percentiles (ms) and batch-256 throughput (images/s) of one predict function."""
    for image in images[:warmup]:
        predict(image[None])
    latencies = []
    for image in images:
        started = time.perf_counter()
        predict(image[None])
        latencies.append((time.perf_counter() - started) * 1e3)
    batches = [images[i:i + BATCH] for i in range(0, len(images) - BATCH + 1, BATCH)] or [images]
    predict(batches[0])
    started = time.perf_counter()
    for batch in batches:
        predict(batch)
    seconds = time.perf_counter() - started
    return {"p50_ms": float(np.percentile(latencies, 50)), "p99_ms": float(np.percentile(latencies, 99)),
            "batch_images_per_second": sum(map(len, batches)) / seconds}


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass


@contextlib.contextmanager
def static_server(directory: str) -> Iterator[str]:
    handler = functools.partial(QuietHandler, directory=directory)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def time_browser(web_dir: str, images: np.ndarray, warmup: int) -> dict[str, float]:
    """The app's own ONNX Runtime Web session, timed in the page around `session.run`."""
    from playwright.sync_api import sync_playwright

    with static_server(web_dir) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_function("document.body.dataset.model === 'ready'", timeout=60_000)
        digits = [image.reshape(-1).tolist() for image in images]
        times = page.evaluate(BROWSER_TIMING, [digits, warmup])
        browser.close()
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    export_dir = args.export or os.path.join(args.workdir, "export")
    with open(os.path.join(export_dir, "export.json")) as file:
        manifest = json.load(file)
    model = restore_model(args.workdir, str(manifest["checkpoint_step"]))
    images, labels = load_split_numpy(model.config.dataset, "test", resolve_data_dir(args.data_dir))
    timed = images[:args.images + args.warmup]
    jax_predict = make_predict_fn(model)
    rows = [{"format": "JAX predict (reference)", "bytes": None,
             "test_accuracy": float((jax_predict(images).argmax(-1) == labels).mean()),
             **time_format(jax_predict, timed, args.warmup)}]
    for entry in manifest["files"]:
        path = os.path.join(export_dir, entry["path"])
        if entry["format"] == "web":
            if args.browser:
                rows.append({"format": "web (chromium, ONNX Runtime Web)", "bytes": entry["bytes"],
                             "test_accuracy": entry["test_accuracy"], "batch_images_per_second": None,
                             **time_browser(path, timed, args.warmup)})
            continue
        model_file = os.path.join(path, "1") if entry["format"] == "savedmodel" else path
        rows.append({"format": entry["format"], "bytes": entry["bytes"], "test_accuracy": entry["test_accuracy"],
                     **time_format(runtimes.load(model_file, threads=1), timed, args.warmup)})
    return rows


def print_rows(rows: list[dict[str, Any]], markdown: bool) -> None:
    def cells(row: dict[str, Any]) -> list[str]:
        throughput = row["batch_images_per_second"]
        return [row["format"], "-" if row["bytes"] is None else f"{row['bytes'] / 1e6:.2f}",
                f"{row['p50_ms']:.3f}", f"{row['p99_ms']:.3f}", "-" if throughput is None else f"{throughput:,.0f}",
                f"{row['test_accuracy']:.2%}"]

    header = ["format", "MB", "p50 ms", "p99 ms", f"batch-{BATCH} img/s", "test accuracy"]
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("| --- | " + " | ".join(["---:"] * (len(header) - 1)) + " |")
        for row in rows:
            print("| " + " | ".join(cells(row)) + " |")
    else:
        print("  ".join(f"{name:>14}" for name in header))
        for row in rows:
            print("  ".join(f"{cell:>14}" for cell in cells(row)))


def pin_to_one_core() -> None:
    """One core for everything, chromium included (it inherits this), so the figures compare runtimes rather than
    how many cores each grabs; XLA is told so too, before its backend starts."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()


def main(argv: list[str] | None = None) -> None:
    quiet_libraries()
    args = parse_args(argv)
    pin_to_one_core()
    print_rows(measure(args), args.markdown)


if __name__ == "__main__":
    main()
