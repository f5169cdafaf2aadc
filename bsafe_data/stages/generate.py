"""Stage *generate*: a record's generator request as a step of the flow, its answer applied.

The method says which request a record needs (``request``, None for none) and what to do with a
usable answer (``apply``); this stage asks the generator for it and records the generator's reason
code (``generator_error``, ``generator_refused``, ``generator_unparseable``, ``empty_violation``)
on records whose answer cannot be used. Its requests count against the error budget.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bsafe_data.generate.base import Generation, GenerationRequest, Generator
from bsafe_data.stages.record import Record
from bsafe_data.stages.step import Step, Task


def generate_step(
    generator: Generator,
    request_of: Callable[[Record], GenerationRequest | None],
    apply: Callable[[Record, Generation], None],
) -> Step:
    """The step that asks ``generator`` for every live record's request and applies the answers."""

    def ask(record: Record) -> list[Task]:
        request = request_of(record)
        return [] if request is None else [generator.task(request)]

    def take(record: Record, answers: list[Any]) -> None:
        if not answers:
            return
        (generation,) = answers
        if generation.error:
            record.reject(generation.error, f"generator: {generation.detail}", transient=generation.transient)
        elif not generation.violation.strip():
            record.reject("empty_violation")
        else:
            apply(record, generation)

    return Step("generate", ask=ask, apply=take, budgeted=True)
