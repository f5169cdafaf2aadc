"""Generators: backends that write the injected violation text."""

from bsafe_data.generate.base import Generation, GenerationRequest, Generator

__all__ = ["Generation", "GenerationRequest", "Generator"]
