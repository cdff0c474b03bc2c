"""`python -m mnist_jax.predict` on image files, as a user has them."""

import json

import numpy as np
import pytest
from PIL import Image

from mnist_jax.augment import TEST_TIME_VIEWS, apply_view
from mnist_jax.checkpoint import restore_model
from mnist_jax.data import load_split_numpy
from mnist_jax.export import runtimes
from mnist_jax.images import preprocess_file
from mnist_jax.predict import classify_files, format_result, predict_files

from helpers import CLASS_NAMES, IN_PROCESS, digit_png, numpy_softmax, run_tool


def save_forms(image: np.ndarray, directory, stem: str) -> list[str]:
    """One 28x28 light-on-dark digit as a user might have it: as is, black on white JPEG, RGBA, and enlarged."""
    gray = image[..., 0]
    paths = [directory / f"{stem}.png", directory / f"{stem}-inverted.jpg", directory / f"{stem}-rgba.png",
             directory / f"{stem}-large.png"]
    Image.fromarray(gray).save(paths[0])
    Image.fromarray(255 - gray).save(paths[1], quality=95)
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[..., 3] = gray  # white ink whose opacity is the digit, on a transparent canvas
    Image.fromarray(rgba, "RGBA").save(paths[2])
    Image.fromarray(255 - gray).resize((280, 280), Image.Resampling.BILINEAR).convert("RGB").save(paths[3])
    return [str(p) for p in paths]


def test_predict_cli_text_json_and_errors(way, tmp_path):
    tiny_run = way.fixture("tiny_run")
    good = tmp_path / "digit.png"
    Image.fromarray(np.pad(np.full((12, 6), 255, np.uint8), 8)).save(good)
    (tmp_path / "notes.png").write_text("not an image")
    missing = tmp_path / "missing.png"
    result = way.run("mnist_jax.predict", "--workdir", tiny_run, good, tmp_path / "notes.png", missing, "--json")
    assert result.returncode == 1  # some files failed; the others are still classified
    entries = json.loads(result.stdout)
    assert [e["file"] for e in entries] == [str(good), str(tmp_path / "notes.png"), str(missing)]
    assert 0 <= entries[0]["prediction"] < 10 and len(entries[0]["probabilities"]) == 10
    assert entries[0]["prediction"] == int(np.argmax(entries[0]["probabilities"]))
    assert sum(entries[0]["probabilities"]) == pytest.approx(1, abs=1e-5)
    assert "notes.png" in entries[1]["error"] and "missing.png" in entries[2]["error"]
    text = way.run("mnist_jax.predict", "--workdir", tiny_run, good)
    assert text.returncode == 0 and "top 3:" in text.stdout and text.stdout.startswith(str(good))


def test_predict_with_test_time_augmentation_averages_the_views(way, tmp_path):
    tiny_run = way.fixture("tiny_run")
    digit = tmp_path / "digit.png"
    Image.fromarray(np.pad(np.full((12, 6), 255, np.uint8), 8)).save(digit)
    result = way.run("mnist_jax.predict", "--workdir", tiny_run, digit, "--tta", "--json")
    assert result.returncode == 0, result.stderr
    model = restore_model(str(tiny_run), "best")
    pixels = preprocess_file(str(digit)).reshape(1, 28, 28, 1)
    expected = np.mean([numpy_softmax(model.module.apply(model.variables, apply_view(pixels, view)))[0]
                        for view in TEST_TIME_VIEWS], axis=0)
    np.testing.assert_allclose(json.loads(result.stdout)[0]["probabilities"], expected, atol=1e-5)


def test_predict_missing_workdir(way, tmp_path):
    result = way.run("mnist_jax.predict", "--workdir", tmp_path / "none", tmp_path / "x.png")
    assert result.returncode == 2 and "no checkpoints found" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_run_with_class_names_prints_and_returns_them(named_run_in_process, tmp_path):
    """fashion_mnist's 7 is a Sneaker: the text says so, and --json gives the name beside the index."""
    digit = tmp_path / "digit.png"
    digit.write_bytes(digit_png(0))
    as_json = run_tool(IN_PROCESS, "mnist_jax.predict", "--workdir", named_run_in_process, digit, "--json")
    assert as_json.returncode == 0, as_json.stderr
    [entry] = json.loads(as_json.stdout)
    assert list(entry) == ["file", "prediction", "class_name", "probabilities"]
    assert entry["prediction"] == int(np.argmax(entry["probabilities"]))
    assert entry["class_name"] == CLASS_NAMES[entry["prediction"]]
    text = run_tool(IN_PROCESS, "mnist_jax.predict", "--workdir", named_run_in_process, digit)
    p = np.asarray(entry["probabilities"])
    top = np.argsort(-p, kind="stable")[:3]
    assert text.stdout == (f"{digit}: {entry['class_name']} ({p.max():.1%})   top 3: "
                           + ", ".join(f"{CLASS_NAMES[i]} {p[i]:.1%}" for i in top) + "\n")


def test_an_exported_models_class_names_come_from_its_manifest(tmp_path):
    (tmp_path / "export" / "savedmodel" / "1").mkdir(parents=True)
    (tmp_path / "export" / "export.json").write_text(json.dumps({"class_names": list(CLASS_NAMES)}))
    assert runtimes.class_names(str(tmp_path / "export" / "model_int8.tflite")) == CLASS_NAMES
    assert runtimes.class_names(str(tmp_path / "export" / "savedmodel" / "1")) == CLASS_NAMES
    assert runtimes.class_names(str(tmp_path / "model.onnx")) is None  # copied away from its manifest
    probabilities = np.eye(10, dtype=np.float32)[[7]]
    digit = tmp_path / "digit.png"
    digit.write_bytes(digit_png(0))
    for names, expected in ((CLASS_NAMES, "Sneaker"), (None, "7"), (CLASS_NAMES[:5], "7")):  # 5 names: not this one's
        [result] = classify_files(lambda images: probabilities, names, [str(digit)])
        assert (result["prediction"], result["class_name"]) == (7, expected)


def test_format_result_ranks_the_top_three():
    result = {"file": "a.png", "prediction": 3, "probabilities": [0.1, 0, 0.2, 0.6, 0.1] + [0] * 5}
    assert format_result(result) == "a.png: 3 (60.0%)   top 3: 3 60.0%, 2 20.0%, 0 10.0%"
    assert format_result(result, CLASS_NAMES) == ("a.png: Dress (60.0%)   top 3: Dress 60.0%, Pullover 20.0%, "
                                                  "T-shirt/top 10.0%")


@pytest.mark.slow
@pytest.mark.e2e
def test_predict_on_real_mnist_files_agrees_with_the_model(mnist_run, shared_data_dir, tmp_path):
    """Real test digits saved as files in four forms are classified about as well as evaluate's accuracy."""
    images, labels = load_split_numpy("mnist", "test", str(shared_data_dir))
    count = 200
    paths, expected = [], []
    for i in range(count):
        forms = save_forms(images[i], tmp_path, f"d{i}")
        paths += forms
        expected += [labels[i]] * len(forms)
    results = predict_files(str(mnist_run), paths)
    predicted = np.array([r["prediction"] for r in results])
    accuracy_by_form = (predicted == np.array(expected)).reshape(count, 4).mean(axis=0)
    assert np.all(accuracy_by_form >= 0.95), accuracy_by_form
