"""Versioned, atomic publishing of a built dataset folder to the Hugging Face Hub (`bsafe-data push`).

One release = one commit + one tag:

1. check the folder (README.md, manifest.json, parquet shards ≤ ``MAX_SHARD_BYTES``) and the version;
2. resolve the token (argument, ``HF_TOKEN``, ``hf auth login``) and validate it with ``whoami``
   before anything is written; the token itself is never printed, logged or stored;
3. ``create_repo(exist_ok=True)``, apply gating/privacy, then read the Hub state: head commit, tags,
   current card. An existing ``vX.Y.Z`` tag (or a newer release) stops the push with nothing changed;
4. write the new card: the local card, its changelog block rebuilt with every release newest first
   (previous rows carried forward from the Hub's card, their commit shas read from the Hub's tags);
5. ONE ``create_commit`` with every file (plus deletions of stale files in the data folders) and
   ``parent_commit=<head>``; on 408/409/412/425/429/5xx or a network error it backs off
   exponentially (the package's one retry policy, honouring ``Retry-After``) and starts again from
   step 3 (re-reading the head). LFS objects uploaded by an earlier attempt or an interrupted run
   are not uploaded again: huggingface_hub asks the LFS batch endpoint first, and the Hub answers
   objects it already stores without upload actions;
6. ``create_tag(f"v{version}", revision=<commit sha>)``; the tag message records the commit sha.

The card text lives in ``publish.changelog``, the Hub access (token, repository state, error
mapping, retry policy) in ``publish.hub``; this module is the transaction. It never prints: progress
goes to the ``on_event`` callback as ``PushEvent``s, which the CLI renders.

About the commit sha in the changelog: a commit cannot contain its own sha, so the row of the release
being pushed says *this commit* (and names its parent commit); every older row shows the sha its
``vX.Y.Z`` tag points to, read from the Hub when the next release is pushed. The tag is the
authoritative record.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants
from huggingface_hub.errors import HfHubHTTPError

from bsafe_data.integrity import FolderError, checked
from bsafe_data.llm.retry import Retry, RetryPolicy
from bsafe_data.publish.changelog import (
    TAG_RE,
    ChangelogEntry,
    Gated,
    build_card,
    card_diff,
    parse_version,
    split_front_matter,
    version_key,
)
from bsafe_data.publish.errors import PublishError
from bsafe_data.publish.hub import (
    BRANCH_MOVED,
    TRANSIENT,
    RemoteState,
    check_token,
    decide,
    first_line,
    http_cause,
    hub_error,
    hub_policy,
    read_remote,
    resolve_token,
    scrub,
    status_of,
)

MAX_SHARD_BYTES = 500 * 1000 * 1000

#: The ``audit`` config: annotator judgements (pseudonymised), uploaded besides the folder's files.
AUDIT_SHARD = "audit/train-00000-of-00001.parquet"
AUDIT_CONFIG = {"config_name": "audit", "data_files": [{"split": "train", "path": "audit/train-*.parquet"}]}

EventKind = Literal["authenticated", "setting", "committing", "retrying", "pull_request", "tagged"]


@dataclass(frozen=True)
class PushEvent:
    """One step of a push, for a progress display (``message`` is plain text, one line).

    ``authenticated`` (token checked), ``setting`` (gating or privacy applied), ``committing`` (an
    attempt starts), ``retrying`` (an attempt failed; the next one in ``wait_s`` seconds),
    ``pull_request`` (opened), ``tagged`` (the release is complete).
    """

    kind: EventKind
    message: str
    attempt: int | None = None
    wait_s: float | None = None


#: The progress callback of ``push_dataset``.
OnEvent = Callable[[PushEvent], None]


def _ignore(event: PushEvent) -> None:
    """The default ``on_event``: report nothing."""


@dataclass
class PushResult:
    """What a push did (or, with ``dry_run``, would do)."""

    repo_id: str
    version: str
    tag: str | None
    commit_sha: str | None
    parent_sha: str | None
    url: str
    commit_url: str | None = None
    pr_url: str | None = None
    files: list[tuple[str, int]] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    card_diff: str = ""
    dry_run: bool = False
    attempts: int = 0
    new_repo: bool = False  # dry run: the repository does not exist on the Hub yet


@dataclass
class LocalFolder:
    """A validated dataset folder: relative POSIX paths with sizes, the card and the manifest."""

    root: Path
    files: dict[str, int]
    card: str
    manifest: dict[str, Any]
    extra: dict[str, bytes] = field(default_factory=dict)  # uploaded too, not part of the folder


def audit_shard(folder: Path) -> bytes | None:
    """The ``audit`` config shard (live judgements, annotators pseudonymised, notes left out) from
    ``folder/.bsafe/``; None when nothing was judged."""
    from bsafe_data.audit.export import audit_config_rows

    rows = audit_config_rows(folder)
    if not rows:
        return None
    import io

    import datasets

    from bsafe_data.audit.export import AUDIT_FEATURES

    buffer = io.BytesIO()
    datasets.Dataset.from_list(rows, features=AUDIT_FEATURES).to_parquet(buffer)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------
# Local checks
# ------------------------------------------------------------------------------------------------
def read_folder(folder: Path, max_shard_bytes: int | None = None) -> LocalFolder:
    """List and check a built dataset folder (hidden files are skipped)."""
    limit = MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
    root = Path(folder)
    if not root.is_dir():
        raise PublishError(f"{root} is not a folder (expected the output of `bsafe-data build`)", 2)
    for required in ("README.md", "manifest.json"):
        if not (root / required).is_file():
            raise PublishError(f"{root} has no {required}: is it the output of `bsafe-data build`?", 2)
    try:  # nothing is uploaded from a folder that is not what its build wrote
        verified = checked(root)
    except FolderError as exc:
        raise PublishError(f"{exc}. Nothing was uploaded", exc.exit_code) from None
    files = {rel: int(entry["bytes"]) for rel, entry in sorted(verified.files.items())}  # exactly these
    files["manifest.json"] = (root / "manifest.json").stat().st_size
    parquet = {p: s for p, s in files.items() if p.endswith(".parquet")}
    if not parquet:
        raise PublishError(f"{root} contains no .parquet shards", 2)
    too_big = {p: s for p, s in files.items() if s > limit}
    if too_big:
        listing = ", ".join(f"{p} ({format_size(s)})" for p, s in too_big.items())
        raise PublishError(
            f"file(s) larger than {format_size(limit)}: {listing}. The Hub serves shards of at most "
            f"{format_size(limit)} well; rebuild with smaller shards (the builder shards, push does not).",
            2,
        )
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PublishError(f"{root / 'manifest.json'} is not valid JSON: {exc}", 2) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("counts"), dict):
        raise PublishError(f'{root / "manifest.json"} has no "counts" mapping', 2)
    card = (root / "README.md").read_text(encoding="utf-8")
    split_front_matter(card)  # raises on a broken header
    shard = audit_shard(root)
    return LocalFolder(root, files, card, manifest, {AUDIT_SHARD: shard} if shard else {})


def format_size(n: int) -> str:
    """``1234`` → ``"1.2 kB"`` (decimal units)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n} B"  # pragma: no cover


