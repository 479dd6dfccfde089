"""Recipe schema: defaults, overrides, and the exact text of validation errors."""

from pathlib import Path

import pytest
import yaml

from tltool.errors import RecipeError
from tltool.recipe import Recipe, describe_fields, load_recipe, save_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
BAD = Path(__file__).resolve().parent / "bad_recipes"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_defaults_without_a_file():
    recipe = load_recipe(None)
    assert recipe.backbone.name == "mobilenet_v2"
    assert recipe.frozen.epochs == 30 and recipe.fine_tune.epochs == 5 and recipe.fine_tune.unfreeze == 2
    assert recipe.data.val_split == 0.2


def test_every_field_has_a_description():
    rows = describe_fields()
    assert len(rows) > 40
    missing = [path for path, _, help_text in rows if not help_text]
    assert missing == []


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_are_valid(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    # Each shipped recipe is commented for newcomers.
    assert path.read_text().lstrip().startswith("#")


def test_required_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"quickstart.yaml", "vgg16.yaml", "mobilenet_v2.yaml", "resnet50.yaml", "efficientnet.yaml"} <= names


def test_unknown_key_gets_dotted_path_and_did_you_mean(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown key `head\.dropuot`\. Did you mean `head\.dropout`\?"):
        load_recipe(write(tmp_path, "head: {dropuot: 0.3}\n"))


def test_unknown_section_is_rejected(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown key `augmentation`\. Did you mean `augment`\?"):
        load_recipe(write(tmp_path, "augmentation: {flip: horizontal}\n"))


def test_wrong_type_says_expected_and_received(tmp_path):
    with pytest.raises(RecipeError, match=r"expected `frozen\.epochs` to be an integer\. Received: frozen\.epochs='ten'"):
        load_recipe(write(tmp_path, "frozen: {epochs: ten}\n"))


def test_bad_choice_lists_the_choices(tmp_path):
    with pytest.raises(RecipeError, match=r"expected `head\.mode` to be one of `pooled`, `classic`\. "
                                          r"Received: head\.mode='clasic'\. Did you mean `classic`\?"):
        load_recipe(write(tmp_path, "head: {mode: clasic}\n"))


def test_out_of_range_value(tmp_path):
    with pytest.raises(RecipeError, match=r"expected `head\.dropout` to be between 0\.0 and 0\.95\. Received"):
        load_recipe(write(tmp_path, "head: {dropout: 1.5}\n"))


def test_invalid_yaml_names_the_line(tmp_path):
    with pytest.raises(RecipeError, match=r"is not valid YAML at line \d+, column \d+"):
        load_recipe(write(tmp_path, "data:\n  train: x\n  bad: [\n  :\n"))


def test_scientific_notation_without_dot_is_a_number(tmp_path):
    recipe = load_recipe(write(tmp_path, "frozen: {learning_rate: 1e-3}\n"))
    assert recipe.frozen.learning_rate == pytest.approx(1e-3)


def test_set_overrides_apply_and_are_validated(tmp_path):
    recipe = load_recipe(None, overrides=["head.dense=[128, 64]", "frozen.epochs=3", "backbone.weights=none"])
    assert recipe.head.dense == [128, 64] and recipe.frozen.epochs == 3 and recipe.backbone.weights == "none"
    with pytest.raises(RecipeError, match=r"unknown key `fine_tune\.unfreez`\. Did you mean `fine_tune\.unfreeze`"):
        load_recipe(None, overrides=["fine_tune.unfreez=10"])
    with pytest.raises(RecipeError, match="Expected an override of the form KEY=VALUE"):
        load_recipe(None, overrides=["frozen.epochs"])


def test_explicit_values_override_the_file(tmp_path):
    path = write(tmp_path, "frozen: {epochs: 7}\ndata: {batch_size: 4}\n")
    recipe = load_recipe(path, overrides=["data.batch_size=8"], values={"frozen": {"epochs": 2}})
    assert recipe.frozen.epochs == 2 and recipe.data.batch_size == 8


def test_tune_space_keys_must_exist(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown key `head\.dropot` in `tune\.space`\. Did you mean `head\.dropout`"):
        load_recipe(write(tmp_path, "tune: {space: {head.dropot: {choice: [0.1]}}}\n"))


def test_nothing_to_train_is_rejected():
    with pytest.raises(RecipeError, match="both `frozen.epochs` and `fine_tune.epochs` are 0"):
        load_recipe(None, overrides=["frozen.epochs=0", "fine_tune.epochs=0"])


def test_saved_recipe_round_trips(tmp_path):
    recipe = load_recipe(None, overrides=["head.dense=[32]", "augment.zoom=0.1", "data.train=/some/where"])
    save_recipe(recipe, tmp_path / "recipe.yaml")
    again = load_recipe(tmp_path / "recipe.yaml")
    assert again == recipe
    assert yaml.safe_load((tmp_path / "recipe.yaml").read_text())["head"]["dense"] == [32]


@pytest.mark.parametrize("path", sorted(BAD.glob("*.yaml")), ids=lambda p: p.name)
def test_invalid_recipes_give_their_expected_error(path):
    """Each file in tests/bad_recipes starts with `# error: REGEX` naming the message it must produce."""
    expected = path.read_text().splitlines()[0].removeprefix("# error:").strip()
    with pytest.raises(RecipeError, match=expected):
        load_recipe(path)


def test_cli_recipe_fields_and_show(tmp_path):
    from click.testing import CliRunner

    from tltool.cli import main

    result = CliRunner().invoke(main, ["recipe", "fields", "fine_tune"])
    assert result.exit_code == 0
    assert "fine_tune.unfreeze" in result.output and " 2 " in result.output and "head.dropout" not in result.output
    shown = CliRunner().invoke(main, ["recipe", "show", "--set", "head.dense=[64]"])
    assert shown.exit_code == 0 and yaml.safe_load(shown.output)["head"]["dense"] == [64]
    bad = CliRunner().invoke(main, ["recipe", "show", "--set", "head.dropuot=1"])
    assert bad.exit_code == 2 and "Did you mean `head.dropout`?" in bad.output
