"""Pick the generator backend a recipe asks for."""

from __future__ import annotations

from pathlib import Path

from bsafe_data.generate.base import Generator
from bsafe_data.llm.engine import Engine
from bsafe_data.recipe import GeneratorSpec


class GeneratorUnavailable(RuntimeError):
    """The requested backend cannot run here (not implemented, or an unknown provider)."""


def make_generator(
    spec: GeneratorSpec, engine: Engine | None = None, *, cache_dir: Path | None = None
) -> Generator:
    """Build the backend for ``spec.provider``: ``builtin``, or ``openai`` on ``engine`` (a build's;
    without one the generator runs its own over ``cache_dir``).

    Backends are imported lazily, so the optional dependencies of one are never needed by another.
    ``transformers`` (in-process local models) is not implemented: ``GeneratorUnavailable``.
    """
    if spec.provider == "builtin":
        from bsafe_data.generate.builtin import BuiltinGenerator

        return BuiltinGenerator()
    if spec.provider == "openai":
        from bsafe_data.generate.openai_backend import OpenAIGenerator

        return OpenAIGenerator(spec, engine, cache_dir=cache_dir)
    if spec.provider == "transformers":
        raise GeneratorUnavailable(
            "generator.provider 'transformers' is not available in this version (the `[local]` extra "
            "adds local classifiers only): serve the model with an OpenAI-compatible server (vLLM, "
            "llama.cpp, TGI) and use provider 'openai' with its base_url"
        )
    raise GeneratorUnavailable(f"unknown generator provider {spec.provider!r}")
