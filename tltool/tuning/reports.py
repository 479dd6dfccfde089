"""The reports of a search: summary.json, trials.csv, best.yaml, trials.png and the table printed at the end."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from tltool import rundir
from tltool.recipe import Recipe
from tltool.tuning.space import SearchSpace, trial_budget, trial_epochs, trial_recipe

BEST_FILE = "best.yaml"
TRIALS_CSV = "trials.csv"
TRIALS_PLOT = "trials.png"


def trial_records(oracle, space: SearchSpace, base: Recipe) -> list[dict]:
    """One dict per trial, in trial order: id, values, metrics, status, worker, seconds, error; a Hyperband
    trial's budget share and epochs."""
    name = oracle.objective.name
    records = []
    for trial_id in sorted(oracle.trials):
        trial = oracle.trials[trial_id]
        log = getattr(oracle, "trial_log", {}).get(trial_id, {})
        metrics = {m: (float(trial.metrics.get_last_value(m)) if trial.metrics.exists(m) else None)
                   for m in ("val_accuracy", "val_loss", "cached_features", "cached_activations")}
        status = str(trial.status).lower()
        record = {"trial_id": trial_id, "hyperparameters": space.values(trial.hyperparameters.values),
                  name: metrics[name] if status == "completed" else None, "status": status,
                  "worker": log.get("worker"), "seconds": log.get("seconds")}
        for metric in ("val_accuracy", "val_loss"):
            record.setdefault(metric, metrics[metric] if status == "completed" else None)
        for metric in ("cached_features", "cached_activations"):
            if metrics[metric] is not None and status == "completed":
                record[metric] = bool(metrics[metric])
        budget = trial_budget(trial.hyperparameters.values, getattr(oracle, "max_epochs", None))
        if budget is not None:  # Hyperband: the trial's share of the budget, and its epochs [stage 1, stage 2]
            record["budget_epochs"] = budget[0]
            if status == "completed":  # (a failed trial's values may not even make a recipe)
                record["epochs"] = trial_epochs(base, record["hyperparameters"], budget)
        if status in ("failed", "invalid"):
            record["error"] = last_line(trial.message)
        records.append(record)
    return records


def _scored(records: list[dict], name: str) -> list[dict]:
    """The trials that completed with a value of the objective `name`."""
    return [r for r in records if r["status"] == "completed" and r.get(name) is not None]


def write_reports(out: Path, oracle, base: Recipe, space: SearchSpace, plot: bool = False) -> dict:
    """summary.json, trials.csv and best.yaml (and trials.png if `plot`) from the oracle's trials."""
    name = oracle.objective.name
    direction = oracle.objective.direction
    records = trial_records(oracle, space, base)
    done = _scored(records, name)
    best = None
    if done:
        top = max(_trained_longest(done), key=_merit(name, direction))
        # `trial`: the number the terminal and trials.csv show; `trial_id`: Keras Tuner's (search/trial_ID).
        best = {"trial": trial_number(top["trial_id"]), "trial_id": top["trial_id"], name: top[name],
                "hyperparameters": top["hyperparameters"]}
        if "epochs" in top:
            best["epochs"] = top["epochs"]
        best_recipe = trial_recipe(base, top["hyperparameters"])
        header = (f"# Best recipe of a tltool search: trial {best['trial']}, {name} {top[name]:.6g}, the best of "
                  f"{len(done)} completed trial(s) of {oracle.max_trials} planned.\n"
                  f"# Train it with: tltool finetune THIS_FILE --out NEW_DIR\n")
        rundir.atomic_write_text(out / BEST_FILE, header + best_recipe.to_yaml())
    summary = {
        "objective": {"name": name, "direction": direction},
        "algorithm": base.tune.algorithm,
        "max_trials": oracle.max_trials,
        "space": space.space,
        "trials_completed": len(done),
        "trials_failed": sum(r["status"] in ("failed", "invalid") for r in records),
        "best": best,
        "trials": records,
    }
    rundir.atomic_write_json(out / rundir.SUMMARY_FILE, summary)
    _write_csv(out / TRIALS_CSV, records, space, name)
    if plot:
        from tltool.evaluation import plots

        rundir.atomic_write_bytes(out / TRIALS_PLOT, plots.trials(records, name, direction))
    return summary


