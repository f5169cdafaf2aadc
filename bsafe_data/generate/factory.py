"""Pick the generator backend a recipe asks for."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from bsafe_data.generate.base import Generator
from bsafe_data.recipe import GeneratorSpec


class GeneratorUnavailable(RuntimeError):
    """The requested backend cannot run here (missing optional dependency)."""


def make_generator(
    spec: GeneratorSpec,
    cache_dir: Path | None = None,
    progress: Callable[[dict], None] | None = None,
) -> Generator:
    """Build the backend for ``spec.provider``: ``builtin``, ``openai`` or ``transformers``.

    Backends are imported lazily, so the optional dependencies of one are never needed by another.
    """
    if spec.provider == "builtin":
        from bsafe_data.generate.builtin import BuiltinGenerator

        return BuiltinGenerator()
    if spec.provider == "openai":
        from bsafe_data.generate.openai_backend import OpenAIGenerator

        return OpenAIGenerator(spec, cache_dir=cache_dir, progress=progress)
    if spec.provider == "transformers":
        if importlib.util.find_spec("torch") is None:
            raise GeneratorUnavailable(
                "generator.provider 'transformers' needs PyTorch: install the extra with "
                "`pip install 'bsafe-data[local]'`, or serve the model with vLLM and use provider 'openai'"
            )
        try:
            from bsafe_data.generate.local_backend import LocalGenerator  # type: ignore[import-not-found]
        except ImportError as exc:
            raise GeneratorUnavailable(
                "generator.provider 'transformers' is not available in this version: serve the model "
                "with an OpenAI-compatible server (vLLM, llama.cpp) and use provider 'openai'"
            ) from exc
        return LocalGenerator(spec, cache_dir=cache_dir, progress=progress)
    raise GeneratorUnavailable(f"unknown generator provider {spec.provider!r}")
