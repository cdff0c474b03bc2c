"""Data parallelism on two CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=2), in subprocesses
because the device count is fixed when JAX starts."""

import subprocess
import sys

import pytest

from helpers import REPO, TINY_FLAGS, cli_env, free_port, read_jsonl

pytestmark = pytest.mark.e2e  # every test here starts Python in a subprocess (two devices need a fresh JAX)

TWO_DEVICES = "--xla_force_host_platform_device_count=2"


def run(args, extra_env=None, module="mnist_jax.train"):
    env = cli_env()
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + TWO_DEVICES).strip()
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)


def history(workdir):
    return read_jsonl(workdir / "metrics.jsonl")


def test_step_on_two_devices_equals_one_device():
    script = """
import jax, jax.numpy as jnp, numpy as np
from mnist_jax import sharding, steps
from mnist_jax.config import Config
from mnist_jax.model import build_model
from mnist_jax.optim import make_optimizer
assert jax.device_count() == 2
rng = np.random.default_rng(0)
batch = {"image": jnp.asarray(rng.integers(0, 256, (32, 28, 28, 1), dtype=np.uint8)),
         "label": jnp.asarray(rng.integers(0, 10, 32, dtype=np.int32))}
def run(devices):
    mesh = sharding.make_mesh(devices)
    config = Config()
    state = steps.create_train_state(build_model(config, 10, 0.13, 0.31), make_optimizer(config, 10),
                                     jax.random.PRNGKey(0), (28, 28, 1))
    state = jax.device_put(state, sharding.replicated(mesh))
    b = jax.device_put(batch, sharding.batch_sharded(mesh))
    step = steps.make_train_step(config)
    for _ in range(3):
        state, metrics = step(state, b)
    assert len(b["image"].sharding.device_set) == devices
    return state, metrics
one, m1 = run(1)
two, m2 = run(2)
for a, b in zip(jax.tree_util.tree_leaves(one.params), jax.tree_util.tree_leaves(two.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**cli_env(), "XLA_FLAGS": TWO_DEVICES})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_training_cli_on_two_devices_matches_one(tiny_data_dir, tmp_path):
    flags = ["--data-dir", tiny_data_dir, *TINY_FLAGS, "--epochs", "2", "--learning-rate", "0.003"]
    one = run(["--workdir", tmp_path / "one", "--devices", "1", *flags])
    two = run(["--workdir", tmp_path / "two", *flags])  # default: every device JAX sees (2 here)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    for a, b in zip(history(tmp_path / "one"), history(tmp_path / "two")):
        assert a["step"] == b["step"]
        for key in ("train_loss", "test_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-3)
        assert abs(a["test_accuracy"] - b["test_accuracy"]) <= 0.02


def test_batch_must_divide_over_devices(tiny_data_dir, tmp_path):
    result = run(["--workdir", tmp_path / "w", "--data-dir", tiny_data_dir, *TINY_FLAGS, "--batch-size", "33",
                  "--devices", "2"])
    assert result.returncode == 2 and "divisible by the number of devices (2)" in result.stderr
    assert not (tmp_path / "w").exists()


def test_default_device_count_divides_the_batch(tiny_data_dir, tmp_path):
    """Without --devices, an odd batch runs on as many devices as divide it (here one) instead of failing."""
    result = run(["--workdir", tmp_path / "w", "--data-dir", tiny_data_dir, *TINY_FLAGS, "--batch-size", "33",
                  "--epochs", "1"])
    assert result.returncode == 0, result.stderr


def test_distributed_initialisation_with_a_single_process(tiny_data_dir, tmp_path):
    """A one-process cluster through jax.distributed.initialize() (two processes: test_multiprocess.py)."""
    env = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}
    result = run(["--workdir", tmp_path / "w", "--data-dir", tiny_data_dir, *TINY_FLAGS, "--epochs", "1"], env)
    assert result.returncode == 0, result.stderr
    assert "process 0 of 1, 2 devices" in result.stdout
    assert len(history(tmp_path / "w")) == 1
