"""``bsafe-data plan`` of an eval recipe: what an evaluation will ask, before anything is sent.

Reads the prompt sources and expands them with the attacks exactly as ``eval`` does; counts the
generations per model and attack and how many of them the response cache already holds (those
cost no request).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bsafe_data.eval.attacks import expand
from bsafe_data.eval.prompts import read_all
from bsafe_data.eval.recipe import EvalRecipe


@dataclass
class EvalPlan:
    """Prompts, generations and the requests still to send, per model."""

    prompts: int = 0
    harmful: int = 0
    benign: int = 0
    generations: dict[str, dict[str, int]] = field(default_factory=dict)  # model -> attack -> count
    cached: dict[str, int] = field(default_factory=dict)  # model -> generations the cache holds
    skipped: dict[str, int] = field(default_factory=dict)  # attack -> prompts without a target

    def requests(self, model: str) -> int:
        """Generation requests still to send for ``model``."""
        return sum(self.generations.get(model, {}).values()) - self.cached.get(model, 0)

    def as_dict(self) -> dict[str, Any]:
        """The plan as plain numbers."""
        return {
            "prompts": self.prompts,
            "harmful": self.harmful,
            "benign": self.benign,
            "generations": self.generations,
            "cached": self.cached,
            "skipped": self.skipped,
        }


def plan_eval(recipe: EvalRecipe, *, cache_dir: Path | None = None, limit: int | None = None) -> EvalPlan:
    """Plan an evaluation without calling any model (the cache is read, never written)."""
    from bsafe_data.eval.model import EndpointModel
    from bsafe_data.llm.cache import CACHE_FILENAME, ResponseCache, resolve_cache_dir
    from bsafe_data.llm.engine import Engine
    from bsafe_data.tokenization import load_tokenizer

    prompts = read_all(recipe.prompts)
    if limit is not None:
        prompts = prompts[:limit]
    plan = EvalPlan(
        len(prompts), sum(p.kind == "harmful" for p in prompts), sum(p.kind == "benign" for p in prompts)
    )
    folder = resolve_cache_dir(cache_dir)
    cache = ResponseCache(folder) if (folder / CACHE_FILENAME).exists() else None
    engine = Engine(folder)
    try:
        for role, spec in recipe.models():
            instances, plan.skipped = expand(prompts, recipe.attacks, spec)
            per_attack: dict[str, int] = {}
            for instance in instances:
                per_attack[instance.attack] = per_attack.get(instance.attack, 0) + 1
            plan.generations[spec.name] = per_attack
            plan.cached[spec.name] = 0
            if spec.provider == "openai" and cache is not None:
                model = EndpointModel(spec, engine, role, load_tokenizer(spec.tokenizer_ref))
                keys = [model.call(i).key for i in instances]
                plan.cached[spec.name] = len(cache.get_many(keys))
    finally:
        engine.close()
        if cache is not None:
            cache.close()
    return plan
