"""Endpoint limits shared by the worker processes of one build (the processes executor).

A recipe's ``max_concurrency``, ``requests_per_minute`` and ``tokens_per_minute`` are the
endpoint's, not a worker's. ``for_recipe`` makes them once, in shared memory, before the workers
are forked; each worker ``install``s them, and every ``Transport`` it then opens for that endpoint
(by its role: ``"generator"``, ``"classifier 'NAME'"``) takes its slots and its RPM/TPM budget
from them (``installed``). So a worker whose chunk has requests can use slots and budget another
worker leaves idle, and the workers together never exceed the limits. Without installed limits
(local builds, Ray actors) a transport keeps its own.
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass
from multiprocessing.context import BaseContext
from multiprocessing.sharedctypes import SynchronizedArray
from multiprocessing.synchronize import Semaphore
from typing import Any

from bsafe_data.llm.ratelimit import bucket_shape, refilled, wait_s
from bsafe_data.recipe import EndpointSpec, Recipe


def generator_role() -> str:
    """The role of the generator endpoint's transports (the generator and companion writers)."""
    return "generator"


def classifier_role(name: str) -> str:
    """The role of classifier ``name``'s transport."""
    return f"classifier {name!r}"


class SharedBudget:
    """RPM and TPM token buckets (``ratelimit``'s arithmetic) whose levels live in shared memory;
    ``try_take`` checks and takes under one cross-process lock."""

    def __init__(self, context: BaseContext, requests_per_minute: int | None, tokens_per_minute: int | None):
        self.shapes = [bucket_shape(n) if n else None for n in (requests_per_minute, tokens_per_minute)]
        now = time.monotonic()  # the same clock in every process of this machine
        # [requests level, requests stamp, tokens level, tokens stamp]
        initial = [s[0] if s else 0.0 for s in self.shapes]
        self.state: SynchronizedArray[Any] = context.Array("d", [initial[0], now, initial[1], now])

    @property
    def tracks_tokens(self) -> bool:
        return self.shapes[1] is not None

    def try_take(self, tokens: int) -> float:
        """Take one request and ``tokens`` tokens when both are there (0.0), else the seconds
        until they will be (nothing taken)."""
        with self.state.get_lock():
            now = time.monotonic()
            state = self.state
            wait = 0.0
            for i, (shape, amount) in enumerate(zip(self.shapes, (1, tokens), strict=True)):
                if shape is None:
                    continue
                level = refilled(state[2 * i], now - state[2 * i + 1], *shape)
                state[2 * i], state[2 * i + 1] = level, now
                wait = max(wait, wait_s(level, amount, *shape))
            if wait > 0:
                return wait
            for i, amount in enumerate((1, tokens)):
                if self.shapes[i] is not None:
                    state[2 * i] -= amount
            return 0.0

    def settle(self, reserved: int, used: int) -> None:
        """Give back (or take) the difference between reserved and reported tokens."""
        shape = self.shapes[1]
        if shape is None:
            return
        with self.state.get_lock():
            self.state[2] = min(shape[0], self.state[2] + reserved - used)


@dataclass
class SharedEndpoint:
    """One endpoint's limits for every worker: its slots (``None``: no concurrency limit shared)
    and its RPM/TPM budget (``None``: no rate limit)."""

    slots: Semaphore | None
    budget: SharedBudget | None


_installed: dict[str, SharedEndpoint] = {}


def for_recipe(recipe: Recipe, context: BaseContext | None = None) -> dict[str, SharedEndpoint]:
    """The shared limits of every endpoint ``recipe`` names, by transport role (make them before
    forking the workers that use them)."""
    context = context or multiprocessing.get_context("fork")
    out: dict[str, SharedEndpoint] = {}
    gen = recipe.generator
    if gen.provider != "builtin":
        rates = gen.requests_per_minute, gen.tokens_per_minute
        budget = SharedBudget(context, *rates) if any(rates) else None
        out[generator_role()] = SharedEndpoint(context.Semaphore(gen.max_concurrency), budget)
    for spec in recipe.filters.classifiers if recipe.filters.enabled else []:
        if isinstance(spec, EndpointSpec):
            out[classifier_role(spec.name)] = SharedEndpoint(context.Semaphore(spec.max_concurrency), None)
    return out


def install(limits: dict[str, SharedEndpoint]) -> None:
    """Make ``limits`` the ones this process's transports use (a worker calls it once)."""
    _installed.clear()
    _installed.update(limits)


def installed(role: str) -> SharedEndpoint | None:
    """The shared limits of the endpoint with transport role ``role`` in this process, if any."""
    return _installed.get(role)
