"""Data-construction methods: the interface (``base``) and one module per method.

``bsafe_data.registry`` knows the package's methods and registers others (``register_method``).
"""

from bsafe_data.methods.base import Method

__all__ = ["Method"]
