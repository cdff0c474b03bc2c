"""Where the web export gets ONNX Runtime Web: the pin the package ships equals package-lock.json's, the places are
tried in order, and the cache is filled from a registry (a real local HTTP server serving npm's real tarball) only
with a tarball whose sha512 matches the pin; a tampered or wrong one, or no way at all, is one line and writes
nothing."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest

from helpers import REPO, StaticServer, free_port, npm_registry
from mnist_jax.export import webruntime


def fake_dist(root: Path, version: str = webruntime.VERSION) -> Path:
    """A package folder as npm lays it out (package.json, dist/ with the runtime's files), naming its place."""
    (root / "dist").mkdir(parents=True)
    (root / "package.json").write_text(json.dumps({"name": webruntime.PACKAGE, "version": version}))
    for name in webruntime.RUNTIME_FILES:
        (root / "dist" / name).write_text(f"{name} from {root.name}")
    return root / "dist"


def members(tarball: bytes) -> dict[str, bytes]:
    """Every regular file of an npm tarball, by its path inside the package."""
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
        return {m.name.removeprefix("package/"): archive.extractfile(m).read() for m in archive if m.isfile()}


def closed_port_url() -> str:
    """An address where nothing listens: connecting is refused at once, as offline."""
    return f"http://127.0.0.1:{free_port()}"


def test_the_pin_the_package_ships_is_package_lock_jsons() -> None:
    lock = json.loads((REPO / "package-lock.json").read_text())["packages"][f"node_modules/{webruntime.PACKAGE}"]
    assert (webruntime.VERSION, webruntime.INTEGRITY) == (lock["version"], lock["integrity"]), (
        "copy package-lock.json's version and integrity of onnxruntime-web into mnist_jax/export/webruntime.py")
    assert json.loads((REPO / "package.json").read_text())["dependencies"][webruntime.PACKAGE] == webruntime.VERSION


def test_the_first_place_that_holds_a_copy_is_used(tmp_path) -> None:
    flag, variable, checkout = (fake_dist(tmp_path / name) for name in ("flag", "variable", "checkout"))
    cache_home = tmp_path / "cache-home"
    cached = fake_dist(webruntime.cache_dir({"XDG_CACHE_HOME": str(cache_home)}))
    environ = {webruntime.DIRECTORY_VARIABLE: str(variable), "XDG_CACHE_HOME": str(cache_home)}

    def located(given, environ, checkout_dist):
        return webruntime.locate(given, environ, checkout_dist, log=pytest.fail)  # nothing is downloaded

    assert located(str(flag), environ, checkout) == flag
    assert located(None, environ, checkout) == variable
    without_variable = {"XDG_CACHE_HOME": str(cache_home)}
    assert located(None, without_variable, checkout) == checkout
    assert located(None, without_variable, None) == cached
    # A checkout without node_modules/onnxruntime-web (no `npm ci` yet) is passed over, not an error.
    assert located(None, without_variable, tmp_path / "no-npm-ci" / "node_modules" / "x" / "dist") == cached


@pytest.mark.parametrize("place", ["flag", "variable", "checkout", "cache"])
def test_a_copy_of_another_version_or_an_incomplete_one_is_refused_naming_the_remedy(place, tmp_path) -> None:
    cache_home = tmp_path / "cache-home"
    root = webruntime.cache_dir({"XDG_CACHE_HOME": str(cache_home)}) if place == "cache" else tmp_path / place
    dist = fake_dist(root, version="1.0.0")
    environ = {"XDG_CACHE_HOME": str(cache_home)} | (
        {webruntime.DIRECTORY_VARIABLE: str(dist)} if place == "variable" else {})
    given = str(dist) if place == "flag" else None
    checkout = dist if place == "checkout" else None
    remedy = {"flag": "pass the dist folder of onnxruntime-web 1.31.1 to --onnxruntime-web",
              "variable": "point $MNIST_JAX_ONNXRUNTIME_WEB at the dist folder of onnxruntime-web 1.31.1, or unset it",
              "checkout": "run `npm ci` in the checkout",
              "cache": f"remove {root}, and export downloads the runtime again"}[place].replace(
                  "1.31.1", webruntime.VERSION)
    with pytest.raises(webruntime.RuntimeUnavailable) as wrong_version:
        webruntime.locate(given, environ, checkout, log=pytest.fail)
    assert str(wrong_version.value) == (f"ONNX Runtime Web in {dist} is onnxruntime-web 1.0.0, not "
                                        f"{webruntime.VERSION}, the version package-lock.json pins: {remedy}")
    (dist / webruntime.RUNTIME_FILES[-1]).unlink()
    with pytest.raises(webruntime.RuntimeUnavailable) as incomplete:
        webruntime.locate(given, environ, checkout, log=pytest.fail)
    assert str(incomplete.value) == (f"ONNX Runtime Web not found in {dist} (missing {webruntime.RUNTIME_FILES[-1]}): "
                                     f"{remedy}")


def test_the_cache_is_filled_from_the_registry_with_the_verified_tarball_and_used_offline(
        onnxruntime_web_tarball, tmp_path) -> None:
    tarball = onnxruntime_web_tarball.read_bytes()
    registry = npm_registry(tmp_path / "registry", tarball, webruntime.PACKAGE, webruntime.VERSION)
    environ = {"XDG_CACHE_HOME": str(tmp_path / "cache-home")}
    logged = []
    with StaticServer(registry) as server:
        environ[webruntime.REGISTRY_VARIABLE] = server.url + "/"  # a trailing slash, as mirrors are often written
        dist = webruntime.locate(None, environ, checkout_dist=None, log=logged.append)
    target = tmp_path / "cache-home" / "mnist_jax" / f"{webruntime.PACKAGE}-{webruntime.VERSION}"
    url = f"{server.url}/{webruntime.PACKAGE}/-/{webruntime.PACKAGE}-{webruntime.VERSION}.tgz"
    assert dist == target / "dist"
    assert server.requested == [url.removeprefix(server.url)]
    assert logged == [f"downloading {webruntime.PACKAGE} {webruntime.VERSION} from {url} into {target}"]
    packaged = members(tarball)
    assert {path.relative_to(target).as_posix(): path.read_bytes() for path in target.rglob("*") if path.is_file()} == {
        name: packaged[name] for name in ["package.json", *(f"dist/{name}" for name in webruntime.RUNTIME_FILES)]}
    assert [path.name for path in target.parent.iterdir()] == [target.name]  # no staging folder left behind
    # The server is gone: the cache alone serves, without a download.
    assert webruntime.locate(None, environ, checkout_dist=None, log=pytest.fail) == dist


@pytest.mark.parametrize("wrong", ["one byte changed", "another package's tarball"])
def test_a_tampered_or_wrong_tarball_is_refused_and_nothing_is_written(wrong, onnxruntime_web_tarball,
                                                                        tmp_path) -> None:
    tarball = bytearray(onnxruntime_web_tarball.read_bytes())
    if wrong == "one byte changed":
        tarball[len(tarball) // 2] ^= 1
    else:  # a well-formed package with every file export copies, but not the one the lock file pins
        files = {"package/package.json": json.dumps({"name": webruntime.PACKAGE, "version": webruntime.VERSION})}
        files |= {f"package/dist/{name}": "console.log('not onnxruntime')" for name in webruntime.RUNTIME_FILES}
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            for name, text in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(text.encode())
                archive.addfile(info, io.BytesIO(text.encode()))
        tarball = gzip.compress(buffer.getvalue())
    registry = npm_registry(tmp_path / "registry", bytes(tarball), webruntime.PACKAGE, webruntime.VERSION)
    environ = {"XDG_CACHE_HOME": str(tmp_path / "cache-home")}
    with StaticServer(registry) as server, pytest.raises(webruntime.RuntimeUnavailable) as refused:
        environ[webruntime.REGISTRY_VARIABLE] = server.url
        webruntime.locate(None, environ, checkout_dist=None, log=lambda line: None)
    url = webruntime.tarball_url(environ)
    assert str(refused.value) == (f"refused {url}: its sha512 is {webruntime.integrity(bytes(tarball))[:27]}..., not "
                                  f"the integrity package-lock.json pins for {webruntime.PACKAGE} {webruntime.VERSION} "
                                  f"({webruntime.INTEGRITY[:27]}...); nothing was unpacked")
    assert not (tmp_path / "cache-home").exists()


@pytest.mark.parametrize("why", ["no network", "MNIST_JAX_OFFLINE=1", "not on the mirror"])
def test_with_no_way_to_get_it_one_line_names_every_way_and_nothing_is_written(why, tmp_path) -> None:
    environ = {"XDG_CACHE_HOME": str(tmp_path / "cache-home")}
    if why == "MNIST_JAX_OFFLINE=1":
        environ["MNIST_JAX_OFFLINE"] = "1"
    (tmp_path / "empty-mirror").mkdir()
    with StaticServer(tmp_path / "empty-mirror") as mirror:
        environ[webruntime.REGISTRY_VARIABLE] = mirror.url if why == "not on the mirror" else closed_port_url()
        with pytest.raises(webruntime.RuntimeUnavailable) as unavailable:
            webruntime.locate(None, environ, checkout_dist=None, log=lambda line: None)
    message = str(unavailable.value)
    url, target = webruntime.tarball_url(environ), webruntime.cache_dir(environ)
    assert message.startswith(
        f"the web format needs ONNX Runtime Web {webruntime.VERSION}: pass --onnxruntime-web DIR, set "
        f"$MNIST_JAX_ONNXRUNTIME_WEB, run `npm ci` in a source checkout, or let export download it from {url} into "
        f"{target} ($MNIST_JAX_NPM_REGISTRY names a mirror); "), message
    assert message.endswith({"no network": "the download failed: [Errno 111] Connection refused",
                             "MNIST_JAX_OFFLINE=1": "MNIST_JAX_OFFLINE=1 forbids the download",
                             "not on the mirror": "the download failed: File not found"}[why]), message
    assert "\n" not in message
    assert not (tmp_path / "cache-home").exists()


def test_a_cache_that_cannot_be_written_is_one_line(onnxruntime_web_tarball, tmp_path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    registry = npm_registry(tmp_path / "registry", onnxruntime_web_tarball.read_bytes(), webruntime.PACKAGE,
                            webruntime.VERSION)
    environ = {"XDG_CACHE_HOME": str(tmp_path / "a-file" / "cache")}
    with StaticServer(registry) as server, pytest.raises(webruntime.RuntimeUnavailable) as unwritable:
        environ[webruntime.REGISTRY_VARIABLE] = server.url
        webruntime.locate(None, environ, checkout_dist=None, log=lambda line: None)
    assert str(unwritable.value) == (f"cannot write the cache {webruntime.cache_dir(environ)} (Not a directory): set "
                                     "$XDG_CACHE_HOME to a writable folder, or pass --onnxruntime-web DIR")