def check_release(remote: RemoteState, version: str) -> None:
    """PublishError (exit 2) when ``version`` is already released or older than the latest release."""
    tag = f"v{version}"
    if tag in remote.tags:
        raise PublishError(
            f"{tag} already exists on the Hub (commit {remote.tags[tag][:12]}); releases are immutable. "
            "Bump the version (nothing was changed).",
            2,
        )
    released = [t for t in remote.tags if TAG_RE.match(t)]
    if released:
        latest = max(released, key=lambda t: version_key(t[1:]))
        if version_key(version) < version_key(latest[1:]):
            raise PublishError(
                f"v{version} is older than the latest release {latest}; "
                "use a higher version (nothing was changed).",
                2,
            )


def plan_operations(local: LocalFolder, card: str, remote_files: set[str]) -> tuple[list[Any], list[str]]:
    """Add every local file (README.md replaced by ``card``); delete remote files that are gone from the
    local folders (``data/``, ``rejected/``, ``plots/``, ...) so stale shards never match a config glob."""
    ops: list[Any] = []
    for rel in local.files:
        source: Any = card.encode("utf-8") if rel == "README.md" else str(local.root / rel)
        ops.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=source))
    for rel, data in local.extra.items():
        ops.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=data))
    published = set(local.files) | set(local.extra)
    local_dirs = {rel.split("/", 1)[0] for rel in published if "/" in rel} | {AUDIT_SHARD.split("/")[0]}
    deleted = sorted(
        p for p in remote_files if "/" in p and p.split("/", 1)[0] in local_dirs and p not in published
    )
    ops.extend(CommitOperationDelete(path_in_repo=p) for p in deleted)
    return ops, deleted


