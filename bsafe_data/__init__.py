"""bsafe-data: build, verify and publish backtracking safety training data.

Public API for trainers: ``render(row, tokenizer)`` and ``tokenize(row, tokenizer)`` re-render a
loaded row for any model; ``rerender(dataset, tokenizer)`` does it for a whole dataset;
``control_tokens(rows)`` lists the control atoms the rows need and ``add_control_tokens`` registers
them as special tokens; ``end_of_turn(tokenizer)`` is the token every completion ends with.

Exports load on first use (module ``__getattr__``): ``import bsafe_data`` and the trainer API import
neither spaCy, matplotlib, scikit-learn, aiohttp nor typer.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("bsafe-data")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+source"

_EXPORTS = {
    "ControlTokenError": "bsafe_data.label",
    "Rendered": "bsafe_data.label",
    "RenderError": "bsafe_data.label",
    "add_control_tokens": "bsafe_data.label",
    "control_tokens": "bsafe_data.label",
    "end_of_turn": "bsafe_data.label",
    "render": "bsafe_data.label",
    "tokenize": "bsafe_data.label",
    "RerenderResult": "bsafe_data.rerender",
    "rerender": "bsafe_data.rerender",
}

__all__ = [
    "ControlTokenError",
    "RenderError",
    "Rendered",
    "RerenderResult",
    "__version__",
    "add_control_tokens",
    "control_tokens",
    "end_of_turn",
    "render",
    "rerender",
    "tokenize",
]

if TYPE_CHECKING:
    from bsafe_data.label import (
        ControlTokenError,
        Rendered,
        RenderError,
        add_control_tokens,
        control_tokens,
        end_of_turn,
        render,
        tokenize,
    )
    from bsafe_data.rerender import RerenderResult, rerender


def __getattr__(name: str) -> Any:
    """Import an export's module on first access and cache the value in the package namespace."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bsafe_data' has no attribute {name!r}")
    imported = importlib.import_module(module)
    if name == "rerender":
        # The submodule itself: importing it binds this attribute to it anyway, and it is callable
        # (it forwards to the function), so `bsafe_data.rerender(ds, tok)` and
        # `import bsafe_data.rerender as m; m.RerenderResult` both work in any import order.
        return imported
    value = getattr(imported, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
