"""Stage *generate*: the generator requests of live records, sent as one batch, answers applied.

The method says which request a record needs and what to do with a usable answer; this stage
sends them and records the generator's reason code (``generator_error``, ``generator_refused``,
``generator_unparseable``, ``empty_violation``) on records whose answer cannot be used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bsafe_data.generate.base import Generation, GenerationRequest, Generator
from bsafe_data.rows import TRANSIENT_REASONS
from bsafe_data.stages.record import Record


def generate(
    generator: Generator,
    records: Sequence[Record],
    request_of: Callable[[Record], GenerationRequest],
    apply: Callable[[Record, Generation], None],
) -> None:
    """Ask ``generator`` for every record (one batch, in order) and apply each usable answer."""
    requests = [request_of(r) for r in records]
    for record, generation in zip(records, generator.generate_batch(requests), strict=True):
        if generation.error:
            transient = generation.error in TRANSIENT_REASONS
            record.reject(generation.error, f"generator: {generation.detail}", transient=transient)
        elif not generation.violation.strip():
            record.reject("empty_violation")
        else:
            apply(record, generation)
