"""The generator interface every backend subclasses (builtin bank, OpenAI-compatible endpoint).

The pipeline hands a backend a batch of requests and gets one ``Generation`` per request back, in
order (``generate_batch``, or ``submit`` for a future of it). Backends never raise for a single bad
row: they return a ``Generation`` whose ``error`` is a stable reason code (``generator_error``,
``generator_refused``, ``generator_unparseable``), so the row lands in the ``rejected`` config
instead of crashing the run. Only a ``FatalEndpointError`` (bad key, wrong URL) stops the run.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


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

    @property
    def usage(self) -> dict[str, Any]:
        """Cumulative usage counters (requests, tokens, cost, ...); empty for offline backends."""
        return {}

    @abstractmethod
    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """Return one Generation per request, in the same order."""

    def submit(
        self, requests: Sequence[GenerationRequest], sent: threading.Event | None = None
    ) -> Future[list[Generation]]:
        """Start a batch and return its future (``result()`` is what ``generate_batch`` returns).

        Endpoint backends send the requests in the background, so the caller can label and
        classify another chunk while they are in flight; they set ``sent`` once every request of
        the batch has left (or the batch ended). The default (offline backends, which are CPU
        work anyway) computes the batch here and returns a finished future.
        """
        if sent is not None:
            sent.set()
        future: Future[list[Generation]] = Future()
        try:
            future.set_result(self.generate_batch(requests))
        except Exception as exc:  # FatalEndpointError: raised where the caller takes the result
            future.set_exception(exc)
        return future

    def close(self) -> None:  # noqa: B027 - optional hook: offline backends hold nothing
        """Release connections, event loops and caches."""

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
