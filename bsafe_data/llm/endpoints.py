"""The endpoints a recipe names, on a build's engine: the generator's and each classifier's.

A spec is read by its fields (``base_url``, ``api_key_env``, ``max_concurrency``,
``min_concurrency``, ``timeout_s``,
``max_retries``, ``max_retry_after_s`` and, for the generator, ``requests_per_minute`` /
``tokens_per_minute``), so this module needs no recipe model. The generator and the companion
writers share the generator's endpoint, hence its limits. A spec with ``mode: batch`` (and every
endpoint of a build that exports its calls for an offline engine) gets a batch queue
(``Engine.use_batch``).
"""

from __future__ import annotations

from typing import Any

from bsafe_data.llm.breaker import AnswerCheck
from bsafe_data.llm.engine import Endpoint, Engine
from bsafe_data.llm.transport import Transport, resolve_endpoint

GENERATOR_ROLE = "generator"


def classifier_role(name: str) -> str:
    """The role of classifier ``name``'s endpoint."""
    return f"classifier {name!r}"


def generator_endpoint(engine: Engine, spec: Any, *, backoff_base_s: float = 0.5) -> Endpoint:
    """The generator's endpoint (``recipe.generator``) on ``engine``, with its answer check (online
    only: a batch round holds every call of the round, so calls held back for the verdict would
    never let the round start)."""
    limits = {"requests_per_minute": spec.requests_per_minute, "tokens_per_minute": spec.tokens_per_minute}
    endpoint = endpoint_for(engine, GENERATOR_ROLE, spec, backoff_base_s=backoff_base_s, **limits)
    if spec.check_answers and not endpoint.check.answers and endpoint.batch is None:
        where = f"{spec.model!r} at {endpoint.transport.public}"
        endpoint.check = AnswerCheck(spec.check_answers, spec.max_unusable_fraction, where)
    return endpoint


def classifier_endpoint(engine: Engine, spec: Any, *, backoff_base_s: float = 0.5) -> Endpoint:
    """The endpoint of an HTTP classifier (``filters.classifiers[]``) on ``engine``."""
    return endpoint_for(
        engine, classifier_role(spec.name), spec, backoff_base_s=backoff_base_s, backoff_max_s=30.0
    )


def endpoint_for(engine: Engine, role: str, spec: Any, **options: Any) -> Endpoint:
    """The engine's endpoint for ``role``, made from ``spec`` (``base_url``, ``api_key_env``,
    ``max_concurrency``, ...) on first use; ``options`` override the spec's transport settings."""
    where = resolve_endpoint(spec.base_url, spec.api_key_env)

    def make() -> Transport:
        return Transport(
            where.base_url,
            where.api_key,
            role=role,
            max_concurrency=spec.max_concurrency,
            min_concurrency=spec.min_concurrency,
            timeout_s=spec.timeout_s,
            max_retries=spec.max_retries,
            max_retry_after_s=spec.max_retry_after_s,
            **options,
        )

    endpoint = engine.endpoint(role, make)
    if getattr(spec, "mode", "online") == "batch" or engine.exporting:
        engine.use_batch(endpoint, spec.api_key_env)
    return endpoint
