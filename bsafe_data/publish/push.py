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
   ``parent_commit=<head>``; on 409/412/429/5xx or a network error it backs off exponentially and
   starts again from step 3 (re-reading the head). LFS objects uploaded by an earlier attempt or an
   interrupted run are not uploaded again: huggingface_hub asks the LFS batch endpoint first, and
   the Hub answers objects it already stores without upload actions;
6. ``create_tag(f"v{version}", revision=<commit sha>)``; the tag message records the commit sha.

About the commit sha in the changelog: a commit cannot contain its own sha, so the row of the release
being pushed says *this commit* (and names its parent commit); every older row shows the sha its
``vX.Y.Z`` tag points to, read from the Hub when the next release is pushed. The tag is the
authoritative record.
"""

from __future__ import annotations

import difflib
import json
import re
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import yaml
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants, get_token
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

try:  # the HTTP client huggingface_hub uses (httpx2 in 2.x, httpx before)
    import httpx2 as _http
except ImportError:  # pragma: no cover
    import httpx as _http  # type: ignore[no-redef]

Gated = Literal["none", "auto", "manual"]

MAX_SHARD_BYTES = 500 * 1000 * 1000
RETRY_STATUSES = frozenset({409, 412, 429, 500, 502, 503, 504})
MAX_BACKOFF_S = 60.0
CHANGELOG_START = "<!-- changelog:start -->"
CHANGELOG_END = "<!-- changelog:end -->"
_DATA_RE = re.compile(r"<!-- changelog:data\s(.*?)-->", re.S)
_VERSION_RE = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)$")
_TAG_RE = re.compile(r"^v(\d+)\.(\d+)\.(\d+)$")
_TRANSIENT = (_http.TransportError,)
DEFAULT_GATED_PROMPT = (
    "This dataset contains deliberately harmful text for safety research. "
    "By requesting access you agree to use it only to train or evaluate safer models."
)
DEFAULT_GATED_FIELDS = {
    "Affiliation": "text",
    "I agree to use this dataset only for safety research": "checkbox",
}


class PublishError(Exception):
    """A push that cannot (or must not) go ahead; ``exit_code`` 2 for bad input, 1 for Hub/auth failures."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


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


@dataclass
class LocalFolder:
    """A validated dataset folder: relative POSIX paths with sizes, the card and the manifest."""

    root: Path
    files: dict[str, int]
    card: str
    manifest: dict[str, Any]


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


# ------------------------------------------------------------------------------------------------
# Local checks
# ------------------------------------------------------------------------------------------------
def parse_version(version: str) -> tuple[int, int, int]:
    """``"1.2.3"`` (or ``"v1.2.3"``) → ``(1, 2, 3)``; PublishError otherwise."""
    match = _VERSION_RE.match(version.strip())
    if not match:
        raise PublishError(f"version {version!r} is not a semantic version X.Y.Z (for example 1.0.0)", 2)
    major, minor, patch = (int(g) for g in match.groups())
    return major, minor, patch


def read_folder(folder: Path, max_shard_bytes: int | None = None) -> LocalFolder:
    """List and check a built dataset folder (hidden files are skipped)."""
    limit = MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
    root = Path(folder)
    if not root.is_dir():
        raise PublishError(f"{root} is not a folder (expected the output of `bsafe-data build`)", 2)
    for required in ("README.md", "manifest.json"):
        if not (root / required).is_file():
            raise PublishError(f"{root} has no {required}: is it the output of `bsafe-data build`?", 2)
    files: dict[str, int] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            files[rel.as_posix()] = path.stat().st_size
    parquet = {p: s for p, s in files.items() if p.endswith(".parquet")}
    if not parquet:
        raise PublishError(f"{root} contains no .parquet shards", 2)
    too_big = {p: s for p, s in files.items() if s > limit}
    if too_big:
        listing = ", ".join(f"{p} ({_size(s)})" for p, s in too_big.items())
        raise PublishError(
            f"file(s) larger than {_size(limit)}: {listing}. The Hub serves shards of at most "
            f"{_size(limit)} well; rebuild with smaller shards (the builder shards, push does not).",
            2,
        )
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PublishError(f"{root / 'manifest.json'} is not valid JSON: {exc}", 2) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("counts"), dict):
        raise PublishError(f'{root / "manifest.json"} has no "counts" mapping', 2)
    card = (root / "README.md").read_text(encoding="utf-8")
    _split_front_matter(card)  # raises on a broken header
    return LocalFolder(root, files, card, manifest)


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n} B"  # pragma: no cover


