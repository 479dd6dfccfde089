"""The `tltool` command line: a thin layer over the Python API.

Commands parse their options, call the API, and turn tltool's own errors into one line on stderr and an
exit code (2 for bad input, 1 for a failed operation). Options can also come from the environment with
the TLTOOL_ prefix (e.g. TLTOOL_FINETUNE_BATCH_SIZE=16), except the flags that replace or delete files
(--force, --overwrite) and --resume: those must be typed, never inherited from a shell's environment.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
import warnings
from pathlib import Path

import click

import tltool
from tltool import native_logs


class CleanError(click.ClickException):
    """A ClickException with the exit code of the tltool error it carries."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# Only the program filters its process's stderr; `main` invoked in-process (tests, other tools) leaves it be.
_AS_PROGRAM = False


def _set_verbose(ctx, param, value) -> None:
    if value:
        native_logs.set_verbose()


verbose_option = click.option(
    "--verbose", is_flag=True, expose_value=False, is_eager=True, callback=_set_verbose,
    help="Also show the log lines of TensorFlow, LiteRT and MediaPipe themselves (or TLTOOL_VERBOSE=1).")


def handle_errors(fn):
    """Turn tltool's errors (and Ctrl-C) into one clean line and an exit code, never a traceback; --verbose.

    Native libraries' start-up lines are filtered from here on (before TensorFlow loads), unless verbose.
    """

    @verbose_option
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _AS_PROGRAM:
            native_logs.filter_process_stderr()
        try:
            return fn(*args, **kwargs)
        except tltool.WorkerLostError as exc:
            _restart_after_lost_worker(exc)
        except tltool.TltoolError as exc:
            raise CleanError(str(exc), exc.exit_code) from None
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)

    return wrapper


#: how often a multi-worker process restarts itself after losing a worker, before it gives up
MAX_RESTARTS = 10
_RESTARTS_ENV = "TLTOOL_RESTARTS"


def _restart_after_lost_worker(exc) -> None:
    """A multi-worker run lost a worker: the `tltool` program starts again in its own process (the chief
    resuming its run), to wait for the cluster to form again; the Python API only says what happened."""
    run_dir = getattr(exc, "run_dir", None)
    resumable = run_dir is not None and (Path(run_dir) / "recipe.yaml").is_file()
    restarts = int(os.environ.get(_RESTARTS_ENV, "0"))
    if not _AS_PROGRAM or restarts >= MAX_RESTARTS:
        hint = f" Start every worker again (the chief with: tltool finetune --resume --out {run_dir})." if resumable else ""
        raise CleanError(f"{exc}{hint}", exc.exit_code) from None
    args = ["finetune", "--resume", "--out", str(run_dir)] if resumable else sys.argv[1:]
    click.echo(f"{exc} Start the lost process again: a worker with the command it was started with, the chief with "
               f"`tltool finetune --resume --out RUN_DIR`. Restarting ({restarts + 1} of at most {MAX_RESTARTS}) "
               f"to wait for it: tltool {' '.join(args)}", err=True)
    os.environ[_RESTARTS_ENV] = str(restarts + 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "tltool", *args])


@contextlib.contextmanager
def interruptible(hint: str = "", sigterm: bool = True):
    """Ctrl-C (and with `sigterm`, SIGTERM at the work's next safe point): stop cleanly, say what was kept and
    how to continue (`hint`), exit 130 (143 for SIGTERM)."""
    try:
        with tltool.sigterm_at_safe_points() if sigterm else contextlib.nullcontext():
            yield
    except (KeyboardInterrupt, tltool.Interrupted) as exc:
        code = 143 if isinstance(exc, tltool.Interrupted) else 130
        click.echo(f"\nInterrupted.{' ' + hint if hint else ''}", err=True)
        sys.exit(code)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    click.secho(f"Warning: {message}", fg="yellow", err=True)


def echo(message: str = "") -> None:
    click.echo(message)


def progress_verbosity(quiet: bool) -> int:
    """Keras's verbosity for a command's progress: live bars on a terminal; written to a file or a pipe (a log,
    CI), one line per epoch and per extraction (2), since bars would fill it with carriage returns and
    colour codes."""
    if quiet:
        return 0
    return 1 if sys.stdout.isatty() else 2


