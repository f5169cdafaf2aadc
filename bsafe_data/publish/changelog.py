"""The card text of a release: YAML header, gating metadata, the changelog block and the card diff.

The changelog lists every release newest first (version, commit, date, rows per config and split,
recipe hash). Rows of earlier releases are carried forward from the card on the Hub (machine data in
an HTML comment, one JSON object per line); their commit shas are read from the Hub's ``vX.Y.Z``
tags. A commit cannot contain its own sha, so the row of the release being committed says *this
commit* and names its parent.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

import yaml

from bsafe_data.publish.errors import PublishError

Gated = Literal["none", "auto", "manual"]

CHANGELOG_START = "<!-- changelog:start -->"
CHANGELOG_END = "<!-- changelog:end -->"
_DATA_RE = re.compile(r"<!-- changelog:data\s(.*?)-->", re.S)
_VERSION_RE = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)$")
TAG_RE = re.compile(r"^v(\d+)\.(\d+)\.(\d+)$")
DEFAULT_GATED_PROMPT = (
    "This dataset contains deliberately harmful text for safety research. "
    "By requesting access you agree to use it only to train or evaluate safer models."
)
DEFAULT_GATED_FIELDS = {
    "Affiliation": "text",
    "I agree to use this dataset only for safety research": "checkbox",
}


def parse_version(version: str) -> tuple[int, int, int]:
    """``"1.2.3"`` (or ``"v1.2.3"``) → ``(1, 2, 3)``; PublishError otherwise."""
    match = _VERSION_RE.match(version.strip())
    if not match:
        raise PublishError(f"version {version!r} is not a semantic version X.Y.Z (for example 1.0.0)", 2)
    major, minor, patch = (int(g) for g in match.groups())
    return major, minor, patch


def version_key(version: str) -> tuple[int, int, int]:
    """Sort key of ``"X.Y.Z"``; (-1, -1, -1) for anything else."""
    match = _VERSION_RE.match(version)
    return tuple(int(g) for g in match.groups()) if match else (-1, -1, -1)  # type: ignore[return-value]


def split_front_matter(card: str) -> tuple[dict[str, Any] | None, str, str]:
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
    meta, header, body = split_front_matter(card)
    meta = dict(meta or {})
    if meta.get("extra_gated_prompt") and meta.get("extra_gated_fields"):
        return card
    meta.setdefault("extra_gated_prompt", DEFAULT_GATED_PROMPT)
    meta.setdefault("extra_gated_fields", dict(DEFAULT_GATED_FIELDS))
    dumped = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    return f"---\n{dumped}---\n{body if header else chr(10) + body}"


def add_configs(card: str, configs: list[dict[str, Any]]) -> str:
    """Add (or replace, by ``config_name``) entries of the card header's ``configs`` list."""
    if not configs:
        return card
    meta, header, body = split_front_matter(card)
    meta = dict(meta or {})
    names = {c["config_name"] for c in configs}
    meta["configs"] = [c for c in meta.get("configs") or [] if c.get("config_name") not in names] + configs
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
        """The machine-readable record kept in the card (one JSON object per release)."""
        return asdict(self)

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
        match = TAG_RE.match(tag)
        version = tag[1:]
        if match and version not in entries and version != new.version:
            entries[version] = ChangelogEntry(version, "", {}, None, commit=sha, note="not recorded")
    entries[new.version] = new
    return sorted(entries.values(), key=lambda e: version_key(e.version), reverse=True)


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
    local_card: str,
    *,
    gated: Gated,
    old_card: str | None,
    entry: ChangelogEntry,
    tags: dict[str, str],
    extra_configs: list[dict[str, Any]] | None = None,
) -> str:
    """The card to publish: the local card, gating metadata, configs of files uploaded besides the
    folder's (``extra_configs``), and the changelog carried forward."""
    card = add_configs(apply_gating(local_card, gated), extra_configs or [])
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
