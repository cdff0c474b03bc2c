"""Export: every format written, loaded by its own runtime and compared with JAX; the manifest; a failing format
leaves nothing behind; bad inputs; `predict --model`. The browser side of the web app: test_export_browser.py."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from helpers import (SMALL_MODEL_FLAGS, TINY, TINY_FLAGS, built_once, digit_png, make_tiny_images, run_main_in_process,
                     run_module, shared_path, web_runtime_dir)

FLOAT_FORMATS = ("tflite", "onnx", "savedmodel")
LOCAL_FORMATS = "tflite,tflite_fp16,tflite_int8,onnx,savedmodel"  # all but web, which needs ONNX Runtime Web


def export_main(*args):
    from mnist_jax.export import __main__ as export

    return run_main_in_process(export.main, *args)


@pytest.fixture(scope="session")
def exported(tiny_run_in_process, tiny_data_dir, tmp_path_factory) -> Path:
    """tiny_run_in_process exported to every format but web, once per test session (the workers share it)."""
    out = shared_path(tmp_path_factory, "export")
    with built_once(out) as needed:
        if needed:
            result = export_main("--workdir", tiny_run_in_process, "--formats", LOCAL_FORMATS, "--out", out,
                                 "--data-dir", tiny_data_dir)
            assert result.returncode == 0, result.stderr
            assert result.stderr == ""
            (out / "stdout.txt").write_text(result.stdout)
    return out


def manifest_of(out: Path) -> dict:
    return json.loads((out / "export.json").read_text())


# --------------------------------------------------------------------------------------------- the ONNX graph
def random_model(**architecture):
    """A model of this architecture with random weights and, with batch norm, random running statistics (drawn
    in numpy on the variables' shapes: nothing is compiled)."""
    import jax

    from mnist_jax.config import Config
    from mnist_jax.model import build_model

    module = build_model(dataclasses.replace(Config(), **architecture), 10, 0.13, 0.31)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), np.zeros((1, 28, 28, 1), np.uint8)))
    rng = np.random.default_rng(1)
    variables = jax.tree_util.tree_map(lambda leaf: rng.normal(0, 0.3, leaf.shape).astype(np.float32), shapes)
    if "batch_stats" in variables:  # variances stay positive
        variables["batch_stats"] = jax.tree_util.tree_map(np.abs, variables["batch_stats"])
    return module, variables


