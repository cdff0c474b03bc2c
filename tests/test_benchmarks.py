"""The benchmark scripts run and print what their READMEs promise (figures are not asserted: machines are noisy)."""

import json
import subprocess
import sys

import pytest

from mnist_jax import backend

from helpers import REPO, cli_env

pytestmark = pytest.mark.e2e  # every test here starts Python in a subprocess

def run_benchmark(name: str, *args: str) -> subprocess.CompletedProcess:
    """`python benchmarks/NAME.py args...` from the repository root, as the docs run it."""
    return subprocess.run([sys.executable, f"benchmarks/{name}.py", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=cli_env(), timeout=300)


FIELDS = {"implementation", "stack", "config", "batch_size", "dtype", "train_images_per_second",
          "eval_images_per_second", "compile_seconds", "backend", "device_kind", "speedup_vs_reference",
          "speedup_vs_keras", "cpu_vendor", "cpu_avx512", "ynn_fusions"}


def test_step_throughput_json_on_a_tiny_run():
    result = run_benchmark("step_throughput", "--batch-sizes", "8", "--steps", "2", "--windows", "1",
                           "--cpu-devices", "2", "--implementations", "reference", "per_step", "on_device_epoch",
                           "data_parallel", "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["implementation"] for r in rows] == ["reference", "per_step", "on_device_epoch", "data_parallel_x2"]
    for row in rows:
        assert set(row) == FIELDS
        assert row["batch_size"] == 8 and row["dtype"] == "float32" and row["backend"] == "cpu"
        assert row["config"] == "default"
        assert row["cpu_avx512"] == ("avx512f" in backend.cpu_flags() if backend.cpu_flags() else None)
        assert row["cpu_vendor"] == backend.cpu_vendor()
        assert row["ynn_fusions"] == backend.compiler_options("cpu")["xla_cpu_experimental_ynn_fusion_type"].replace(
            "LIBRARY_FUSION_TYPE_", "")
        assert row["train_images_per_second"] > 0 and row["eval_images_per_second"] > 0
        assert row["compile_seconds"] >= 0
    assert rows[0]["speedup_vs_reference"] == 1.0
    assert rows[1]["speedup_vs_reference"] == rows[1]["train_images_per_second"] / rows[0]["train_images_per_second"]
    assert all(row["speedup_vs_keras"] is None and row["stack"].startswith("jax ") for row in rows)


def test_step_throughput_times_keras_on_tensorflow_in_the_same_windows():
    """The notebook's stack, alternating with ours: a row of its own, and every row's ratio to it."""
    result = run_benchmark("step_throughput", "--batch-sizes", "8", "--steps", "2", "--windows", "2",
                           "--implementations", "per_step", "keras_tensorflow", "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["implementation"] for r in rows] == ["per_step", "keras_tensorflow"]
    ours, keras = rows
    assert set(keras) == FIELDS and keras["stack"].startswith("keras 3") and "tensorflow 2" in keras["stack"]
    assert keras["eval_images_per_second"] is None and keras["compile_seconds"] is None
    assert keras["train_images_per_second"] > 0 and keras["speedup_vs_keras"] == 1.0
    assert ours["speedup_vs_keras"] == ours["train_images_per_second"] / keras["train_images_per_second"]
    table = run_benchmark("step_throughput", "--batch-sizes", "8", "--steps", "1", "--windows", "1",
                          "--implementations", "per_step", "keras_tensorflow", "--markdown")
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[-1].startswith("| keras_tensorflow | 8 | float32 |")
    assert table.stdout.splitlines()[-1].endswith("| - | - | - | 1.00x |")


def test_step_throughput_table():
    result = run_benchmark("step_throughput", "--batch-sizes", "4", "--steps", "1", "--windows", "1",
                           "--implementations", "reference", "per_step", "--dtypes", "bfloat16")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("backend cpu") and lines[0].endswith("--config default") and "train img/s" in lines[1]
    assert lines[3].split()[:3] == ["reference", "4", "float32"]  # the reference is always the float32 loop
    assert lines[4].split()[:3] == ["per_step", "4", "bfloat16"]


def test_step_throughput_of_a_batch_norm_preset_leaves_the_reference_out():
    result = run_benchmark("step_throughput", "--config", "strong", "--batch-sizes", "4", "--steps", "1",
                           "--windows", "1", "--implementations", "reference", "per_step", "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["implementation"], r["config"]) for r in rows] == [("per_step", "strong")]
    assert rows[0]["speedup_vs_reference"] is None and rows[0]["train_images_per_second"] > 0


def test_fusion_choice_times_every_candidate_and_marks_what_train_compiles_with():
    result = run_benchmark("fusion_choice", "--batch-size", "8", "--steps", "1", "--rounds", "2", "--cpu-devices",
                           "2", "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["fusions"] for r in rows] == ["xla-defaults", "none", "dot", "dot,reduce", "dot,eltwise,reduce",
                                            "dot,eltwise,reduce,convolution"]
    chosen = backend.compiler_options("cpu", batch_norm=False).get("xla_cpu_experimental_ynn_fusion_type", "")
    assert [r["fusions"] for r in rows if r["chosen"]] == [
        chosen.replace("LIBRARY_FUSION_TYPE_", "").lower().replace("individual_", "") or "xla-defaults"]
    for row in rows:
        assert row["devices"] == 2 and row["batch_size"] == 8 and row["config"] == "default"
        assert 0 < row["slowest"] <= row["train_images_per_second"] <= row["fastest"]
        assert row["cpu_vendor"] == backend.cpu_vendor()


def test_fusion_choice_rejects_bad_arguments():
    result = run_benchmark("fusion_choice", "--rounds", "0")
    assert result.returncode == 2 and "must be positive" in result.stderr.splitlines()[-1]


def test_batchnorm_choice_times_ours_against_flax_in_the_strong_step():
    result = run_benchmark("batchnorm_choice", "--batch-size", "8", "--steps", "1", "--rounds", "2", "--cpu-devices",
                           "2", "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["batch_norm"] for r in rows] == ["mnist_jax BatchNorm", "flax.linen.BatchNorm"]
    for row in rows:
        assert row["devices"] == 2 and row["batch_size"] == 8 and row["cpu_vendor"] == backend.cpu_vendor()
        assert 0 < row["slowest"] <= row["train_images_per_second"] <= row["fastest"]


def test_export_latency_times_every_exported_format_and_the_browser(tiny_run, tiny_data_dir, tmp_path):
    from helpers import run_module, web_runtime_dir

    exported = run_module("mnist_jax.export", "--workdir", tiny_run, "--out", tmp_path, "--data-dir", tiny_data_dir,
                          "--formats", "tflite_int8,onnx,web", "--onnxruntime-web", web_runtime_dir())
    assert exported.returncode == 0, exported.stderr
    result = run_benchmark("export_latency", "--workdir", str(tiny_run), "--export", str(tmp_path), "--data-dir",
                           str(tiny_data_dir), "--images", "20", "--warmup", "2", "--browser", "--markdown")
    assert result.returncode == 0, result.stderr
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in result.stdout.splitlines()]
    assert rows[0] == ["format", "MB", "p50 ms", "p99 ms", "batch-256 img/s", "test accuracy"]
    assert [row[0] for row in rows[2:]] == ["JAX predict (reference)", "tflite_int8", "onnx",
                                           "web (chromium, ONNX Runtime Web)"]
    manifest = json.loads((tmp_path / "export.json").read_text())
    for row, entry in zip(rows[3:], manifest["files"]):
        assert row[1] == f"{entry['bytes'] / 1e6:.2f}" and row[5] == f"{entry['test_accuracy']:.2%}"
    for row in rows[2:]:
        assert 0 < float(row[2]) <= float(row[3])  # p50 <= p99
    assert rows[-1][4] == "-"  # no batch figure in the browser


def test_multiprocess_throughput_times_both_configurations():
    result = run_benchmark("multiprocess_throughput", "--batch-size", "8", "--steps", "2", "--windows", "1",
                           "--rounds", "1", "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["configuration"] for r in rows] == ["2 processes x 1 device", "1 process x 2 devices"]
    for row in rows:
        assert row["batch_size"] == 8 and row["windows"] == 1 and row["cpu_vendor"] == backend.cpu_vendor()
        assert 0 < row["slowest"] <= row["train_images_per_second"] <= row["fastest"]


def test_step_breakdown_names_every_operation_of_both_steps():
    """Ours by layer, direction and operation, summing to the devices' busy time; TensorFlow's by oneDNN primitive."""
    result = run_benchmark("step_breakdown", "--batch-size", "16", "--steps", "2", "--cpu-devices", "2")
    assert result.returncode == 0, result.stderr
    ours, keras = result.stdout.split("\n\n")
    lines = ours.splitlines()
    assert lines[0].startswith(backend.cpu_vendor() or "unknown CPU") and "batch 16" in lines[0]
    assert lines[1].startswith("ours, 2 device(s)")
    rows = {line.split("%", 1)[1].strip(): float(line.split()[0]) for line in lines[2:-1]}
    for operation in ("conv1_1 forward: convolution", "conv2_1 backward: convolution: input gradient",
                      "conv2_1 backward: convolution: weight gradient", "dense1 forward: matmul",
                      "gradients: all-reduce across devices"):
        assert any(row.startswith(operation) for row in rows), (operation, sorted(rows))
    busy = [float(ms) for ms in lines[-1].split(":")[1].split(" ms of")[0].split(",")]
    assert lines[-1].startswith("busy per device thread") and sum(rows.values()) == pytest.approx(sum(busy), rel=0.01)
    keras_lines = keras.splitlines()
    assert keras_lines[0].startswith("Keras on TensorFlow (oneDNN primitives, each on every core)")
    keras_rows = [line.split("%", 1)[1].strip() for line in keras_lines[1:]]
    assert "conv2_1 backward_weights: convolution" in keras_rows and "conv1_1 forward_training: convolution" in keras_rows
