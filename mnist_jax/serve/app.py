"""The drawing-page server: a page that classifies digits live, and a JSON API (`python -m mnist_jax.serve`).

The model is restored and its jitted predict compiled for every batch size it will see before the socket
accepts a request, so the first user does not pay for compilation. Requests never run the model on the event
loop: images are decoded in a thread pool (through `images.load_image_bytes`, the function the predict CLI
uses) and concurrent requests are gathered by a micro-batcher into one jitted call in a worker thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import html
import json
import os
import signal
import socket
import sys
from typing import Annotated, Any, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from mnist_jax.serve import page
from mnist_jax.serve.batching import DEFAULT_MAX_BATCH, DEFAULT_MAX_WAIT_S, MicroBatcher
from mnist_jax.config import UserError

IMAGE_TYPES = ("image/png", "image/jpeg")
JSON_TYPE = "application/json"
MAX_UPLOAD_PIXELS = 16_000_000  # a decoded upload larger than this would stall a preprocessing thread


class RequestError(Exception):
    """A bad request: answered with `status` and `{"error": message}`, never a 5xx."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = " ".join(message.split())


# --- request parsing -----------------------------------------------------------------------------------------


Pixel = Annotated[float, Field(ge=0, le=255, strict=True, allow_inf_nan=False)]
Row = Annotated[list[Pixel], Field(min_length=28, max_length=28)]


class PixelsRequest(BaseModel):
    """The JSON body: 28 rows of 28 numbers in 0..255 (MNIST orientation, light digit on dark)."""

    model_config = ConfigDict(extra="forbid")
    pixels: Annotated[list[Row], Field(min_length=28, max_length=28,
                                       description="28 rows of 28 values 0-255, light digit on dark, used as is")]


class Prediction(BaseModel):
    prediction: int = Field(description="the class index")
    class_name: str = Field(description="the class's name in the dataset (for mnist the digit itself)")
    probabilities: list[float]


class Health(BaseModel):
    status: str
    checkpoint_step: int
    dataset: str


class ErrorBody(BaseModel):
    error: str


def parse_pixels(body: bytes) -> np.ndarray:
    """The (28, 28) uint8 image of a JSON body, or RequestError 422 saying what is wrong with it."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(422, f"malformed JSON: {error}") from None
    try:
        parsed = PixelsRequest.model_validate(payload)
    except ValidationError as error:
        first = error.errors()[0]
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"]).lstrip(".")
        raise RequestError(422, f"{where or 'body'}: {first['msg']}" +
                           (f" ({error.error_count()} errors)" if error.error_count() > 1 else "")) from None
    return np.rint(np.asarray(parsed.pixels, dtype=np.float64)).astype(np.uint8)


def preprocess_upload(body: bytes) -> np.ndarray:
    """The MNIST-style digit of an uploaded PNG/JPEG, or RequestError 400 with the reason."""
    from mnist_jax.images import ImageError, load_image_bytes, to_mnist

    try:
        return to_mnist(load_image_bytes(body, "<upload>", max_pixels=MAX_UPLOAD_PIXELS))
    except ImageError as error:
        raise RequestError(400, f"unusable image: {error.reason}") from None


def media_type(header: str | None) -> str:
    return (header or "").split(";", 1)[0].strip().lower()


async def read_body(request: Any, max_bytes: int) -> bytes:
    """The request body, refusing (413) a declared or actual size over `max_bytes` without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise RequestError(400, "invalid Content-Length header")
        if int(declared) > max_bytes:
            raise RequestError(413, f"request body of {int(declared)} bytes is over the {max_bytes}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise RequestError(413, f"request body is over the {max_bytes}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


# --- the app -------------------------------------------------------------------------------------------------


def create_app(model: Any, predict: Callable[[np.ndarray], np.ndarray], max_body_bytes: int = 2_000_000,
               max_batch: int = DEFAULT_MAX_BATCH, max_wait_s: float = DEFAULT_MAX_WAIT_S):
    """The FastAPI app for a restored model and its (warmed) batched predict function."""
    batcher = MicroBatcher(predict, max_batch=max_batch, max_wait_s=max_wait_s)
    preprocess_pool = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2,
                                                            thread_name_prefix="preprocess")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            preprocess_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="mnist_jax", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Classifies a handwritten digit: a drawing page at / and a JSON API.")
    app.state.batcher = batcher
    app.mount("/static", StaticFiles(directory=str(page.STATIC)), name="static")

    def error_response(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, error: RequestError) -> JSONResponse:
        return error_response(error.status, error.message)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid request")

    class_names = list(model.class_names)
    page_html = page.render(
        assets="/static/", hint="Use your mouse, pen or finger. The model guesses as you draw.",
        scripts=["drawing.js", "app.js"],
        footer='JSON API: POST /api/predict, described in <a href="/openapi.json">/openapi.json</a>',
        head=[f'<meta name="class-names" content="{html.escape(json.dumps(class_names))}">'])
    icon = page.favicon()

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page_html, headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(icon, media_type="image/x-icon", headers={"Cache-Control": "max-age=86400"})

    @app.get("/healthz", response_model=Health, summary="Liveness and the checkpoint being served")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "checkpoint_step": int(model.step), "dataset": model.config.dataset}

    errors = {status: {"model": ErrorBody, "description": text} for status, text in (
        (400, "unreadable image"), (413, "body over the size limit"), (415, "unsupported content type"),
        (422, "malformed or wrongly shaped JSON"))}
    request_body = {
        "required": True,
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            JSON_TYPE: {"schema": PixelsRequest.model_json_schema()},
        },
    }

    @app.post("/api/predict", response_model=Prediction, responses=errors,
              openapi_extra={"requestBody": request_body}, summary="Classify one digit")
    async def predict_digit(request: Request) -> JSONResponse:
        """PNG/JPEG bytes (any digit photo or drawing, preprocessed like `mnist_jax.predict`), or JSON
        `{"pixels": 28x28 numbers 0-255}` already in MNIST form (light digit on dark, used as is)."""
        kind = media_type(request.headers.get("content-type"))
        if kind not in IMAGE_TYPES and kind != JSON_TYPE:
            raise RequestError(415, f"unsupported content type {kind or '(none)'!r}: send image/png, image/jpeg "
                                    "or application/json")
        body = await read_body(request, max_body_bytes)
        loop = asyncio.get_running_loop()
        if kind == JSON_TYPE:
            image = parse_pixels(body)
        else:
            image = await loop.run_in_executor(preprocess_pool, preprocess_upload, body)
        probabilities, batch_size = await batcher.predict(image)
        index = int(np.argmax(probabilities))
        return JSONResponse({"prediction": index, "class_name": class_names[index],
                             "probabilities": [float(p) for p in probabilities]},
                            headers={"X-Batch-Size": str(batch_size)})

    return app


