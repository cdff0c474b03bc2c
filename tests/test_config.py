"""Named presets (`--config default|strong`): one place, flags override them, config.json records the result."""

import dataclasses
import json

import pytest

from mnist_jax.config import PRESETS, Config, UserError, preset, validate

from helpers import TINY_FLAGS, run_module


def test_presets_are_valid_and_default_is_the_plain_config():
    assert PRESETS["default"] == Config()
    for config in PRESETS.values():
        validate(config)
    strong = PRESETS["strong"]
    assert strong.batch_norm and strong.dropout_rate > 0 and 0 < strong.clean_final_epochs < strong.epochs
    assert min(strong.augment_rotation, strong.augment_scale, strong.augment_shift) > 0
    assert strong.ema_decay > 0 and 0 < strong.label_smoothing < 1
    assert strong.final_tta and not Config().final_tta  # strong also reports its test-time-augmented accuracy
    assert strong.validation_fraction == 0  # trains on all 60k; sweeps hold out their own validation slice
    default = Config()
    assert len(strong.conv_features) * strong.convs_per_block > len(default.conv_features) * default.convs_per_block
    with pytest.raises(UserError, match="unknown --config 'huge'; choose one of: default, strong"):
        preset("huge")


@pytest.mark.e2e
def test_strong_preset_with_overrides_lands_in_config_json(strong_tiny_run, tiny_data_dir, tmp_path):
    """strong_tiny_run is `train --config strong` with TINY_FLAGS and STRONG_TINY_FLAGS overriding fields."""
    import shutil

    workdir = tmp_path / "w"
    shutil.copytree(strong_tiny_run, workdir)  # resumed below; other tests share the run
    saved = Config.from_dict(json.loads((workdir / "config.json").read_text()))
    assert saved == dataclasses.replace(PRESETS["strong"], dataset="tiny_digits", batch_size=32, eval_batch_size=100,
                                        epochs=3, warmup_epochs=0.5, validation_fraction=0.25)
    assert (workdir / "augmentations.png").exists()
    metrics = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    assert "validation_accuracy" in metrics and "test_tta_accuracy" in metrics and "validation_tta_accuracy" in metrics

    # Resuming needs no flags; another preset on the same workdir is refused, naming the fields.
    again = run_module("mnist_jax.train", "--workdir", workdir, "--data-dir", tiny_data_dir, "--no-progress")
    assert again.returncode == 0 and "run complete" in again.stdout
    other = run_module("mnist_jax.train", "--workdir", workdir, "--data-dir", tiny_data_dir, "--config", "default",
                       *TINY_FLAGS, "--epochs", "1", "--warmup-epochs", "0.5")
    assert other.returncode == 2 and "holds a run with other settings" in other.stderr
    assert "convs_per_block=2 (asked 1)" in other.stderr and "batch_norm=True (asked False)" in other.stderr


def test_unknown_preset_is_one_line_exit_2(way, tmp_path):
    result = way.run("mnist_jax.train", "--workdir", tmp_path / "w", "--config", "huge")
    assert result.returncode == 2 and "invalid choice: 'huge'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "w").exists()
