"""Transfer learning: `python -m mnist_jax.transfer --from SRC --workdir DIR --dataset NAME [--freeze ...]`.

A transfer run is an ordinary training run (checkpoints, exact resume, metrics, evaluate, predict) whose fresh
state starts from the source workdir's best checkpoint instead of a random draw (`initial_state_from`, the run's
`RunOptions.initial_state`). The architecture is the source's; the classifier (the `head` layer) is kept when the
class counts agree and otherwise replaced by the one initialised from this run's seed. `--freeze features` keeps
the convolutional layers fixed through the optimiser (`optax.set_to_zero`, in `optim.make_optimizer`). The source
is read once, before the first epoch: a resumed run starts from its own checkpoints and needs the source no more.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports: glibc reads its malloc settings only at start-up
    from mnist_jax.backend import restart_with_huge_pages

    restart_with_huge_pages()

import dataclasses
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp

from mnist_jax import checkpoint, cli, data, steps, workdir
from mnist_jax.config import ARCHITECTURE_FIELDS, FREEZE_CHOICES, Config, UserError, one_line, validate
from mnist_jax.model import HEAD
from mnist_jax.training import train_and_evaluate


def load_source(source_dir: str) -> checkpoint.RestoredModel:
    """The source run's best checkpoint; a missing or unreadable source is a UserError naming --from."""
    if not os.path.isdir(source_dir):
        raise UserError(f"--from {source_dir}: no such directory (it must be a finished training workdir)")
    try:
        return checkpoint.restore_model(source_dir, "best")
    except checkpoint.UnreadableCheckpoint as error:  # its --checkpoint hint is for the reading tools
        raise UserError(f"--from {source_dir} is not a usable source run: {error.problem}")
    except UserError as error:
        raise UserError(f"--from {source_dir} is not a usable source run: {error}")
    except Exception as error:  # noqa: BLE001 -- a corrupt meta or config is unusable, whatever the exception.
        reason = one_line(str(error)) or type(error).__name__
        raise UserError(f"--from {source_dir} is not a usable source run: {reason}")


def check_compatible(source: checkpoint.RestoredModel, dataset: str, image_shape: tuple[int, ...]) -> None:
    """Refuses a source trained on images of another shape or channel count: its kernels would not fit."""
    if tuple(source.image_shape) != tuple(image_shape):
        raise UserError(
            f"--from run was trained on {source.config.dataset} images of shape {tuple(source.image_shape)}, "
            f"{dataset} has {tuple(image_shape)}; transfer needs the same image shape and channels"
        )


def transfer_config(source: Config, requested: Config, chosen: set[str], source_dir: str, freeze: str) -> Config:
    """The new run's config: the source's architecture (`config.ARCHITECTURE_FIELDS`), the requested training
    settings, and the provenance."""
    conflicts = [n for n in ARCHITECTURE_FIELDS if n in chosen and getattr(requested, n) != getattr(source, n)]
    if conflicts:
        details = ", ".join(f"{n}={getattr(source, n)!r} (asked {getattr(requested, n)!r})" for n in conflicts)
        raise UserError(f"the architecture comes from the --from run: {details}; leave those flags out")
    inherited = {name: getattr(source, name) for name in ARCHITECTURE_FIELDS}
    return dataclasses.replace(requested, **inherited, transfer_from=os.path.abspath(source_dir), freeze=freeze)