# ------------------------------------------------------------------------------------------------
# Card: YAML header, gating, changelog
# ------------------------------------------------------------------------------------------------
def _split_front_matter(card: str) -> tuple[dict[str, Any] | None, str, str]:
    """(metadata, header text, body) of a card; header text is ``""`` when there is no YAML header."""
    if not card.startswith("---"):
        return None, "", card
    end = card.find("\n---", 3)
    if end < 0:
        raise PublishError("README.md starts a YAML header with --- but never closes it", 2)
    close = card.find("\n", end + 1)
    close = len(card) if close < 0 else close + 1
    try:
        meta = yaml.safe_load(card[3:end]) or {}
    except yaml.YAMLError as exc:
        raise PublishError(f"README.md has an invalid YAML header: {exc}", 2) from None
    if not isinstance(meta, dict):
        raise PublishError("README.md YAML header is not a mapping", 2)
    return meta, card[:close], card[close:]


def apply_gating(card: str, gated: Gated) -> str:
    """Add ``extra_gated_prompt``/``extra_gated_fields`` to the card header for a gated release."""
    if gated == "none":
        return card
    meta, header, body = _split_front_matter(card)
    meta = dict(meta or {})
    if meta.get("extra_gated_prompt") and meta.get("extra_gated_fields"):
        return card
    meta.setdefault("extra_gated_prompt", DEFAULT_GATED_PROMPT)
    meta.setdefault("extra_gated_fields", dict(DEFAULT_GATED_FIELDS))
    dumped = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    return f"---\n{dumped}---\n{body if header else chr(10) + body}"


@dataclass
class ChangelogEntry:
    """One release row. ``commit`` is the tagged commit sha, None for the commit being created."""

    version: str
    date: str
    counts: dict[str, dict[str, int]]
    recipe_sha256: str | None
    commit: str | None = None
    parent: str | None = None
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "date": self.date,
            "counts": self.counts,
            "recipe_sha256": self.recipe_sha256,
            "commit": self.commit,
            "parent": self.parent,
            "note": self.note,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ChangelogEntry:
        return cls(
            version=str(data["version"]),
            date=str(data.get("date") or ""),
            counts=data.get("counts") or {},
            recipe_sha256=data.get("recipe_sha256"),
            commit=data.get("commit"),
            parent=data.get("parent"),
            note=data.get("note"),
        )


def read_changelog(card: str | None) -> tuple[list[ChangelogEntry], list[str]]:
    """Entries stored in a card's changelog block, plus table rows it had without machine data."""
    if not card or CHANGELOG_START not in card:
        return [], []
    block = card.split(CHANGELOG_START, 1)[1].split(CHANGELOG_END, 1)[0]
    match = _DATA_RE.search(block)
    if match:
        try:
            data = [json.loads(line) for line in match.group(1).splitlines() if line.strip()]
            return [ChangelogEntry.from_json(d) for d in data if isinstance(d, dict) and "version" in d], []
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    rows = [
        line
        for line in block.splitlines()
        if line.startswith("|") and not line.startswith("| version") and not line.startswith("|---")
    ]
    return [], rows


def _version_key(version: str) -> tuple[int, int, int]:
    match = _VERSION_RE.match(version)
    return tuple(int(g) for g in match.groups()) if match else (-1, -1, -1)  # type: ignore[return-value]


def merge_changelog(
    old: list[ChangelogEntry], new: ChangelogEntry, tags: dict[str, str]
) -> list[ChangelogEntry]:
    """Every release newest first: the new one, old entries with their sha from the Hub's tags, and
    tags the old card did not know about. Untagged old entries of the same version (a push that
    committed but never tagged) are replaced."""
    entries: dict[str, ChangelogEntry] = {}
    for entry in old:
        if entry.version == new.version:
            same_data = (entry.counts, entry.recipe_sha256) == (new.counts, new.recipe_sha256)
            if entry.commit is None and same_data:
                new.parent, new.date = entry.parent, entry.date  # resume: the card comes out unchanged
            continue
        tagged = tags.get(f"v{entry.version}")
        if tagged:
            entry.commit = tagged
        entries.setdefault(entry.version, entry)
    for tag, sha in tags.items():
        match = _TAG_RE.match(tag)
        version = tag[1:]
        if match and version not in entries and version != new.version:
            entries[version] = ChangelogEntry(version, "", {}, None, commit=sha, note="not recorded")
    entries[new.version] = new
    return sorted(entries.values(), key=lambda e: _version_key(e.version), reverse=True)


def _rows_cell(counts: dict[str, dict[str, int]]) -> str:
    if not counts:
        return "—"
    parts = [
        f"{config}: " + ", ".join(f"{split} {n}" for split, n in splits.items())
        for config, splits in counts.items()
    ]
    return " · ".join(parts)