@pytest.mark.parametrize("architecture", [
    {"conv_features": (8, 16), "dense_features": (32,)},
    {"conv_features": (8, 16), "dense_features": (32, 16), "convs_per_block": 2, "pooling": "max",
     "batch_norm": True, "dropout_rate": 0.3},
], ids=["default-layout", "batch-norm-max-pool-two-convs-per-block"])
def test_the_onnx_graph_computes_what_the_model_computes(architecture) -> None:
    import jax
    import onnx
    import onnxruntime

    from mnist_jax.export.onnx_graph import to_onnx

    module, variables = random_model(**architecture)
    probabilities = jax.jit(lambda v, x: jax.nn.softmax(module.apply(v, x, train=False)))
    graph = to_onnx(module, variables, (28, 28, 1))
    onnx.checker.check_model(onnx.load_from_string(graph), full_check=True)
    session = onnxruntime.InferenceSession(graph, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for count in (1, 7):  # the batch is free
        images = make_tiny_images(rng.integers(0, 10, count), rng)
        expected = np.asarray(probabilities(variables, images))
        (got,) = session.run(None, {"images": images})
        assert got.shape == (count, 10) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_models_the_onnx_graph_cannot_express_are_refused_with_the_reason() -> None:
    from mnist_jax.config import Config
    from mnist_jax.export.onnx_graph import UnsupportedModel, to_onnx
    from mnist_jax.model import build_model

    for change, reason in (({"deskew": True}, "--deskew models are not supported"),
                           ({"dtype": "bfloat16"}, "--dtype bfloat16 models are not supported")):
        module = build_model(dataclasses.replace(Config(), **change), 10, 0.13, 0.31)
        with pytest.raises(UnsupportedModel, match=reason):
            to_onnx(module, {}, (28, 28, 1))  # refused before any weight is read


# --------------------------------------------------------------------------------------------- every format
def test_every_format_is_written_and_listed_with_its_check(exported, tiny_run_in_process, tiny_data_dir) -> None:
    from mnist_jax.export import runtimes
    from mnist_jax.checkpoint import restore_model
    from mnist_jax.data import load_split_numpy

    manifest = manifest_of(exported)
    images, labels = load_split_numpy(TINY, "test", str(tiny_data_dir))
    assert manifest["checkpoint_step"] == restore_model(str(tiny_run_in_process)).step
    assert manifest["dataset"] == TINY and manifest["class_names"] == [str(i) for i in range(10)]
    assert manifest["input"] | {"pixels": None} == {"name": "images", "shape": ["N", 28, 28, 1], "dtype": "uint8",
                                                    "pixels": None}
    assert "white digit on black" in manifest["input"]["pixels"]
    by_format = {entry["format"]: entry for entry in manifest["files"]}
    assert list(by_format) == LOCAL_FORMATS.split(",")
    for name, entry in by_format.items():
        path = exported / entry["path"]
        assert entry["bytes"] == (path.stat().st_size if path.is_file() else
                                  sum(p.stat().st_size for p in path.rglob("*") if p.is_file()))
        if path.is_file():
            assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert re.fullmatch(r"(ai-edge-litert|onnxruntime|tensorflow-cpu) \d+\.\d+\S*", entry["runtime"]), entry
        model_file = path / "1" if name == "savedmodel" else path
        predicted = runtimes.load(str(model_file))(images)  # an independent run of the file
        assert entry["test_accuracy"] == pytest.approx((predicted.argmax(-1) == labels).mean(), abs=1e-6)
        if name in FLOAT_FORMATS:
            assert entry["agreement_with_jax"] == 1.0 and entry["max_abs_probability_difference"] <= 1e-4
    assert not list(exported.glob(".staging-*"))
    assert len((exported / "stdout.txt").read_text().splitlines()) == 1 + len(by_format)


def test_tflite_files_take_one_uint8_image_and_use_builtin_operators_only(exported) -> None:
    from ai_edge_litert.interpreter import Interpreter

    from mnist_jax.export.runtimes import tflite_operators

    for name in ("model.tflite", "model_fp16.tflite", "model_int8.tflite"):
        interpreter = Interpreter(model_path=str(exported / name))
        (entry,), (exit_,) = interpreter.get_input_details(), interpreter.get_output_details()
        assert (list(entry["shape"]), entry["dtype"]) == ([1, 28, 28, 1], np.uint8)
        assert (list(exit_["shape"]), exit_["dtype"]) == ([1, 10], np.float32)
        operators = tflite_operators(str(exported / name))
        assert "CONV_2D" in operators and "FULLY_CONNECTED" in operators
        assert all(op.isupper() and not op.startswith(("STABLEHLO", "FLEX", "CUSTOM")) for op in operators), operators
    int8 = tflite_operators(str(exported / "model_int8.tflite"))
    assert "QUANTIZE" in int8 and "DEQUANTIZE" in int8  # quantised inside, float probabilities out


def test_the_onnx_file_and_the_savedmodel_take_any_batch(exported) -> None:
    import onnx
    import tensorflow as tf

    graph = onnx.load(str(exported / "model.onnx"))
    onnx.checker.check_model(graph)
    (entry,), (exit_,) = graph.graph.input, graph.graph.output
    dims = [d.dim_param or d.dim_value for d in entry.type.tensor_type.shape.dim]
    assert (entry.name, dims, exit_.name) == ("images", ["N", 28, 28, 1], "probabilities")
    assert (exported / "savedmodel" / "1" / "saved_model.pb").is_file()  # TF Serving's numbered version
    signature = tf.saved_model.load(str(exported / "savedmodel" / "1")).signatures["serving_default"]
    (spec,) = signature.structured_input_signature[1].values()
    assert (spec.shape.as_list(), spec.dtype) == ([None, 28, 28, 1], tf.uint8)


def test_a_folder_digest_is_what_sha256sum_prints(exported) -> None:
    from mnist_jax.export.pipeline import _sha256

    folder = exported / "savedmodel"
    shell = subprocess.run("find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum",
                           shell=True, cwd=folder, capture_output=True, text=True, check=True)
    assert _sha256(str(folder)) == shell.stdout.split()[0]
    assert manifest_of(exported)["files"][4]["sha256"] == shell.stdout.split()[0]


def test_exporting_again_keeps_other_formats_of_the_same_checkpoint_only(exported, tiny_run_in_process,
                                                                       tiny_data_dir, tmp_path) -> None:
    import shutil

    from mnist_jax.checkpoint import open_manager

    out = tmp_path / "out"
    shutil.copytree(exported, out)
    (out / "stdout.txt").unlink()
    (out / ".done").unlink()
    same = export_main("--workdir", tiny_run_in_process, "--formats", "onnx", "--out", out, "--data-dir",
                       tiny_data_dir)
    assert same.returncode == 0, same.stderr
    assert manifest_of(out)["files"] == manifest_of(exported)["files"]  # the ONNX file is rebuilt bit for bit
    step = manifest_of(out)["checkpoint_step"]
    earlier = min(open_manager(str(tiny_run_in_process), read_only=True).all_steps())
    assert earlier != step
    other = export_main("--workdir", tiny_run_in_process, "--formats", "onnx", "--checkpoint", earlier, "--out",
                        out, "--data-dir", tiny_data_dir)
    assert other.returncode == 0, other.stderr
    assert [line for line in other.stdout.splitlines() if line.startswith("removed")] == [
        f"removed {path}: exported from checkpoint {step}, not {earlier}"
        for path in ("model.tflite", "model_fp16.tflite", "model_int8.tflite", "savedmodel/")]
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.onnx"]
    assert manifest_of(out)["checkpoint_step"] == earlier


# --------------------------------------------------------------------------------------------- failures
def test_a_format_that_cannot_be_made_leaves_nothing_and_the_others_are_written(
        tiny_run_in_process, tiny_data_dir, tmp_path, monkeypatch) -> None:
    from mnist_jax.checkpoint import restore_model
    from mnist_jax.export import pipeline as exporting

    # The run's model with the deskewing warp, which the ONNX writer refuses and the SavedModel holds.
    model = restore_model(str(tiny_run_in_process))
    deskewing = dataclasses.replace(model, module=model.module.clone(deskew=True))
    monkeypatch.setattr(exporting, "restore_model", lambda workdir, checkpoint: deskewing)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_text("an earlier export")
    (out / ".staging-onnx-killed").mkdir()  # what an export killed mid-way leaves
    result = export_main("--workdir", tiny_run_in_process, "--formats", "onnx,savedmodel", "--out", out,
                         "--data-dir", tiny_data_dir)
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["error: onnx: --deskew models are not supported (the deskewing warp has no "
                                          "ONNX form here)"]
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "savedmodel"]
    assert [entry["format"] for entry in manifest_of(out)["files"]] == ["savedmodel"]


