"""Orbax checkpoints: save, resume, keep the latest and the best, restore for inference; and what every tool does
with a corrupt one (train moves it aside and resumes; the reading tools stop with one line naming one that reads)."""

import os
import re

import jax.numpy as jnp
import pytest

from mnist_jax import checkpoint
from mnist_jax.config import Config, UserError

from helpers import (CORRUPTIONS, READING_TOOLS, assert_trees_equal, corrupt, corrupt_copy, digit_png, fixed_batch,
                     meta, run_main_in_process, save_epochs, snapshot, train_step, trained_state)


def test_save_then_restore_gives_equal_arrays(tmp_path):
    config = Config(batch_norm=True)
    state = trained_state(config)
    manager = checkpoint.open_manager(str(tmp_path))
    checkpoint.save(manager, state, meta(config, 1, [0.5]))
    fresh = trained_state(config, 0)
    restored, restored_meta = checkpoint.restore_latest(str(tmp_path), manager, fresh)
    assert int(restored.step) == int(state.step) == 2
    assert_trees_equal((state.params, state.batch_stats, state.opt_state, state.rng),
                       (restored.params, restored.batch_stats, restored.opt_state, restored.rng))
    assert restored_meta["epoch"] == 1
    # And the restored state keeps training exactly as the original would.
    step = train_step(config)
    a, _ = step(state, fixed_batch())
    b, _ = step(restored, fixed_batch())
    assert_trees_equal(a.params, b.params)


def test_keeps_the_latest_few_and_the_best(tmp_path):
    config = Config()
    _, saved = save_epochs(tmp_path, config, [0.5, 0.9, 0.6, 0.7, 0.65])
    manager = checkpoint.open_manager(str(tmp_path), read_only=True)
    steps_on_disk = sorted(manager.all_steps())
    assert steps_on_disk == [3, 5, 6]  # best (epoch 2 = step 3) plus the latest two
    assert checkpoint.resolve_step(manager, "best") == 3
    assert checkpoint.resolve_step(manager, "latest") == 6
    assert checkpoint.resolve_step(manager, "5") == 5
    with pytest.raises(UserError, match="--checkpoint"):
        checkpoint.resolve_step(manager, "4")


def test_without_validation_best_is_the_latest_never_chosen_on_test(tmp_path):
    config = Config()
    manager = checkpoint.open_manager(str(tmp_path), keep=1)
    state = trained_state(config, 1)
    for epoch, test_accuracy in enumerate([0.5, 0.9, 0.6], start=1):
        state, _ = train_step(config)(state, fixed_batch())
        history = [{"epoch": e, "step": e + 1, "test_accuracy": a} for e, a in enumerate([0.5, 0.9, 0.6][:epoch], 1)]
        checkpoint.save(manager, state, {**meta(config, epoch, [0.0] * epoch), "history": history})
    assert checkpoint.resolve_step(manager, "best") == checkpoint.resolve_step(manager, "latest") == 4
    assert sorted(manager.all_steps()) == [4]  # the test-best epoch 2 was not kept as "best"
    manager.close()


def test_restore_model_for_inference(tmp_path):
    config = Config()
    _, saved = save_epochs(tmp_path, config, [0.5, 0.9, 0.6])
    best = checkpoint.restore_model(str(tmp_path), "best")
    assert best.step == 3 and best.config == config and best.image_shape == (28, 28, 1)
    assert_trees_equal(best.variables["params"], saved[3])
    logits = best.module.apply(best.variables, jnp.zeros((2, 28, 28, 1), jnp.uint8))
    assert logits.shape == (2, 10)
    assert checkpoint.restore_model(str(tmp_path), "latest").step == 4


def test_restore_model_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no checkpoints found"):
        checkpoint.restore_model(str(tmp_path / "missing"))


def test_corrupt_latest_falls_back_to_the_previous_checkpoint(tmp_path, capsys):
    config = Config()
    _, saved = save_epochs(tmp_path, config, [0.5, 0.6, 0.7])
    corrupt(tmp_path / "checkpoints" / "4")
    manager = checkpoint.open_manager(str(tmp_path), keep=2)
    restored, restored_meta = checkpoint.restore_latest(str(tmp_path), manager, trained_state(config, 0))
    assert int(restored.step) == 3 and restored_meta["epoch"] == 2
    assert_trees_equal(restored.params, saved[3])
    assert "checkpoint 4 is unreadable" in capsys.readouterr().err
    # Nothing is lost: the corrupt checkpoint is moved aside, not deleted.
    assert len(os.listdir(tmp_path / "checkpoints-corrupt")) == 1
    assert sorted(manager.all_steps()) == [3]