# ------------------------------------------------------------------------------------------------
# The push
# ------------------------------------------------------------------------------------------------
def push_dataset(
    folder: str | Path,
    repo_id: str,
    version: str,
    *,
    token: str | None = None,
    private: bool = False,
    gated: Gated = "none",
    create_pr: bool = False,
    dry_run: bool = False,
    endpoint: str | None = None,
    on_event: OnEvent | None = None,
    max_attempts: int = 5,
    backoff_s: float = 1.0,
) -> PushResult:
    """Publish a built dataset folder as release ``version`` of the dataset repo ``repo_id``.

    Creates exactly one commit with all files (parent = the current head of main) and tags it
    ``vX.Y.Z``; with ``create_pr`` the commit is opened as a pull request and not tagged; with
    ``dry_run`` nothing is written and the result holds the file list, the deletions and the card
    diff. ``gated`` ("auto" or "manual") gates the repo and adds the gating prompt/fields to the
    card. A failed commit or tag is retried (``max_attempts`` attempts in all) with exponential
    backoff starting at ``backoff_s`` seconds, or as long as the Hub's ``Retry-After`` asks.
    Progress goes to ``on_event`` (nothing is printed). Raises PublishError (nothing changed) for
    an invalid folder or version, a missing/rejected token, or an existing tag, and PublishError
    for Hub failures.
    """
    emit = on_event or _ignore
    if gated not in ("none", "auto", "manual"):
        raise PublishError(f"gated must be none, auto or manual, not {gated!r}", 2)
    version = ".".join(str(n) for n in parse_version(version))
    tag = f"v{version}"
    local = read_folder(Path(folder))

    token = resolve_token(token)
    api = HfApi(endpoint=(endpoint or constants.ENDPOINT).rstrip("/"), token=token, library_name="bsafe-data")
    user = check_token(api, token)
    if "/" not in repo_id:
        repo_id = f"{user}/{repo_id}"
    url = f"{api.endpoint}/datasets/{repo_id}"
    emit(PushEvent("authenticated", f"token ok (user {user}); publishing {repo_id} {tag}"))

    try:
        if dry_run:
            return _dry_run(api, local, repo_id, version, token=token, gated=gated, url=url)
        api.create_repo(repo_id, repo_type="dataset", exist_ok=True, private=private, token=token)
        remote = read_remote(api, repo_id, token)
        check_release(remote, version)
        _apply_settings(api, repo_id, remote, token=token, private=private, gated=gated, emit=emit)
        return _commit_and_tag(
            api,
            local,
            repo_id,
            version,
            remote,
            token=token,
            gated=gated,
            create_pr=create_pr,
            url=url,
            emit=emit,
            policy=hub_policy(max_attempts, backoff_s),
        )
    except PublishError:
        raise
    except (HfHubHTTPError, *TRANSIENT) as exc:
        raise hub_error(f"pushing {repo_id}", exc, token, api.endpoint) from None


def _new_entry(local: LocalFolder, version: str, parent: str | None, create_pr: bool) -> ChangelogEntry:
    return ChangelogEntry(
        version=version,
        date=datetime.now(timezone.utc).date().isoformat(),
        counts={c: dict(s) for c, s in local.manifest["counts"].items()},
        recipe_sha256=local.manifest.get("recipe_sha256"),
        commit=None,
        parent=parent,
        note="pull request" if create_pr else None,
    )


def _files(local: LocalFolder, card: str) -> list[tuple[str, int]]:
    """Every file of the release with its size (README.md is the card actually published)."""
    files = [(p, len(card.encode()) if p == "README.md" else s) for p, s in local.files.items()]
    return files + [(p, len(data)) for p, data in local.extra.items()]


def _extra_configs(local: LocalFolder) -> list[dict[str, Any]]:
    """Card configs of the files uploaded besides the folder's (the ``audit`` config)."""
    return [AUDIT_CONFIG] if AUDIT_SHARD in local.extra else []


def _dry_run(
    api: HfApi, local: LocalFolder, repo_id: str, version: str, *, token: str, gated: Gated, url: str
) -> PushResult:
    remote = read_remote(api, repo_id, token)
    if remote.exists:
        check_release(remote, version)
    card = build_card(
        local.card,
        gated=gated,
        old_card=remote.card,
        entry=_new_entry(local, version, remote.head, False),
        tags=remote.tags,
        extra_configs=_extra_configs(local),
    )
    _, deleted = plan_operations(local, card, remote.files)
    return PushResult(
        repo_id=repo_id,
        version=version,
        tag=None,
        commit_sha=None,
        parent_sha=remote.head,
        url=url,
        files=_files(local, card),
        deleted=deleted,
        card_diff=card_diff(remote.card, card, remote.head),
        dry_run=True,
        new_repo=not remote.exists,
    )


def _apply_settings(
    api: HfApi,
    repo_id: str,
    remote: RemoteState,
    *,
    token: str,
    private: bool,
    gated: Gated,
    emit: OnEvent,
) -> None:
    """Gate (and make private, if asked) BEFORE data is committed, so it is never briefly open."""
    if gated != "none" and remote.gated != gated:
        api.update_repo_settings(repo_id, gated=gated, repo_type="dataset", token=token)
        emit(PushEvent("setting", f"gated access: {gated}"))
    if private and remote.private is False:
        api.update_repo_settings(repo_id, private=True, repo_type="dataset", token=token)
        emit(PushEvent("setting", "repository made private"))