# Click rewraps help paragraphs; a paragraph that starts with "\b" keeps its line breaks (example commands).
@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "TLTOOL"})
@click.version_option(tltool.__version__, prog_name="tltool")
def main():
    """Transfer learning for image classification: fine-tune, tune, evaluate, export and predict.

    Point it at an image folder with one sub-folder per class, e.g.

    \b
        tltool finetune recipes/quickstart.yaml
        tltool finetune --data ~/photos --backbone vgg16 --out runs/photos
    """
    warnings.showwarning = _show_warning


def run() -> None:
    """The `tltool` program (console script and `python -m tltool`): the command line as its own process."""
    global _AS_PROGRAM
    _AS_PROGRAM = True
    try:
        main()
        ending = SystemExit(0)  # click's main() ends with SystemExit in any case
    except SystemExit as exc:
        ending = exc
    _exit_promptly(ending)


def _exit_promptly(exc: SystemExit) -> None:
    """End the process with `exc`'s status once its work is done and written, without the interpreter's
    teardown: after TensorFlow has run, that teardown (freeing every module, graph and kernel) takes 1 to
    1.5 s between a command's last line and the shell prompt. What must happen at exit still does: the
    atexit handlers run (the stderr filter passes on its last lines, TensorFlow removes its temporary
    files) and the output streams are flushed. With a Python thread still at work (none of tltool's
    commands leave one), or without atexit's runner, the process exits the ordinary way."""
    import atexit
    import threading

    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if others or run_exit_handlers is None or not isinstance(exc.code, (int, type(None))):
        raise exc
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away (`tltool predict ... | head`), a closed stream
            pass
    os._exit(exc.code or 0)