def _merit(name: str, direction: str):
    """A sort key of completed trials, better ones higher: the objective, then the other metric, for the ties
    an accuracy over a small validation set makes (a few images decide it) to go to the lower loss."""
    sign = 1 if direction == "max" else -1
    other, other_sign = {"val_accuracy": ("val_loss", -1), "val_loss": ("val_accuracy", 1)}.get(name, (None, 0))

    def key(record: dict) -> tuple:
        tie = record.get(other) if other else None
        return sign * record[name], 0.0 if tie is None else other_sign * tie
    return key


def _trained_longest(records: list[dict]) -> list[dict]:
    """The trials given the most epochs: Hyperband's early rounds train for a fraction of them, and a score
    after 3 of 30 epochs is no measure of what `finetune` of that recipe gives, so the best is one of these."""
    most = max(r.get("budget_epochs", 0) for r in records)
    return [r for r in records if r.get("budget_epochs", 0) == most]


def _write_csv(path: Path, records: list[dict], space: SearchSpace, name: str) -> None:
    # `trial` is the number the terminal shows; `trial_id` Keras Tuner's (its folder search/trial_ID).
    columns = ["trial", "trial_id", "status", "worker", "seconds", name] + [m for m in ("val_accuracy", "val_loss")
                                                                     if m != name]
    columns += (["epochs"] if any("epochs" in r for r in records) else []) + space.keys + ["error"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for record in records:
        row = {k: record.get(k) for k in columns}
        row["trial"] = trial_number(record["trial_id"])
        if "epochs" in record:
            row["epochs"] = fmt_epochs(record["epochs"])
        for key in space.keys:
            value = record["hyperparameters"].get(key)
            row[key] = json.dumps(value) if isinstance(value, (list, dict)) else value
        writer.writerow(row)
    rundir.atomic_write_text(path, buffer.getvalue())


def format_table(summary: dict, limit: int = 10) -> str:
    """The best `limit` trials as a small text table, failed trials counted below it."""
    name = summary["objective"]["name"]
    done = _scored(summary["trials"], name)
    # Best first; Hyperband's trials trained longest before the shorter ones (the best is one of them).
    merit = _merit(name, summary["objective"]["direction"])
    done.sort(key=lambda r: (r.get("budget_epochs", 0), merit(r)), reverse=True)
    epochs = any("epochs" in r for r in done)  # Hyperband: trials of different lengths
    lines = [f"{'trial':<6} {name:>12} {'seconds':>8} {'worker':<10} " + ("epochs " if epochs else "") + "values",
             "-" * 72]
    for r in done[:limit]:
        values = ", ".join(f"{k}={fmt_value(v)}" for k, v in r["hyperparameters"].items())
        seconds = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        length = f"{fmt_epochs(r['epochs']) if 'epochs' in r else '-':<7}" if epochs else ""
        lines.append(f"{trial_number(r['trial_id']):<6} {r[name]:>12.4f} {seconds:>8} {str(r['worker'] or '-'):<10} "
                     f"{length}{values}")
    if len(done) > limit:
        lines.append(f"... and {len(done) - limit} more completed trial(s) in trials.csv")
    if summary["trials_failed"]:
        lines.append(f"{summary['trials_failed']} trial(s) failed; their errors are in summary.json.")
    return "\n".join(lines)


def fmt_epochs(epochs: list[int]) -> str:
    """[stage 1, stage 2] epochs as "30+5"."""
    return f"{epochs[0]}+{epochs[1]}"


def trial_number(trial_id) -> int:
    """The number a trial is shown with, counting from 1 (Keras Tuner's ids, in files, count from 0)."""
    return int(trial_id) + 1


def fmt_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return json.dumps(value) if isinstance(value, (list, dict)) or value is None else str(value)


def last_line(message) -> str:
    lines = [line.strip() for line in str(message or "").strip().splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    line = lines[-1]
    for prefix in ("keras_tuner.src.errors.FailedTrialError: ", "FailedTrialError: "):
        line = line.removeprefix(prefix)
    return line[:300]
