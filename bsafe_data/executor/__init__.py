"""Executors: how chunks of source rows run through a method (this process; more to come)."""

from bsafe_data.executor.local import LocalExecutor

__all__ = ["LocalExecutor"]
