"""The platform layer: how epochs are run (per step on CPU, one scan on accelerators: the same results), when steps
wait for each other, the XLA:CPU options per CPU, and the training tools' restart onto huge-page malloc."""

import dataclasses
import io
import os
import sys
import types
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnist_jax import backend, sharding, steps
from mnist_jax.config import Config, UserError
from mnist_jax.data import Split
from mnist_jax.train import main as train_main

from helpers import copy, fixed_batch, make_tiny_images, new_state, run_main_in_process, train_step


def tiny_split(n: int = 96, seed: int = 1) -> Split:
    labels = np.arange(n) % 10
    return Split(jnp.asarray(make_tiny_images(labels, np.random.default_rng(seed))), jnp.asarray(labels, jnp.int32))


def test_the_cpu_epoch_runner_equals_the_on_device_scan():
    """What `train` runs on CPU (a step dispatched per batch, compiled with the CPU's options) computes what it runs
    on GPU/TPU (one `lax.scan` over the epoch), up to float rounding; the runner hands back per-step metrics."""
    config = Config(augment_shift=1.0, ema_decay=0.9, label_smoothing=0.1, optimizer="sgd")  # why SGD: test_steps
    split = tiny_split()
    permutation = jax.random.permutation(jax.random.PRNGKey(3), 96).reshape(3, 32)
    step = steps.make_train_step(config)
    state = new_state(config)
    runner = backend.EpochRunner(step, state, split, 32, sharding.make_mesh(1))
    looped, looped_metrics = runner.run(copy(state), split, permutation)
    scanned, scanned_metrics = backend.scan_epoch(step)(copy(state), split, permutation)
    assert set(looped_metrics) == {"loss", "accuracy"} and looped_metrics["loss"].shape == (3,)
    np.testing.assert_allclose(looped_metrics["loss"], np.asarray(scanned_metrics["loss"]), rtol=1e-5)
    assert int(looped.step) == int(scanned.step) == 3
    for x, y in zip(jax.tree_util.tree_leaves((looped.params, looped.ema)),
                    jax.tree_util.tree_leaves((scanned.params, scanned.ema))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stderr, shown", [(io.StringIO, False), (Terminal, True)])
def test_the_progress_bar_shows_only_on_a_terminal(stderr, shown, monkeypatch):
    """tqdm's disable=None: `train ... 2> log` must not fill the log with the bar's frames; a terminal gets the bar."""
    split = tiny_split()
    state = new_state()
    runner = backend.EpochRunner(train_step(), state, split, 32, sharding.make_mesh(1), progress=True)
    if backend.uses_on_device_epoch(jax.devices()[0].platform):
        pytest.skip("GPU and TPU run the epoch as one call, without a bar")
    written = stderr()
    monkeypatch.setattr(sys, "stderr", written)
    runner.run(state, split, jax.random.permutation(jax.random.PRNGKey(3), 96).reshape(3, 32), "epoch 1/1")
    assert ("epoch 1/1" in written.getvalue()) == shown, written.getvalue()


def fake_mesh(size: int, platform: str):
    return types.SimpleNamespace(size=size, devices=np.array([types.SimpleNamespace(platform=platform)] * size))


def test_steps_wait_for_each_other_only_on_several_cpu_devices(monkeypatch):
    assert backend.needs_lockstep(fake_mesh(2, "cpu"))
    assert not backend.needs_lockstep(fake_mesh(1, "cpu"))
    assert not backend.needs_lockstep(fake_mesh(8, "gpu")) and not backend.needs_lockstep(fake_mesh(4, "tpu"))
    waited = []
    monkeypatch.setattr(jax, "block_until_ready", lambda outputs: waited.append(outputs) or outputs)
    outputs = {"loss": jnp.ones(())}
    assert backend.settle(fake_mesh(2, "cpu"))(outputs) is outputs and waited == [outputs]
    assert backend.settle(fake_mesh(8, "gpu"))(outputs) is outputs and waited == [outputs]  # no second wait


def test_on_device_epoch_equals_per_step_loop():
    """The accelerator path (one lax.scan per epoch) computes what the CPU path (a step per dispatch) does."""
    rng = np.random.default_rng(1)
    labels = np.arange(96) % 10
    split = Split(jnp.asarray(make_tiny_images(labels, rng)), jnp.asarray(labels, jnp.int32))
    permutation = jax.random.permutation(jax.random.PRNGKey(3), 96).reshape(3, 32)
    looped = new_state()
    per_step = []
    for row in permutation:
        looped, metrics = train_step(Config())(looped, steps.take_batch(split, row))
        per_step.append(float(metrics["loss"]))
    scanned, metrics = backend.scan_epoch(train_step(Config()))(new_state(), split, permutation)
    np.testing.assert_allclose(np.asarray(metrics["loss"]), per_step, rtol=1e-5)
    for x, y in zip(jax.tree_util.tree_leaves(looped.params), jax.tree_util.tree_leaves(scanned.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_path_choice_by_backend():
    assert not backend.uses_on_device_epoch("cpu")
    assert backend.uses_on_device_epoch("gpu") and backend.uses_on_device_epoch("tpu")


def test_compiled_cpu_path_equals_the_plain_jitted_step():
    """train's CPU path (AOT-compiled with YNNPACK fusions) computes the plain step, up to float rounding.

    With SGD: Adam's first step divides each gradient by its own magnitude, which turns rounding in a near-zero
    gradient into a difference of a whole learning rate."""
    config = Config(optimizer="sgd")
    batch, state, step = fixed_batch(), new_state(config), train_step(config)
    plain, plain_metrics = step(copy(state), batch)
    compiled = backend.compile_for_backend(step, state, batch)
    fast, fast_metrics = compiled(copy(state), batch)
    np.testing.assert_allclose(float(fast_metrics["loss"]), float(plain_metrics["loss"]), rtol=1e-6)
    for x, y in zip(jax.tree_util.tree_leaves(plain.params), jax.tree_util.tree_leaves(fast.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


AVX512 = frozenset({"sse2", "avx2", "avx512f", "avx512bw"})
AVX2 = frozenset({"sse2", "avx2", "fma"})


AMD, INTEL = "AuthenticAMD", "GenuineIntel"


@pytest.mark.parametrize("flags, vendor, batch_norm, expected", [
    (AVX512, AMD, False, "DOT,ELTWISE,REDUCE,INDIVIDUAL_CONVOLUTION"),  # measured on a Zen 4 EPYC
    (AVX512, AMD, True, None),  # measured there: the fusions slow batch-norm models down
    (AVX2, AMD, False, "DOT,ELTWISE,REDUCE"),  # measured on a Zen 3 EPYC: YNNPACK's convolutions are pathological
    (AVX2, AMD, True, "DOT,ELTWISE,REDUCE"),
    (AVX512, INTEL, False, "DOT,ELTWISE,REDUCE"),  # measured on an Emerald Rapids Xeon: 1.3-1.7x the AMD choice
    (AVX512, INTEL, True, "DOT,ELTWISE,REDUCE"),
    (AVX2, INTEL, False, "DOT,ELTWISE,REDUCE"),
    (frozenset(), "", False, "DOT,ELTWISE,REDUCE,INDIVIDUAL_CONVOLUTION"),  # unknown CPU: as the AMD AVX-512 one
    (frozenset(), "", True, None),
])
def test_cpu_compiler_options_follow_the_cpu(flags, vendor, batch_norm, expected):
    options = backend.compiler_options("cpu", batch_norm=batch_norm, flags=flags, vendor=vendor)
    if expected is None:
        assert options == {}
    else:
        kinds = expected.split(",")
        assert options == {"xla_cpu_experimental_ynn_fusion_type": ",".join(f"LIBRARY_FUSION_TYPE_{k}" for k in kinds)}
    assert backend.compiler_options("gpu", batch_norm=batch_norm, flags=flags, vendor=vendor) == {}
    assert backend.compiler_options("tpu", batch_norm=batch_norm, flags=flags, vendor=vendor) == {}


@pytest.mark.parametrize("setting, kinds", [
    ("auto", "DOT,ELTWISE,REDUCE,INDIVIDUAL_CONVOLUTION"),  # the rule, here for an AMD AVX-512 CPU
    ("", "DOT,ELTWISE,REDUCE,INDIVIDUAL_CONVOLUTION"),
    ("none", ""),
    ("dot,reduce", "DOT,REDUCE"),
    (" Convolution , dot,dot", "INDIVIDUAL_CONVOLUTION,DOT"),
])
def test_the_user_chooses_the_fusions(setting, kinds):
    options = backend.compiler_options("cpu", flags=AVX512, vendor=AMD,
                                       environ={backend.FUSIONS_VARIABLE: setting})
    assert options == {backend.YNN_FUSION_OPTION: ",".join(f"LIBRARY_FUSION_TYPE_{k}" for k in kinds.split(",") if k)}
    assert backend.compiler_options("gpu", environ={backend.FUSIONS_VARIABLE: setting}) == {}


def test_xla_flags_that_set_the_fusions_win():
    """No option is passed then, so XLA compiles with the value XLA_FLAGS gave it (compile options would win)."""
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2 "
                            "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT",
               backend.FUSIONS_VARIABLE: "dot,eltwise"}
    assert backend.compiler_options("cpu", flags=AVX512, vendor=AMD, environ=environ) == {}
    unrelated = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert backend.compiler_options("cpu", flags=AVX512, vendor=INTEL, environ=unrelated) == \
        backend.ynn_fusion_options("DOT", "ELTWISE", "REDUCE")


@pytest.mark.parametrize("setting", ["dots", "dot,,reduce", "fast"])
def test_a_bad_fusion_setting_is_one_line_and_exit_2(setting, tmp_path):
    with pytest.raises(UserError, match=f"MNIST_JAX_CPU_FUSIONS={setting!r}: expected auto, none or"):
        backend.compiler_options("cpu", environ={backend.FUSIONS_VARIABLE: setting})
    with mock.patch.dict(os.environ, {backend.FUSIONS_VARIABLE: setting}):
        result = run_main_in_process(train_main, "--workdir", tmp_path / "w", "--epochs", "1")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and setting in result.stderr, result.stderr
    assert not (tmp_path / "w").exists()


def test_cpu_flags_and_vendor_read_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n"
                       "flags\t\t: fpu sse2 avx2 fma\nvmx flags\t: ept\n\n"
                       "processor\t: 1\nflags\t\t: fpu sse2 avx2 fma\n")
    assert backend.cpu_flags(str(cpuinfo)) == frozenset({"fpu", "sse2", "avx2", "fma"})
    assert backend.cpu_vendor(str(cpuinfo)) == "AuthenticAMD"
    (tmp_path / "arm").write_text("processor\t: 0\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\n")
    assert backend.cpu_flags(str(tmp_path / "arm")) == frozenset()  # aarch64 says "Features": unknown
    assert backend.cpu_vendor(str(tmp_path / "arm")) == ""
    assert backend.cpu_flags(str(tmp_path / "missing")) == frozenset()
    assert backend.cpu_vendor(str(tmp_path / "missing")) == ""


@pytest.mark.parametrize("flags, vendor", [(AVX512, AMD), (AVX2, AMD)], ids=["amd-avx512", "other"])
def test_every_cpu_option_set_computes_the_plain_batch_norm_step(flags, vendor):
    """The batch-norm model compiled with either CPU option set computes the plain jitted step, up to rounding."""
    config = dataclasses.replace(Config(), conv_features=(8, 16), dense_features=(32,), batch_norm=True,
                                 batch_norm_groups=2, optimizer="sgd")  # why SGD: see the test above
    batch, state, step = fixed_batch(), new_state(config), train_step(config)
    plain, plain_metrics = step(copy(state), batch)
    options = backend.compiler_options("cpu", batch_norm=True, flags=flags, vendor=vendor)
    fast, fast_metrics = step.lower(state, batch).compile(options)(copy(state), batch)
    np.testing.assert_allclose(float(fast_metrics["loss"]), float(plain_metrics["loss"]), rtol=1e-6)
    for x, y in zip(jax.tree_util.tree_leaves((plain.params, plain.batch_stats)),
                    jax.tree_util.tree_leaves((fast.params, fast.batch_stats))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
