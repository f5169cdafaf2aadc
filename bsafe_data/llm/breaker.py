"""The quality breaker: a build whose first generator answers are mostly unusable stops.

A generator that ignores the injection protocol, or refuses everything, would otherwise be paid for
the whole corpus. ``AnswerCheck`` judges the first ``generator.check_answers`` answers of the
generator's endpoint (the generator's and its companion writers', cached ones included, so a re-run
stops again without a request): only that many calls go out until the verdict, and the verdict comes
as soon as it is certain (a stop waits for the first answers still in flight: they are paid for, and
cached). More than ``generator.max_unusable_fraction`` of them unusable (unparseable, refused,
truncated) raises ``QualityStop``: one message with the shares by reason, and one sample answer kept
apart from it (``sample``, for the user's terminal only, never logged). Requests that fail (endpoint
errors) are not answers: the error budget judges those. Each worker of a pool judges its own first
answers (``Recipe.shared_by`` splits the count).
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from bsafe_data.errors import BuildError

#: the exit code of a build the breaker stopped
EXIT_CODE = 4
#: characters of the sample answer kept for the message
SAMPLE_CHARS = 200
LIFT = "--set generator.check_answers=0"


class QualityStop(BuildError):
    """The generator's first answers are mostly unusable (exit ``EXIT_CODE``); ``sample`` is one of
    them, shortened, for the terminal only."""

    exit_code = EXIT_CODE

    def __init__(self, message: str, sample: str = ""):
        super().__init__(message, sample)  # both in args: the stop crosses process boundaries
        self.message = message
        self.sample = sample

    def __str__(self) -> str:
        return self.message


#: judges one answer: its unusable reason (None: usable) and its text
Judge = Callable[[str | None, str], None]


class AnswerCheck:
    """The verdict on an endpoint's first ``answers`` answers (0: no check)."""

    def __init__(self, answers: int, max_unusable: float, where: str = "the generator"):
        self.answers = answers
        self.allowed = math.floor(max_unusable * answers)  # more unusable answers than this stop
        self.max_unusable = max_unusable
        self.where = where
        self.admitted = 0
        self.unusable: Counter[str] = Counter()
        self.usable = 0
        self.samples: dict[str, str] = {}
        self.open = answers <= 0
        self.tripped = False  # the verdict is "stop"; it is raised once no first answer is out
        self.stop: QualityStop | None = None
        self._waiters: list[asyncio.Future[None]] = []

    @asynccontextmanager
    async def answer(self) -> AsyncIterator[Judge]:
        """One call's turn: waits while the first answers are out and undecided (raises the stop);
        the call judges its answer with the function it gets. A call that ends without judging
        (its request failed) gives its place to another."""
        counted = await self._admit()
        judged = False

        def judge(reason: str | None, text: str) -> None:
            nonlocal judged
            judged = True
            if counted:
                self._judge(reason, text)

        try:
            yield judge
        finally:
            if counted and not judged:
                self.admitted -= 1
                self._wake()
                self._settle()

    async def _admit(self) -> bool:
        """True when the call is one of the first answers."""
        while True:
            if self.stop is not None:
                raise self.stop
            if self.open:
                return False
            if self.admitted < self.answers and not self.tripped:
                self.admitted += 1
                return True
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _judge(self, reason: str | None, text: str) -> None:
        if reason is None:
            self.usable += 1
        else:
            self.unusable[reason] += 1
            self.samples.setdefault(reason, text[:SAMPLE_CHARS] + ("…" if len(text) > SAMPLE_CHARS else ""))
        if self.tripped or sum(self.unusable.values()) > self.allowed:
            self.tripped = True
            self._settle()
        elif self.usable >= self.answers - self.allowed:  # the stop can no longer come
            self.open = True
            self._wake()

    def _settle(self) -> None:
        """Once tripped, raise the stop when no first answer is still out: the answers in flight
        are paid for, so they are awaited (and cached: a re-run judges them without a request)."""
        if self.tripped and self.usable + sum(self.unusable.values()) >= self.admitted:
            self.stop = self.stop or self._stop()
            self._wake()
            raise self.stop

    def _stop(self) -> QualityStop:
        bad = sum(self.unusable.values())
        judged = bad + self.usable
        shares = ", ".join(f"{reason} {n / judged:.0%}" for reason, n in self.unusable.most_common())
        top = self.unusable.most_common(1)[0][0]
        message = (
            f"stopped: {bad} of the first {judged} answers of {self.where} are unusable ({shares}), "
            f"more than generator.max_unusable_fraction={self.max_unusable:g} of "
            f"generator.check_answers={self.answers}; does the model follow the prompt? To go on "
            f"anyway: {LIFT}"
        )
        return QualityStop(message, f"{top}: {self.samples[top]}")