def recipe_options(fn):
    """Options shared by `finetune` and `tune`: data, backbone, weights, sizes, seed, overrides."""
    options = [
        click.argument("recipe", required=False, type=click.Path(dir_okay=False, path_type=Path)),
        click.option("--data", type=click.Path(path_type=Path), help="Training image folder (one sub-folder per class)."),
        click.option("--val-data", type=click.Path(path_type=Path),
                     help="Validation folder; default: a seeded stratified split of --data."),
        click.option("--test-data", type=click.Path(path_type=Path),
                     help="Test folder, evaluated at the end (`tune` writes it into best.yaml, for `finetune` "
                          "of it)."),
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
@click.option("--force", is_flag=True, allow_from_autoenv=False,
              help="Replace --out if it holds an earlier tltool run (never a folder tltool did not write).")
@click.option("--resume", is_flag=True, allow_from_autoenv=False,
              help="Continue the interrupted run in --out from its last finished epoch.")
@click.option("--deterministic", is_flag=True, help="Deterministic ops: the same seed gives the same metrics.")
@click.option("--strategy", type=click.Choice(["default", "mirrored", "multi_worker"]),
              help="mirrored: train on all visible GPUs; multi_worker: on the hosts TF_CONFIG lists, each started "
                   "with this same command (the recipe's train.strategy).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--tensorboard", is_flag=True, help="Also log both stages for TensorBoard, under OUT/tb.")
@handle_errors
def finetune(recipe, data, val_data, test_data, backbone, weights, image_size, batch_size, seed, overrides,
             epochs, fine_tune_epochs, out, force, resume, deterministic, strategy, quiet, tensorboard):
    """Fine-tune a pretrained backbone on an image folder. RECIPE: an optional YAML recipe.

    \b
        tltool finetune recipes/quickstart.yaml
        tltool finetune --data ~/photos --weights imagenet --out runs/photos
        tltool finetune --resume --out runs/photos
    """
    if resume and force:
        raise click.UsageError("--resume and --force contradict each other: --force would delete the run.")
    where = f" --out {out}" if out else " --out RUN_DIR (the run directory printed at the start)"
    with interruptible(f"Progress up to the last finished epoch is saved; continue with: tltool finetune --resume"
                       f"{where}"):
        result = tltool.finetune(recipe, data=data, val_data=val_data, test_data=test_data, backbone=backbone,
                                 weights=weights, image_size=image_size, epochs=epochs,
                                 fine_tune_epochs=fine_tune_epochs, batch_size=batch_size, seed=seed, out=out,
                                 overrides=overrides, force=force, resume=resume, deterministic=deterministic,
                                 strategy=strategy, verbose=progress_verbosity(quiet), log=echo,
                                 tensorboard=tensorboard)
    if result.run_dir is None:  # a multi-worker run's worker: the chief reports the run
        return
    if quiet:  # the one line a quiet run still owes its user
        summary = result.summary
        test = f", test_accuracy {summary['test_accuracy']:.4f}" if summary["test_accuracy"] is not None else ""
        echo(f"val_accuracy {summary['val_accuracy']:.4f}{test}. Run directory: {result.run_dir}")


@main.command()
@recipe_options
@click.option("--algorithm", type=click.Choice(["hyperband", "bayesian", "random", "grid"]),
              help="Search algorithm (default: the recipe's tune.algorithm, hyperband).")
@click.option("--max-trials", type=click.IntRange(1), help="Most trials (default: the recipe's tune.max_trials).")
@click.option("--objective", type=click.Choice(["val_accuracy", "val_loss"]),
              help="What the search optimises (default: the recipe's tune.objective, val_accuracy).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (default: runs/NAME-tune); re-running with it resumes the search.")
@click.option("--overwrite", is_flag=True, allow_from_autoenv=False,
              help="Delete the earlier tltool search in --out and start afresh.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@handle_errors
def tune(recipe, data, val_data, test_data, backbone, weights, image_size, batch_size, seed, overrides,
         algorithm, max_trials, objective, out, overwrite, quiet):
    """Search hyperparameters with Keras Tuner. RECIPE: an optional YAML recipe with a tune.space.

    \b
        tltool tune --data ~/photos --max-trials 20 --out runs/search
        tltool tune recipes/mobilenet_v2.yaml --data ~/photos --algorithm bayesian

    Distributed: set KERASTUNER_ORACLE_IP, KERASTUNER_ORACLE_PORT and KERASTUNER_TUNER_ID (chief on one
    machine, worker0, worker1, ... on the others) and run the same command everywhere.
    """
    # SIGTERM keeps its default (a search's chief waits on the network, with no safe point to stop at).
    with interruptible("Finished trials are kept; run the same command again (without --overwrite) to continue "
                       "the search.", sigterm=False):
        tltool.tune(recipe, data=data, val_data=val_data, test_data=test_data, backbone=backbone, weights=weights,
                    image_size=image_size, batch_size=batch_size, seed=seed, algorithm=algorithm,
                    max_trials=max_trials, objective=objective, out=out, overwrite=overwrite, overrides=overrides,
                    verbose=progress_verbosity(quiet), log=echo)


@main.command()
@click.argument("pattern", default="*")
@click.option("--params/--no-params", default=True, help="Count parameters (builds each network; slower).")
@handle_errors
def backbones(pattern, params):
    """List the registered backbones. PATTERN: a shell-style filter, e.g. 'efficientnet*'."""
    names = tltool.list_backbones(pattern)
    if not names:
        raise CleanError(f"No backbone matches `{pattern}`. Run `tltool backbones` to list them all.", 2)
    header = f"{'name':<20} {'input':>6} {'features':>9} {'params':>12}  preprocessing"
    echo(header)
    echo("-" * len(header))
    for name in names:
        spec = tltool.get_backbone_spec(name)
        count = tltool.count_params(name) if params else None
        shown = f"{count / 1e6:.1f}M" if count is not None else "-"
        prep = "built into the network" if spec.preprocessing_included else spec.preprocessing
        echo(f"{spec.name:<20} {spec.default_size:>6} {spec.feature_size:>9} {shown:>12}  {prep}")


@main.group()
def recipe():
    """Inspect recipes: every field, or one resolved."""


@recipe.command("fields")
@click.argument("prefix", default="")
def recipe_fields(prefix):
    """List every recipe field with its default and description (PREFIX: e.g. `fine_tune`)."""
    for path, default, help_text in tltool.describe_fields():
        if path.startswith(prefix):
            shown = "null" if default is None else default
            echo(f"{path:<28} {str(shown):<14} {help_text}")


@recipe.command("show")
@click.argument("recipe_file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a field (repeatable).")
@handle_errors
def recipe_show(recipe_file, overrides):
    """Validate RECIPE_FILE (default: the built-in defaults) and print it with every field resolved."""
    echo(tltool.load_recipe(recipe_file, overrides=overrides).to_yaml().rstrip())


@main.group()
def cache():
    """Inspect and trim the feature cache.

    It lives in train.cache_dir, $TLTOOL_CACHE_DIR or ~/.cache/tltool/features.
    """


cache_dir_option = click.option("--dir", "folder", type=click.Path(path_type=Path),
                                help="Cache folder (default: $TLTOOL_CACHE_DIR or ~/.cache/tltool/features).")


@cache.command("info")
@cache_dir_option
@handle_errors
def cache_info(folder):
    """List the cache's entries: images, size, stale rows and last use.

    There is one entry per backbone, input size and weights.
    """
    root, entries = tltool.cache_info(folder)
    echo(f"Feature cache: {root} ({len(entries)} entries, {sum(e.size_bytes for e in entries) / 1e6:.1f} MB)")
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        echo(f"  {e.path.name:<44} {e.rows:>7} rows {e.size_bytes / 1e6:>9.1f} MB  {e.stale_rows:>6} stale  "
             f"last used {used}")
    if any(e.stale_rows for e in entries):
        echo("Stale rows belong to images changed or deleted since; `tltool cache prune` drops them.")


@cache.command("prune")
@cache_dir_option
@handle_errors
def cache_prune(folder):
    """Drop the rows of images changed or deleted since they were cached."""
    pruned = tltool.prune_cache(folder)
    echo(f"Dropped {pruned['stale_rows']} stale rows, freed {pruned['freed_bytes'] / 1e6:.1f} MB."
         + _in_use_note(pruned["in_use"]))


@cache.command("clear")
@cache_dir_option
@click.option("--older-than", type=click.FloatRange(min=0), metavar="DAYS",
              help="Only entries not used for more than DAYS days.")
@click.option("--force", is_flag=True, allow_from_autoenv=False,
              help="Really remove them (without it, only lists what would go).")
@handle_errors
def cache_clear(folder, older_than, force):
    """Remove cache entries (all, or those unused for --older-than DAYS). Needs --force."""
    cleared = tltool.clear_cache(folder, older_than, dry_run=not force)
    size = cleared["size_bytes"] / 1e6
    if not force:
        echo(f"Would remove {cleared['entries']} entries ({size:.1f} MB). Pass --force to remove them; the "
             f"features are recomputed when next needed.")
        sys.exit(2 if cleared["entries"] else 0)
    echo(f"Removed {cleared['entries']} entries ({size:.1f} MB)." + _in_use_note(cleared["in_use"]))


def _in_use_note(entries: int) -> str:
    return (f" Left {entries} entr{'y' if entries == 1 else 'ies'} alone: in use by a running tltool; try again "
            f"when it has finished." if entries else "")


@main.group()
def data():
    """Inspect image folders before training."""


@data.command("check")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--val-data", type=click.Path(path_type=Path), help="Validation folder, checked for leakage too.")
@click.option("--test-data", type=click.Path(path_type=Path), help="Test folder, checked for leakage too.")
@click.option("--group-by", metavar="REGEX",
              help="Regex on file names giving each file's group (as data.group_by); reports groups spanning classes.")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@handle_errors
def check(folder, val_data, test_data, group_by, as_json, quiet):
    """Read every image of FOLDER and report broken files, duplicates, imbalance and leakage.

    \b
        tltool data check ~/photos
        tltool data check ~/photos --val-data ~/photos_val --json

    Exit code 0: trainable (warnings allowed); 1: problems found (broken files, the same image under two
    classes, images shared with --val-data/--test-data, fewer than 2 classes, ...); 2: bad input.
    """
    import json

    report = tltool.check_data(folder, val=val_data, test=test_data, group_by=group_by,
                               progress=not quiet and not as_json and sys.stderr.isatty())
    echo(json.dumps(report, indent=2) if as_json else tltool.format_report(report))
    sys.exit(0 if report["ok"] else 1)


TTA_HELP = ("Test-time augmentation: average each image's probabilities with its mirror image's (twice the "
            "work; for models trained on mirrored images).")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Labelled image folder (one sub-folder per class, classes among the model's).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for metrics.json, plots/ and report.html (default: MODEL/eval-DATANAME, with MODEL the run "
                   "or export folder, or the folder of a model file).")
@click.option("--top-k", type=click.IntRange(1), default=5, show_default=True, help="k of the top-k accuracy.")
@click.option("--force", is_flag=True, allow_from_autoenv=False,
              help="Replace --out if it holds an earlier tltool evaluation.")
@click.option("--tta", is_flag=True, help=TTA_HELP)
@click.option("--ood-data", type=click.Path(path_type=Path),
              help="A folder of images from other domains (no classes needed): how many the model rejects as "
                   "unknown, and how well its OOD score separates them from --data (AUROC).")
@click.option("--no-robustness", is_flag=True,
              help="Skip measuring the accuracy under small perturbations (FGSM, Gaussian noise; 10-20 s on a CPU).")
@handle_errors
def evaluate(model, data, out, top_k, force, tta, ood_data, no_robustness):
    """Evaluate a trained model on a labelled image folder. MODEL: a run directory or an export.

    \b
        tltool evaluate runs/photos --data ~/photos_test
        tltool evaluate runs/photos/export/tflite-int8 --data ~/photos_test --ood-data ~/other

    A SavedModel runs its own TensorFlow graph when loaded: pass only SavedModels you trust (.keras files
    load in Keras's safe mode; TFLite and ONNX files hold no code).

    Writes metrics.json (accuracy, per-class precision/recall/F1, confusion matrix, calibration,
    confidence thresholds, out-of-distribution rejection, accuracy under small perturbations), the plots,
    and report.html: one page that opens offline in any browser.
    """
    metrics = tltool.evaluate(model, data, out=out, top_k=top_k, force=force, tta=tta, ood_data=ood_data,
                              robustness=not no_robustness, log=echo)
    for probe in metrics["probes"]:
        if probe["overconfident"]:  # neither unsure nor rejected by the OOD score
            click.secho(f"Warning: on a {probe['name']} image the model says {probe['predicted']} "
                        f"({probe['confidence']:.0%}); see the sanity probes in the report.", fg="yellow", err=True)


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["savedmodel", "keras", "tflite", "onnx"]),
              help="savedmodel (TF Serving), keras (.keras), tflite (mobile, edge) or onnx (onnxruntime). "
                   "Default: every format in the run recipe's export.formats.")
