"""The web server: its app in this process, driven by FastAPI's TestClient (the fast tier), and as a user runs it,
`python -m mnist_jax.serve` in its own process with real HTTP on 127.0.0.1 (e2e). Every request test runs both ways."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import html
import io
import json
import re
import signal
from pathlib import Path
from typing import Callable

import httpx
import numpy as np
import pytest
from PIL import Image

from helpers import (CLASS_NAMES, IN_PROCESS, SUBPROCESS, ServerProcess, digit_png, draw, make_tiny_images,
                     settled_prediction)


@dataclasses.dataclass
class Served:
    """A served tiny run: the workdir, the checkpoint step served, and an HTTP client of the server."""

    workdir: Path
    step: int
    client: httpx.Client
    new_client: Callable[[], contextlib.AbstractContextManager]  # a thread's own client, or the shared one in process


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    running = ServerProcess(tiny_run, log_dir=tmp_path_factory.mktemp("serve"))
    yield running
    assert running.stop() == 0, running.stderr
    assert "Traceback" not in running.stderr, running.stderr


@contextlib.contextmanager
def in_process_app(workdir: Path):
    """`serve.create_app` of the run in `workdir`, in this process, under FastAPI's TestClient (the ASGI app itself,
    no socket): yields the model served and the client."""
    from fastapi.testclient import TestClient

    from mnist_jax.checkpoint import restore_model
    from mnist_jax.inference import make_predict_fn
    from mnist_jax.serve import app as serve

    model = restore_model(str(workdir))  # what `serve` does before it listens, but for warming every batch size
    app = serve.create_app(model, make_predict_fn(model, batch_size=serve.DEFAULT_MAX_BATCH))
    with TestClient(app) as client:  # runs the app's lifespan: the micro-batcher starts and stops with it
        yield model, client


@pytest.fixture(scope="module", params=[IN_PROCESS, pytest.param(SUBPROCESS, marks=pytest.mark.e2e)])
def served(request):
    """IN_PROCESS: `serve.create_app` of tiny_run_in_process in this process, requests through FastAPI's TestClient
    (the ASGI app itself, no socket). SUBPROCESS: the `server` above over HTTP."""
    if request.param == SUBPROCESS:
        server = request.getfixturevalue("server")
        with httpx.Client(base_url=server.url, timeout=30) as http:
            yield Served(request.getfixturevalue("tiny_run"), server.step, http,
                         lambda: httpx.Client(base_url=server.url, timeout=30))
        return
    workdir = request.getfixturevalue("tiny_run_in_process")
    with in_process_app(workdir) as (model, client):
        yield Served(workdir, model.step, client, lambda: contextlib.nullcontext(client))


@pytest.fixture(scope="module")
def client(served):
    return served.client


def post_png(client: httpx.Client, data: bytes) -> httpx.Response:
    return client.post("/api/predict", content=data, headers={"Content-Type": "image/png"})


def test_health(client, served) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checkpoint_step": served.step, "dataset": "tiny_digits"}


def test_page_is_served_without_external_resources(client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for testid in ("digit-canvas", "prediction", "clear"):
        assert f'data-testid="{testid}"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN
    for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text):
        assert client.get(asset).status_code == 200, asset
    assert "touch-action: none" in client.get("/static/style.css").text


def test_png_prediction_matches_the_predict_cli_path(client, served, tmp_path) -> None:
    from mnist_jax.checkpoint import restore_model
    from mnist_jax.images import preprocess_file
    from mnist_jax.inference import make_predict_fn

    predict = make_predict_fn(restore_model(str(served.workdir)))
    for seed, dark in [(1, False), (2, True), (3, False)]:
        data = digit_png(seed, dark_on_light=dark)
        path = tmp_path / f"digit{seed}.png"
        path.write_bytes(data)
        expected = predict(preprocess_file(path)[None])[0]
        response = post_png(client, data)
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"prediction", "class_name", "probabilities"}
        assert body["class_name"] == str(body["prediction"])  # tiny_digits' classes are named 0 to 9, like MNIST's
        assert len(body["probabilities"]) == 10
        assert sum(body["probabilities"]) == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(body["probabilities"], expected, atol=1e-5)
        assert body["prediction"] == int(np.argmax(expected))


def test_jpeg_is_accepted(client) -> None:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(digit_png(4, dark_on_light=True))).convert("RGB").save(buffer, format="JPEG")
    response = client.post("/api/predict", content=buffer.getvalue(), headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200
    assert sum(response.json()["probabilities"]) == pytest.approx(1.0, abs=1e-5)


def test_json_pixels_are_used_as_is(client) -> None:
    labels = np.arange(10)
    images = make_tiny_images(labels, np.random.default_rng(7))[..., 0]
    for label, image in zip(labels, images):
        response = client.post("/api/predict", json={"pixels": image.tolist()})
        assert response.status_code == 200, response.text
        body = response.json()
        assert sum(body["probabilities"]) == pytest.approx(1.0, abs=1e-5)
        assert body["prediction"] == label  # tiny_digits is learnt perfectly; preprocessing would move the block
    floats = client.post("/api/predict", json={"pixels": np.clip(images[3] + 0.3, 0, 255).tolist()})
    assert floats.status_code == 200 and floats.json()["prediction"] == 3


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str) and "\n" not in body["error"]
    return body["error"]


def test_unreadable_images_are_400(client) -> None:
    assert "not a recognised image format" in error_of(post_png(client, b"this is not a png"), 400)
    assert "empty" in error_of(post_png(client, b""), 400)
    assert "unreadable image" in error_of(post_png(client, digit_png(5)[:200]), 400)
    blank = io.BytesIO()
    Image.new("L", (50, 50), 0).save(blank, format="PNG")
    assert "blank" in error_of(post_png(client, blank.getvalue()), 400)
    huge = io.BytesIO()
    Image.new("L", (5000, 4000), 0).save(huge, format="PNG")  # 20 Mpixel in ~20 kB: refused before decoding
    assert "image too large (5000x4000 pixels" in error_of(post_png(client, huge.getvalue()), 400)


def test_bodies_over_the_cap_are_413(client) -> None:
    big = b"\0" * 2_000_001
    assert "limit" in error_of(post_png(client, big), 413)  # refused from its Content-Length
    chunked = client.post("/api/predict", content=iter([big[:1_000_000], big[1_000_000:]]),
                          headers={"Content-Type": "image/png"})
    assert "Content-Length" not in chunked.request.headers  # so the server must count the bytes it reads
    assert "limit" in error_of(chunked, 413)


@pytest.mark.parametrize("content_type", ["text/plain", "image/gif", "application/x-www-form-urlencoded", None])
def test_unsupported_content_types_are_415(client, content_type) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    request = client.build_request("POST", "/api/predict", content=digit_png(6), headers=headers)
    if content_type is None:
        request.headers.pop("Content-Type", None)
    assert "unsupported content type" in error_of(client.send(request), 415)


def pixels(value=0, rows: int = 28, cols: int = 28) -> list:
    return [[value] * cols for _ in range(rows)]


@pytest.mark.parametrize(
    "body, message",
    [
        (b"{not json", "malformed JSON"),
        (b"\xff\xfe", "malformed JSON"),
        (json.dumps({"pixels": pixels(rows=27)}).encode(), "pixels: List should have at least 28 items"),
        (json.dumps({"pixels": pixels(cols=29)}).encode(), "pixels[0]: List should have at most 28 items"),
        (json.dumps({"pixels": [pixels()]}).encode(), "pixels"),
        (json.dumps({"pixels": pixels(256)}).encode(), "less than or equal to 255"),
        (json.dumps({"pixels": pixels(-1)}).encode(), "greater than or equal to 0"),
        (json.dumps({"pixels": pixels("7")}).encode(), "valid number"),
        (json.dumps({"pixels": pixels(True)}).encode(), "valid number"),
        (json.dumps({"pixels": pixels(None)}).encode(), "valid number"),
        (b'{"pixels": [[NaN]]}', "pixels"),
        (json.dumps({"image": pixels()}).encode(), "pixels: Field required"),
        (json.dumps([pixels()]).encode(), "valid dictionary"),
        (json.dumps({"pixels": pixels(), "extra": 1}).encode(), "extra: Extra inputs are not permitted"),
    ],
)
def test_malformed_json_is_422(client, body, message) -> None:
    response = client.post("/api/predict", content=body, headers={"Content-Type": "application/json"})
    assert message in error_of(response, 422)


def test_unknown_paths_and_methods_answer_json_errors(client) -> None:
    assert error_of(client.get("/nowhere"), 404) == "Not Found"
    assert error_of(client.get("/api/predict"), 405) == "Method Not Allowed"


def test_concurrent_requests_are_batched_and_answered_correctly(client, served) -> None:
    images = [digit_png(100 + i) for i in range(8)]
    expected = [post_png(client, image).json()["probabilities"] for image in images]

    def ask(i: int) -> tuple[int, list[float], int]:
        with served.new_client() as own:
            response = post_png(own, images[i % 8])
            assert response.status_code == 200, response.text
            return i, response.json()["probabilities"], int(response.headers["x-batch-size"])

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, range(64)))
    assert len(results) == 64
    for i, probabilities, _ in results:
        np.testing.assert_allclose(probabilities, expected[i % 8], atol=1e-5)
    assert max(batch for _, _, batch in results) > 1  # concurrent requests shared a jitted call


def test_openapi_documents_the_request_bodies(client) -> None:
    spec = client.get("/openapi.json").json()
    predict = spec["paths"]["/api/predict"]["post"]
    content = predict["requestBody"]["content"]
    assert set(content) == {"image/png", "image/jpeg", "application/json"}
    assert content["image/png"]["schema"]["format"] == "binary"
    rows = content["application/json"]["schema"]["properties"]["pixels"]
    assert rows["minItems"] == rows["maxItems"] == 28
    assert {"200", "400", "413", "415", "422"} <= set(predict["responses"])
    assert "/healthz" in spec["paths"]


@pytest.mark.e2e
def test_fuzzed_requests_never_get_a_5xx(server) -> None:
    """Schemathesis generates valid and invalid requests from the OpenAPI spec; none may crash the server."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    statuses: list[int] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case) -> None:
                response = case.call(base_url=server.url, timeout=30)
                statuses.append(response.status_code)
                assert response.status_code < 500, (case.as_curl_command(), response.text)

            try:
                check()
            except Unsatisfiable:  # an operation without inputs (GET /healthz) has no invalid requests
                continue
    print(sorted(collections.Counter(statuses).items()))
    assert len(statuses) >= 60
    assert {200, 422} <= set(statuses), sorted(set(statuses))
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get("/healthz").status_code == 200  # still serving after all of that


