"""The generator interface every backend subclasses (builtin bank, OpenAI-compatible endpoint).

The flow asks a backend for one ``task`` per request: an endpoint backend's is a coroutine the engine
runs (``Remote``), an offline backend's a ``Local`` argument of its ``generate_batch``, which returns
one ``Generation`` per request, in order. Backends never raise for a single bad
row: they return a ``Generation`` whose ``error`` is a stable reason code (``generator_error``,
``generator_refused``, ``generator_unparseable``), so the row lands in the ``rejected`` config
instead of crashing the run. Only a ``FatalEndpointError`` (bad key, wrong URL) stops the run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bsafe_data.stages.step import Local, Task


@dataclass(frozen=True)
class GenerationRequest:
    """What to write: a violation of ``category`` that continues ``part1`` coherently."""

    row_id: str
    context: tuple[tuple[str, str], ...]  # (role, content) turns before the assistant answer
    part1: str  # the answer up to the injection point (may be empty)
    category: str
    seed: int  # per-row seed derived from (recipe seed, row id)


@dataclass(frozen=True)
class Generation:
    """A generator's answer. ``steering`` may be empty; ``error`` set means no usable violation."""

    steering: str = ""
    violation: str = ""
    category: str = ""
    error: str | None = None
    detail: str = ""  # human-readable note for the rejected config (never the API key)
    usage: dict[str, int] = field(default_factory=dict)  # input_tokens, output_tokens, requests, ...
    #: the error may not recur (endpoint down, retries exhausted): a re-run retries the row
    transient: bool = False


class Generator(ABC):
    """A backend that turns requests into generations; a context manager that ``close``s on exit."""

    #: "builtin" or "openai"; recorded in every row's ``generator`` column
    backend: str
    #: the model (or bank) that writes the violations
    model: str
    #: the prompt template (or bank) version
    template: str
    #: where requests go, safe to print (no credentials); offline backends say so
    endpoint: str = "offline"
    #: True for backends whose answers come from an endpoint on the engine (``agenerate``)
    remote: bool = False

    @property
    def usage(self) -> dict[str, Any]:
        """Cumulative usage counters (requests, tokens, cost, ...); empty for offline backends."""
        return {}

    @abstractmethod
    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """Return one Generation per request, in the same order."""

    def task(self, request: GenerationRequest) -> Task:
        """The flow's task for one request (offline: an argument of ``generate_batch``)."""
        return Local(self.generate_batch, request)

    def close(self) -> None:  # noqa: B027 - optional hook: offline backends hold nothing
        """Release connections, event loops and caches."""

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
