import copy
import dataclasses
import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from util import CaffeResNet, randomize_bn

from resnet_surgery import (
    Op,
    Recipe,
    Rewrite,
    Source,
    SurgeryError,
    SurgeryNotice,
    Variant,
    apply_recipe,
    convert,
    history,
    load,
    load_model,
    read_recipe,
    save,
)
from resnet_surgery.cli import main

SIZE = (3, 32, 32)


def quiet_convert(model, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SurgeryNotice)
        return convert(model, *args, input_size=SIZE, **kwargs)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """cifar10-resnet-v1.5 -> v1 -> pruned: a recipe with a history, stride moves and prune_dead records."""
    out = tmp_path_factory.mktemp("recipe") / "pruned"
    pruned = quiet_convert(quiet_convert(load_model("cifar10-resnet-v1.5", "DEFAULT"), "v1"), prune_dead=True)
    save(pruned, out)
    return out


def test_recipe_json_keeps_the_format_and_keys_of_format_1(folder):
    data = json.loads((folder / "recipe.json").read_text())
    assert data["format"] == "resnet-surgery/1"
    assert set(data) == {"format", "source", "history", "options", "variant_before", "variant_after", "exact",
                         "rewrites", "notices", "versions"}
    assert data["source"] == {"model": "cifar10-resnet-v1.5", "kind": "zoo", "weights": "DEFAULT"}
    assert data["options"] == {"to": None, "shortcut": None, "exact": False, "prune_dead": True,
                               "input_size": [3, 32, 32]}
    (step,) = data["history"]
    assert set(step) == {"options", "rewrites"} and step["options"]["to"] == "v1"
    assert set(step["rewrites"][0]) == {"block", "op", "exact", "convs", "norms", "keys"}
    assert step["rewrites"][0]["op"] == "stride_to_1x1" and step["rewrites"][0]["exact"] is False
    assert set(data["rewrites"][0]) == {"block", "op", "exact", "convs", "norms", "keys", "input", "readers",
                                        "absorbed", "reduced", "subsampled"}


def test_recipe_round_trips_typed(folder):
    recipe = read_recipe(folder)
    assert isinstance(recipe, Recipe) and recipe.variant_before == Variant.V1 and recipe.exact
    assert all(isinstance(r, Rewrite) and r.op == Op.PRUNE_DEAD for r in recipe.rewrites)
    assert recipe.source == Source("cifar10-resnet-v1.5", "zoo", "DEFAULT")
    assert Recipe.from_json(recipe.to_json()) == recipe
    assert [c.options.to for c in recipe.conversions] == [Variant.V1, None]
    # Code written against the dict recipe still reads it.
    r = recipe["history"][0]["rewrites"][0]
    assert r["block"] == r.block and r.get("norms") == r.norms and r["op"] == "stride_to_1x1"
    assert r.get("input") is None and "input" not in r and "block" in r
    with pytest.raises(KeyError):
        r["no_such_field"]


def damaged(folder, tmp_path, edit):
    """A copy of ``folder`` whose recipe.json is ``edit(recipe dict)`` (or whatever edit returns)."""
    out = tmp_path / "damaged"
    out.mkdir()
    for f in folder.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    data = json.loads((folder / "recipe.json").read_text())
    result = edit(data)
    (out / "recipe.json").write_text(json.dumps(data if result is None else result))
    return out


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("options") and None, "the key 'options' is missing"),
        (lambda d: d.update(history=[{}]), "the key 'history[0].options' is missing"),
        (lambda d: [], "is not a resnet-surgery recipe (a JSON list"),
        (lambda d: "v1", "is not a resnet-surgery recipe (a JSON str"),
        (lambda d: d.update(format="resnet-surgery/99"), "has format 'resnet-surgery/99' but this resnet-surgery "
                                                         "reads 'resnet-surgery/1'"),
        (lambda d: d.pop("format") and None, "is not a resnet-surgery recipe (format None"),
        (lambda d: d["rewrites"][0].update(op="stride_to_2x2"), "rewrites[0].op must be one of stride_to_1x1"),
        (lambda d: d["rewrites"][0].update(exact="yes"), 'rewrites[0].exact must be true or false, got "yes"'),
        (lambda d: d["options"].update(to="v2"), "options.to must be one of v1, v1.5, d, mixed"),
        (lambda d: d["options"].update(input_size=[3, "32", 32]), "options.input_size[1] must be an integer"),
        (lambda d: d["source"].update(kind="pip"), "source.kind must be one of torchvision, timm, zoo, custom"),
        (lambda d: d.update(colour="red"), "has an unknown key 'colour'"),
        (lambda d: d.update(rewrites={}), "rewrites must be a list, got {}"),
    ],
)
def test_damaged_recipes_are_one_clear_error(folder, tmp_path, edit, message):
    bad = damaged(folder, tmp_path, edit)
    with pytest.raises(SurgeryError) as caught:
        load(bad)
    text = str(caught.value)
    assert message in text and "\n" not in text, text
    assert str(bad / "recipe.json") in text
    result = CliRunner().invoke(main, ["inspect", str(bad), "--input-size", "32"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == [f"error: {text}"]


def test_recipe_that_is_not_json_is_one_clear_error(folder, tmp_path):
    bad = damaged(folder, tmp_path, lambda d: None)
    (bad / "recipe.json").write_text("{not json")
    with pytest.raises(SurgeryError, match="is not valid JSON"):
        load(bad)


def test_history_is_the_one_place_steps_record_on(tmp_path):
    source = load_model("cifar10-resnet-v1", "DEFAULT")
    assert history(source).source == Source("cifar10-resnet-v1", "zoo", "DEFAULT") and history(source).recipe is None
    plain = CaffeResNet()
    assert history(plain).source is None and history(plain).recipe is None
    converted = quiet_convert(source, "v1.5")
    h = history(converted)
    assert h.source == history(source).source and h.recipe.variant_after == Variant.V1_5
    assert history(source).recipe is None, "convert records on the new model, never on its argument"
    save(converted, tmp_path / "c")
    again = load(tmp_path / "c")
    assert history(again).recipe == h.recipe and history(again).source == h.source
    custom = history(quiet_convert(plain, "d")).recipe
    assert custom.source == Source("CaffeResNet", "custom") and custom.to_json()["source"] == {
        "model": "CaffeResNet", "kind": "custom"}


def test_apply_recipe_replays_on_a_custom_model_and_refuses_one_that_differs():
    base = randomize_bn(CaffeResNet(v1=False))
    d = quiet_convert(base, "d")
    recipe = history(d).recipe
    again = apply_recipe(copy.deepcopy(base), recipe.to_json())  # a parsed recipe.json works too
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        assert torch.allclose(d.eval()(x), again.eval()(x))
    with pytest.raises(SurgeryError, match="does not fit this model"):
        apply_recipe(CaffeResNet(v1=False, units=(1, 1, 3)), dataclasses.replace(recipe, rewrites=[]))
