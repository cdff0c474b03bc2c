"""ONNX Runtime Web for the exported web app, at exactly the version package-lock.json pins, found or fetched.

Export looks, in order, and the first place that holds a copy must hold the pinned version:
1. `--onnxruntime-web DIR`, the package's `dist/` folder;
2. `$MNIST_JAX_ONNXRUNTIME_WEB`, the same;
3. `node_modules/onnxruntime-web/dist` of the source checkout the package runs from (`npm ci` fills it);
4. the per-user cache, `$XDG_CACHE_HOME/mnist_jax/onnxruntime-web-VERSION/` (default `~/.cache`), which export fills
   itself: it downloads the package's npm tarball from `$MNIST_JAX_NPM_REGISTRY` (default registry.npmjs.org) and
   unpacks the runtime's files only after the tarball's sha512 has matched the lock file's integrity hash.

An installed wheel has no package-lock.json, so the pin ships here as VERSION and INTEGRITY; a test holds them equal
to the lock file's entry. A folder's version is the one its package's package.json (above `dist/`) states.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import os
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import IO, Callable, Mapping

from mnist_jax.config import UserError

PACKAGE = "onnxruntime-web"
VERSION = "1.31.1"
INTEGRITY = "sha512-5GeH+bWQ+HxM10z7erGlsWqryrwMbSvm/1tkIsKTT48g0fI19VXVVC435t4t7VsPdSQeS7NmuZPXrQ73k82URw=="
# The CPU (WebAssembly SIMD) build and its loader; the WebGPU and other builds are not needed for a small CNN.
RUNTIME_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
DIRECTORY_VARIABLE = "MNIST_JAX_ONNXRUNTIME_WEB"
REGISTRY_VARIABLE = "MNIST_JAX_NPM_REGISTRY"
DEFAULT_REGISTRY = "https://registry.npmjs.org"
DOWNLOAD_TIMEOUT_S = 60  # per network operation, not for the whole download

_ROOT = Path(__file__).resolve().parents[2]
# Only a source checkout has package-lock.json beside the package; an installed copy has no node_modules to use.
CHECKOUT_DIST = _ROOT / "node_modules" / PACKAGE / "dist" if (_ROOT / "package-lock.json").is_file() else None


class RuntimeUnavailable(UserError):
    """ONNX Runtime Web is not where it was looked for, is another version, or failed the integrity check."""


def locate(given: str | None, environ: Mapping[str, str] = os.environ, checkout_dist: Path | None = CHECKOUT_DIST,
           log: Callable[[str], None] = print) -> Path:
    """The `dist/` folder of ONNX Runtime Web VERSION, from the first of the four places that holds a copy,
    downloading it into the cache when none does. RuntimeUnavailable (one line) otherwise; nothing is written
    unless the download passed the integrity check."""
    if given:
        return checked_dist(Path(given), f"pass the dist folder of {PACKAGE} {VERSION} to --onnxruntime-web")
    if environ.get(DIRECTORY_VARIABLE):
        return checked_dist(Path(environ[DIRECTORY_VARIABLE]),
                            f"point ${DIRECTORY_VARIABLE} at the dist folder of {PACKAGE} {VERSION}, or unset it")
    if checkout_dist is not None and checkout_dist.parent.is_dir():
        return checked_dist(checkout_dist, "run `npm ci` in the checkout")
    cached = cache_dir(environ)
    if cached.is_dir():
        return checked_dist(cached / "dist", f"remove {cached}, and export downloads the runtime again")
    return fill_cache(cached, environ, log)


def checked_dist(dist: Path, remedy: str) -> Path:
    """`dist` when it holds the runtime's files and its package.json states VERSION; RuntimeUnavailable naming
    `remedy` otherwise."""
    missing = [name for name in RUNTIME_FILES if not (dist / name).is_file()]
    if missing:
        raise RuntimeUnavailable(f"ONNX Runtime Web not found in {dist} (missing {', '.join(missing)}): {remedy}")
    try:
        found = json.loads((dist.parent / "package.json").read_text()).get("version")
    except (OSError, ValueError, AttributeError):
        found = None
    if found != VERSION:
        stated = f"is {PACKAGE} {found}" if found else "states no version in ../package.json"
        raise RuntimeUnavailable(f"ONNX Runtime Web in {dist} {stated}, not {VERSION}, the version package-lock.json "
                                 f"pins: {remedy}")
    return dist


def cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """`$XDG_CACHE_HOME/mnist_jax/onnxruntime-web-VERSION`, `~/.cache/...` without the variable."""
    home = Path(environ["HOME"]) if environ.get("HOME") else Path.home()
    return Path(environ.get("XDG_CACHE_HOME") or home / ".cache") / "mnist_jax" / f"{PACKAGE}-{VERSION}"


def tarball_url(environ: Mapping[str, str] = os.environ) -> str:
    """Where npm itself fetches the pinned tarball, on `$MNIST_JAX_NPM_REGISTRY` (a mirror) when it is set."""
    registry = (environ.get(REGISTRY_VARIABLE) or DEFAULT_REGISTRY).rstrip("/")
    return f"{registry}/{PACKAGE}/-/{PACKAGE}-{VERSION}.tgz"


def integrity(data: bytes) -> str:
    """npm's integrity string of a tarball: 'sha512-' and the base64 of its SHA-512."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def fill_cache(target: Path, environ: Mapping[str, str] = os.environ, log: Callable[[str], None] = print) -> Path:
    """Downloads the pinned tarball, checks it against INTEGRITY, then unpacks the runtime's files into `target`
    (atomically: a folder there is always complete); returns its `dist/`."""
    url = tarball_url(environ)
    if environ.get("MNIST_JAX_OFFLINE") == "1":
        raise RuntimeUnavailable(_nowhere(target, url, "MNIST_JAX_OFFLINE=1 forbids the download"))
    log(f"downloading {PACKAGE} {VERSION} from {url} into {target}")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            data = response.read()
    except (OSError, http.client.HTTPException, ValueError) as error:  # URLError is an OSError; a bad URL ValueError
        raise RuntimeUnavailable(_nowhere(target, url, f"the download failed: {getattr(error, 'reason', error)}"))
    found = integrity(data)
    if found != INTEGRITY:
        raise RuntimeUnavailable(f"refused {url}: its sha512 is {found[:27]}..., not the integrity package-lock.json "
                                 f"pins for {PACKAGE} {VERSION} ({INTEGRITY[:27]}...); nothing was unpacked")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    except OSError as error:
        raise RuntimeUnavailable(f"cannot write the cache {target} ({error.strerror}): set $XDG_CACHE_HOME to a "
                                 "writable folder, or pass --onnxruntime-web DIR") from None
    try:
        _unpack(io.BytesIO(data), staging)
        try:
            staging.rename(target)
        except OSError:  # another export filled it meanwhile, from the same verified tarball
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target / "dist"


def _unpack(tarball: IO[bytes], folder: Path) -> None:
    """package.json and the runtime's files from an npm tarball (whose paths start with `package/`), in one pass."""
    wanted = {"package/package.json": folder / "package.json"} | {
        f"package/dist/{name}": folder / "dist" / name for name in RUNTIME_FILES}
    (folder / "dist").mkdir()
    with tarfile.open(fileobj=tarball, mode="r|gz") as archive:
        for member in archive:
            if member.name in wanted and member.isfile():
                with archive.extractfile(member) as source, open(wanted.pop(member.name), "wb") as destination:
                    shutil.copyfileobj(source, destination)
    if wanted:
        raise RuntimeUnavailable(f"the {PACKAGE} {VERSION} tarball lacks {', '.join(sorted(wanted))}")


def _nowhere(target: Path, url: str, reason: str) -> str:
    return (f"the web format needs ONNX Runtime Web {VERSION}: pass --onnxruntime-web DIR, set ${DIRECTORY_VARIABLE}, "
            f"run `npm ci` in a source checkout, or let export download it from {url} into {target} "
            f"(${REGISTRY_VARIABLE} names a mirror); {reason}")
