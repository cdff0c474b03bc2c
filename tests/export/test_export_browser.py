"""The exported web app in Debian's chromium, hosted by `python -m http.server` as any static host would: it
classifies real MNIST digits drawn stroke by stroke with no server behind it, preprocesses drawings exactly as
`images.to_mnist` does, and keeps working offline from its service worker's copy."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import cli_env, draw, run_module, settled_prediction, web_runtime_dir

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


class StaticServer:
    """`python -m http.server` on 127.0.0.1 at a free port, serving `directory`."""

    def __init__(self, directory: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(directory)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=cli_env())
        line = self.process.stdout.readline()
        port = re.search(r"port (\d+)", line).group(1)
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture(scope="module")
def web_folder(mnist_run, shared_data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export-web")
    result = run_module("mnist_jax.export", "--workdir", mnist_run, "--formats", "web", "--out", out,
                        "--data-dir", shared_data_dir, "--onnxruntime-web", web_runtime_dir(), timeout=600)
    assert result.returncode == 0, result.stderr
    return out / "web"


@pytest.fixture
def offline_app(browser, web_folder):
    """A page of the app, every request to another origin than its static server aborted; the server."""
    server = StaticServer(web_folder)
    context = browser.new_context(viewport={"width": 800, "height": 900})
    foreign = []

    def guard(route) -> None:
        if route.request.url.startswith(server.url + "/"):
            route.continue_()
        else:
            foreign.append(route.request.url)
            route.abort()

    context.route("**/*", guard)
    page = context.new_page()
    page.goto(server.url + "/")
    page.wait_for_function("document.body.dataset.model === 'ready'", timeout=60_000)
    page.evaluate("navigator.serviceWorker.ready")
    yield page, server
    context.close()
    server.stop()
    assert foreign == []


def test_drawn_digits_are_classified_in_the_browser_and_offline(offline_app, shared_data_dir) -> None:
    from mnist_jax.data import load_split_numpy

    page, server = offline_app
    images, labels = load_split_numpy("mnist", "test", str(shared_data_dir))
    page.reload()  # now under the service worker's control
    page.wait_for_function("navigator.serviceWorker.controller !== null && document.body.dataset.model === 'ready'",
                           timeout=60_000)
    server.stop()  # from here on there is no server at all
    correct = 0
    for image, label in zip(images[:10, ..., 0], labels[:10]):
        draw(page, image)
        correct += settled_prediction(page) == str(label)
        page.get_by_test_id("clear").click()
    timings = page.evaluate("window.mnistTimings")
    print(f"\n{correct}/10 drawn digits recognised in the browser; model run median {np.median(timings):.2f} ms")
    assert correct >= 7
    assert page.get_by_test_id("status").text_content() == ""

    page.reload()  # the whole app again, from the offline copy
    page.wait_for_function("document.body.dataset.model === 'ready'", timeout=60_000)
    draw(page, images[0, ..., 0])
    assert settled_prediction(page) == str(labels[0])


def test_the_browser_preprocesses_drawings_as_python_does(offline_app, shared_data_dir) -> None:
    from mnist_jax.data import load_split_numpy
    from mnist_jax.images import load_image_bytes, to_mnist

    page, _ = offline_app
    images, _ = load_split_numpy("mnist", "test", str(shared_data_dir))
    largest = []
    for image in images[10:20, ..., 0]:
        draw(page, image)
        settled_prediction(page)
        png, browser_digit = page.evaluate("""() => {
            const canvas = document.querySelector('[data-testid=digit-canvas]');
            const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height);
            return [canvas.toDataURL('image/png'),
                    Array.from(window.mnistPreprocess.fromRgba(pixels.data, pixels.width, pixels.height))];
        }""")
        python_digit = to_mnist(load_image_bytes(base64.b64decode(png.split(",", 1)[1])))
        difference = np.abs(np.asarray(browser_digit).reshape(28, 28) - python_digit.astype(int))
        largest.append(int(difference.max()))
        page.get_by_test_id("clear").click()
    assert max(largest) <= 1, largest  # rounding of float sums, at most one grey level
