"""The search space of `tltool tune`: the recipe's `tune.space` as Keras Tuner hyperparameters, and back.

Each entry is a dotted recipe key with {choice: [...]}, {min, max, step, sampling} or {boolean: true}.
A trial's recipe is the base recipe with the trial's values set at their keys.
"""

from __future__ import annotations

import json

from tltool.recipe import Recipe, field_type, from_dict, hidden_layers, set_dotted

#: Keys a trial may change and still train on the search's precomputed features (with no stage 2).
HEAD_KEYS = frozenset({
    "head.dense", "head.dropout", "head.l2", "head.normalize", "frozen.epochs", "frozen.learning_rate",
    "frozen.optimizer", "frozen.early_stopping", "train.label_smoothing", "train.class_weights", "data.batch_size",
})


def default_space(recipe: Recipe) -> dict:
    """The space searched when the recipe has no `tune.space`: head, learning rate, loss, and stage 2 if on."""
    space = {
        "head.dropout": {"min": 0.0, "max": 0.5, "step": 0.1},
        "head.dense": {"choice": [0, 128, 256]},
        "frozen.learning_rate": {"min": 1e-4, "max": 1e-2, "sampling": "log"},
        "train.label_smoothing": {"choice": [0.0, 0.1]},
    }
    if recipe.fine_tune.epochs > 0:
        space["fine_tune.unfreeze"] = {"choice": [1, 2, 4, 6]}
        space["fine_tune.learning_rate"] = {"min": 1e-6, "max": 1e-4, "sampling": "log"}
    return space


# ------------------------------------------------------------------------------------------ the space


class SearchSpace:
    """A validated `tune.space` as Keras Tuner hyperparameters, and their values back as recipe values.

    Keras Tuner's `Choice` takes only one of int, float, str or bool; choices of anything else (lists for
    `head.dense`, null) travel as JSON strings. A number for `head.dense` is one hidden layer of that
    size, 0 none.
    """

    def __init__(self, space: dict):
        self.space = dict(space)
        self._json = set()
        for key, entry in self.space.items():
            if "choice" in entry and self._native(key, entry["choice"]) is None:
                self._json.add(key)

    @staticmethod
    def _native(key: str, values: list):
        tp = field_type(key)
        if tp is float and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return [float(v) for v in values]
        for kind in (bool, int, str):
            if all(type(v) is kind for v in values):
                return list(values)
        return None

    @property
    def keys(self) -> list[str]:
        return list(self.space)

    def largest(self, key: str):
        """The largest value the space may give `key` (a number), or None when the space leaves it alone."""
        entry = self.space.get(key)
        if entry is None:
            return None
        values = entry.get("choice") or [entry.get("max"), entry.get("min")]
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return max(numbers) if numbers else None

    def possible(self, key: str) -> list:
        """Every value the space may give `key`: its choices, or the integers of its range; [] when it leaves
        the key alone or the values are not countable (a float range)."""
        entry = self.space.get(key)
        if entry is None:
            return []
        if "choice" in entry:
            return list(entry["choice"])
        if "boolean" in entry:
            return [False, True]
        if field_type(key) is int and entry.get("sampling", "linear") == "linear":
            return list(range(int(entry["min"]), int(entry["max"]) + 1, int(entry.get("step") or 1)))
        return []

    def declare(self, hp) -> None:
        for key, entry in self.space.items():
            if "choice" in entry:
                values = self._native(key, entry["choice"])
                if key in self._json:
                    values = [json.dumps(v) for v in entry["choice"]]
                hp.Choice(key, values)
            elif "boolean" in entry:
                hp.Boolean(key)
            elif field_type(key) is float:
                hp.Float(key, float(entry["min"]), float(entry["max"]), step=entry.get("step"),
                         sampling=entry.get("sampling", "linear"))
            else:
                hp.Int(key, int(entry["min"]), int(entry["max"]), step=entry.get("step"),
                       sampling=entry.get("sampling", "linear"))

    def values(self, hp_values: dict) -> dict:
        """Recipe values of the space's keys from a trial's hyperparameter values (Keras Tuner's own dropped)."""
        out = {}
        for key in self.space:
            if key not in hp_values:
                continue
            value = hp_values[key]
            if key in self._json:
                value = json.loads(value)
            if isinstance(value, float):
                value = float(f"{value:.10g}")  # 0.30000000000000004 from min + 3 * step is 0.3
            if _is_list_field(key):
                value = hidden_layers(value)
            out[key] = value
        return out


def _is_list_field(key: str) -> bool:
    import typing

    return typing.get_origin(field_type(key)) is list


#: Where a Hyperband trial's values hold the search's budget (its oracle's `max_epochs`), beside Keras Tuner's
#: `tuner/epochs` (the trial's share of it): see `trial_budget`.
BUDGET_KEY = "tltool/budget"


def trial_budget(hp_values: dict, search_budget: int | None = None) -> tuple[int, int] | None:
    """A Hyperband trial's (epochs, budget) for `trial_recipe`; None for a trial of another algorithm.

    The budget is the one the trial carries, set by the oracle that made it: a worker of a distributed search
    started with another --max-trials, or a resumed search whose --max-trials grew, would size another one.
    `search_budget` serves trials of searches saved before trials carried it.
    """
    budget = hp_values.get(BUDGET_KEY, search_budget)
    if "tuner/epochs" not in hp_values or not budget:
        return None
    return int(hp_values["tuner/epochs"]), int(budget)


def trial_recipe(base: Recipe, values: dict, budget: tuple[int, int] | None = None) -> Recipe:
    """The base recipe with a trial's values set; `budget` (epochs, max_epochs) scales both stages' epochs."""
    tree = base.to_dict()
    for key, value in values.items():
        set_dotted(tree, key, value)
    for stage in ("frozen", "fine_tune"):
        tree[stage]["epochs"] = scaled_epochs(tree[stage]["epochs"], budget)
    return from_dict(tree, source="trial")


def scaled_epochs(epochs: int, budget: tuple[int, int] | None) -> int:
    """A stage's `epochs` in a trial of `budget` (epochs, max_epochs): its share, at least 1 (0 stays 0)."""
    if budget is None or epochs <= 0:
        return epochs
    share, max_epochs = budget
    return max(1, round(epochs * share / max_epochs))


def trial_epochs(base: Recipe, values: dict, budget: tuple[int, int] | None) -> list[int]:
    """[stage 1, stage 2] epochs of a trial, as `trial_recipe` sets them, without building its recipe: the
    reports list every trial's after each trial, and recipes cost milliseconds each (0.7 s of a 20-trial
    search, growing with the square of the trials)."""
    return [scaled_epochs(int(values.get(f"{stage}.epochs", getattr(base, stage).epochs)), budget)
            for stage in ("frozen", "fine_tune")]


def stripped_recipe(recipe: Recipe) -> dict:
    """What a trial shares with the base recipe when it can train on the base's features."""
    tree = recipe.to_dict()
    for key in HEAD_KEYS:
        section, name = key.split(".")
        tree[section].pop(name, None)
    for section in ("tune", "export", "fine_tune"):
        tree.pop(section)
    tree.pop("name")
    return tree