def transfer_params(state: steps.TrainState, source: checkpoint.RestoredModel) -> steps.TrainState:
    """`state` with the source's parameters and batch statistics; the head stays fresh when its shape differs.

    The optimiser state is re-initialised for the new parameters (for adam/adamw it is zeros either way).
    """
    def take(name: str, fresh, transferred):
        if name == HEAD and _shapes(fresh) != _shapes(transferred):
            return fresh  # another number of classes: the head initialised from this run's seed
        if _shapes(fresh) != _shapes(transferred):
            raise UserError(f"--from run's layer {name} has shapes {_shapes(transferred)}, this run needs "
                            f"{_shapes(fresh)}")
        return jax.tree_util.tree_map(lambda f, t: jnp.asarray(t, f.dtype), fresh, transferred)

    def merge(fresh_tree, source_tree):
        missing = sorted(set(fresh_tree) ^ set(source_tree or {}))
        if missing:
            raise UserError(f"--from run's layers differ from this run's: {', '.join(missing)}")
        return {name: take(name, fresh_tree[name], source_tree[name]) for name in fresh_tree}

    params = merge(state.params, source.variables["params"])
    batch_stats = merge(state.batch_stats, source.variables.get("batch_stats", {})) if state.batch_stats else {}
    return steps.restart_moving_average(
        state.replace(params=params, batch_stats=batch_stats, opt_state=state.tx.init(params)))


def _shapes(tree) -> list[tuple[int, ...]]:
    return [tuple(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)]


def initial_state_from(source_dir: str) -> Callable[[steps.TrainState, data.Dataset], steps.TrainState]:
    """The `RunOptions.initial_state` of a transfer run: reads the source only when a fresh run calls it."""

    def init(state: steps.TrainState, dataset: data.Dataset) -> steps.TrainState:
        source = load_source(source_dir)
        check_compatible(source, dataset.name, dataset.image_shape)
        return transfer_params(state, source)

    return init


def plan(workdir_path: str, source_dir: str, requested: Config, chosen: set[str], data_dir: str | None) -> Config:
    """The config to run in `workdir_path`, checking the source only when the run has not started yet.

    A workdir with checkpoints resumes from them: its saved config (architecture, provenance) is authoritative and
    the source is not read, so a transfer run resumes even after its source was deleted.
    """
    fixed = {"transfer_from", "freeze"}
    if checkpoint.has_checkpoints(workdir_path) and workdir.read_config(workdir_path) is not None:
        return workdir.resolve_config(workdir_path, requested, chosen | fixed)
    source = load_source(source_dir)
    check_compatible(source, requested.dataset, data.image_shape(requested.dataset, data_dir))
    config = transfer_config(source.config, requested, chosen, source_dir, requested.freeze)
    validate(config)
    return workdir.resolve_config(workdir_path, config, set(dataclasses.asdict(config)))


def parse_args(argv: list[str] | None):
    parser = cli.training_parser(
        prog="python -m mnist_jax.transfer",
        description="Train on --dataset starting from another run's best checkpoint (its architecture, its "
                    "weights; a new classifier when the class count differs). Running it again resumes.",
        epilog="example: python -m mnist_jax.transfer --from runs/mnist --workdir runs/fashion-from-mnist "
               "--dataset fashion_mnist --train-examples 1000 --batch-size 50 --epochs 15 --freeze features",
    )
    parser.add_argument("--from", dest="source", required=True, metavar="SRC_DIR",
                        help="finished training workdir to start from (its best checkpoint)")
    parser.add_argument("--freeze", choices=FREEZE_CHOICES, default=None,
                        help="features: keep the convolutional layers fixed; none: fine-tune everything "
                             "(default: none)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    args = parse_args(argv)
    cli.prepare_devices()
    source_dir = os.path.abspath(args.source)
    requested = dataclasses.replace(cli.config_from_args(args), transfer_from=source_dir, freeze=args.freeze or "none")
    validate(requested)
    if args.freeze is None and checkpoint.has_checkpoints(args.workdir):
        requested = dataclasses.replace(requested, freeze=(workdir.read_config(args.workdir) or requested).freeze)
    config = plan(args.workdir, source_dir, requested, cli.chosen_fields(args), args.data_dir)
    options = dataclasses.replace(cli.run_options(args), initial_state=initial_state_from(config.transfer_from))
    cli.report_final(train_and_evaluate(config, options, started), started, args.workdir)
    return 0


if __name__ == "__main__":
    cli.run_cli(main)
