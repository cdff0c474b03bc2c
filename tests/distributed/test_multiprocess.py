"""Multi-process runs on one machine: two `python -m mnist_jax.train` processes joined over 127.0.0.1 (CPU
collectives through gloo), one device each, on tiny_digits; and the workdir lock, which keeps a second run out.

Every test here starts Python processes (e2e). The runs are small (2 or 3 epochs of 20 steps) so the file stays
within its share of the suite's time.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from helpers import (IN_PROCESS, REPO, TINY_FLAGS, TINY_RUN_FLAGS, ServerProcess, cli_env, digit_png, read_jsonl,
                     results, run_tool)
from mnist_jax.distributed import cluster, runlock

pytestmark = pytest.mark.e2e

FLAGS = (*TINY_FLAGS, "--epochs", "2", "--learning-rate", "0.003")
ONE_DEVICE = "--xla_force_host_platform_device_count=1"
TWO_DEVICES = "--xla_force_host_platform_device_count=2"
HEARTBEAT = 3  # MNIST_JAX_HEARTBEAT_TIMEOUT in the dead-peer tests: seconds without a sign of life


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(workdir: Path, data_dir: Path, *flags: str, log: Path, env: dict[str, str] | None = None,
          xla_flags: str = ONE_DEVICE, module: str = "mnist_jax.train") -> subprocess.Popen:
    """One training process, its stdout and stderr in log.out and log.err."""
    full_env = {**cli_env(), "XLA_FLAGS": xla_flags, **(env or {})}
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        return subprocess.Popen([sys.executable, "-m", module, "--workdir", str(workdir), "--data-dir", str(data_dir),
                                 *flags], stdout=out, stderr=err, env=full_env, cwd=REPO)


def start_cluster(workdir: Path, data_dir: Path, *flags: str, logs: Path, env: dict[str, str] | None = None,
                  processes: int = 2) -> list[subprocess.Popen]:
    """The same training command as `processes` processes of one run, one device each."""
    port = free_port()
    return [start(workdir, data_dir, *flags, log=logs / f"p{i}", env={
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(processes),
        "JAX_PROCESS_ID": str(i), **(env or {})}) for i in range(processes)]


def finish(procs: list[subprocess.Popen], logs: Path, timeout: float = 240) -> None:
    for i, proc in enumerate(procs):
        assert proc.wait(timeout) == 0, (logs / f"p{i}.err").read_text()


def wait_for(path: Path, procs: list[subprocess.Popen], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), f"{path} never appeared"
        time.sleep(0.05)


def params(workdir: Path) -> list[np.ndarray]:
    import jax

    from mnist_jax.checkpoint import restore_model

    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(restore_model(str(workdir), "latest").variables)]


def test_two_processes_resume_bitwise_and_match_one_process_with_two_devices(tiny_data_dir, tmp_path):
    # Uninterrupted, two processes.
    logs = tmp_path
    finish(start_cluster(tmp_path / "two", tiny_data_dir, *FLAGS, logs=logs), logs)
    assert "process 0 of 2, 2 devices" in (logs / "p0.out").read_text()
    assert "process 1 of 2, 2 devices" in (logs / "p1.out").read_text()
    assert (logs / "p0.out").read_text().count("epoch 2/2") == 1 and "epoch 2/2" not in (logs / "p1.out").read_text()

    # Killed (both, kill -9) once the first checkpoint is on disk, then started again.
    procs = start_cluster(tmp_path / "killed", tiny_data_dir, *FLAGS, logs=logs)
    wait_for(tmp_path / "killed" / "checkpoints" / "20", procs)
    for proc in procs:
        proc.kill()
        proc.wait()
    assert not (tmp_path / "killed" / "checkpoints" / "40").exists()
    finish(start_cluster(tmp_path / "killed", tiny_data_dir, *FLAGS, logs=logs), logs)
    assert "resumed from" in (logs / "p0.out").read_text() and "resumed from" in (logs / "p1.out").read_text()

    two = read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert results(read_jsonl(tmp_path / "killed" / "metrics.jsonl")) == results(two)
    for a, b in zip(params(tmp_path / "two"), params(tmp_path / "killed")):
        np.testing.assert_array_equal(a, b)

    # One process with the same two devices: the same run within float tolerance.
    one = start(tmp_path / "one", tiny_data_dir, *FLAGS, log=logs / "one", xla_flags=TWO_DEVICES)
    assert one.wait(240) == 0, (logs / "one.err").read_text()
    for a, b in zip(read_jsonl(tmp_path / "one" / "metrics.jsonl"), two):
        assert a["step"] == b["step"]
        for key in ("train_loss", "test_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-6)
    for a, b in zip(params(tmp_path / "one"), params(tmp_path / "two")):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)

    # The reading tools load the two-process run's checkpoint in one process.
    evaluated = run_tool(IN_PROCESS, "mnist_jax.evaluate", "--workdir", tmp_path / "two", "--data-dir",
                         tiny_data_dir)
    assert evaluated.returncode == 0 and "checkpoint step 40" in evaluated.stdout, evaluated.stderr
    (tmp_path / "digit.png").write_bytes(digit_png(0))
    predicted = run_tool(IN_PROCESS, "mnist_jax.predict", "--workdir", tmp_path / "two", tmp_path / "digit.png")
    assert predicted.returncode == 0 and "digit.png:" in predicted.stdout, predicted.stderr
    exported = run_tool(IN_PROCESS, "mnist_jax.export", "--workdir", tmp_path / "two", "--data-dir", tiny_data_dir,
                        "--formats", "onnx")
    assert exported.returncode == 0 and "onnx " in exported.stdout, exported.stderr
    server = ServerProcess(tmp_path / "two", log_dir=tmp_path)
    try:
        health = httpx.get(server.url + "/healthz", timeout=30).json()
        answer = httpx.post(server.url + "/api/predict", content=digit_png(0), timeout=30,
                            headers={"Content-Type": "image/png"})
    finally:
        assert server.stop() == 0, server.stderr
    assert health["checkpoint_step"] == 40 and answer.status_code == 200 and len(answer.json()["probabilities"]) == 10


@pytest.mark.parametrize("dead", [1, 0], ids=["a worker dies", "the coordinator dies"])
def test_a_dead_peer_ends_the_survivor_with_one_line(dead, tiny_data_dir, tmp_path):
    procs = start_cluster(tmp_path / "w", tiny_data_dir, *TINY_FLAGS, "--epochs", "50", logs=tmp_path,
                          env={cluster.HEARTBEAT_TIMEOUT_VARIABLE: str(HEARTBEAT)})
    wait_for(tmp_path / "w" / "checkpoints" / "20", procs)
    procs[dead].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    survivor = procs[1 - dead]
    status = survivor.wait(60)
    waited = time.monotonic() - killed
    procs[dead].wait()
    # A worker's death is seen by the peer watch (exit 75); the coordinator's usually aborts JAX's runtime first
    # (SIGABRT), whose native report the stderr guard replaces. The guard may write just after the process ends.
    assert status in ((cluster.PEER_DIED_EXIT,) if dead == 1 else (cluster.PEER_DIED_EXIT, -signal.SIGABRT))
    assert waited < HEARTBEAT + 15
    deadline = time.monotonic() + 5
    while not (lines := (tmp_path / f"p{1 - dead}.err").read_text().strip().splitlines()) and (
            time.monotonic() < deadline):
        time.sleep(0.1)
    assert lines == [cluster.peer_died_message(2, lines[0].split("(", 1)[1].rsplit(")", 1)[0])], lines
    assert "start all 2 processes again" in lines[0]


def test_a_coordinator_that_never_answers_is_one_line_and_exit_2(tiny_data_dir, tmp_path):
    started = time.monotonic()
    proc = start(tmp_path / "w", tiny_data_dir, *FLAGS, log=tmp_path / "p", env={
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
        cluster.JOIN_TIMEOUT_VARIABLE: "3"})
    assert proc.wait(60) == 2
    assert time.monotonic() - started < 30
    lines = (tmp_path / "p.err").read_text().strip().splitlines()
    assert len(lines) == 1 and "could not join the run at 127.0.0.1:" in lines[0], lines
    assert not (tmp_path / "w").exists()


def test_a_held_workdir_refuses_every_process_of_a_second_run(tiny_data_dir, tmp_path):
    with runlock.exclusive(str(tmp_path / "w")):
        procs = start_cluster(tmp_path / "w", tiny_data_dir, *FLAGS, logs=tmp_path)
        for i, proc in enumerate(procs):
            assert proc.wait(120) == 2
            lines = (tmp_path / f"p{i}.err").read_text().strip().splitlines()
            assert len(lines) == 1 and f"pid {os.getpid()} on {socket.gethostname()}" in lines[0], lines
    assert sorted(os.listdir(tmp_path / "w")) == [runlock.LOCK_FILE]


def test_a_second_run_on_a_busy_workdir_exits_2_and_the_first_ends_as_if_alone(tiny_run, tiny_data_dir, tmp_path):
    first = start(tmp_path / "w", tiny_data_dir, *TINY_FLAGS, *TINY_RUN_FLAGS, log=tmp_path / "first",
                  xla_flags="")
    wait_for(tmp_path / "w" / "checkpoints" / "20", [first])
    second = start(tmp_path / "w", tiny_data_dir, *TINY_FLAGS, *TINY_RUN_FLAGS, log=tmp_path / "second",
                   xla_flags="")
    assert second.wait(120) == 2
    lines = (tmp_path / "second.err").read_text().strip().splitlines()
    assert len(lines) == 1 and f"pid {first.pid} on {socket.gethostname()}" in lines[0], lines
    assert first.wait(240) == 0, (tmp_path / "first.err").read_text()
    assert results(read_jsonl(tmp_path / "w" / "metrics.jsonl")) == results(read_jsonl(tiny_run / "metrics.jsonl"))
    for a, b in zip(params(tmp_path / "w"), params(tiny_run)):
        np.testing.assert_array_equal(a, b)
    assert (tmp_path / "w" / runlock.LOCK_FILE).read_text() == ""  # a clean end empties it


def test_kill_9_leaves_no_stale_lock(tiny_run, tiny_data_dir, tmp_path):
    run = start(tmp_path / "w", tiny_data_dir, *TINY_FLAGS, *TINY_RUN_FLAGS, log=tmp_path / "run", xla_flags="")
    wait_for(tmp_path / "w" / "checkpoints" / "20", [run])
    run.kill()
    run.wait()
    assert (tmp_path / "w" / runlock.LOCK_FILE).read_text().split()[0] == str(run.pid)  # the dead holder's name
    again = run_tool("subprocess", "mnist_jax.train", "--workdir", tmp_path / "w", "--data-dir", tiny_data_dir,
                     *TINY_FLAGS, *TINY_RUN_FLAGS)
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr
    for a, b in zip(params(tmp_path / "w"), params(tiny_run)):
        np.testing.assert_array_equal(a, b)
