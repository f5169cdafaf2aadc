"""Adaptive concurrency of one endpoint: additive increase, multiplicative decrease (AIMD).

The limit starts at the configured ``max_concurrency`` and stays between ``min_concurrency`` (the
floor) and it. A throttle signal (a 429, or a 200 whose ``x-ratelimit-remaining-*`` header says the
budget is spent) multiplies the limit by 0.75, at most once per window: a signal for a request sent
before the last decrease (``epoch``) answers a level already left and changes nothing. While the
limit is binding (requests wait for a slot), each run of ``limit`` successes adds 1. With the floor
equal to the maximum the limit is fixed. The limit only decides when requests leave, never what they
ask: rows are the same at any level.
"""

from __future__ import annotations

import math

#: the factor a throttle signal multiplies the limit by
DECREASE = 0.75


class AdaptiveLimit:
    """The current concurrency limit of one endpoint and what it went through."""

    def __init__(self, ceiling: int, floor: int | None = None):
        self.ceiling = max(1, ceiling)
        self.floor = self.ceiling if floor is None else max(1, min(floor, self.ceiling))
        self.limit = self.ceiling
        self.lowest = self.highest = self.limit
        #: bumped by every decrease: signals for requests sent in an older epoch are stale
        self.epoch = 0
        #: throttle signals seen (429s and spent rate-limit budgets)
        self.throttled = 0
        self._successes = 0

    def succeeded(self, binding: bool) -> None:
        """One request answered; ``binding``: requests were waiting for a slot."""
        if not binding or self.limit >= self.ceiling:
            return
        self._successes += 1
        if self._successes >= self.limit:
            self._successes = 0
            self.limit += 1
            self.highest = max(self.highest, self.limit)

    def throttle(self, epoch: int) -> bool:
        """A throttle signal for a request sent in ``epoch``. True when it costs the request no
        retry: the level it was sent at is (now) left behind; False at the floor (or fixed)."""
        self.throttled += 1
        if epoch < self.epoch:
            return True
        if self.limit <= self.floor:
            return False
        self.limit = max(self.floor, min(self.limit - 1, math.ceil(self.limit * DECREASE)))
        self.lowest = min(self.lowest, self.limit)
        self.epoch += 1
        self._successes = 0
        return True

    def usage(self) -> dict[str, int]:
        """The manifest's counters: configured range, the level reached (final, lowest, highest)
        and the throttle signals."""
        return {
            "max_concurrency": self.ceiling,
            "min_concurrency": self.floor,
            "concurrency_final": self.limit,
            "concurrency_lowest": self.lowest,
            "concurrency_highest": self.highest,
            "throttled": self.throttled,
        }
