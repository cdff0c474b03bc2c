"""Multi-process settings and the workdir lock, in this process: bad cluster settings are one-line user errors
before anything waits, and the lock refuses a second holder with its pid and host. The runs themselves are in
test_multiprocess.py (e2e)."""

from __future__ import annotations

import ast
import os
import socket
from pathlib import Path
from unittest import mock

import pytest

import mnist_jax
from helpers import TINY_FLAGS, run_main_in_process, snapshot
from mnist_jax.distributed import cluster, runlock
from mnist_jax.config import UserError
from mnist_jax.train import main as train_main


@pytest.mark.parametrize("environ, message", [
    ({"JAX_NUM_PROCESSES": "2"}, "JAX_COORDINATOR_ADDRESS is not"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, "JAX_COORDINATOR_ADDRESS is not"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "out of range"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "-1"}, "JAX_PROCESS_ID"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two'"),
    ({"JAX_COORDINATOR_ADDRESS": "h", "JAX_NUM_PROCESSES": "2"}, "must be host:port"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1234", cluster.JOIN_TIMEOUT_VARIABLE: "0"}, cluster.JOIN_TIMEOUT_VARIABLE),
])
def test_bad_cluster_settings_are_user_errors(environ, message):
    with pytest.raises(UserError, match=message):
        cluster.cluster_settings(environ)


def test_cluster_settings():
    assert cluster.cluster_settings({}) is None
    assert cluster.cluster_settings({"JAX_NUM_PROCESSES": "1"}) is None
    explicit = cluster.cluster_settings({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
                                         "JAX_PROCESS_ID": "3", cluster.HEARTBEAT_TIMEOUT_VARIABLE: "10"})
    assert explicit == cluster.ClusterSettings("10.0.0.1:1234", 4, 3, cluster.DEFAULT_JOIN_TIMEOUT, 10)
    assert cluster.cluster_settings({"SLURM_NTASKS": "2"}) == cluster.ClusterSettings(
        None, None, None, cluster.DEFAULT_JOIN_TIMEOUT, cluster.DEFAULT_HEARTBEAT_TIMEOUT)


def test_bad_cluster_settings_on_the_command_line_are_one_line_and_exit_2(tiny_data_dir, tmp_path):
    with mock.patch.dict(os.environ, {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}):
        os.environ.pop("JAX_COORDINATOR_ADDRESS", None)
        result = run_main_in_process(train_main, "--workdir", tmp_path / "w", "--data-dir", tiny_data_dir,
                                     *TINY_FLAGS)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "JAX_COORDINATOR_ADDRESS" in result.stderr and not (tmp_path / "w").exists()


def test_the_lock_refuses_a_second_holder_naming_the_first(tmp_path):
    workdir = str(tmp_path / "w")
    runlock.check_free(workdir)  # nothing there: free, and nothing created
    assert not os.path.exists(workdir)
    with runlock.exclusive(workdir):
        holder = f"pid {os.getpid()} on {socket.gethostname()}"
        for attempt in (runlock.check_free, lambda path: runlock.exclusive(path).__enter__()):
            with pytest.raises(UserError, match=holder):
                attempt(workdir)
    assert (tmp_path / "w" / runlock.LOCK_FILE).read_text() == ""
    with runlock.exclusive(workdir):  # released: free again
        pass


def test_the_lock_is_released_when_the_run_fails(tmp_path):
    with pytest.raises(RuntimeError):
        with runlock.exclusive(str(tmp_path)):
            raise RuntimeError("the run failed")
    runlock.check_free(str(tmp_path))


def test_training_on_a_held_workdir_is_one_line_exit_2_and_changes_nothing(tiny_run_in_process, tiny_data_dir):
    before = snapshot(tiny_run_in_process)
    with runlock.exclusive(str(tiny_run_in_process)):
        result = run_main_in_process(train_main, "--workdir", tiny_run_in_process, "--data-dir", tiny_data_dir,
                                     *TINY_FLAGS, "--epochs", "3", "--learning-rate", "0.003")
        assert snapshot(tiny_run_in_process) != before  # the holder's pid and host, while it holds the lock
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"in use by another training run (pid {os.getpid()} on {socket.gethostname()})" in result.stderr
    assert snapshot(tiny_run_in_process) == before



def _reaches_jax_internals(node: ast.AST) -> bool:
    if isinstance(node, ast.Import):
        return any(alias.name.startswith("jax._src") for alias in node.names)
    if isinstance(node, ast.ImportFrom):
        return (node.module or "").startswith("jax._src") or any(alias.name == "_src" for alias in node.names)
    return isinstance(node, ast.Attribute) and node.attr == "_src"


def test_the_package_reaches_jax_through_its_public_api_only():
    """No module uses JAX's internals (`jax._src`), whose behaviour the next release may change."""
    for internal in ("from jax._src import distributed", "import jax._src.distributed", "from jax import _src",
                     "jax._src.distributed.global_state"):
        assert any(_reaches_jax_internals(node) for node in ast.walk(ast.parse(internal))), internal
    package = Path(mnist_jax.__file__).parent
    modules = sorted(package.rglob("*.py"))
    found = [f"{path.relative_to(package)}:{node.lineno}" for path in modules
             for node in ast.walk(ast.parse(path.read_text(), str(path))) if _reaches_jax_internals(node)]
    assert len(modules) > 20 and found == []
