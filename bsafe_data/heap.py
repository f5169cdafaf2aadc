"""Long-lived objects frozen for the garbage collector while work that must not stall runs.

A full collection re-scans the whole heap: with spaCy, tokenizers, datasets and SDK modules loaded
that is a 100-300 ms pause (measured), on the event loop during a batch or, right after a build's
last answer, on the build's critical path. ``gc.freeze`` moves every object that exists into a
generation the collector skips; objects created later are still collected as usual.
"""

from __future__ import annotations

import gc
import threading


class HeapFreeze:
    """A counter of holders: the first ``enter`` freezes the objects that exist (unless someone
    else froze objects already), the last ``exit`` unfreezes what it froze. ``gc`` is global to
    the process, so one counter (``HEAP``) serves a build and every generator batch in it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._ours = False

    def enter(self) -> None:
        """Hold the freeze (frozen now if this is the first holder)."""
        with self._lock:
            self._holders += 1
            if self._holders == 1 and not gc.get_freeze_count():
                gc.freeze()
                self._ours = True

    def exit(self, _future: object = None) -> None:
        """Release one hold (a future's done callback may call it); the last one unfreezes."""
        with self._lock:
            self._holders -= 1
            if self._holders == 0 and self._ours:
                gc.unfreeze()
                self._ours = False


#: the process's one counter
HEAP = HeapFreeze()