# --------------------------------------------------------------------------------------------- the reading tools
READING_TOOL_ARGS = {  # each reading tool's arguments besides --workdir
    "mnist_jax.evaluate": lambda data_dir, image: ("--data-dir", data_dir),
    "mnist_jax.predict": lambda data_dir, image: (image,),
    "mnist_jax.serve": lambda data_dir, image: ("--port", "0"),
    "mnist_jax.export": lambda data_dir, image: ("--data-dir", data_dir, "--formats", "onnx"),
}
# One whole line: the checkpoint, why (TensorStore's own message, without its many-line spec), and what reads.
REFUSAL = re.compile(r"error: checkpoint 60 in (\S+)/checkpoints is unreadable \((.+)\); "
                     r"the newest readable one is 40: pass --checkpoint 40\n")


def assert_refused(result, workdir) -> None:
    """Exit 2 with only the one line: no traceback, no asyncio report of the reads Orbax abandoned."""
    assert result.returncode == 2, result.stderr
    match = REFUSAL.fullmatch(result.stderr)
    assert match, result.stderr
    assert match.group(1) == str(workdir)  # as given
    assert "TensorStore details" not in match.group(2) and "<bound method" not in match.group(2)


@pytest.mark.parametrize("tool", sorted(READING_TOOLS))
def test_the_reading_tools_name_the_unreadable_checkpoint_and_the_newest_that_reads(way, tool, tiny_data_dir,
                                                                                   tmp_path):
    """As the issue found it: the data files of the newest checkpoint overwritten. evaluate, predict, serve and
    export stop alike, move nothing, and say which checkpoint to use instead."""
    workdir = corrupt_copy(way.fixture("tiny_run"), tmp_path, "array data overwritten")
    image = tmp_path / "digit.png"
    image.write_bytes(digit_png(0))
    before = snapshot(workdir)
    result = way.run(tool, "--workdir", workdir, *READING_TOOL_ARGS[tool](tiny_data_dir, image))
    assert_refused(result, workdir)
    assert snapshot(workdir) == before  # reading tools never move a checkpoint (train does)


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_every_kind_of_corruption_gets_the_line_and_the_named_checkpoint_reads(corruption, tiny_run_in_process,
                                                                               tiny_data_dir, tmp_path):
    from mnist_jax.evaluate import main as evaluate_main

    workdir = corrupt_copy(tiny_run_in_process, tmp_path, corruption)
    for which in ("best", "latest", "60"):  # best: the newest checkpoint's history names it
        result = run_main_in_process(evaluate_main, "--workdir", workdir, "--data-dir", tiny_data_dir,
                                     "--checkpoint", which)
        assert_refused(result, workdir)
    followed = run_main_in_process(evaluate_main, "--workdir", workdir, "--data-dir", tiny_data_dir,
                                   "--checkpoint", "40")
    assert followed.returncode == 0, followed.stderr
    assert "checkpoint step 40" in followed.stdout


def test_with_no_readable_checkpoint_the_line_says_so(tiny_run_in_process, tmp_path):
    workdir = corrupt_copy(tiny_run_in_process, tmp_path, "array data overwritten", steps=("20", "40", "60"))
    with pytest.raises(checkpoint.UnreadableCheckpoint, match=r"checkpoint 60 .* no other checkpoint in it is "
                                                               r"readable$") as raised:
        checkpoint.restore_model(str(workdir))
    assert raised.value.readable is None


def test_one_line_never_cuts_a_word():
    from mnist_jax.config import one_line

    assert one_line("first  line \nsecond") == "first line"
    assert one_line("word " * 100, 30) == "word word word word word ..."
    assert one_line("/a/very/long/path" * 10 + " and more", 30) == "/a/very/long/path" * 10 + " ..."
    assert one_line("") == ""


def test_a_long_reason_is_shortened_at_a_word_boundary():
    words = " ".join(f"word{i}" for i in range(200))
    cause = ValueError(words + "\nsecond line")
    try:
        raise Exception("wrapper: " + "x" * 500) from cause
    except Exception as error:  # noqa: BLE001
        reason = checkpoint.failure_reason(error)
    assert reason.endswith(" ...") and len(reason) <= 300
    assert all(word.startswith("word") for word in reason.removesuffix(" ...").split())  # whole words only
    assert "second line" not in reason and "wrapper" not in reason  # the root cause's first line
    assert checkpoint.failure_reason(KeyError("meta")) == "KeyError: 'meta'"
