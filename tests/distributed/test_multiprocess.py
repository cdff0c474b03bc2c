"""Multi-process runs on one machine: two `python -m mnist_jax.train` processes joined over 127.0.0.1 (CPU
collectives through gloo), one device each, on tiny_digits; and the workdir lock, which keeps a second run out.

Every test here starts Python processes (e2e). The runs are small (2 or 3 epochs of 20 steps) so the file stays
within its share of the suite's time.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from helpers import (IN_PROCESS, REPO, TINY_FLAGS, TINY_RUN_FLAGS, ServerProcess, cli_env, digit_png, free_port,
                     read_jsonl, results, run_tool)
from mnist_jax.distributed import cluster, runlock

pytestmark = pytest.mark.e2e

FLAGS = (*TINY_FLAGS, "--epochs", "2", "--learning-rate", "0.003")
ONE_DEVICE = "--xla_force_host_platform_device_count=1"
TWO_DEVICES = "--xla_force_host_platform_device_count=2"
HEARTBEAT = 3  # MNIST_JAX_HEARTBEAT_TIMEOUT in the dead-peer tests: seconds without a heartbeat
JOIN_TIMEOUT = 3  # MNIST_JAX_JOIN_TIMEOUT in the test of a coordinator that never answers
# The line JAX's runtime ends a process of a broken run with (it aborts: SIGABRT).
JAX_ENDS_THE_PROCESS = "Terminating process because the JAX distributed service detected fatal errors"


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


def assert_same_run(workdir: Path, reference: Path) -> None:
    """Bit for bit: the same metrics (wall-clock facts aside) and the same final parameters."""
    assert results(read_jsonl(workdir / "metrics.jsonl")) == results(read_jsonl(reference / "metrics.jsonl"))
    for a, b in zip(params(workdir), params(reference)):
        np.testing.assert_array_equal(a, b)


def restart(workdir: Path, data_dir: Path, logs: Path) -> None:
    """Every process started again with the same command: the run resumes from its last checkpoint and ends."""
    finish(start_cluster(workdir, data_dir, *FLAGS, logs=logs), logs)
    assert "resumed from" in (logs / "p0.out").read_text() and "resumed from" in (logs / "p1.out").read_text()


@pytest.fixture(scope="module")
def uninterrupted(tiny_data_dir, tmp_path_factory) -> Path:
    """The workdir of a two-process run of FLAGS, start to end (its logs beside it): what every interrupted run,
    started again, must end as."""
    logs = tmp_path_factory.mktemp("uninterrupted")
    finish(start_cluster(logs / "w", tiny_data_dir, *FLAGS, logs=logs), logs)
    return logs / "w"


def test_two_processes_resume_bitwise_and_match_one_process_with_two_devices(uninterrupted, tiny_data_dir,
                                                                                tmp_path):
    logs, two = uninterrupted.parent, uninterrupted
    assert "process 0 of 2, 2 devices" in (logs / "p0.out").read_text()
    assert "process 1 of 2, 2 devices" in (logs / "p1.out").read_text()
    assert (logs / "p0.out").read_text().count("epoch 2/2") == 1 and "epoch 2/2" not in (logs / "p1.out").read_text()

    # Killed (both, kill -9) once the first checkpoint is on disk, then started again.
    procs = start_cluster(tmp_path / "killed", tiny_data_dir, *FLAGS, logs=tmp_path)
    wait_for(tmp_path / "killed" / "checkpoints" / "20", procs)
    for proc in procs:
        proc.kill()
        proc.wait()
    assert not (tmp_path / "killed" / "checkpoints" / "40").exists()
    restart(tmp_path / "killed", tiny_data_dir, tmp_path)
    assert_same_run(tmp_path / "killed", two)

    # One process with the same two devices: the same run within float tolerance.
    one = start(tmp_path / "one", tiny_data_dir, *FLAGS, log=tmp_path / "one", xla_flags=TWO_DEVICES)
    assert one.wait(240) == 0, (tmp_path / "one.err").read_text()
    for a, b in zip(read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")):
        assert a["step"] == b["step"]
        for key in ("train_loss", "test_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-6)
    for a, b in zip(params(tmp_path / "one"), params(two)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)

    # The reading tools load the two-process run's checkpoint in one process.
    evaluated = run_tool(IN_PROCESS, "mnist_jax.evaluate", "--workdir", two, "--data-dir", tiny_data_dir)
    assert evaluated.returncode == 0 and "checkpoint step 40" in evaluated.stdout, evaluated.stderr
    (tmp_path / "digit.png").write_bytes(digit_png(0))
    predicted = run_tool(IN_PROCESS, "mnist_jax.predict", "--workdir", two, tmp_path / "digit.png")
    assert predicted.returncode == 0 and "digit.png:" in predicted.stdout, predicted.stderr
    exported = run_tool(IN_PROCESS, "mnist_jax.export", "--workdir", two, "--data-dir", tiny_data_dir,
                        "--formats", "onnx", "--out", tmp_path / "export")  # the shared run stays as it ended
    assert exported.returncode == 0 and "onnx " in exported.stdout, exported.stderr
    server = ServerProcess(two, log_dir=tmp_path)
    try:
        health = httpx.get(server.url + "/healthz", timeout=30).json()
        answer = httpx.post(server.url + "/api/predict", content=digit_png(0), timeout=30,
                            headers={"Content-Type": "image/png"})
    finally:
        assert server.stop() == 0, server.stderr
    assert health["checkpoint_step"] == 40 and answer.status_code == 200 and len(answer.json()["probabilities"]) == 10


@pytest.mark.parametrize("dead", [1, 0], ids=["a worker dies", "the coordinator dies"])
def test_a_dead_peer_ends_the_survivor_within_the_heartbeat_timeout_and_a_restart_resumes_exactly(
        dead, uninterrupted, tiny_data_dir, tmp_path):
    """JAX ends the survivor (SIGABRT) and says why: a worker stopped sending heartbeats, or the coordinator, which
    hosts JAX's coordination service, is gone. Starting every process again resumes the run, which ends as if it
    had never stopped. Run with -s for the figures docs/multihost.md states."""
    procs = start_cluster(tmp_path / "w", tiny_data_dir, *FLAGS, logs=tmp_path,
                          env={cluster.HEARTBEAT_TIMEOUT_VARIABLE: str(HEARTBEAT)})
    wait_for(tmp_path / "w" / "checkpoints" / "20", procs)
    procs[dead].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    status = procs[1 - dead].wait(60)
    waited = time.monotonic() - killed
    procs[dead].wait()
    print(f"\nprocess {dead} killed: process {1 - dead} ended {waited:.1f} s later, status {status} "
          f"({cluster.HEARTBEAT_TIMEOUT_VARIABLE}={HEARTBEAT})")
    assert status == -signal.SIGABRT
    assert waited < HEARTBEAT + 15
    stderr = (tmp_path / f"p{1 - dead}.err").read_text()
    assert JAX_ENDS_THE_PROCESS in stderr, stderr
    # JAX names the dead worker in one of two ways, depending on where the survivor was when its heartbeats ran out.
    reason = (r"Task 1 heartbeat timeout|unhealthy \(stopped sending heartbeats\):\s+1\b" if dead == 1 else
              r"the leader task was preempted/died")
    assert re.search(reason, stderr), stderr

    assert not (tmp_path / "w" / "checkpoints" / "40").exists()
    restart(tmp_path / "w", tiny_data_dir, tmp_path)
    assert_same_run(tmp_path / "w", uninterrupted)


def test_a_coordinator_that_never_answers_ends_the_process_within_the_join_timeout(tiny_data_dir, tmp_path):
    """JAX aborts a process that cannot join within `initialization_timeout`; our line before the wait says what it
    waited for. Nothing is written to the workdir."""
    address = f"127.0.0.1:{free_port()}"
    proc = start(tmp_path / "w", tiny_data_dir, *FLAGS, log=tmp_path / "p", env={
        "JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
        cluster.JOIN_TIMEOUT_VARIABLE: str(JOIN_TIMEOUT)})
    deadline = time.monotonic() + 120
    while "joining the run" not in (tmp_path / "p.out").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "p.err").read_text()
        time.sleep(0.05)
    joining = time.monotonic()
    status = proc.wait(60)
    waited = time.monotonic() - joining
    print(f"\nno coordinator: the process ended {waited:.1f} s after its joining line, status {status} "
          f"({cluster.JOIN_TIMEOUT_VARIABLE}={JOIN_TIMEOUT})")
    assert status == -signal.SIGABRT
    assert JOIN_TIMEOUT - 1 < waited < JOIN_TIMEOUT + 15
    assert (tmp_path / "p.out").read_text().splitlines() == [
        f"joining the run at {address} as process 1 of 2: every process must start within {JOIN_TIMEOUT} s "
        f"({cluster.JOIN_TIMEOUT_VARIABLE})"]
    stderr = (tmp_path / "p.err").read_text()
    assert JAX_ENDS_THE_PROCESS in stderr and "DEADLINE_EXCEEDED" in stderr and "RegisterTask" in stderr, stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.skipif(any(name.startswith(("SLURM_", "OMPI_")) for name in os.environ),
                    reason="inside a real SLURM or Open MPI job, which JAX would read")
def test_a_scheduler_environment_jax_cannot_read_is_one_line_and_exit_2(tiny_data_dir, tmp_path):
    """SLURM_NTASKS above 1 outside a SLURM job: JAX refuses it before it connects, and the process says so."""
    proc = start(tmp_path / "w", tiny_data_dir, *FLAGS, log=tmp_path / "p", env={"SLURM_NTASKS": "2"})
    assert proc.wait(120) == 2
    lines = (tmp_path / "p.err").read_text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot join a multi-process run: ") and (
        "JAX_COORDINATOR_ADDRESS" in lines[0]), lines
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
    # As soon as the first holds the lock: a loaded machine starts the second slowly, and the first must still run.
    lock = tmp_path / "w" / runlock.LOCK_FILE
    wait_for(lock, [first])
    while lock.read_text().split()[:1] != [str(first.pid)]:
        assert first.poll() is None, (tmp_path / "first.err").read_text()
        time.sleep(0.05)
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