def render_changelog(
    entries: list[ChangelogEntry], current: str | None = None, legacy_rows: list[str] | None = None
) -> str:
    """The text between the changelog markers: a table (``current`` is the release being committed)
    and the machine-readable data it came from (one JSON object per line in an HTML comment)."""
    lines = [
        "",
        'Releases, newest first. Load one with `load_dataset(REPO, revision="vX.Y.Z")`. The commit of a',
        "release is the one its `vX.Y.Z` tag points to; a commit cannot contain its own sha, so the newest",
        "release reads *this commit* (sha in its tag) and older rows show the sha read from their tag.",
        "",
        "| version | commit | date | rows | recipe sha256 |",
        "|---|---|---|---|---|",
    ]
    for e in entries:
        if e.commit:
            commit = f"`{e.commit[:12]}`"
        elif e.note == "pull request":
            commit = "this pull request (untagged)" if e.version == current else "pull request (untagged)"
        elif e.version == current:
            commit = "this commit" + (f" (parent `{e.parent[:12]}`)" if e.parent else "")
        else:
            commit = "untagged"
        recipe = f"`{e.recipe_sha256[:12]}`" if e.recipe_sha256 else "—"
        lines.append(f"| `v{e.version}` | {commit} | {e.date or '—'} | {_rows_cell(e.counts)} | {recipe} |")
    lines.extend(legacy_rows or [])
    data = [json.dumps(e.to_json(), separators=(",", ":")).replace("-->", "--\\u003e") for e in entries]
    lines += ["", "<!-- changelog:data", *data, "-->", ""]
    return "\n".join(lines)


def build_card(
    local_card: str, *, gated: Gated, old_card: str | None, entry: ChangelogEntry, tags: dict[str, str]
) -> str:
    """The card to publish: the local card, gating metadata, and the changelog carried forward."""
    card = apply_gating(local_card, gated)
    old_entries, legacy = read_changelog(old_card)
    block = render_changelog(merge_changelog(old_entries, entry, tags), entry.version, legacy)
    if CHANGELOG_START in card and CHANGELOG_END in card.split(CHANGELOG_START, 1)[1]:
        head, rest = card.split(CHANGELOG_START, 1)
        tail = rest.split(CHANGELOG_END, 1)[1]
        return f"{head}{CHANGELOG_START}{block}{CHANGELOG_END}{tail}"
    return f"{card.rstrip()}\n\n## Changelog\n\n{CHANGELOG_START}{block}{CHANGELOG_END}\n"


def card_diff(old: str | None, new: str, head: str | None) -> str:
    """Unified diff of the Hub card (empty if none) against the card to publish."""
    source = f"hub/README.md@{head[:12]}" if old is not None and head else "hub/README.md (none)"
    return "".join(
        difflib.unified_diff(
            (old or "").splitlines(keepends=True),
            new.splitlines(keepends=True),
            fromfile=source,
            tofile="new/README.md",
        )
    )