def test_server_still_healthy_and_predicting_after_bad_requests(client) -> None:
    post_png(client, b"junk")
    client.post("/api/predict", content=b"{", headers={"Content-Type": "application/json"})
    assert client.get("/healthz").json()["status"] == "ok"
    assert post_png(client, digit_png(9)).status_code == 200


@pytest.mark.e2e
def test_sigterm_stops_the_server_cleanly(tiny_run, tmp_path) -> None:
    running = ServerProcess(tiny_run, "--max-batch", "1", log_dir=tmp_path)
    with httpx.Client(base_url=running.url, timeout=30) as http:
        assert post_png(http, digit_png(11)).status_code == 200
    running.process.send_signal(signal.SIGTERM)
    assert running.process.wait(30) == 0, running.stderr
    assert "stopped" in running.stderr and "Traceback" not in running.stderr


def test_bad_workdir_is_a_one_line_error(way, tmp_path) -> None:
    result = way.run("mnist_jax.serve", "--workdir", tmp_path / "missing", "--port", "0")
    assert result.returncode == 2
    assert result.stderr.startswith("error: no checkpoints found") and result.stderr.count("\n") == 1


@pytest.mark.parametrize("args, message", [(["--port", "70000"], "--port"), (["--max-body-bytes", "0"], "--max-body-bytes")])
def test_bad_arguments_are_usage_errors(way, args, message) -> None:
    result = way.run("mnist_jax.serve", "--workdir", way.fixture("tiny_run"), *args)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1


