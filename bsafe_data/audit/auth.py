"""Annotator tokens, sessions and CSRF tokens.

A token is shown once (``bsafe-data audit annotators add``) and stored as a salted scrypt hash.
Signing in with it opens a session: a random session id (cookie, HttpOnly, SameSite=Strict,
stored only as its sha256) and a CSRF token that every write must echo in ``X-CSRF-Token``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets

from bsafe_data.audit.store import AuditStore

SESSION_COOKIE = "bsafe_audit_session"
CSRF_HEADER = "X-CSRF-Token"
SESSION_TTL_S = 12 * 3600
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}


def hash_token(token: str, salt: bytes) -> bytes:
    """The stored form of a token: scrypt(token, salt), n=2^14, r=8, p=1."""
    return hashlib.scrypt(token.encode(), salt=salt, **_SCRYPT)


def add_annotator(store: AuditStore, name: str, *, rotate: bool = False) -> str:
    """Register ``name`` with a fresh random token and return the token (the only time it exists in clear)."""
    if not _NAME.match(name):
        raise ValueError(
            "annotator names are 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    token = "bsa_" + secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    store.add_annotator(name, salt, hash_token(token, salt), replace=rotate)
    return token


class Authenticator:
    """Checks tokens against the store and manages sessions; safe to share between threads.

    Tokens are checked only at sign-in (scrypt is slow on purpose); later requests carry the
    session cookie.
    """

    def __init__(self, store: AuditStore) -> None:
        self.store = store

    def verify_token(self, token: str) -> str | None:
        """The annotator whose token this is, or None. Constant-time comparison of hashes."""
        if not token or len(token) > 256 or not token.isascii():  # tokens are ASCII (`bsa_` + base64)
            return None
        found = None
        for name, salt, stored in self.store.annotator_hashes():
            if hmac.compare_digest(hash_token(token, salt), stored):
                found = name
        return found

    def open_session(self, annotator: str) -> tuple[str, str]:
        """A new session for ``annotator``: ``(session_id, csrf_token)``."""
        session_id = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        self.store.add_session(_session_hash(session_id), annotator, csrf, SESSION_TTL_S)
        return session_id, csrf

    def session(self, session_id: str | None) -> dict[str, str] | None:
        """``{annotator, csrf}`` of a live session, or None."""
        if not session_id or len(session_id) > 128:
            return None
        return self.store.session(_session_hash(session_id))

    def close_session(self, session_id: str) -> None:
        """End a session (sign out)."""
        self.store.delete_session(_session_hash(session_id))


def csrf_ok(session: dict[str, str], header_value: str | None) -> bool:
    """Whether a write carries the session's CSRF token."""
    # as bytes: compare_digest refuses str with non-ASCII characters, which a header may carry
    given = (header_value or "").encode("utf-8", "replace")
    return bool(header_value) and hmac.compare_digest(session["csrf"].encode(), given)


def is_loopback(host: str) -> bool:
    """Whether a bind address only listens on this machine (127.0.0.0/8, ::1, localhost)."""
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _session_hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()
