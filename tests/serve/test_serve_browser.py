"""The drawing page in a real headless Chromium: real MNIST digits drawn stroke by stroke must be recognised."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import ServerProcess, draw, settled_prediction, strokes

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.fixture(scope="module")
def server(mnist_run, tmp_path_factory):
    running = ServerProcess(mnist_run, log_dir=tmp_path_factory.mktemp("serve-browser"))
    yield running
    assert running.stop() == 0, running.stderr


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 800, "height": 900})
    opened = context.new_page()
    opened.goto(server.url + "/")
    yield opened
    context.close()


def canvas_max_value(page) -> int:
    return page.evaluate("""() => {
        const canvas = document.querySelector('[data-testid=digit-canvas]');
        const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        let max = 0;
        for (let i = 0; i < data.length; i += 4) max = Math.max(max, data[i], data[i + 1], data[i + 2]);
        return max;
    }""")


def test_drawn_mnist_digits_are_recognised_live(page, shared_data_dir) -> None:
    from mnist_jax.data import load_split_numpy

    images, labels = load_split_numpy("mnist", "test", str(shared_data_dir))
    in_flight, most_in_flight, predictions_sent = [0], [0], [0]

    def started(request) -> None:
        if request.url.endswith("/api/predict"):
            in_flight[0] += 1
            predictions_sent[0] += 1
            most_in_flight[0] = max(most_in_flight[0], in_flight[0])

    def ended(request) -> None:
        if request.url.endswith("/api/predict"):
            in_flight[0] -= 1

    page.on("request", started)
    page.on("requestfinished", ended)
    page.on("requestfailed", ended)
    correct, latencies = 0, []
    for image, label in zip(images[:10, ..., 0], labels[:10]):
        before = predictions_sent[0]
        draw(page, image)
        predicted = settled_prediction(page)
        assert predicted.isdigit() and len(predicted) == 1, predicted
        correct += int(predicted) == int(label)
        assert predictions_sent[0] - before >= 2  # the prediction updated while drawing, not only at the end
        # One more short stroke on the digit: how long until the page shows the new prediction?
        row, first, last = strokes(image)[len(strokes(image)) // 2]
        page.evaluate("delete document.body.dataset.latencyMs")
        draw(page, np.where(np.arange(28)[:, None] == row, image, 0))
        page.wait_for_function("document.body.dataset.latencyMs !== undefined", timeout=20_000)
        latencies.append(float(page.evaluate("document.body.dataset.latencyMs")))
        settled_prediction(page)
        page.get_by_test_id("clear").click()
    print(f"\n{correct}/10 drawn digits recognised; stroke-to-prediction latency median "
          f"{np.median(latencies):.0f} ms, max {max(latencies):.0f} ms (including the 50 ms debounce)")
    assert correct >= 7
    assert most_in_flight[0] == 1  # requests never pile up
    assert len(latencies) == 10  # every extra stroke brought a new prediction (its latency is printed, not asserted)


def test_clear_empties_the_canvas_and_the_prediction(page, shared_data_dir) -> None:
    from mnist_jax.data import load_split_numpy

    images, _ = load_split_numpy("mnist", "test", str(shared_data_dir))
    draw(page, images[0, ..., 0])
    assert settled_prediction(page) != ""
    assert canvas_max_value(page) == 255
    page.get_by_test_id("clear").click()
    assert page.get_by_test_id("prediction").text_content() == ""
    assert canvas_max_value(page) == 0
    page.wait_for_timeout(300)  # a response that was in flight must not bring the old prediction back
    assert page.get_by_test_id("prediction").text_content() == ""


def test_page_fits_a_phone_screen(browser, server) -> None:
    context = browser.new_context(viewport={"width": 360, "height": 740}, has_touch=True, is_mobile=True)
    phone = context.new_page()
    phone.goto(server.url + "/")
    box = phone.get_by_test_id("digit-canvas").bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 360 and box["width"] >= 250
    assert phone.evaluate("document.documentElement.scrollWidth") <= 360
    assert phone.evaluate("getComputedStyle(document.querySelector('canvas')).touchAction") == "none"
    context.close()
