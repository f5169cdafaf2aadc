"""Jinja templates rendered in Jinja's immutable sandbox: a template is text, never code.

A recipe carries templates (a guard's inline ``template:``, the generator's prompt template files)
and is published with every dataset, so whoever rebuilds a downloaded recipe renders them; the
card templates render row text. Every template of the package is therefore made by
``environment()``: ``jinja2.sandbox.ImmutableSandboxedEnvironment`` refuses attributes that reach
Python's internals (``lipsum.__globals__``, ``cycler.__init__``, ``x.__class__``) and methods that
change objects, with a ``SecurityError`` instead of running them, and here ``*``/``**`` cannot
build huge values either. ``check_template`` is what recipe validation runs: the template parses,
names no private attribute, and renders on sample values without touching anything it must not.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import jinja2
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

#: Largest result ``*`` may build (characters or items) and largest exponent of ``**``.
MAX_PRODUCT = 1_000_000
MAX_EXPONENT = 64


class TemplateProblem(ValueError):
    """A template that cannot be used (syntax, a refused attribute, an unknown variable)."""


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with ``*`` and ``**`` bounded (``"x" * 10**10`` is refused)."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: jinja2.runtime.Context, operator_name: str, left: Any, right: Any) -> Any:
        if operator_name == "**":
            if isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:
                raise SecurityError(f"exponent {right} is larger than {MAX_EXPONENT}")
            return operator.pow(left, right)
        for size, times in ((left, right), (right, left)):
            if isinstance(size, (str, bytes, list, tuple)) and isinstance(times, int):
                if len(size) * times > MAX_PRODUCT:
                    raise SecurityError(f"the product would hold more than {MAX_PRODUCT:,} items")
        return operator.mul(left, right)


def environment(**options: Any) -> jinja2.Environment:
    """A sandboxed Jinja environment (``StrictUndefined`` unless ``options`` say otherwise)."""
    options.setdefault("undefined", jinja2.StrictUndefined)
    return _Sandbox(**options)


def check_template(env: jinja2.Environment, source: str, sample: Mapping[str, Any], where: str) -> None:
    """Refuse ``source`` (a template for ``env``, a sandbox) unless it parses, names no private
    attribute (``_x``: what reaches Python internals) and renders on ``sample`` values; raises
    ``TemplateProblem`` naming ``where``."""
    try:
        tree = env.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateProblem(f"{where}: template syntax error on line {exc.lineno}: {exc.message}") from None
    private = _private_names(tree)
    if private:
        raise TemplateProblem(
            f"{where}: the template reads {private[0]!r}: templates render in a sandbox and may not "
            "reach private attributes"
        )
    try:
        env.from_string(source).render(**sample)
    except SecurityError as exc:
        raise TemplateProblem(f"{where}: refused by the template sandbox: {exc}") from None
    except RecursionError:
        raise TemplateProblem(f"{where}: the template includes itself without end") from None
    except Exception as exc:  # noqa: BLE001 - a recipe's template: any failure is a problem to report
        raise TemplateProblem(
            f"{where}: the template fails on sample values: {type(exc).__name__}: {exc}"
        ) from None


def _private_names(tree: jinja2.nodes.Template) -> list[str]:
    """Attribute and constant item names starting with ``_`` (also through ``|attr``)."""
    names = [node.attr for node in tree.find_all(jinja2.nodes.Getattr) if node.attr.startswith("_")]
    for node in tree.find_all(jinja2.nodes.Getitem):
        if isinstance(node.arg, jinja2.nodes.Const) and str(node.arg.value).startswith("_"):
            names.append(str(node.arg.value))
    for node in tree.find_all(jinja2.nodes.Filter):
        if node.name == "attr" and node.args and isinstance(node.args[0], jinja2.nodes.Const):
            if str(node.args[0].value).startswith("_"):
                names.append(str(node.args[0].value))
    return names