# --- the command line ----------------------------------------------------------------------------------------


def warm_up(predict: Callable[[np.ndarray], np.ndarray], max_batch: int) -> None:
    """Compiles predict for every power-of-two batch size the batcher can produce (1, 2, 4, ... max_batch)."""
    size = 1
    while True:
        predict(np.zeros((min(size, max_batch), 28, 28), np.uint8))
        if size >= max_batch:
            return
        size *= 2


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket, so a taken port or bad host is a one-line error and port 0 picks a free port."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise UserError(f"cannot resolve --host {host!r}: {error.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(host: str, sock: socket.socket) -> str:
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


async def _serve(server: Any, sock: socket.socket, ready_message: str) -> None:
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if server.started:
        print(ready_message, flush=True)
    await task


def serve(workdir: str, host: str = "127.0.0.1", port: int = 8000, checkpoint: str = "best",
          max_body_bytes: int = 2_000_000, max_batch: int = DEFAULT_MAX_BATCH) -> None:
    """Restores, warms and serves the model until SIGINT/SIGTERM, then shuts down gracefully."""
    from mnist_jax.checkpoint import restore_model
    from mnist_jax.inference import make_predict_fn

    model = restore_model(workdir, checkpoint)
    if tuple(model.image_shape) != (28, 28, 1):
        raise UserError(f"serve needs a 28x28 grayscale model; {workdir} holds one for {model.image_shape}")
    sock = bind_socket(host, port)
    print(f"compiling the model for batches of 1 to {max_batch} images...", file=sys.stderr, flush=True)
    predict = make_predict_fn(model, batch_size=max_batch)
    warm_up(predict, max_batch)

    import uvicorn

    app = create_app(model, predict, max_body_bytes=max_body_bytes, max_batch=max_batch)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                           timeout_graceful_shutdown=5))
    stopped_by: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):  # uvicorn re-raises the signal after its graceful shutdown
        signal.signal(sig, lambda number, frame: stopped_by.append(number))
    ready = f"serving {model.config.dataset} checkpoint {model.step} at {url_of(host, sock)} (Ctrl-C stops)"
    asyncio.run(_serve(server, sock, ready))
    sock.close()
    print("stopped", file=sys.stderr, flush=True)