@click.option("--quantize", type=click.Choice(["none", "dynamic", "float16", "int8"]),
              help="TFLite only: dynamic (int8 weights), float16, or int8 (full integer, calibrated on training "
                   "images). Default: the recipe's export.quantize for tflite, none otherwise.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write (default: RUN/export/FORMAT, or RUN/export/tflite-QUANTIZE).")
@click.option("--force", is_flag=True, allow_from_autoenv=False,
              help="Replace --out if it holds an earlier tltool export.")
@handle_errors
def export(run, fmt, quantize, out, force):
    """Export a run's model and check the export. RUN: a run directory.

    Each export is checked against the Keras model on the validation images (TFLite files also in LiteRT
    and MediaPipe Tasks) and refused when they disagree.

    \b
        tltool export runs/photos --format tflite --quantize int8
        tltool export runs/photos --format savedmodel
    """
    tltool.export_run(run, fmt, quantize, out=out, force=force, log=echo)


@main.command()
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top-k", type=click.IntRange(1), default=3, show_default=True, help="Classes listed per image.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of results.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV, one row per file.")
@click.option("--threshold", type=click.FloatRange(0, 1),
              help="Below this top probability the label is `unknown` (reason: low_confidence).")
@click.option("--no-reject", is_flag=True,
              help="Always name a class, even for images the model judges out of distribution (by default "
                   "their label is `unknown`, reason: out_of_distribution).")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True, help="Images per batch.")
