"""Steps: what a method does to its records, in order, as the executor's flow runs them.

A method is a list of steps (``Method.steps``). A step either

* ``run``s CPU work on a batch of records (every record that has reached the step so far, whole
  chunks at once offline, a few at a time while answers arrive), or
* ``ask``s for the model calls one live record needs (a list of ``Task``), and ``apply``s their
  results to the record, in order, once all are in (records that are not live, or need nothing,
  get ``apply(record, [])`` at once).

A task is ``Remote`` (a coroutine the engine runs: an HTTP model call) or ``Local`` (an argument of
a batch function, e.g. the builtin classifier's ``score_items``: the flow calls ``fn`` once on the
arguments of every record that is waiting for it, and hands each its result). So a record's
requests leave as soon as its text exists, whatever the other records are doing, and local models
still see batches. A step's result for a record must depend only on that record (not on which
records share its batch): rows are then the same however answers arrive.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from bsafe_data.stages.record import Record


@dataclass(frozen=True)
class Remote:
    """A model call: a coroutine the engine runs."""

    call: Coroutine[Any, Any, Any]
    #: the endpoint role whose requests this is (the error budget counts the generator's)
    role: str = ""


@dataclass(frozen=True)
class Local:
    """CPU work batched across records: ``fn(args)`` returns one result per argument, in order."""

    fn: Callable[[list[Any]], list[Any]]
    arg: Any


Task = Remote | Local


@dataclass(frozen=True)
class Step:
    """One step of a method (see the module docstring); ``name`` is its timing bucket."""

    name: str
    run: Callable[[list[Record]], None] | None = None
    ask: Callable[[Record], list[Task]] | None = None
    apply: Callable[[Record, list[Any]], None] | None = None
    #: the step's generator requests count against ``generator.max_error_fraction``
    budgeted: bool = False

    def __post_init__(self) -> None:
        if (self.run is None) == (self.ask is None) or (self.ask is None) != (self.apply is None):
            raise ValueError(f"step {self.name!r}: give `run`, or `ask` and `apply`")
