"""Endpoint plumbing: one HTTP transport, one retry policy, rate limiting and the response cache."""

from bsafe_data.llm.errors import FatalEndpointError, RequestFailed

__all__ = ["FatalEndpointError", "RequestFailed"]
