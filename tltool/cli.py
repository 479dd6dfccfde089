"""The `tltool` command line: a thin layer over the Python API.

Commands parse their options, call the API, and turn tltool's own errors into one line on stderr and an
exit code (2 for bad input, 1 for a failed operation). Options can also come from the environment with
the TLTOOL_ prefix (e.g. TLTOOL_FINETUNE_BATCH_SIZE=16).
"""

from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path

import click

import tltool
from tltool.errors import TltoolError


class CleanError(click.ClickException):
    """A ClickException with the exit code of the tltool error it carries."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def handle_errors(fn):
    """Turn tltool's errors (and Ctrl-C) into one clean line and an exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TltoolError as exc:
            raise CleanError(str(exc), exc.exit_code) from None
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)

    return wrapper


def _show_warning(message, category, filename, lineno, file=None, line=None):
    click.secho(f"Warning: {message}", fg="yellow", err=True)


def echo(message: str = "") -> None:
    click.echo(message)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "TLTOOL"})
@click.version_option(tltool.__version__, prog_name="tltool")
def main():
    """Transfer learning for image classification: fine-tune, tune, evaluate, export and predict.

    Point it at an image folder with one sub-folder per class, e.g.

        tltool finetune recipes/quickstart.yaml
        tltool finetune --data ~/photos --backbone vgg16 --out runs/photos
    """
    warnings.showwarning = _show_warning


def recipe_options(fn):
    """Options shared by `finetune` and `tune`: data, backbone, weights, sizes, seed, overrides."""
    options = [
        click.argument("recipe", required=False, type=click.Path(dir_okay=False, path_type=Path)),
        click.option("--data", type=click.Path(path_type=Path), help="Training image folder (one sub-folder per class)."),
        click.option("--val-data", type=click.Path(path_type=Path),
                     help="Validation folder; default: a seeded stratified split of --data."),
        click.option("--test-data", type=click.Path(path_type=Path), help="Test folder, evaluated at the end."),
        click.option("--backbone", help="Backbone name (see `tltool backbones`)."),
        click.option("--weights", help="imagenet, none, or PATH to a weights file of the backbone without its top."),
        click.option("--image-size", type=click.IntRange(1), help="Input size in pixels (default: the backbone's)."),
        click.option("--batch-size", type=click.IntRange(1), help="Images per batch."),
        click.option("--seed", type=int, help="Seed of the split, the head's weights and augmentation."),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override any recipe field, e.g. --set head.dropout=0.3 (repeatable)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@main.command()
@recipe_options
@click.option("--epochs", type=click.IntRange(0), help="Epochs of stage 1 (frozen backbone).")
@click.option("--fine-tune-epochs", type=click.IntRange(0), help="Epochs of stage 2 (top layers unfrozen; 0 skips it).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Run directory to write (default: runs/NAME-TIMESTAMP).")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists and is not empty.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@handle_errors
def finetune(recipe, data, val_data, test_data, backbone, weights, image_size, batch_size, seed, overrides,
             epochs, fine_tune_epochs, out, force, quiet):
    """Fine-tune a pretrained backbone on an image folder (RECIPE: optional YAML recipe)."""
    tltool.finetune(recipe, data=data, val_data=val_data, test_data=test_data, backbone=backbone,
                    weights=weights, image_size=image_size, epochs=epochs, fine_tune_epochs=fine_tune_epochs,
                    batch_size=batch_size, seed=seed, out=out, overrides=overrides, force=force,
                    verbose=0 if quiet else 1, log=echo)


@main.command()
@recipe_options
@click.option("--algorithm", type=click.Choice(["hyperband", "bayesian", "random", "grid"]),
              help="Search algorithm (default: the recipe's tune.algorithm, hyperband).")
@click.option("--max-trials", type=click.IntRange(1), help="Most trials (default: the recipe's tune.max_trials).")
@click.option("--objective", type=click.Choice(["val_accuracy", "val_loss"]),
              help="What the search optimises (default: the recipe's tune.objective, val_accuracy).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (default: runs/NAME-tune); re-running with it resumes the search.")
@click.option("--overwrite", is_flag=True, help="Delete what --out holds and start the search afresh.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@handle_errors
def tune(recipe, data, val_data, test_data, backbone, weights, image_size, batch_size, seed, overrides,
         algorithm, max_trials, objective, out, overwrite, quiet):
    """Search hyperparameters with Keras Tuner (RECIPE: optional YAML recipe with a tune.space).

    Distributed: set KERASTUNER_ORACLE_IP, KERASTUNER_ORACLE_PORT and KERASTUNER_TUNER_ID (chief on one
    machine, worker0, worker1, ... on the others) and run the same command everywhere.
    """
    tltool.tune(recipe, data=data, val_data=val_data, test_data=test_data, backbone=backbone, weights=weights,
                image_size=image_size, batch_size=batch_size, seed=seed, algorithm=algorithm,
                max_trials=max_trials, objective=objective, out=out, overwrite=overwrite, overrides=overrides,
                verbose=0 if quiet else 1, log=echo)


@main.command()
@click.argument("pattern", default="*")
@click.option("--params/--no-params", default=True, help="Count parameters (builds each network; slower).")
@handle_errors
def backbones(pattern, params):
    """List registered backbones (PATTERN: shell-style filter, e.g. 'efficientnet*')."""
    names = tltool.list_backbones(pattern)
    if not names:
        raise CleanError(f"No backbone matches `{pattern}`. Run `tltool backbones` to list them all.", 2)
    header = f"{'name':<20} {'input':>6} {'features':>9} {'params':>12}  preprocessing"
    echo(header)
    echo("-" * len(header))
    for name in names:
        spec = tltool.get_backbone_spec(name)
        count = _count_params(spec) if params else None
        shown = f"{count / 1e6:.1f}M" if count is not None else "-"
        prep = "built into the network" if spec.preprocessing_included else spec.preprocessing
        echo(f"{spec.name:<20} {spec.default_size:>6} {spec.feature_size:>9} {shown:>12}  {prep}")


def _count_params(spec) -> int:
    import keras

    net = spec.constructor_fn()(include_top=False, weights=None,
                                input_shape=(spec.default_size, spec.default_size, 3), **dict(spec.extra_kwargs))
    count = net.count_params()
    keras.backend.clear_session()
    return count


if __name__ == "__main__":
    main()