def test_a_format_that_disagrees_with_jax_is_not_kept(tiny_run_in_process, tiny_data_dir, tmp_path,
                                                       monkeypatch) -> None:
    from mnist_jax.export import runtimes

    real_load = runtimes.load

    def shifted(path, threads=None):
        predict = real_load(path, threads)
        return lambda images: np.roll(predict(images), 1, axis=-1)  # every class off by one

    monkeypatch.setattr(runtimes, "load", shifted)
    result = export_main("--workdir", tiny_run_in_process, "--formats", "onnx", "--out", tmp_path,
                         "--data-dir", tiny_data_dir)
    assert result.returncode == 1
    assert re.fullmatch(r"error: onnx: differs from JAX: same class on 0/200 test images, largest probability "
                        r"difference \S+ \(allowed 1e-04\)\n", result.stderr)
    assert not (tmp_path / "model.onnx").exists() and manifest_of(tmp_path)["files"] == []


@pytest.mark.parametrize("case", ["missing workdir", "unknown format", "not 28x28 grayscale", "bad checkpoint",
                                  "no web runtime"])
def test_bad_inputs_get_one_line_and_exit_2(case, tiny_run_in_process, tiny_data_dir, tmp_path,
                                             monkeypatch) -> None:
    args = ["--workdir", tiny_run_in_process, "--data-dir", tiny_data_dir, "--out", tmp_path / "out"]
    expected = {
        "missing workdir": r"error: no checkpoints found: .*/nowhere/checkpoints does not exist .*",
        "unknown format": r"error: --formats: unknown format tflite_int4 \(choose from all, tflite, .*",
        "not 28x28 grayscale": r"error: export needs a model of 28x28 grayscale images; .* holds one of 28x28x3",
        "bad checkpoint": r"error: --checkpoint must be best, latest or one of the saved steps .*",
        "no web runtime": (rf"error: ONNX Runtime Web not found in {re.escape(str(tmp_path / 'nothing-here'))} "
                           r"\(missing ort.wasm.min.js, ort-wasm-simd-threaded.mjs, ort-wasm-simd-threaded.wasm\): "
                           r"pass the dist folder of onnxruntime-web 1\.\d+\.\d+ to --onnxruntime-web"),
    }[case]
    if case == "missing workdir":
        args[1] = tmp_path / "nowhere"
    elif case == "unknown format":
        args += ["--formats", "onnx,tflite_int4"]
    elif case == "bad checkpoint":
        args += ["--checkpoint", "12345"]
    elif case == "no web runtime":
        args += ["--formats", "onnx,web", "--onnxruntime-web", tmp_path / "nothing-here"]
    else:
        from mnist_jax.export import pipeline as exporting
        from mnist_jax.checkpoint import restore_model

        rgb = dataclasses.replace(restore_model(str(tiny_run_in_process)), image_shape=(28, 28, 3))
        monkeypatch.setattr(exporting, "restore_model", lambda workdir, checkpoint: rgb)
    result = export_main(*args)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and re.fullmatch(expected + "\n", result.stderr), result.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- predict --model
