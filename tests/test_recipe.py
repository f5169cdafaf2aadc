"""Recipes: the flagship validates, broken recipes report every problem with path and line,
``--set`` overrides, the CLI's ``validate`` / ``schema --check``, and the recipe hash."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bsafe_data.cli import app
from bsafe_data.recipe import RLBF_CATEGORIES, Recipe, RecipeError
from bsafe_data.registry import load_recipe, parse_recipe, recipe_json_schema
from tests.conftest import REPO


def parse_judge(spec: dict):
    """A judge classifier spec, validated like one in a recipe."""
    from pydantic import TypeAdapter

    from bsafe_data.recipe import AnyClassifierSpec

    return TypeAdapter(AnyClassifierSpec).validate_python(spec)


FLAGSHIP = REPO / "recipes" / "bsafe_plus.yaml"
CLI = Path(sys.executable).parent / "bsafe-data"

# Every line below except `name` and the bare containers holds exactly one independent problem.
BROKEN = """\
name: broken
seed: not-a-number
bogus_top: 1
sources:
  - path: a.jsonl
    formatt: jsonl
  - path: b.jsonl
    limit: 0
sampling:
  positions:
    distribution: gaussian
  clean_fraction: 1.5
generator:
  provider: anthropic
control:
  format: "[CATEGORY {category}]"
tokenizers:
  extra: builtin:phi-3-mini
