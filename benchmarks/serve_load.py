"""Load test of `python -m mnist_jax.serve`: N keep-alive clients send PNG digits, report throughput and latency.

    python benchmarks/serve_load.py --workdir /tmp/serve-run            # starts a server on a free port
    python benchmarks/serve_load.py --url http://127.0.0.1:8000          # or measures a running one

The clients run in this process (threads, one persistent http.client connection each) and the server in
another, as in production. Images are MNIST-like digits (random pen strokes) encoded as PNG, by default at the
drawing page's canvas size (280x280, RGBA, what the browser sends); --image-size 28 sends 28x28 grayscale ones.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mnist_jax.cli import ArgumentParser

REPO = Path(__file__).resolve().parents[1]
READY = re.compile(r"serving \S+ checkpoint \d+ at (http://\S+)")


def digit_pngs(count: int, size: int, seed: int = 0) -> list[bytes]:
    """Light-on-dark scribbles of 3-5 strokes, like digits drawn on the page, as PNG bytes."""
    rng = np.random.default_rng(seed)
    pngs = []
    for _ in range(count):
        image = Image.new("L", (size, size), 0)
        points = [tuple(float(v) for v in rng.uniform(0.2, 0.8, 2) * size) for _ in range(rng.integers(3, 6))]
        ImageDraw.Draw(image).line(points, fill=255, width=max(2, size // 14), joint="curve")
        buffer = io.BytesIO()
        (image.convert("RGBA") if size > 28 else image).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return pngs


def start_server(workdir: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """Starts the server on a free port and waits for its ready line."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen([sys.executable, "-m", "mnist_jax.serve", "--workdir", workdir, "--port", "0", *extra],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    for line in process.stdout:
        if match := READY.search(line):
            return process, match.group(1).rstrip("/")
    raise SystemExit(f"error: the server exited with code {process.wait()} before it was ready")


def run_load(url: str, pngs: list[bytes], requests: int, clients: int) -> dict:
    """Sends `requests` predictions from `clients` threads; returns throughput, latency percentiles, errors."""
    parts = urllib.parse.urlsplit(url)
    latencies: list[float] = []
    batch_sizes: list[int] = []
    errors: list[str] = []
    counter = iter(range(requests))
    lock = threading.Lock()
    headers = {"Content-Type": "image/png"}

    def client() -> None:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            started = time.perf_counter()
            try:
                connection.request("POST", "/api/predict", body=pngs[i % len(pngs)], headers=headers)
                response = connection.getresponse()
                body = response.read()
                elapsed = time.perf_counter() - started
                if response.status != 200 or "prediction" not in json.loads(body):
                    raise RuntimeError(f"HTTP {response.status}: {body[:100]!r}")
                with lock:
                    latencies.append(elapsed)
                    batch_sizes.append(int(response.getheader("X-Batch-Size", "1")))
            except (OSError, RuntimeError, ValueError, http.client.HTTPException) as error:
                with lock:
                    errors.append(str(error))
                connection.close()
                connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    milliseconds = np.array(latencies) * 1e3 if latencies else np.array([float("nan")])
    return {
        "requests": requests,
        "clients": clients,
        "requests_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(float(np.percentile(milliseconds, 50)), 2),
        "p99_ms": round(float(np.percentile(milliseconds, 99)), 2),
        "max_ms": round(float(milliseconds.max()), 2),
        "mean_batch": round(statistics.fmean(batch_sizes), 2) if batch_sizes else 0.0,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "wall_s": round(wall, 2),
    }


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--workdir", help="start a server on this training workdir (on a free 127.0.0.1 port)")
    target.add_argument("--url", help="measure an already running server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=3000, help="predictions to send (default: 3000)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent keep-alive clients (default: 16)")
    parser.add_argument("--image-size", type=int, default=280, help="PNG side in pixels (default: 280, the canvas)")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured requests sent first (default: 200)")
    parser.add_argument("--server-args", default="", help="extra serve flags when starting one, e.g. '--max-batch 32'")
    parser.add_argument("--json", action="store_true", help="print one line of JSON")
    args = parser.parse_args()
    if min(args.requests, args.clients, args.image_size) <= 0 or args.warmup < 0:
        parser.error("--requests, --clients and --image-size must be positive")

    process = None
    url = args.url
    if args.workdir:
        process, url = start_server(args.workdir, args.server_args.split())
    try:
        pngs = digit_pngs(64, args.image_size)
        if args.warmup:
            run_load(url, pngs, args.warmup, args.clients)
        result = {"url": url, "image_size": args.image_size, **run_load(url, pngs, args.requests, args.clients)}
    except ConnectionRefusedError:
        raise SystemExit(f"error: no server answers at {url}") from None
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['requests']} PNG predictions ({args.image_size}x{args.image_size}) from {result['clients']} "
              f"clients: {result['requests_per_s']} req/s, p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, "
              f"max {result['max_ms']} ms, mean batch {result['mean_batch']}, errors {result['errors']}")


if __name__ == "__main__":
    main()