def test_port_in_use_is_a_one_line_error(way) -> None:
    import socket

    tiny_run = way.fixture("tiny_run")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = way.run("mnist_jax.serve", "--workdir", tiny_run, "--port", taken.getsockname()[1])
    assert result.returncode == 2
    assert "cannot listen on 127.0.0.1" in result.stderr and result.stderr.count("\n") == 1


def test_a_run_with_class_names_answers_them_and_its_page_shows_them(named_run_in_process) -> None:
    """The JSON answer gains the class's name beside its index; the page carries the names its script shows."""
    with in_process_app(named_run_in_process) as (_, named):
        for image in make_tiny_images(np.arange(10), np.random.default_rng(3))[..., 0]:
            body = named.post("/api/predict", json={"pixels": image.tolist()}).json()
            assert body["class_name"] == CLASS_NAMES[body["prediction"]]
        page = named.get("/").text
        [names] = re.findall(r'<meta name="class-names" content="([^"]*)">', page)
        assert json.loads(html.unescape(names)) == list(CLASS_NAMES)
        script = named.get("/static/drawing.js").text
        assert 'meta[name="class-names"]' in script and "nameOf(prediction)" in script


def test_the_favicon_is_an_icon(client) -> None:
    """Browsers ask for /favicon.ico unbidden; a 404 there is an error in every visitor's console."""
    response = client.get("/favicon.ico")
    assert response.status_code == 200 and response.headers["content-type"] == "image/x-icon"
    with Image.open(io.BytesIO(response.content)) as icon:
        assert icon.format == "ICO" and {(16, 16), (32, 32)} <= set(icon.info["sizes"])


@pytest.mark.e2e
def test_the_page_shows_the_class_name(browser, named_run_in_process, tmp_path) -> None:
    """Drawn on the page of a run whose classes have names: the prediction shown is a name, as the API's."""
    running = ServerProcess(named_run_in_process, log_dir=tmp_path)
    try:
        context = browser.new_context(viewport={"width": 800, "height": 900})
        page = context.new_page()
        errors = []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.goto(running.url + "/")
        draw(page, make_tiny_images(np.array([7]), np.random.default_rng(0))[0, ..., 0])
        shown = settled_prediction(page)
        assert shown in CLASS_NAMES, shown
        assert page.locator(".bar").nth(7).get_attribute("title") == "Sneaker"
        assert errors == []  # no 404 for /favicon.ico either
        context.close()
    finally:
        assert running.stop() == 0, running.stderr
