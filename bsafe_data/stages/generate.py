"""Stage *generate*: the generator requests of live records, sent as one batch, answers applied.

``send`` submits the batch and returns at once (an endpoint backend sends it in the background);
``apply_answers`` waits for it, so a caller can do other work in between.

The method says which request a record needs and what to do with a usable answer; this stage
sends them and records the generator's reason code (``generator_error``, ``generator_refused``,
``generator_unparseable``, ``empty_violation``) on records whose answer cannot be used.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from bsafe_data.generate.base import Generation, GenerationRequest, Generator
from bsafe_data.stages.record import Record


def send(
    generator: Generator,
    records: Sequence[Record],
    request_of: Callable[[Record], GenerationRequest],
    sent: threading.Event | None = None,
) -> Future[list[Generation]]:
    """Submit the request of every record as one batch; the answers arrive in record order.
    ``sent`` is set once every request has left (at once for an offline generator)."""
    return generator.submit([request_of(r) for r in records], sent)


def wait_sent(sent: threading.Event, answers: Future[list[Generation]]) -> None:
    """Wait until every request of a batch has left, or the batch has ended."""
    while not sent.wait(0.1) and not answers.done():
        pass


def apply_answers(
    records: Sequence[Record], answers: Future[list[Generation]], apply: Callable[[Record, Generation], None]
) -> None:
    """Wait for the batch ``send`` submitted and take each usable answer into its record."""
    for record, generation in zip(records, answers.result(), strict=True):
        if generation.error:
            record.reject(generation.error, f"generator: {generation.detail}", transient=generation.transient)
        elif not generation.violation.strip():
            record.reject("empty_violation")
        else:
            apply(record, generation)