@click.option("--tta", is_flag=True, help=TTA_HELP)
@handle_errors
def predict(model, files, top_k, as_json, as_csv, threshold, no_reject, batch_size, tta):
    """Classify images with a trained model. MODEL: a run directory or an export; FILES: images or folders.

    \b
        tltool predict runs/photos photo.jpg
        tltool predict runs/photos/export/tflite-int8 ~/new_photos --csv > predictions.csv

    A SavedModel runs its own TensorFlow graph when loaded: pass only SavedModels you trust (.keras files
    load in Keras's safe mode; TFLite and ONNX files hold no code).

    A file that cannot be read is reported with its reason and the others go on; the exit code is 1
    when any failed.
    """
    if as_json and as_csv:
        raise click.UsageError("Pass at most one of --json and --csv.")
    predictor = tltool.load_predictor(model)
    if tta:
        predictor = tltool.mirror_tta(predictor, model)
    results = tltool.predict_files(predictor, files, top_k=top_k, threshold=threshold, batch_size=batch_size,
                                   reject=not no_reject)
    if as_json:
        import json

        echo(json.dumps(results, indent=2))
    elif as_csv:
        import csv
        import io

        header, rows = tltool.results_to_csv_rows(results)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        click.echo(buffer.getvalue(), nl=False)
    else:
        width = max((len(r["path"]) for r in results), default=0)
        for r in results:
            if r["error"] is None:
                echo(f"{r['path']:<{width}}  {_answer(r)}")
    failed = [r for r in results if r["error"] is not None]
    for r in failed:
        click.echo(f"Error: {r['path']}: {r['error']}", err=True)
    if failed:
        click.echo(f"{len(failed)} of {len(results)} file(s) could not be classified.", err=True)
        sys.exit(1)


