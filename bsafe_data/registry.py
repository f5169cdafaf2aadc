"""The methods the package knows, and recipes parsed with their models.

This module sits above ``recipe`` (the shared sections) and ``methods`` (one module per method, each
with its recipe model): ``parse_recipe`` / ``load_recipe`` pick the model from the recipe's
``method``, ``method_class`` the Method class. ``register_method`` adds a method defined elsewhere
(``tests/test_toy_method.py`` does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bsafe_data.errors import BuildError
from bsafe_data.methods.base import Method
from bsafe_data.methods.bsafe import BsafeMethod
from bsafe_data.methods.bsafe_plus import BsafePlusMethod
from bsafe_data.methods.derta import DertaMethod
from bsafe_data.methods.reset import ResetMethod
from bsafe_data.methods.rlbf_prompts import RlbfPromptsMethod
from bsafe_data.recipe import Recipe, RecipeError, json_schema_of, load_with, parse_with

__all__ = [
    "METHODS",
    "RecipeError",
    "load_recipe",
    "method_class",
    "parse_recipe",
    "recipe_json_schema",
    "register_method",
]

#: the package's own methods, in the order their recipes are documented
PACKAGE_METHODS: tuple[type[Method], ...] = (
    BsafePlusMethod,
    BsafeMethod,
    DertaMethod,
    ResetMethod,
    RlbfPromptsMethod,
)
#: method name -> Method class
METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``method: cls.name`` buildable (and its recipe model parseable).

    A method that counts or orders rows its own way (overrides ``count_row`` / ``order_key``) says
    so with ``counts = None`` / ``row_order = None``: refilter reads these declarations to decide
    whether it may count and order rows on columns."""
    if cls.recipe_model.model_fields["method"].default != cls.name:
        raise ValueError(f"{cls.recipe_model.__name__}.method must default to {cls.name!r}")
    for hook, declared in (("count_row", "counts"), ("order_key", "row_order")):
        own = any(
            hook in vars(klass) for klass in cls.__mro__ if klass is not Method and issubclass(klass, Method)
        )
        if own and getattr(cls, declared) is not None:
            raise ValueError(f"{cls.__name__} overrides {hook}: set {declared} = None")
    METHODS[cls.name] = cls
    return cls


for _method in PACKAGE_METHODS:
    register_method(_method)


def method_class(recipe: Recipe | str) -> type[Method]:
    """The Method class for a recipe (or a method name)."""
    name = recipe if isinstance(recipe, str) else recipe.method
    try:
        return METHODS[name]
    except KeyError:
        raise BuildError(f"unknown method {name!r} (known: {', '.join(sorted(METHODS))})") from None


def _models() -> dict[str, type[Recipe]]:
    return {name: cls.recipe_model for name, cls in METHODS.items()}


def parse_recipe(text: str, source: str = "<recipe>", overrides: list[str] | None = None) -> Recipe:
    """Parse YAML text into the recipe model its ``method`` names; every problem at once as a
    RecipeError."""
    return parse_with(_models(), text, source, overrides)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe file, applying ``--set`` overrides; raises RecipeError with every problem."""
    return load_with(_models(), path, overrides)


def recipe_json_schema() -> dict[str, Any]:
    """JSON Schema of the package's recipes (a schema file must not depend on what a session
    registered)."""
    return json_schema_of(tuple(cls.recipe_model for cls in PACKAGE_METHODS))