def test_predict_with_an_exported_file_matches_predict_with_the_workdir(exported, tiny_run_in_process,
                                                                        tmp_path) -> None:
    from mnist_jax import predict

    files = []
    for seed in range(3):
        files.append(tmp_path / f"digit{seed}.png")
        files[-1].write_bytes(digit_png(seed, dark_on_light=seed % 2 == 1))
    files.append(tmp_path / "missing.png")
    reference = run_main_in_process(predict.main, "--workdir", tiny_run_in_process, *files, "--json")
    expected = json.loads(reference.stdout)
    for name in ("model.onnx", "model.tflite", "model_int8.tflite"):
        result = run_main_in_process(predict.main, "--model", exported / name, *files, "--json")
        assert result.returncode == reference.returncode == 1  # the missing file
        got = json.loads(result.stdout)
        assert got[-1] == expected[-1]
        for mine, theirs in zip(got[:-1], expected[:-1]):
            assert mine["file"] == theirs["file"] and len(mine["probabilities"]) == 10
            if name == "model_int8.tflite":
                # Scribbles lie outside tiny_digits, whose training images calibrated the int8 ranges: its
                # activations saturate there. Export checks int8 against JAX on the test split instead.
                continue
            np.testing.assert_allclose(mine["probabilities"], theirs["probabilities"], atol=1e-4)
            assert mine["prediction"] == theirs["prediction"], (name, mine["file"])


