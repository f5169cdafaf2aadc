"""Build the classifier backends a recipe's ``filters.classifiers`` names."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bsafe_data.classify.builtin import BuiltinClassifier


def make_classifier(spec: Any, cache_dir: Path | str | None = None, categories: Sequence[str] = ()) -> Any:
    """The backend for one spec; backends are imported lazily (their dependencies are optional)."""
    provider = spec.provider
    if provider == "builtin":
        return BuiltinClassifier(spec.name, spec.threshold, spec.scored_targets)
    if provider == "openai_moderation":
        from bsafe_data.classify.moderation import ModerationClassifier

        return ModerationClassifier(spec, cache_dir)
    if provider == "llama_guard":
        from bsafe_data.classify.guard import LlamaGuardClassifier

        return LlamaGuardClassifier(spec, cache_dir)
    if provider == "guard":
        from bsafe_data.classify.guard import GenericGuardClassifier

        return GenericGuardClassifier(spec, cache_dir)
    if provider == "llm_judge":
        from bsafe_data.classify.judge import JudgeClassifier

        return JudgeClassifier(spec, cache_dir, categories=categories)
    if provider == "transformers":
        from bsafe_data.classify.local import LocalModelClassifier

        return LocalModelClassifier(spec, cache_dir)
    raise ValueError(f"unknown classifier provider {provider!r}")


def make_classifiers(recipe: Any, cache_dir: Path | str | None = None) -> list[Any]:
    """Every classifier of the recipe, in recipe order (none when filters are disabled)."""
    if not recipe.filters.enabled:
        return []
    categories = recipe.categories
    return [make_classifier(spec, cache_dir, categories) for spec in recipe.filters.classifiers]
