"""Data-construction methods: the interface (``base``) and one module per method.

Importing this package registers the package's own methods (``method_class`` does it for you).
"""

from bsafe_data.methods import (
    bsafe,  # noqa: F401 - registers BSAFE (detect-and-repair)
    bsafe_plus,  # noqa: F401 - registers BSAFE+
    derta,  # noqa: F401 - registers DeRTa
    reset,  # noqa: F401 - registers Reset backtracking
    rlbf_prompts,  # noqa: F401 - registers the RLBF prompt sets
)
from bsafe_data.methods.base import METHODS, Method, register_method

__all__ = ["METHODS", "Method", "register_method"]