# ------------------------------------------------------------------------------------------------
# Hub access
# ------------------------------------------------------------------------------------------------
def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _http_cause(exc: BaseException) -> BaseException | None:
    """The HTTP error or network error behind ``exc`` (huggingface_hub wraps some, e.g. LFS uploads)."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None or isinstance(seen, (HfHubHTTPError, *_TRANSIENT)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _hub_error(what: str, exc: BaseException, token: str | None) -> PublishError:
    cause = _http_cause(exc) or exc
    status = _status(cause)
    detail = _first_line(exc) + (f" ({_first_line(cause)})" if cause is not exc else "")
    prefix = f"{what} failed" + (f" (HTTP {status})" if status else "")
    return PublishError(_scrub(f"{prefix}: {detail}", token), 1)


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
    except HfHubHTTPError as exc:
        if _status(exc) == 401:
            raise PublishError(
                f"the Hugging Face token was rejected by {api.endpoint} (401 Unauthorized): check "
                "HF_TOKEN or run `hf auth login` again. Nothing was uploaded.",
                1,
            ) from None
        raise _hub_error("checking the token", exc, token) from None
    except _TRANSIENT as exc:
        raise PublishError(f"cannot reach {api.endpoint}: {type(exc).__name__}: {exc}", 1) from None
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


def _check_release(remote: RemoteState, version: str) -> None:
    tag = f"v{version}"
    if tag in remote.tags:
        raise PublishError(
            f"{tag} already exists on the Hub (commit {remote.tags[tag][:12]}); releases are immutable. "
            "Bump the version (nothing was changed).",
            2,
        )
    released = [t for t in remote.tags if _TAG_RE.match(t)]
    if released:
        latest = max(released, key=lambda t: _version_key(t[1:]))
        if _version_key(version) < _version_key(latest[1:]):
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
    local_dirs = {rel.split("/", 1)[0] for rel in local.files if "/" in rel}
    deleted = sorted(
        p for p in remote_files if "/" in p and p.split("/", 1)[0] in local_dirs and p not in local.files
    )
    ops.extend(CommitOperationDelete(path_in_repo=p) for p in deleted)
    return ops, deleted


def _wait_s(exc: BaseException, attempt: int, backoff_s: float) -> float:
    response = getattr(exc, "response", None)
    retry_after = getattr(response, "headers", {}).get("Retry-After") if response is not None else None
    if retry_after:
        try:
            return min(MAX_BACKOFF_S, max(0.0, float(retry_after)))
        except ValueError:
            pass
    return min(MAX_BACKOFF_S, backoff_s * 2 ** (attempt - 1))


def _retryable(exc: BaseException) -> bool:
    cause = _http_cause(exc)
    return cause is not None and (isinstance(cause, _TRANSIENT) or _status(cause) in RETRY_STATUSES)


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
    console: Console | None = None,
    max_attempts: int = 5,
    backoff_s: float = 1.0,
) -> PushResult:
    """Publish a built dataset folder as release ``version`` of the dataset repo ``repo_id``.

    Creates exactly one commit with all files (parent = the current head of main) and tags it
    ``vX.Y.Z``; with ``create_pr`` the commit is opened as a pull request and not tagged; with
    ``dry_run`` it prints the file list and the card diff and writes nothing. ``gated`` ("auto" or
    "manual") gates the repo and adds the gating prompt/fields to the card. A failed commit is
    retried ``max_attempts`` times with exponential backoff starting at ``backoff_s`` seconds.
    Raises PublishError (nothing changed) for an invalid folder or version, a missing/rejected
    token, or an existing tag, and PublishError for Hub failures.
    """
    console = console or Console(stderr=True)
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
    console.print(
        f"[green]✓[/green] token ok (user [bold]{escape(user)}[/bold]); publishing "
        f"[bold]{escape(repo_id)}[/bold] {tag}"
    )

    try:
        if dry_run:
            return _dry_run(api, local, repo_id, version, token=token, gated=gated, url=url, console=console)
        api.create_repo(repo_id, repo_type="dataset", exist_ok=True, private=private, token=token)
        remote = read_remote(api, repo_id, token)
        _check_release(remote, version)
        _apply_settings(api, repo_id, remote, token=token, private=private, gated=gated, console=console)
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
            console=console,
            max_attempts=max_attempts,
            backoff_s=backoff_s,
        )
    except PublishError:
        raise
    except HfHubHTTPError as exc:
        raise _hub_error(f"pushing {repo_id}", exc, token) from None
    except _TRANSIENT as exc:
        message = f"cannot reach {api.endpoint}: {type(exc).__name__}: {exc}"
        raise PublishError(_scrub(message, token), 1) from None


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


def _dry_run(
    api: HfApi,
    local: LocalFolder,
    repo_id: str,
    version: str,
    *,
    token: str,
    gated: Gated,
    url: str,
    console: Console,
) -> PushResult:
    remote = read_remote(api, repo_id, token)
    if remote.exists:
        _check_release(remote, version)
    card = build_card(
        local.card,
        gated=gated,
        old_card=remote.card,
        entry=_new_entry(local, version, remote.head, False),
        tags=remote.tags,
    )
    _, deleted = plan_operations(local, card, remote.files)
    files = [(p, len(card.encode()) if p == "README.md" else s) for p, s in local.files.items()]
    diff = card_diff(remote.card, card, remote.head)
    state = "existing repo" if remote.exists else "new repo"
    table = Table(title=f"dry run: {repo_id} v{version} ({state})")
    table.add_column("file")
    table.add_column("size", justify="right")
    for path, size in files:
        table.add_row(escape(path), _size(size))
    for path in deleted:
        table.add_row(f"[red]delete {escape(path)}[/red]", "")
    console.print(table)
    total = _size(sum(s for _, s in files))
    console.print(
        f"total {total} in {len(files)} files; one commit, then tag v{version}"
        + (f"; gating: {gated}" if gated != "none" else "")
    )
    console.print("[bold]card diff (Hub → new):[/bold]")
    console.print(diff or "(no change)", markup=False, highlight=False)
    console.print("[yellow]dry run: nothing was uploaded[/yellow]")
    return PushResult(
        repo_id=repo_id,
        version=version,
        tag=None,
        commit_sha=None,
        parent_sha=remote.head,
        url=url,
        files=files,
        deleted=deleted,
        card_diff=diff,
        dry_run=True,
    )


def _apply_settings(
    api: HfApi,
    repo_id: str,
    remote: RemoteState,
    *,
    token: str,
    private: bool,
    gated: Gated,
    console: Console,
) -> None:
    """Gate (and make private, if asked) BEFORE data is committed, so it is never briefly open."""
    if gated != "none" and remote.gated != gated:
        api.update_repo_settings(repo_id, gated=gated, repo_type="dataset", token=token)
        console.print(f"[green]✓[/green] gated access: {gated}")
    if private and remote.private is False:
        api.update_repo_settings(repo_id, private=True, repo_type="dataset", token=token)
        console.print("[green]✓[/green] repository made private")


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
    console: Console,
    max_attempts: int,
    backoff_s: float,
) -> PushResult:
    tag = f"v{version}"
    summary = ", ".join(f"{c} {sum(s.values())}" for c, s in local.manifest["counts"].items())
    description = (
        f"bsafe-data {local.manifest.get('package_version', '?')}; recipe sha256 "
        f"{local.manifest.get('recipe_sha256', '?')}; rows: {summary}"
    )
    attempt = 0
    while True:
        attempt += 1
        if attempt > 1:
            remote = read_remote(api, repo_id, token)
            _check_release(remote, version)
        entry = _new_entry(local, version, remote.head, create_pr)
        card = build_card(local.card, gated=gated, old_card=remote.card, entry=entry, tags=remote.tags)
        ops, deleted = plan_operations(local, card, remote.files)
        console.print(
            f"committing {len(local.files)} files"
            + (f" and {len(deleted)} deletions" if deleted else "")
            + f" on top of {(remote.head or '?')[:12]} (attempt {attempt}/{max_attempts})"
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
            cause = _http_cause(exc)
            if cause is None:
                raise
            if not _retryable(exc) or attempt >= max_attempts:
                raise _hub_error(f"commit to {repo_id} (attempt {attempt})", exc, token) from None
            wait = _wait_s(cause, attempt, backoff_s)
            status = _status(cause)
            reason = f"HTTP {status}" if status else type(cause).__name__
            moved = " (the branch moved; re-reading the head)" if status in (409, 412) else ""
            console.print(f"[yellow]commit failed: {reason}{moved}; retrying in {wait:.1f}s[/yellow]")
            time.sleep(wait)

    files = [(p, len(card.encode()) if p == "README.md" else s) for p, s in local.files.items()]
    result = PushResult(
        repo_id=repo_id,
        version=version,
        tag=None,
        commit_sha=info.oid,
        parent_sha=entry.parent,
        url=url,
        commit_url=info.commit_url,
        files=files,
        deleted=deleted,
        card_diff=card_diff(remote.card, card, remote.head),
        attempts=attempt,
    )
    if create_pr:
        result.pr_url = info.pr_url
        console.print(
            f"[green]✓[/green] opened pull request {info.pr_url} (commit {info.oid[:12]}); "
            f"merge it, then tag it {tag}"
        )
        return result
    _create_tag(api, repo_id, tag, info.oid, token=token, max_attempts=max_attempts, backoff_s=backoff_s)
    result.tag = tag
    console.print(f"[green]✓[/green] {repo_id} {tag} → commit {info.oid[:12]} ({url})")
    return result


def _create_tag(
    api: HfApi, repo_id: str, tag: str, sha: str, *, token: str, max_attempts: int, backoff_s: float
) -> None:
    message = f"bsafe-data release {tag}: commit {sha}"
    for attempt in range(1, max_attempts + 1):
        try:
            api.create_tag(
                repo_id, tag=tag, tag_message=message, revision=sha, repo_type="dataset", token=token
            )
            return
        except Exception as exc:
            if isinstance(exc, HfHubHTTPError) and _status(exc) == 409:
                refs = api.list_repo_refs(repo_id, repo_type="dataset", token=token)
                if any(t.name == tag and t.target_commit == sha for t in refs.tags):
                    return  # an earlier attempt created it
                raise PublishError(
                    f"commit {sha} was created but tag {tag} now exists elsewhere; tag the commit by hand", 1
                ) from None
            if not _retryable(exc) or attempt >= max_attempts:
                message = (
                    f"commit {sha} was created but tagging it {tag} failed ({_first_line(exc)}); re-run "
                    "the same push to tag it (the files are already there, nothing is uploaded twice)"
                )
                raise PublishError(_scrub(message, token), 1) from None
            time.sleep(_wait_s(exc, attempt, backoff_s))
