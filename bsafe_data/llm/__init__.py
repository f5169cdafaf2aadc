"""LLM plumbing: a lean async chat-completions engine, rate limiting, retries and a response cache."""

from bsafe_data.llm.errors import FatalEndpointError, RequestFailed

__all__ = ["FatalEndpointError", "RequestFailed"]
