"""The Hugging Face Hub side of a push: the token, the repository state, and Hub failures under the
package's one retry policy (``bsafe_data.llm.retry``).

A Hub call that fails with an HTTP error (huggingface_hub's ``HfHubHTTPError``, also when it is
wrapped, as for LFS uploads) or a network error is mapped onto ``RetryPolicy.decide``: its status,
its server message and its ``Retry-After`` header (seconds or an HTTP date, via ``retry_after_s``).
The Hub adds one retryable status, 412: the branch moved since its head was read. The token is
never printed, logged or stored; every message is scrubbed of it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError

from bsafe_data.llm.errors import describe_failure
from bsafe_data.llm.retry import Fail, Fatal, Retry, RetryPolicy
from bsafe_data.publish.errors import PublishError

try:  # the HTTP client huggingface_hub uses (httpx2 in 2.x, httpx before)
    import httpx2 as _http
except ImportError:  # pragma: no cover
    import httpx as _http  # type: ignore[no-redef]

#: Network failures worth another attempt (no HTTP answer at all).
TRANSIENT = (_http.TransportError,)
#: 409/412 on a commit: the branch moved since its head was read (re-read it and commit again).
BRANCH_MOVED = frozenset({409, 412})
#: The longest wait between two attempts, server hints included.
MAX_BACKOFF_S = 60.0


def hub_policy(max_attempts: int, backoff_s: float) -> RetryPolicy:
    """The retry policy of Hub writes: ``max_attempts`` in all, backoff from ``backoff_s`` seconds."""
    return RetryPolicy(
        max_retries=max_attempts - 1,
        base_s=backoff_s,
        max_s=MAX_BACKOFF_S,
        max_hint_s=MAX_BACKOFF_S,
        extra_retry_statuses=frozenset({412}),
    )


@dataclass
class RemoteState:
    """The Hub side at one moment: head commit of main, release tags, files and the card at the head."""

    exists: bool
    head: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    files: set[str] = field(default_factory=set)
    card: str | None = None
    private: bool | None = None
    gated: Any = None


def scrub(text: str, token: str | None) -> str:
    """``text`` with the token replaced by ``***``."""
    return text.replace(token, "***") if token else text


def status_of(exc: BaseException | None) -> int | None:
    """The HTTP status of a Hub error (None for network errors and everything else)."""
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def http_cause(exc: BaseException) -> BaseException | None:
    """The HTTP error or network error behind ``exc`` (huggingface_hub wraps some, e.g. LFS uploads)."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None or isinstance(seen, (HfHubHTTPError, *TRANSIENT)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def decide(exc: BaseException, attempt: int, policy: RetryPolicy) -> Retry | Fatal | Fail | None:
    """The retry policy's verdict on attempt ``attempt`` of a Hub call that raised ``exc``; None when
    ``exc`` is neither an HTTP nor a network error (a bug, not the Hub: let it propagate)."""
    cause = http_cause(exc)
    if cause is None:
        return None
    if isinstance(cause, TRANSIENT):
        return policy.decide(None, type(cause).__name__, attempt=attempt)
    response = getattr(cause, "response", None)
    message = getattr(cause, "server_message", None) or first_line(cause)
    return policy.decide(status_of(cause), message, getattr(response, "headers", {}), attempt)


def hub_error(what: str, exc: BaseException, token: str | None, endpoint: str) -> PublishError:
    """A PublishError naming the hub endpoint, the failed step, the status and the server's words."""
    cause = http_cause(exc) or exc
    if isinstance(cause, TRANSIENT):
        detail = f"{type(cause).__name__}: {first_line(cause)}"
    else:
        detail = first_line(exc) + (f" ({first_line(cause)})" if cause is not exc else "")
    return PublishError(
        scrub(describe_failure("hub", endpoint, status_of(cause), f"{what}: {detail}"), token), 1
    )


def resolve_token(token: str | None) -> str:
    """The token to use: the argument, else ``HF_TOKEN``, else the saved ``hf auth login`` token."""
    resolved = token or get_token()
    if not resolved:
        raise PublishError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login` (a write token is needed)", 1
        )
    return resolved


def check_token(api: HfApi, token: str) -> str:
    """Validate the token with ``whoami`` (before anything is written); returns the user name."""
    try:
        info = api.whoami(token=token)
    except (HfHubHTTPError, *TRANSIENT) as exc:
        if status_of(exc) == 401:
            raise PublishError(
                f"the Hugging Face token was rejected by {api.endpoint} (401 Unauthorized): check "
                "HF_TOKEN or run `hf auth login` again. Nothing was uploaded.",
                1,
            ) from None
        raise hub_error("checking the token", exc, token, api.endpoint) from None
    role = ((info.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise PublishError("the Hugging Face token is read-only; pushing needs a token with write access", 1)
    return str(info.get("name") or "")


def read_remote(api: HfApi, repo_id: str, token: str) -> RemoteState:
    """Head of main, release tags, file list and card of a dataset repo (``exists=False`` if missing)."""
    try:
        info = api.dataset_info(repo_id, token=token)
    except RepositoryNotFoundError:
        return RemoteState(exists=False)
    refs = api.list_repo_refs(repo_id, repo_type="dataset", token=token)
    state = RemoteState(
        exists=True,
        head=info.sha,
        tags={t.name: t.target_commit for t in refs.tags},
        files={s.rfilename for s in info.siblings or []},
        private=info.private,
        gated=info.gated,
    )
    if "README.md" in state.files:
        with tempfile.TemporaryDirectory(prefix="bsafe-push-") as tmp:
            try:
                path = api.hf_hub_download(
                    repo_id, "README.md", repo_type="dataset", revision=info.sha, cache_dir=tmp, token=token
                )
                state.card = Path(path).read_text(encoding="utf-8")
            except EntryNotFoundError:
                state.card = None
    return state
