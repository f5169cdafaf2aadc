"""Build the classifier backends a recipe's ``filters.classifiers`` names."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bsafe_data.classify.builtin import BuiltinClassifier
from bsafe_data.llm.engine import Engine


def make_classifier(
    spec: Any,
    cache_dir: Path | str | None = None,
    categories: Sequence[str] = (),
    *,
    engine: Engine | None = None,
) -> Any:
    """The backend for one spec; backends are imported lazily (their dependencies are optional).
    HTTP backends ask on ``engine`` (a build's); without one, each runs its own over ``cache_dir``."""
    provider = spec.provider
    if provider == "builtin":
        return BuiltinClassifier(spec.name, spec.threshold, spec.scored_targets)
    if provider == "openai_moderation":
        from bsafe_data.classify.moderation import ModerationClassifier

        return ModerationClassifier(spec, cache_dir, engine=engine)
    if provider == "llama_guard":
        from bsafe_data.classify.guard import LlamaGuardClassifier

        return LlamaGuardClassifier(spec, cache_dir, engine=engine)
    if provider == "guard":
        from bsafe_data.classify.guard import GenericGuardClassifier

        return GenericGuardClassifier(spec, cache_dir, engine=engine)
    if provider == "llm_judge":
        from bsafe_data.classify.judge import JudgeClassifier

        return JudgeClassifier(spec, cache_dir, categories=categories, engine=engine)
    if provider == "transformers":
        from bsafe_data.classify.local import LocalModelClassifier

        return LocalModelClassifier(spec, cache_dir)
    raise ValueError(f"unknown classifier provider {provider!r}")


def make_classifiers(recipe: Any, engine: Engine) -> list[Any]:
    """Every classifier of the recipe, in recipe order, on the build's ``engine`` (none when filters
    are disabled)."""
    if not recipe.filters.enabled:
        return []
    categories = recipe.categories
    return [
        make_classifier(spec, engine.cache_dir, categories, engine=engine)
        for spec in recipe.filters.classifiers
    ]