def _commit_and_tag(
    api: HfApi,
    local: LocalFolder,
    repo_id: str,
    version: str,
    remote: RemoteState,
    *,
    token: str,
    gated: Gated,
    create_pr: bool,
    url: str,
    emit: OnEvent,
    policy: RetryPolicy,
) -> PushResult:
    tag = f"v{version}"
    summary = ", ".join(f"{c} {sum(s.values())}" for c, s in local.manifest["counts"].items())
    description = (
        f"bsafe-data {local.manifest.get('package_version', '?')}; recipe sha256 "
        f"{local.manifest.get('recipe_sha256', '?')}; rows: {summary}"
    )
    max_attempts = policy.max_retries + 1
    attempt = 0
    while True:
        attempt += 1
        if attempt > 1:
            remote = read_remote(api, repo_id, token)
            check_release(remote, version)
        entry = _new_entry(local, version, remote.head, create_pr)
        card = build_card(
            local.card,
            gated=gated,
            old_card=remote.card,
            entry=entry,
            tags=remote.tags,
            extra_configs=_extra_configs(local),
        )
        ops, deleted = plan_operations(local, card, remote.files)
        emit(
            PushEvent(
                "committing",
                f"committing {len(local.files) + len(local.extra)} files"
                + (f" and {len(deleted)} deletions" if deleted else "")
                + f" on top of {(remote.head or '?')[:12]} (attempt {attempt}/{max_attempts})",
                attempt=attempt,
            )
        )
        try:
            info = api.create_commit(
                repo_id,
                ops,
                commit_message=f"Release {tag}",
                commit_description=description,
                repo_type="dataset",
                parent_commit=remote.head,
                create_pr=create_pr,
                token=token,
            )
            break
        except Exception as exc:
            decision = decide(exc, attempt, policy)
            if decision is None:
                raise
            if not isinstance(decision, Retry):
                what = f"commit to {repo_id} (attempt {attempt})"
                raise hub_error(what, exc, token, api.endpoint) from None
            moved = status_of(http_cause(exc)) in BRANCH_MOVED
            note = " (the branch moved; re-reading the head)" if moved else ""
            wait = decision.delay_s
            text = f"commit failed: {decision.reason}{note}; retrying in {wait:.1f}s"
            emit(PushEvent("retrying", text, attempt=attempt, wait_s=wait))
            time.sleep(wait)

    result = PushResult(
        repo_id=repo_id,
        version=version,
        tag=None,
        commit_sha=info.oid,
        parent_sha=entry.parent,
        url=url,
        commit_url=info.commit_url,
        files=_files(local, card),
        deleted=deleted,
        card_diff=card_diff(remote.card, card, remote.head),
        attempts=attempt,
    )
    if create_pr:
        result.pr_url = info.pr_url
        text = f"opened pull request {info.pr_url} (commit {info.oid[:12]}); merge it, then tag it {tag}"
        emit(PushEvent("pull_request", text))
        return result
    _create_tag(api, repo_id, tag, info.oid, token=token, policy=policy, emit=emit)
    result.tag = tag
    emit(PushEvent("tagged", f"{repo_id} {tag} → commit {info.oid[:12]} ({url})"))
    return result


def _create_tag(
    api: HfApi, repo_id: str, tag: str, sha: str, *, token: str, policy: RetryPolicy, emit: OnEvent
) -> None:
    message = f"bsafe-data release {tag}: commit {sha}"
    attempt = 0
    while True:
        attempt += 1
        try:
            api.create_tag(
                repo_id, tag=tag, tag_message=message, revision=sha, repo_type="dataset", token=token
            )
            return
        except Exception as exc:
            if isinstance(exc, HfHubHTTPError) and status_of(exc) == 409:
                refs = api.list_repo_refs(repo_id, repo_type="dataset", token=token)
                if any(t.name == tag and t.target_commit == sha for t in refs.tags):
                    return  # an earlier attempt created it
                raise PublishError(
                    f"commit {sha} was created but tag {tag} now exists elsewhere; tag the commit by hand", 1
                ) from None
            decision = decide(exc, attempt, policy)
            if not isinstance(decision, Retry):
                text = (
                    f"commit {sha} was created but tagging it {tag} failed ({first_line(exc)}); re-run "
                    "the same push to tag it (the files are already there, nothing is uploaded twice)"
                )
                raise PublishError(scrub(text, token), 1) from None
            text = f"tagging failed: {decision.reason}; retrying in {decision.delay_s:.1f}s"
            emit(PushEvent("retrying", text, attempt=attempt, wait_s=decision.delay_s))
            time.sleep(decision.delay_s)
