"""One config object for a training run, its defaults, and its validation; and how a run is run.

Every run is described by a single frozen `Config`: what to train. The command line builds one, `config.json` in
the workdir stores it, and a resumed run must match it. Validation happens here, before anything touches the
workdir. `RunOptions` says how to run it (where, on how many devices, with or without progress bars): nothing in
it changes the results.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "one_cycle")
FREEZE_CHOICES = ("none", "features")
POOLINGS = ("avg", "max")


def hyperparameter(default: Any, help_text: str, flag: bool = True, architecture: bool = False) -> Any:
    """A config field whose help text the command line shows: the config is the one place flags are defined.

    `flag=False` keeps a field off the generic flags: it is set by a dedicated tool (`transfer_from` and `freeze`
    by `python -m mnist_jax.transfer`), so `train` cannot record a setting it would not honour.
    `architecture=True` marks what shapes the parameters or the forward pass: a transfer run inherits those.
    """
    return dataclasses.field(default=default, metadata={"help": help_text, "flag": flag,
                                                         "architecture": architecture})


class UserError(Exception):
    """Bad input from the user: reported as one line on stderr with exit code 2, never a traceback."""


def one_line(text: str, width: int = 300) -> str:
    """The first non-empty line of a library's message, shortened only at a word boundary beyond `width`: quoted in
    our one-line errors, never cut mid-word."""
    line = " ".join(next((line for line in text.splitlines() if line.strip()), "").split())
    if len(line) <= width:
        return line
    cut = line.rfind(" ", 0, width - len(" ...") + 1)
    cut = cut if cut > 0 else line.find(" ")  # one word longer than `width` stays whole
    return f"{line[:cut]} ..." if cut > 0 else line


def plural(count: int, noun: str) -> str:
    """'1 epoch', '3 epochs': a count in a message to the user."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


@dataclasses.dataclass(frozen=True)
class Config:
    """Hyperparameters of one run. The defaults are the `default` preset, the recipe the README quotes."""

    dataset: str = hyperparameter("mnist", "tfds dataset name (mnist, fashion_mnist, kmnist, ...)")
    conv_features: tuple[int, ...] = hyperparameter((32, 64), "widths of the 3x3 conv blocks, comma-separated",
                                            architecture=True)
    convs_per_block: int = hyperparameter(1, "3x3 convs in each conv block, before its 2x2 pooling", architecture=True)
    pooling: str = hyperparameter("avg", f"2x2 pooling after each conv block, one of {', '.join(POOLINGS)}",
                          architecture=True)
    dense_features: tuple[int, ...] = hyperparameter((256,), "widths of the hidden dense layers, comma-separated",
                                             architecture=True)
    dropout_rate: float = hyperparameter(0.0, "dropout after each hidden dense layer (0 disables)", architecture=True)
    batch_norm: bool = hyperparameter(False, "batch norm after every conv and hidden dense layer", architecture=True)
    batch_norm_groups: int = hyperparameter(
        1, "batch-norm statistics per this many equal slices of each training batch (ghost batch norm); "
        "a multiple of the device count keeps them off the interconnect", architecture=True)
    deskew: bool = hyperparameter(
        False, "remove each image's slant (a horizontal shear about its centre of mass) before the network, in "
        "training, evaluation, prediction and serving alike", architecture=True)
    dtype: str = hyperparameter("float32", "computation dtype, float32 or bfloat16 (parameters stay float32)",
                        architecture=True)
    optimizer: str = hyperparameter("adamw", f"one of {', '.join(OPTIMIZERS)}")
    learning_rate: float = hyperparameter(3e-3, "peak learning rate of the schedule")
    schedule: str = hyperparameter("one_cycle", f"learning-rate schedule, one of {', '.join(SCHEDULES)}")
    warmup_epochs: float = hyperparameter(0.5, "warm-up length for warmup_cosine and one_cycle")
    momentum: float = hyperparameter(0.9, "momentum for sgd")
    weight_decay: float = hyperparameter(1e-4, "decoupled weight decay for adamw")
    label_smoothing: float = hyperparameter(
        0.0, "train against targets that give this much probability mass to the other classes, e.g. 0.1 "
        "(0: one-hot); evaluation losses stay plain cross-entropy")
    batch_size: int = hyperparameter(128, "training batch size (split across --devices)")
    epochs: int = hyperparameter(3, "passes over the training split")
    seed: int = hyperparameter(0, "seed of every random choice: init, shuffling, dropout, augmentation")
    eval_batch_size: int = hyperparameter(1000, "batch size of evaluation passes")
    ema_decay: float = hyperparameter(
        0.0, "evaluate, checkpoint and predict with an exponential moving average of the weights and batch-norm "
        "statistics, updated every step with this decay, e.g. 0.9995 (0: the trained weights themselves)")
    final_tta: bool = hyperparameter(
        False, "after the last epoch, evaluate the model a second time with test-time augmentation (the views "
        "`evaluate --tta` averages): train's final line and last metrics entry then carry test_tta_accuracy")
    keep_checkpoints: int = hyperparameter(3, "how many latest checkpoints to keep (the best is always kept too)")
    augment_rotation: float = hyperparameter(0.0, "training augmentation: largest random rotation in degrees (0: none)")
    augment_scale: float = hyperparameter(0.0, "training augmentation: largest relative zoom, e.g. 0.1 (0: none)")
    augment_shift: float = hyperparameter(0.0, "training augmentation: largest random shift in pixels (0: none)")
    augment_elastic_alpha: float = hyperparameter(
        0.0, "training augmentation: scale of the elastic distortion (Simard et al. used 34; 0: none)")
    augment_elastic_sigma: float = hyperparameter(
        4.0, "training augmentation: smoothness of the elastic distortion, pixels")
    clean_final_epochs: int = hyperparameter(
        0, "train the last this many epochs on un-augmented images, as evaluation sees them (0: augment to the end)")
    validation_fraction: float = hyperparameter(
        0.0, "hold out this fraction of the training split (its last examples) for validation and best-checkpoint "
        "choice; 0 disables")
    train_examples: int = hyperparameter(
        0, "train on a class-balanced subset of this many training examples, the same for the same value and "
        "seed (0: the whole split; must be >= --batch-size)"
    )
    transfer_from: str = hyperparameter("", "source workdir whose best checkpoint initialised this run ('' for none)",
                                flag=False)
    freeze: str = hyperparameter("none", f"parameters kept fixed while training, one of {', '.join(FREEZE_CHOICES)}",
                         flag=False)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        """Builds a config from JSON values, rejecting unknown fields and restoring tuples."""
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UserError(f"unknown config field(s): {', '.join(unknown)}")
        fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**fixed)


