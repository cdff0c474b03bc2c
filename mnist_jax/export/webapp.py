"""The offline web app: the drawing page, model.onnx and ONNX Runtime Web's files, as plain static files.

Any static host serves it (`python -m http.server`, GitHub Pages). The page preprocesses each drawing as
`images.to_mnist` does and classifies it in the browser; a web app manifest and a service worker make it
installable on a phone and usable offline after the first visit. ONNX Runtime Web's files, at the version
package-lock.json pins, are copied from where `webruntime.locate` finds them; they are never committed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from mnist_jax.export.webruntime import RUNTIME_FILES
from mnist_jax.serve import page

MODEL_FILE = "model.onnx"
STATIC = page.STATIC
APP_FILES = ("web/manifest.webmanifest", "web/offline.js", "web/preprocess.js", "drawing.js",
             "style.css")
ICON_SIZES = (192, 512)


def write_web_folder(path: str, onnx_model: bytes, runtime: Path) -> None:
    """Writes the app into the (new) folder `path`, with ONNX Runtime Web's files from `runtime` (its `dist/`)."""
    target = Path(path)
    target.mkdir(parents=True)
    for name in APP_FILES:
        (target / Path(name).name).write_bytes((STATIC / name).read_bytes())
    (target / "index.html").write_text(page.render(
        assets="", hint="Use your mouse, pen or finger. The model runs in this browser, also offline.",
        scripts=["ort.wasm.min.js", "drawing.js", "preprocess.js", "offline.js"],
        footer="Exported by mnist_jax: model.onnx, run by ONNX Runtime Web. No drawing leaves this device.",
        head=['<meta name="theme-color" content="#1d2430">', '<link rel="manifest" href="manifest.webmanifest">',
              '<link rel="icon" href="icon-192.png">', '<link rel="apple-touch-icon" href="icon-192.png">']))
    for name in RUNTIME_FILES:
        shutil.copyfile(runtime / name, target / name)
    (target / MODEL_FILE).write_bytes(onnx_model)
    for size in ICON_SIZES:
        page.icon(size, max(2, size // 12)).save(target / f"icon-{size}.png")
    files = sorted(p.name for p in target.iterdir())
    # The cache's name follows the model, so a new export replaces the offline copy of an old one.
    cache = "mnist-jax-" + hashlib.sha256(onnx_model).hexdigest()[:16]
    worker = (STATIC / "web" / "sw.js").read_text()
    worker = worker.replace("__CACHE__", cache).replace("__FILES__", json.dumps(["./"] + files))
    (target / "sw.js").write_text(worker)