@pytest.mark.parametrize("flags, message", [
    (("--model", "nowhere.onnx"), "error: nowhere.onnx: no such file"),
    (("--model", "{png}"), "error: {png}: not an exported model (expected a .tflite or .onnx file, or a SavedModel "
                           "folder)"),
    (("--model", "{exported}/model.onnx", "--tta"), "error: --tta needs --workdir: an exported model holds plain "
                                                    "prediction only"),
    (("--model", "{bad}"), "error: {bad}: cannot be loaded by onnxruntime: .*"),
])
def test_predict_model_errors(flags, message, exported, tmp_path) -> None:
    from mnist_jax import predict

    png, bad = tmp_path / "digit.png", tmp_path / "bad.onnx"
    png.write_bytes(digit_png(0))
    bad.write_bytes(b"not a model")
    names = {"png": png, "exported": exported, "bad": bad}
    result = run_main_in_process(predict.main, *(flag.format(**names) for flag in flags), png)
    assert result.returncode == 2
    assert re.fullmatch(re.escape(message.format(**names)).replace(r"\.\*", ".*") + "\n", result.stderr), result.stderr


# --------------------------------------------------------------------------------------------- as users run it
@pytest.mark.e2e
@pytest.mark.parametrize("run", ["tiny_run", "strong_tiny_run"])
def test_the_export_command_writes_every_format(run, request, tiny_data_dir, tmp_path) -> None:
    """The default layout, and `strong`'s (two convs per block, grouped batch norm, dropout, the moving average)."""
    result = run_module("mnist_jax.export", "--workdir", request.getfixturevalue(run), "--out", tmp_path,
                        "--data-dir", tiny_data_dir, "--onnxruntime-web", web_runtime_dir())
    assert result.returncode == 0, result.stderr
    formats = [entry["format"] for entry in manifest_of(tmp_path)["files"]]
    assert formats == ["tflite", "tflite_fp16", "tflite_int8", "onnx", "savedmodel", "web"]
    assert [line.split()[0] for line in result.stdout.splitlines()[1:]] == formats
    web = manifest_of(tmp_path)["files"][-1]
    assert web["path"] == "web/" and web["browser_runtime"].startswith("onnxruntime-web 1.")
    app = {p.name for p in (tmp_path / "web").iterdir()}
    assert {"index.html", "sw.js", "manifest.webmanifest", "model.onnx", "ort-wasm-simd-threaded.wasm",
            "icon-192.png", "icon-512.png"} <= app
    cached = json.loads(re.search(r"const FILES = (\[.*\]);", (tmp_path / "web" / "sw.js").read_text()).group(1))
    assert set(cached) == {"./"} | app - {"sw.js"}  # the offline copy: every file but the worker itself
    assert (tmp_path / "web" / "model.onnx").read_bytes() == (tmp_path / "model.onnx").read_bytes()
    for entry in manifest_of(tmp_path)["files"]:
        if entry["format"] in FLOAT_FORMATS:
            assert entry["agreement_with_jax"] == 1.0 and entry["max_abs_probability_difference"] <= 1e-4


@pytest.mark.e2e
def test_a_model_some_formats_cannot_hold_gets_the_others_and_one_line_per_failure(tiny_data_dir, tmp_path) -> None:
    trained = run_module("mnist_jax.train", "--workdir", tmp_path / "run", "--data-dir", tiny_data_dir, *TINY_FLAGS,
                         "--epochs", "1", "--deskew", "true", *SMALL_MODEL_FLAGS)
    assert trained.returncode == 0, trained.stderr
    result = run_module("mnist_jax.export", "--workdir", tmp_path / "run", "--out", tmp_path / "out",
                        "--data-dir", tiny_data_dir, "--onnxruntime-web", web_runtime_dir())
    assert result.returncode == 1
    failed = dict(line.removeprefix("error: ").split(": ", 1) for line in result.stderr.splitlines())
    assert "Traceback" not in result.stderr and all(name in LOCAL_FORMATS + ",web" for name in failed)
    assert failed["onnx"] == failed["web"] == ("--deskew models are not supported (the deskewing warp has no ONNX "
                                               "form here)")
    written = [entry["format"] for entry in manifest_of(tmp_path / "out")["files"]]
    assert written and set(written).isdisjoint(failed)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["export.json"] + [entry["path"].rstrip("/") for entry in manifest_of(tmp_path / "out")["files"]])