"""

# field path -> (text that starts its YAML line, a fragment of the message)
BROKEN_EXPECTED = {
    "seed": ("seed: not-a-number", "valid integer"),
    "bogus_top": ("bogus_top: 1", "Extra inputs"),
    "sources.0.formatt": ("    formatt: jsonl", "Extra inputs"),
    "sources.1.limit": ("    limit: 0", "greater than or equal to 1"),
    "sampling.positions.distribution": ("    distribution: gaussian", "'uniform' or 'beta'"),
    "sampling.clean_fraction": ("  clean_fraction: 1.5", "less than or equal to 1"),
    "generator.provider": ("  provider: anthropic", "'builtin'"),
    "control.format": ('  format: "[CATEGORY {category}]"', "{x}"),
    "tokenizers.extra": ("  extra: builtin:phi-3-mini", "valid list"),
}


def line_of(text: str, start: str) -> int:
    """1-based number of the only line of ``text`` that starts with ``start``."""
    hits = [i for i, line in enumerate(text.splitlines(), 1) if line.startswith(start)]
    assert len(hits) == 1, (start, hits)
    return hits[0]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1"}
    return subprocess.run(
        [str(CLI), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120, check=False
    )


# -- the flagship ---------------------------------------------------------------------------------


def test_flagship_recipe_validates():
    recipe = load_recipe(FLAGSHIP)
    assert isinstance(recipe, Recipe)
    assert recipe.name == "bsafe_plus"
    assert recipe.method == "bsafe_plus"
    assert recipe.seed == 1234
    assert [s.path for s in recipe.sources] == ["builtin:everyday_chat"]
    assert recipe.tokenizers.all == ["builtin:qwen2.5", "builtin:phi-3-mini"]
    assert recipe.control.format == "[CATEGORY {category}][BACKTRACK_BY_{x}]"
    assert 0 < recipe.sampling.clean_fraction < 1  # clean rows are mixed in (README, "How a row is made")
    # Defaults not written in the file are filled in: all 18 RLBF categories, weight 1.
    assert recipe.sampling.categories == dict.fromkeys(RLBF_CATEGORIES, 1.0)


def test_workers_share_the_endpoint_limits_and_nothing_else():
    recipe = load_recipe(FLAGSHIP)
    generator = recipe.generator.model_copy(
        update={"requests_per_minute": 601, "tokens_per_minute": 90_000, "max_concurrency": 3}
    )
    judge = {"provider": "llm_judge", "model": "j", "max_concurrency": 16}
    filters = recipe.filters.model_copy(
        update={"classifiers": [*recipe.filters.classifiers, parse_judge(judge)]}
    )
    recipe = recipe.model_copy(update={"generator": generator, "filters": filters})
    share = recipe.shared_by(4)
    assert (share.generator.requests_per_minute, share.generator.tokens_per_minute) == (150, 22_500)
    assert share.generator.max_concurrency == 1  # at least one each
    assert share.filters.classifiers[-1].max_concurrency == 4  # the judge's 16 shared by 4
    assert share.sha256() != recipe.sha256() and recipe.shared_by(1) is recipe
    unchanged = share.model_copy(update={"generator": recipe.generator, "filters": recipe.filters})
    assert unchanged.sha256() == recipe.sha256()  # only the limits differ


def test_resolved_recipe_round_trips_through_yaml():
    recipe = load_recipe(FLAGSHIP)
    again = parse_recipe(recipe.to_yaml(), "resolved")
    assert again == recipe
    assert again.sha256() == recipe.sha256()


# -- broken recipes: every problem, with path and line -----------------------------------------


def test_broken_recipe_reports_every_problem_with_path_and_line():
    with pytest.raises(RecipeError) as info:
        parse_recipe(BROKEN, "broken.yaml")
    problems = info.value.problems
    by_path = {path: (line, message) for path, line, message in problems}
    assert len(by_path) == len(problems), f"duplicate paths: {problems}"
    assert set(by_path) == set(BROKEN_EXPECTED), problems
    for path, (start, fragment) in BROKEN_EXPECTED.items():
        line, message = by_path[path]
        assert line == line_of(BROKEN, start), (path, line, message)
        assert fragment in message, (path, message)
    text = str(info.value)
    assert text.startswith(f"broken.yaml: {len(BROKEN_EXPECTED)} problem(s)")
    for path in BROKEN_EXPECTED:
        assert f"  {path} (line {by_path[path][0]}):" in text


def test_source_with_both_path_and_hf_points_at_the_list_item():
    text = "name: two_places\nsources:\n  - path: a.jsonl\n  - hf: org/name\n    path: b.jsonl\n"
    with pytest.raises(RecipeError) as info:
        parse_recipe(text)
    (problem,) = info.value.problems
    path, line, message = problem
    assert path == "sources.1"
    assert line == line_of(text, "  - hf: org/name")
    assert "exactly one of `path` or `hf`" in message


def test_missing_required_fields_are_reported_together():
    with pytest.raises(RecipeError) as info:
        parse_recipe("description: nothing else\n")
    paths = {p for p, _, _ in info.value.problems}
    assert paths == {"name", "sources"}


@pytest.mark.parametrize(
    ("fmt", "fragment"),
    [
        ("[CATEGORY {category}]", "must contain {x}"),
        ("[BACKTRACK {y}][{x}]", "unknown field {y}"),
        ("[BT {x}] {0}", "positional field {0}"),
        ("[BT {x}] {", "invalid format string"),
        ("[BT {x.real}]", "attribute and index access is not allowed"),
        ("[BT {x:>999999999}]", "format specs are not allowed"),
    ],
)
def test_bad_control_format(fmt, fragment):
    text = f"name: r\nsources:\n  - path: a.jsonl\ncontrol:\n  format: '{fmt}'\n"
    with pytest.raises(RecipeError) as info:
        parse_recipe(text)
    ((path, line, message),) = info.value.problems
    assert path == "control.format"
    assert line == 5
    assert fragment in message


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("name: a\nseed: 1\nfoo: bar: baz\n", 3),
        ("name: a\nsources:\n  - path: a.jsonl\n    limit: [1, 2\nseed: 3\n", 5),
        ("name: a\n\tseed: 1\n", 2),
    ],
)
def test_invalid_yaml_reports_the_line(text, line):
    with pytest.raises(RecipeError) as info:
        parse_recipe(text)
    ((path, got_line, message),) = info.value.problems
    assert path == ""
    assert got_line == line
    assert message.startswith("invalid YAML")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n"])
def test_non_mapping_recipe(text):
    with pytest.raises(RecipeError) as info:
        parse_recipe(text)
    assert info.value.problems == [("", 1, "a recipe must be a YAML mapping")]


def test_unreadable_recipe_file(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "nope.yaml")
    ((path, line, message),) = info.value.problems
    assert (path, line) == ("", None)
    assert "cannot read recipe" in message


# -- --set overrides ------------------------------------------------------------------------------


def test_set_overrides_nested_values_list_items_and_yaml_types():
    recipe = load_recipe(
        FLAGSHIP,
        [
            "seed=99",  # int
            "sampling.clean_fraction=0.5",  # float
            "sampling.positions.distribution=beta",  # nested enum
            "sampling.positions.a=2",
            "filters.enabled=false",  # bool
            "publish.repo=org/name",  # plain string with a slash
            "description=",  # empty -> ""
            "sources.0.limit=10",  # list item by index
            "sources.0.mapping.prompt=question",  # creates the missing nested mapping
            "tokenizers.extra=[builtin:phi-3-mini, some-org/tok]",  # YAML list
            "sampling.categories={Toxic: 2, Violent: 1}",  # YAML mapping
            "filters.classifiers.0.threshold=0.7",  # field of a list item
        ],
    )
    assert recipe.seed == 99
    assert recipe.sampling.clean_fraction == 0.5
    assert recipe.sampling.positions.distribution == "beta"
    assert recipe.sampling.positions.a == 2.0
    assert recipe.filters.enabled is False
    assert recipe.publish.repo == "org/name"
    assert recipe.description == ""
    assert recipe.sources[0].limit == 10
    assert recipe.sources[0].path == "builtin:everyday_chat"  # sibling untouched
    assert recipe.sources[0].mapping.prompt == "question"
    assert recipe.tokenizers.extra == ["builtin:phi-3-mini", "some-org/tok"]
    assert recipe.sampling.categories == {"Toxic": 2.0, "Violent": 1.0}
    assert recipe.filters.classifiers[0].threshold == 0.7
    # Untouched values keep the file's settings.
    assert recipe.sampling.variants_per_answer == 5
    assert recipe.tokenizers.primary == "builtin:qwen2.5"


def test_set_adds_a_dict_key_and_replaces_a_whole_list():
    recipe = parse_recipe(
        "name: r\nsources:\n  - path: a.jsonl\n",
        overrides=["sampling.categories.Toxic=3", "sources=[{path: x.jsonl}, {hf: org/ds, split: test}]"],
    )
    assert recipe.sampling.categories == {"Toxic": 3.0}
    assert [(s.path, s.hf, s.split) for s in recipe.sources] == [
        ("x.jsonl", None, "train"),
        (None, "org/ds", "test"),
    ]


@pytest.mark.parametrize("override", ["no_equals_sign", "=1", "sources.5.path=x.jsonl", "sources.a.path=x"])
def test_malformed_set_is_a_recipe_error(override):
    with pytest.raises(RecipeError) as info:
        load_recipe(FLAGSHIP, [override])
    ((path, line, _message),) = info.value.problems
    assert (path, line) == ("--set", None)


def test_set_value_with_quoted_yaml_string():
    recipe = load_recipe(FLAGSHIP, ['control.format="[RESET {x}]"', "sources.0.mapping.id='007'"])
    assert recipe.control.format == "[RESET {x}]"
    assert recipe.sources[0].mapping.id == "007"


def test_set_value_that_is_not_valid_yaml_is_a_recipe_error():
    # Either fix is fine: report the bad value as a `--set` problem, or take it as a literal string.
    try:
        recipe = load_recipe(FLAGSHIP, ["control.format=[BT {x}]"])
    except RecipeError as exc:
        assert [p for p, _, _ in exc.problems] == ["--set"]
    else:
        assert recipe.control.format == "[BT {x}]"


def test_set_value_of_wrong_type_is_validated():
    with pytest.raises(RecipeError) as info:
        load_recipe(FLAGSHIP, ["seed=abc", "sampling.bogus=1"])
    by_path = {p: line for p, line, _ in info.value.problems}
    assert set(by_path) == {"seed", "sampling.bogus"}
    text = FLAGSHIP.read_text()
    assert by_path["seed"] == line_of(text, "seed:")
    assert by_path["sampling.bogus"] == line_of(text, "sampling:")  # nearest existing parent


# -- hash ------------------------------------------------------------------------------------------


def test_recipe_sha256_is_stable_and_tracks_fields():
    a = load_recipe(FLAGSHIP)
    b = load_recipe(FLAGSHIP)
    assert a.sha256() == b.sha256()
    assert len(a.sha256()) == 64 and int(a.sha256(), 16) >= 0
    assert load_recipe(FLAGSHIP, ["seed=1235"]).sha256() != a.sha256()
    assert load_recipe(FLAGSHIP, ['control.format="[BT {x}]"']).sha256() != a.sha256()
    assert load_recipe(FLAGSHIP, ["sampling.categories.Toxic=2"]).sha256() != a.sha256()


def test_recipe_sha256_is_of_the_resolved_recipe():
    short = "name: r\nsources:\n  - path: a.jsonl\n"
    spelled_out = (
        "sources:\n  - {path: a.jsonl, split: train}\nsplit: {test_fraction: 0.1}\nname: r\nseed: 0\n"
    )
    assert parse_recipe(short).sha256() == parse_recipe(spelled_out).sha256()


def test_recipe_json_schema_forbids_unknown_keys():
    schema = recipe_json_schema()
    branches = {ref["$ref"].rsplit("/", 1)[1] for ref in schema["oneOf"]}  # one per method
    assert schema["discriminator"]["propertyName"] == "method"
    assert {"BsafePlusRecipe", "BsafeRecipe", "DertaRecipe", "ResetRecipe", "RlbfPromptsRecipe"} <= branches
    for name in branches:
        branch = schema["$defs"][name]
        assert branch["additionalProperties"] is False
        assert {"name", "sources"} <= set(branch["required"])
    assert "control" in schema["$defs"]["BsafePlusRecipe"]["properties"]
    json.dumps(schema)  # serialisable


# -- CLI -------------------------------------------------------------------------------------------


def test_cli_validate_broken_recipe_exits_2_without_traceback(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text(BROKEN)
    result = run_cli("validate", str(broken))
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    assert f"{len(BROKEN_EXPECTED)} problem(s)" in output
    for path, (start, _fragment) in BROKEN_EXPECTED.items():
        assert f"{path} (line {line_of(BROKEN, start)})" in output, path


def test_cli_validate_ok_with_set():
    result = run_cli("validate", str(FLAGSHIP), "--set", "seed=7", "--set", "sources.0.limit=3")
    assert result.returncode == 0, result.stdout + result.stderr
    sha = load_recipe(FLAGSHIP, ["seed=7", "sources.0.limit=3"]).sha256()
    assert "ok" in result.stdout and sha[:12] in result.stdout
    bad = run_cli("validate", str(FLAGSHIP), "--set", "sampling.clean_fraction=2")
    assert bad.returncode == 2
    assert "sampling.clean_fraction" in bad.stdout + bad.stderr
    assert "Traceback" not in bad.stdout + bad.stderr


def test_cli_schema_check_passes_on_the_repo():
    # Fails when schemas/ is missing or stale: regenerate with `bsafe-data schema` from the repo root.
    result = run_cli("schema", "--check", "--out", "schemas", cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "up to date" in result.stdout


def test_cli_schema_check_fails_on_a_modified_file(tmp_path):
    runner = CliRunner()
    out = tmp_path / "schemas"
    missing = runner.invoke(app, ["schema", "--check", "--out", str(out)])
    assert missing.exit_code == 1
    written = runner.invoke(app, ["schema", "--out", str(out)])
    assert written.exit_code == 0, written.output
    assert sorted(p.name for p in out.iterdir()) == [
        "eval.schema.json",
        "recipe.schema.json",
        "row.schema.json",
    ]
    assert json.loads((out / "recipe.schema.json").read_text()) == recipe_json_schema()
    ok = runner.invoke(app, ["schema", "--check", "--out", str(out)])
    assert ok.exit_code == 0, ok.output
    target = out / "recipe.schema.json"
    target.write_text(target.read_text().replace('"Recipe"', '"Recipe (edited by hand)"', 1))
    stale = runner.invoke(app, ["schema", "--check", "--out", str(out)])
    assert stale.exit_code == 1
    assert "recipe.schema.json" in stale.output
    assert "row.schema.json" not in stale.output
