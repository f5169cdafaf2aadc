"""The one bridge between synchronous callers and asyncio.

A second event loop cannot run in a thread that already runs one (a notebook, an async caller), so
synchronous entry points that drive a loop of their own go through ``off_running_loop``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def off_running_loop(fn: Callable[..., T], *args: Any) -> T:
    """Call ``fn(*args)`` here, or in a helper thread when this thread already runs an event loop.

    ``off_running_loop(asyncio.run, coro)`` runs a coroutine to completion from synchronous code.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn(*args)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result()