@main.command()
@click.argument("content", type=click.Path(path_type=Path))
@click.argument("style", type=click.Path(path_type=Path))
@click.option("--recipe", type=click.Path(dir_okay=False, path_type=Path),
              help="A recipe whose stylize section (and seed) to use, e.g. OUT/recipe.yaml of an earlier run.")
@click.option("--backbone", help="Backbone whose layers define content and style: vgg19 (default), vgg16, "
                                 "mobilenet_v2.")
@click.option("--weights", help="imagenet, none (random: for tests only), or PATH to the backbone's weights file.")
@click.option("--size", type=click.IntRange(16), help="Longer side of the result in pixels (default 512).")
@click.option("--steps", type=click.IntRange(1), help="Optimiser iterations (default 200).")
@click.option("--optimizer", type=click.Choice(["adam", "lbfgs"]),
              help="adam (default: sooner to a given loss) or lbfgs (lower in the end).")
@click.option("--content-weight", type=click.FloatRange(0), help="Weight of the content loss (default: the "
                                                                 "backbone's; vgg 1e4).")
@click.option("--style-weight", type=click.FloatRange(0), help="Weight of the style loss (default: the backbone's; "
                                                               "vgg 1e-2).")
@click.option("--tv-weight", type=click.FloatRange(0), help="Weight of the total-variation loss (default: the "
                                                            "backbone's; vgg 30).")
@click.option("--init", type=click.Choice(["content", "noise"]), help="Start from the content image (default) "
                                                                    "or from noise.")
@click.option("--seed", type=int, help="Seed of the noise start.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe field, e.g. "
                                                                            "--set stylize.steps=100.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write (default: runs/stylize-CONTENT-TIME).")
@click.option("--force", is_flag=True, allow_from_autoenv=False,
              help="Replace --out if it holds an earlier tltool stylization.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@handle_errors
def stylize(content, style, recipe, backbone, weights, size, steps, optimizer, content_weight, style_weight,
            tv_weight, init, seed, overrides, out, force, quiet):
    """Paint CONTENT in the style of STYLE: neural style transfer.

    \b
        tltool stylize photo.jpg painting.jpg --out runs/painted
        tltool stylize photo.jpg painting.jpg --size 256 --steps 100 --style-weight 0.1
        tltool stylize photo.jpg painting.jpg --recipe runs/painted/recipe.yaml

    Writes result.png (at the content's aspect ratio), sheet.png (content | style | result), loss.png,
    stylize.json (settings, losses per step, timings) and recipe.yaml. Ctrl-C or SIGTERM keeps the image so far.
    """
    with interruptible():
        tltool.stylize(content, style, recipe, backbone=backbone, weights=weights, size=size, steps=steps,
                       optimizer=optimizer, content_weight=content_weight, style_weight=style_weight,
                       tv_weight=tv_weight, init=init, seed=seed, out=out, force=force, overrides=overrides,
                       verbose=0 if quiet else 1, log=echo)  # one bar: it has no epochs


def _answer(row: dict) -> str:
    """One result as the plain-text line shows it: the label and score, what else was likely, and why not."""
    others = ", ".join(f"{t['label']} {t['score']:.3f}" for t in row["top_k"][1:])
    if row["reason"] == "out_of_distribution":
        return (f"unknown (out of distribution, ood_score {row['ood_score']:.2f}; would be {row['predicted']} "
                f"{row['score']:.3f})")
    if row["reason"] == "low_confidence":
        return f"unknown (low confidence; would be {row['predicted']} {row['score']:.3f})"
    return f"{row['label']} {row['score']:.3f}" + (f"  ({others})" if others else "")


if __name__ == "__main__":
    main()
