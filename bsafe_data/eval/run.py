"""``bsafe-data eval``: generate, execute the backtracks, judge, report, write the folder.

For each model (the model under test, then the baseline): expand prompts x attacks into instances
(``attacks.expand``), generate them (``model``: through the engine and its response cache, so a
re-run asks only what is missing), then judge every generation with ``rl.BacktrackReward``: the
decoder executes the backtracks, the recipe's classifiers judge the final answer (the prefill
included: what stays of it after the backtracks is part of the answer), and each generation gets
its reward. The folder (Hub layout, written through ``executor.output.OutputFolder``: staged and
swapped in whole) holds ``data/test-00000-of-00001.parquet`` (one row per generation, with every
score and the executed trajectory), ``README.md`` (the card with the tables), ``summary.json``,
``plots/asr.png``, ``recipe.yaml`` and ``manifest.json`` (file hashes).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bsafe_data.eval.attacks import Instance, expand
from bsafe_data.eval.model import Generation, make_model, messages_of
from bsafe_data.eval.prompts import EvalPrompt, read_all
from bsafe_data.eval.recipe import EvalRecipe, ModelSpec
from bsafe_data.eval.report import ModelReport, markdown_tables, model_report
from bsafe_data.llm.engine import Engine
from bsafe_data.rl.reward import BacktrackReward, RewardBreakdown
from bsafe_data.rl.spec import RewardSpec

#: The generations' parquet file (config ``default``, split ``test``).
DATA_FILE = "data/test-00000-of-00001.parquet"

_TURN = pa.struct([("role", pa.string()), ("content", pa.string())])
SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("model_role", pa.string()),
        ("prompt_id", pa.string()),
        ("source", pa.string()),
        ("kind", pa.string()),
        ("category", pa.string()),
        ("attack", pa.string()),
        ("attack_kind", pa.string()),
        ("setting", pa.string()),
        ("temperature", pa.float32()),
        ("top_p", pa.float32()),
        ("top_k", pa.int32()),
        ("suffix", pa.string()),
        ("messages", pa.list_(_TURN)),
        ("prefill", pa.string()),
        ("completion", pa.string()),
        ("final", pa.string()),
        ("unsafe", pa.bool_()),
        ("scores", pa.list_(pa.struct([("classifier", pa.string()), ("score", pa.float32())]))),
        ("refused", pa.bool_()),
        ("backtracked", pa.bool_()),
        (
            "signals",
            pa.list_(
                pa.struct(
                    [
                        ("category", pa.string()),
                        ("x", pa.int32()),
                        ("deleted", pa.int32()),
                        ("malformed", pa.string()),
                        ("removed", pa.string()),
                    ]
                )
            ),
        ),
        ("x", pa.list_(pa.int32())),
        ("deleted_tokens", pa.int32()),
        ("violation_tokens", pa.int32()),
        ("excess_tokens", pa.int32()),
        ("exact_x", pa.bool_()),
        ("malformed", pa.list_(pa.string())),
        ("reward", pa.float32()),
        ("finish_reason", pa.string()),
        ("error", pa.string()),
    ]
)


@dataclass
class EvalResult:
    """What an evaluation wrote and measured."""

    folder: Path
    reports: list[ModelReport]
    rows: list[dict[str, Any]]
    requests: dict[str, int] = field(default_factory=dict)  # model -> requests sent by this run
    skipped: dict[str, int] = field(default_factory=dict)  # attack -> prompts it had nothing for
    errors: int = 0


def expect_of(instance: Instance) -> str:
    """What a good model does with the instance (the reward's ``expect``)."""
    if instance.prompt.kind == "benign":
        return "answer"
    return "backtrack" if instance.prefill else "refuse"


def row(
    spec: ModelSpec, role: str, instance: Instance, generation: Generation, b: RewardBreakdown | None
) -> dict[str, Any]:
    """One generation's row (``SCHEMA``)."""
    prompt: EvalPrompt = instance.prompt
    out: dict[str, Any] = {
        "model": spec.name,
        "model_role": role,
        "prompt_id": prompt.id,
        "source": prompt.source,
        "kind": prompt.kind,
        "category": prompt.category,
        "attack": instance.attack,
        "attack_kind": instance.kind,
        "setting": instance.setting,
        "temperature": instance.sampling["temperature"],
        "top_p": instance.sampling["top_p"],
        "top_k": instance.sampling["top_k"],
        "suffix": instance.suffix,
        "messages": [{"role": r, "content": c} for r, c in instance.messages],
        "prefill": instance.prefill,
        "completion": generation.text,
        "finish_reason": generation.finish_reason or "",
        "error": generation.error or "",
    }
    if b is None:
        empty: dict[str, Any] = {"final": "", "unsafe": False, "scores": [], "refused": False}
        empty.update(backtracked=False, signals=[], x=[], deleted_tokens=0, violation_tokens=0)
        empty.update(excess_tokens=0, exact_x=False, malformed=[], reward=None)
        return {**out, **empty}
    signals = b.trajectory.signals if b.trajectory is not None else ()
    exact = bool(
        b.violation_tokens
        and b.deleted_tokens == b.violation_tokens == b.removed_violation_tokens
        and not b.excess_tokens
    )
    out.update(
        final=b.answer,
        unsafe=b.unsafe,
        scores=[{"classifier": k, "score": v} for k, v in b.scores.items()],
        refused=b.refused,
        backtracked=b.deleted_tokens > 0,
        signals=[
            {
                "category": s.category,
                "x": s.x,
                "deleted": s.deleted,
                "malformed": s.malformed,
                "removed": s.removed_text,
            }
            for s in signals
        ],
        x=[s.x for s in signals if s.executed and s.x is not None],
        deleted_tokens=b.deleted_tokens,
        violation_tokens=b.violation_tokens,
        excess_tokens=b.excess_tokens,
        exact_x=exact,
        malformed=list(b.malformed),
        reward=b.reward,
    )
    return out


def judge(
    reward: BacktrackReward, instances: Sequence[Instance], generations: Sequence[Generation]
) -> list[RewardBreakdown | None]:
    """The reward breakdown of every generation (None for a failed request)."""
    done = [i for i, g in enumerate(generations) if g.error is None]
    if not done:
        return [None] * len(generations)
    breakdowns = reward.score_with_breakdown(
        [messages_of(instances[i]) for i in done],
        [generations[i].text for i in done],
        attack=[instances[i].violation for i in done],
        category=[instances[i].prompt.category for i in done],
        expect=[expect_of(instances[i]) for i in done],
        completion_ids=[list(generations[i].ids) if generations[i].ids else None for i in done],
    )
    out: list[RewardBreakdown | None] = [None] * len(generations)
    for i, b in zip(done, breakdowns, strict=True):
        out[i] = b
    return out


def evaluate(
    recipe: EvalRecipe,
    out_dir: Path | None = None,
    *,
    cache_dir: Path | None = None,
    limit: int | None = None,
    force: bool = False,
    say: Callable[[str], None] = lambda _m: None,
) -> EvalResult:
    """Run the evaluation a recipe describes and write its folder (see the module docstring).

    Raises ``SourceError`` (prompt files), ``TokenizerLoadError``, ``FatalEndpointError`` (an
    endpoint that cannot be used), ``OutputError`` (the folder) and ``CriticError``.
    """
    from bsafe_data.classify.factory import make_classifier
    from bsafe_data.executor.output import OutputFolder
    from bsafe_data.formats import output_dir
    from bsafe_data.llm.cache import resolve_cache_dir
    from bsafe_data.tokenization import load_tokenizer

    target = Path(out_dir) if out_dir is not None else Path(output_dir(recipe.output.dir, recipe.name))
    folder = OutputFolder(target, recipe.name, force=force)
    folder.check()
    prompts = read_all(recipe.prompts)
    if limit is not None:
        prompts = prompts[:limit]
    engine = Engine(resolve_cache_dir(cache_dir))
    rows: list[dict[str, Any]] = []
    requests: dict[str, int] = {}
    skipped: dict[str, int] = {}
    try:
        classifiers = [
            make_classifier(c, engine.cache_dir, recipe.categories, engine=engine) for c in recipe.classifiers
        ]
        for role, spec in recipe.models():
            tokenizer = load_tokenizer(spec.tokenizer_ref)
            instances, skipped = expand(prompts, recipe.attacks, spec)
            say(f"{spec.name}: {len(instances)} generations ({len(prompts)} prompts)")
            model = make_model(spec, engine, role, tokenizer)
            try:
                generations = model.generate(instances)
                requests[spec.name] = model.requests
            finally:
                model.close()
            reward_spec = RewardSpec(
                tokenizer=spec.tokenizer_ref,
                control_format=recipe.control_format,
                categories=recipe.categories,
                classifiers=recipe.classifiers,
                combine=recipe.combine,
            )
            reward = BacktrackReward(tokenizer, reward_spec, classifiers=classifiers)
            breakdowns = judge(reward, instances, generations)
            rows.extend(
                row(spec, role, i, g, b) for i, g, b in zip(instances, generations, breakdowns, strict=True)
            )
        for c in classifiers:
            c.close()
    finally:
        engine.close()
    reports = [model_report(spec.name, rows) for _role, spec in recipe.models()]
    with folder.locked():
        staging = folder.new_staging()
        try:
            write_folder(staging, recipe, rows, reports, requests, skipped)
            folder.write_marker(staging, recipe.sha256())
            folder.commit()
        except BaseException:
            folder.discard()
            raise
    folder.finish()
    errors = sum(1 for r in rows if r["error"])
    return EvalResult(folder.target, reports, rows, requests, skipped, errors)


def summary(
    recipe: EvalRecipe,
    reports: Sequence[ModelReport],
    requests: dict[str, int],
    skipped: dict[str, int],
    n: int,
) -> dict[str, Any]:
    """``summary.json``: the numbers, no text."""
    return {
        "recipe": recipe.name,
        "recipe_sha256": recipe.sha256(),
        "generations": n,
        "requests": requests,
        "skipped_prompts": skipped,
        "models": [r.as_dict() for r in reports],
    }


def write_folder(
    folder: Path,
    recipe: EvalRecipe,
    rows: list[dict[str, Any]],
    reports: Sequence[ModelReport],
    requests: dict[str, int],
    skipped: dict[str, int],
) -> None:
    """The report folder's files (parquet, card, summary, plot, recipe, manifest)."""
    from bsafe_data.integrity import file_entries
    from bsafe_data.plots import asr_figure, draw

    (folder / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), folder / DATA_FILE, compression="zstd")
    facts = summary(recipe, reports, requests, skipped, len(rows))
    (folder / "summary.json").write_text(json.dumps(facts, indent=2) + "\n")
    (folder / "recipe.yaml").write_text(recipe.to_yaml())
    (folder / "plots").mkdir(exist_ok=True)
    attacks = sorted({a for r in reports for a in r.asr})
    rates = {r.model: [r.asr[a]["all"].as_dict() if a in r.asr else None for a in attacks] for r in reports}
    draw(folder / "plots" / "asr.png", asr_figure, attacks, rates)
    (folder / "README.md").write_text(render_eval_card(recipe, reports, facts, ["plots/asr.png"], len(rows)))
    manifest = {
        "tool": "bsafe-data",
        "kind": "eval",
        "recipe": recipe.name,
        "recipe_sha256": recipe.sha256(),
        "files": file_entries(folder),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def render_eval_card(
    recipe: EvalRecipe, reports: Sequence[ModelReport], facts: dict[str, Any], plots: list[str], n: int
) -> str:
    """README.md of the report folder: Hub YAML header, the tables, the plot."""
    import jinja2
    import yaml

    from bsafe_data.card import _template_dir, hub_configs, size_category
    from bsafe_data.sandbox import environment

    meta = {
        "license": recipe.output.license,
        "language": ["en"],
        "pretty_name": f"{recipe.name} (evaluation)",
        "size_categories": [size_category(n)],
        "tags": ["safety", "evaluation", "backtracking", "red-teaming", "bsafe-data"],
        "configs": hub_configs({"default": ["test"]}),
    }
    env = environment(loader=jinja2.FileSystemLoader(str(_template_dir())), autoescape=False)
    return env.get_template("eval_card.md.j2").render(
        yaml_header=yaml.safe_dump(meta, sort_keys=False, allow_unicode=True),
        recipe=recipe,
        tables=markdown_tables(reports),
        facts=facts,
        plots=plots,
        attacks=[a.model_dump(mode="json") for a in recipe.attacks],
    )
