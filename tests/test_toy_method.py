"""A method added from outside the package, through the public Method interface only.

"Uppercase the answer, loss on all": no generator, one row per source answer. Nothing in
pipeline, plan or refilter knows about it; they find it from the recipe's ``method``.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import pytest
from datasets import load_dataset

from bsafe_data.methods import Method
from bsafe_data.pipeline import build
from bsafe_data.plan import plan_build
from bsafe_data.recipe import Recipe, RecipeError
from bsafe_data.refilter import refilter
from bsafe_data.registry import parse_recipe, register_method
from bsafe_data.stages.record import Record


class UpperRecipe(Recipe):
    """The toy method's recipe: nothing beyond the shared sections."""

    method: Literal["toy_upper"] = "toy_upper"


@register_method
class UpperMethod(Method):
    """One row per answer: the answer in upper case, trained on whole."""

    name = "toy_upper"
    recipe_model = UpperRecipe
    kinds = ("upper",)
    loss_segments = ("continuation",)

    def build_row(self, record: Record) -> dict[str, Any]:
        head, tail = record.frames[self.primary]
        upper = record.conv.response.upper()
        segments = [{"kind": "continuation", "text": upper, "loss": True}]
        return self.row(record, kind="upper", segments=segments, prompt=head, completion=upper + tail)


RECIPE = """
name: toy
method: toy_upper
seed: 7
sources: [{path: "builtin:everyday_chat", limit: 30}]
filters:
  classifiers: [{name: builtin, provider: builtin}]
  rules: [{target: response, verdict: safe}]
"""


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "toy"
    result = build(parse_recipe(RECIPE), out)
    return out, result


def test_toy_method_builds_and_loads(toy):
    out, result = toy
    ds = load_dataset(str(out))
    rows = [r for split in ds.values() for r in split]
    assert rows, "the toy build kept no row"
    for row in rows:
        assert row["kind"] == "upper"
        assert row["segments"][0]["text"] == row["response"].upper()
        assert row["completion"].startswith(row["response"].upper())
        assert {s["target"] for s in row["scores"]} == {"response"}  # classified through the stage
    funnel = json.loads((out / "manifest.json").read_text())["funnel"]
    assert funnel["source_rows"] == 30
    assert funnel["rows"] == funnel["kept"] + funnel["rejected"] == 30
    assert result.funnel == funnel
    assert json.loads((out / "manifest.json").read_text())["method"] == "toy_upper"
    assert "Content warning" in (out / "README.md").read_text()


def test_toy_method_plans_and_refilters(toy):
    out, _ = toy
    plan = plan_build(parse_recipe(RECIPE))
    assert plan.source_rows == 30 and plan.requests == 0
    kept_before = json.loads((out / "manifest.json").read_text())["funnel"]["kept"]
    assert kept_before > 0
    result = refilter(out, ["filters.classifiers.0.threshold=0.0"])  # every answer is now unsafe
    assert result.after["kept"] == 0 and result.newly_rejected == kept_before
    assert result.after["rejected_by_reason"].get("source_unsafe") == kept_before
    assert result.after["rows"] == result.after["kept"] + result.after["rejected"] == 30


def test_unknown_method_is_a_recipe_error():
    with pytest.raises(RecipeError, match="unknown method 'nope'"):
        parse_recipe(RECIPE.replace("toy_upper", "nope"))


def test_the_toy_method_is_small():
    """What a method must say is its identity and its row: the rest has defaults."""
    import inspect

    lines = inspect.getsource(UpperMethod).splitlines()
    assert len(lines) <= 30, len(lines)
