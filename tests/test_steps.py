import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnist_jax import steps
from mnist_jax.config import Config
from mnist_jax.data import Split
from mnist_jax.model import build_model
from mnist_jax.optim import learning_rate_schedule

from helpers import copy, fixed_batch, make_tiny_images, new_state, numpy_softmax, train_step


def test_jitted_initialisation_gives_flaxs_op_by_op_bits():
    """create_train_state jits the init; its variables must be the very bits of Flax's eager `model.init` (what
    every published run used), or resumes and figures would drift. Conv, dense and batch-norm layers, each with
    its initialisers (the default model and `strong` were checked the same way by hand)."""
    config = Config(conv_features=(4,), dense_features=(), batch_norm=True)
    key = jax.random.PRNGKey(3)
    state = new_state(config, seed=3)
    init_key, _ = jax.random.split(key)
    eager = build_model(config, 10, 0.2, 0.3).init(init_key, jnp.zeros((1, 28, 28, 1), jnp.uint8), train=False)
    assert jax.tree_util.tree_structure(state.trained_variables()) == jax.tree_util.tree_structure(eager)
    expected = jax.tree_util.tree_leaves_with_path(eager)
    got = jax.tree_util.tree_leaves(state.trained_variables())
    for (path, want), have in zip(expected, got, strict=True):
        np.testing.assert_array_equal(np.asarray(have), np.asarray(want), err_msg=jax.tree_util.keystr(path))


def test_train_step_lowers_the_loss_on_a_fixed_batch():
    state, batch, step = new_state(), fixed_batch(), train_step(Config())
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0]
    assert int(state.step) == 8


def test_train_step_is_pure():
    """Same state and batch in, bitwise the same state and metrics out; the input state is not consulted later."""
    state, batch, step = new_state(), fixed_batch(), train_step(Config())
    a_state, a_metrics = step(copy(state), batch)
    b_state, b_metrics = step(copy(state), batch)
    for x, y in zip(jax.tree_util.tree_leaves((a_state, a_metrics)), jax.tree_util.tree_leaves((b_state, b_metrics))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_train_step_donates_the_input_state():
    state, batch = new_state(), fixed_batch()
    params_leaf = jax.tree_util.tree_leaves(state.params)[0]
    train_step(Config())(state, batch)
    assert params_leaf.is_deleted()


def test_dropout_and_batch_norm_state_flow():
    config = Config(batch_norm=True, dropout_rate=0.3)
    state, batch = new_state(config), fixed_batch()
    before = copy(state.batch_stats)
    state, _ = train_step(config)(state, batch)
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), before, state.batch_stats)
    assert all(jax.tree_util.tree_leaves(changed)), "training must update the running statistics"
    frozen = copy(state.batch_stats)
    steps.eval_step(state, batch, jnp.ones(32))
    same = jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)), frozen, state.batch_stats)
    assert all(jax.tree_util.tree_leaves(same))


def test_label_smoothing_trains_against_smoothed_targets_and_leaves_evaluation_plain():
    """The step's loss is cross-entropy against 0.9 * one-hot + 0.01, from numpy on the pre-step logits."""
    config = Config(label_smoothing=0.1)
    state, batch = new_state(config), fixed_batch()
    log_probs = np.log(numpy_softmax(state.apply_fn(state.variables(), batch["image"])))
    targets = np.full(log_probs.shape, 0.01)
    targets[np.arange(32), np.asarray(batch["label"])] += 0.9
    plain = -log_probs[np.arange(32), np.asarray(batch["label"])].sum()
    np.testing.assert_allclose(float(steps.eval_step(state, batch, jnp.ones(32))["loss"]), plain, rtol=1e-5)
    _, metrics = train_step(config)(state, batch)
    np.testing.assert_allclose(float(metrics["loss"]), -(targets * log_probs).sum(1).mean(), rtol=1e-5)