# Named starting points for `--config NAME`; flags given beside it override single fields.
PRESETS: dict[str, Config] = {
    # The Flax example's CNN with a fast recipe: AdamW on a one-cycle schedule, 3 epochs (docs/accuracy.md).
    "default": Config(),
    # A deeper batch-norm CNN with dropout, random affine and elastic augmentation in the train step (off for the
    # last two epochs), a longer one-cycle schedule, label smoothing and a moving average of the weights, on all
    # 60k training images, reported with test-time augmentation as well; chosen on a validation slice
    # (docs/accuracy.md).
    "strong": Config(
        conv_features=(32, 64),
        convs_per_block=2,
        batch_norm=True,
        batch_norm_groups=2,
        dropout_rate=0.3,
        augment_rotation=10.0,
        augment_scale=0.1,
        augment_shift=2.0,
        augment_elastic_alpha=36.0,
        augment_elastic_sigma=6.0,
        epochs=24,
        warmup_epochs=1.0,
        clean_final_epochs=2,
        ema_decay=0.9995,
        label_smoothing=0.1,
        final_tta=True,
    ),
}


ARCHITECTURE_FIELDS = tuple(f.name for f in dataclasses.fields(Config) if f.metadata["architecture"])


def flag_text(value: Any) -> str:
    """A Config value as its flag takes it on the command line: tuples comma-separated, booleans true or false."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def changed_flags(config: Config, include: Callable[[dataclasses.Field], bool]) -> list[str]:
    """["--name", "value", ...] for each field of `config` that `include` accepts and that differs from the default:
    the flags that set up `config` again."""
    default = Config()
    words = []
    for field in dataclasses.fields(Config):
        value = getattr(config, field.name)
        if value != getattr(default, field.name) and include(field):
            words += ["--" + field.name.replace("_", "-"), flag_text(value)]
    return words


def preset(name: str) -> Config:
    """The named preset, or a UserError listing the names."""
    if name not in PRESETS:
        raise UserError(f"unknown --config {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


DTYPES = ("float32", "bfloat16")


def validate(config: Config) -> None:
    """Raises UserError naming the first bad hyperparameter (dataset existence is checked by the loader)."""
    positive_ints = ("epochs", "batch_size", "eval_batch_size", "keep_checkpoints", "convs_per_block",
                     "batch_norm_groups")
    for name in positive_ints:
        value = getattr(config, name)
        if not isinstance(value, int) or value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if not config.learning_rate > 0:
        raise UserError(f"--learning-rate must be > 0, got {config.learning_rate}")
    if config.dtype not in DTYPES:
        raise UserError(f"unknown dtype {config.dtype!r}; choose one of: {', '.join(DTYPES)}")
    if config.pooling not in POOLINGS:
        raise UserError(f"unknown pooling {config.pooling!r}; choose one of: {', '.join(POOLINGS)}")
    if config.optimizer not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {config.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
    if config.schedule not in SCHEDULES:
        raise UserError(f"unknown schedule {config.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    if not 0 <= config.warmup_epochs < config.epochs:
        raise UserError(f"--warmup-epochs must be in [0, epochs), got {config.warmup_epochs}")
    if not 0 <= config.momentum < 1:
        raise UserError(f"--momentum must be in [0, 1), got {config.momentum}")
    if not 0 <= config.ema_decay < 1:
        raise UserError(f"--ema-decay must be in [0, 1), got {config.ema_decay}")
    if not 0 <= config.label_smoothing < 1:
        raise UserError(f"--label-smoothing must be in [0, 1), got {config.label_smoothing}")
    if config.weight_decay < 0:
        raise UserError(f"--weight-decay must be >= 0, got {config.weight_decay}")
    if not 0 <= config.dropout_rate < 1:
        raise UserError(f"--dropout-rate must be in [0, 1), got {config.dropout_rate}")
    for name in ("augment_rotation", "augment_scale", "augment_shift", "augment_elastic_alpha"):
        if getattr(config, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(config, name)}")
    if config.augment_scale >= 1:
        raise UserError(f"--augment-scale must be below 1, got {config.augment_scale}")
    if not isinstance(config.clean_final_epochs, int) or not 0 <= config.clean_final_epochs <= config.epochs:
        raise UserError(f"--clean-final-epochs must be an integer from 0 to --epochs ({config.epochs}), "
                        f"got {config.clean_final_epochs}")
    if not config.augment_elastic_sigma > 0:
        raise UserError(f"--augment-elastic-sigma must be > 0, got {config.augment_elastic_sigma}")
    if not 0 <= config.validation_fraction < 1:
        raise UserError(f"--validation-fraction must be in [0, 1), got {config.validation_fraction}")
    if not isinstance(config.train_examples, int) or config.train_examples < 0:
        raise UserError(f"--train-examples must be a non-negative integer, got {config.train_examples}")
    if 0 < config.train_examples < config.batch_size:
        # Erroring beats clamping: a silently changed batch size would change the schedule and the results.
        raise UserError(
            f"--train-examples {config.train_examples} is smaller than --batch-size {config.batch_size}; "
            f"pass --batch-size {config.train_examples} or less"
        )
    if config.freeze not in FREEZE_CHOICES:
        raise UserError(f"unknown --freeze {config.freeze!r}; choose one of: {', '.join(FREEZE_CHOICES)}")
    if config.freeze != "none" and not config.transfer_from:
        raise UserError("--freeze features needs a transferred model (--from): frozen random features learn nothing")
    if not config.conv_features or any(f <= 0 for f in config.conv_features + config.dense_features):
        raise UserError("--conv-features needs at least one layer and every width must be positive")


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How to run, as opposed to what to train: none of it changes the results (beyond float tolerance)."""

    workdir: str
    data_dir: str | None = None
    devices: int | None = None  # None: every device JAX sees
    progress: bool = True
    plots: bool = True
    tensorboard: bool = True  # event files in WORKDIR/tensorboard/ (summaries.py)
    # The initial state of a fresh run, (steps.TrainState, data.Dataset) -> steps.TrainState, from the freshly
    # initialised state and the data (transfer learning sets it; typed loosely because config imports nothing of
    # ours). Called only when no checkpoint exists: a resumed run's state comes from its own checkpoints.
    initial_state: Callable[[Any, Any], Any] | None = None
    # Called on every process with the metrics history after each epoch's checkpoint, and once with the restored
    # history when a run resumes: True ends the run there, its workdir holding that epoch (a sweep prunes a trial
    # with it). Every process must return the same answer. The epochs trained are those of the whole run.
    after_epoch: Callable[[list[dict[str, Any]]], bool] | None = None


def incompatible_fields(saved: Config, requested: Config) -> list[str]:
    """Names the fields whose values differ, so a resume never silently continues a different run."""
    return [
        field.name
        for field in dataclasses.fields(Config)
        if getattr(saved, field.name) != getattr(requested, field.name)
    ]
