"""bsafe-data: build, verify and publish backtracking safety training data.

Public API for trainers: ``render(row, tokenizer)`` and ``tokenize(row, tokenizer)`` re-render a
loaded row for any model; ``add_control_tokens`` registers the control atoms as special tokens.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bsafe-data")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+source"

from bsafe_data.label import Rendered, RenderError, add_control_tokens, render, tokenize  # noqa: E402

__all__ = ["Rendered", "RenderError", "__version__", "add_control_tokens", "render", "tokenize"]