def test_eval_step_counts_only_unmasked_examples():
    state, batch = new_state(), fixed_batch()
    mask = jnp.arange(32) < 20
    full = steps.eval_step(state, batch, jnp.ones(32))
    part = steps.eval_step(state, batch, mask)
    logits = state.apply_fn(state.variables(), batch["image"][:20])
    expected_loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["label"][:20, None], axis=1).sum()
    assert int(part["count"]) == 20 and int(full["count"]) == 32
    assert int(part["correct"]) == int(jnp.sum(jnp.argmax(logits, -1) == batch["label"][:20]))
    np.testing.assert_allclose(float(part["loss"]), float(expected_loss), rtol=1e-5)


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
    scanned, metrics = steps.train_epoch_on_device(new_state(), split, permutation)
    np.testing.assert_allclose(np.asarray(metrics["loss"]), per_step, rtol=1e-5)
    for x, y in zip(jax.tree_util.tree_leaves(looped.params), jax.tree_util.tree_leaves(scanned.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_path_choice_by_backend():
    assert not steps.uses_on_device_epoch("cpu")
    assert steps.uses_on_device_epoch("gpu") and steps.uses_on_device_epoch("tpu")


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("schedule", ["constant", "cosine", "warmup_cosine", "one_cycle"])
def test_every_optimizer_and_schedule_trains(optimizer, schedule):
    config = Config(optimizer=optimizer, schedule=schedule, learning_rate=0.01 if optimizer == "sgd" else 1e-3,
                    epochs=2, warmup_epochs=0.5)
    lr = learning_rate_schedule(config, steps_per_epoch=10)
    values = np.array([float(lr(s)) for s in range(20)])
    assert np.all(values >= 0) and values.max() <= config.learning_rate * (1 + 1e-6)
    if schedule == "constant":
        assert np.all(values == config.learning_rate)
    else:
        assert values[-1] < 0.2 * config.learning_rate  # every non-constant schedule anneals
    if schedule in ("warmup_cosine", "one_cycle"):
        assert values[0] < values[5]  # and warms up first
    state, batch, step = new_state(config), fixed_batch(), train_step(config)
    first = None
    for _ in range(6):
        state, metrics = step(state, batch)
        first = float(metrics["loss"]) if first is None else first
    assert float(metrics["loss"]) < first


def test_compiled_cpu_path_equals_the_plain_jitted_step():
    """train.py's CPU path (AOT-compiled with YNNPACK fusions) computes the plain step, up to float rounding.

    With SGD: Adam's first step divides each gradient by its own magnitude, which turns rounding in a near-zero
    gradient into a difference of a whole learning rate."""
    config = Config(optimizer="sgd")
    batch, state, step = fixed_batch(), new_state(config), train_step(config)
    plain, plain_metrics = step(copy(state), batch)
    compiled = steps.compile_for_backend(step, state, batch)
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
    options = steps.compiler_options("cpu", batch_norm=batch_norm, flags=flags, vendor=vendor)
    if expected is None:
        assert options == {}
    else:
        kinds = expected.split(",")
        assert options == {"xla_cpu_experimental_ynn_fusion_type": ",".join(f"LIBRARY_FUSION_TYPE_{k}" for k in kinds)}
    assert steps.compiler_options("gpu", batch_norm=batch_norm, flags=flags, vendor=vendor) == {}
    assert steps.compiler_options("tpu", batch_norm=batch_norm, flags=flags, vendor=vendor) == {}


def test_cpu_flags_and_vendor_read_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n"
                       "flags\t\t: fpu sse2 avx2 fma\nvmx flags\t: ept\n\n"
                       "processor\t: 1\nflags\t\t: fpu sse2 avx2 fma\n")
    assert steps.cpu_flags(str(cpuinfo)) == frozenset({"fpu", "sse2", "avx2", "fma"})
    assert steps.cpu_vendor(str(cpuinfo)) == "AuthenticAMD"
    (tmp_path / "arm").write_text("processor\t: 0\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\n")
    assert steps.cpu_flags(str(tmp_path / "arm")) == frozenset()  # aarch64 says "Features": unknown
    assert steps.cpu_vendor(str(tmp_path / "arm")) == ""
    assert steps.cpu_flags(str(tmp_path / "missing")) == frozenset()
    assert steps.cpu_vendor(str(tmp_path / "missing")) == ""


@pytest.mark.parametrize("flags, vendor", [(AVX512, AMD), (AVX2, AMD)], ids=["amd-avx512", "other"])
def test_every_cpu_option_set_computes_the_plain_batch_norm_step(flags, vendor):
    """The batch-norm model compiled with either CPU option set computes the plain jitted step, up to rounding."""
    config = dataclasses.replace(Config(), conv_features=(8, 16), dense_features=(32,), batch_norm=True,
                                 batch_norm_groups=2, optimizer="sgd")  # why SGD: see the test above
    batch, state, step = fixed_batch(), new_state(config), train_step(config)
    plain, plain_metrics = step(copy(state), batch)
    options = steps.compiler_options("cpu", batch_norm=True, flags=flags, vendor=vendor)
    fast, fast_metrics = step.lower(state, batch).compile(options)(copy(state), batch)
    np.testing.assert_allclose(float(fast_metrics["loss"]), float(plain_metrics["loss"]), rtol=1e-6)
    for x, y in zip(jax.tree_util.tree_leaves((plain.params, plain.batch_stats)),
                    jax.tree_util.tree_leaves((fast.params, fast.batch_stats))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
