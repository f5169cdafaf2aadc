"""Annotator judgements back into the data: which kept rows the annotators rejected.

The maintainer wires this into ``bsafe-data refilter DIR --apply-audit`` and into push; rows it
returns move to config ``rejected`` with reason :data:`REASON` and the returned detail.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Literal

from bsafe_data.audit.folder import default_db_path, kept_row_ids
from bsafe_data.audit.questions import BAD_ANSWER, bad_questions
from bsafe_data.audit.store import AuditStore

#: Reason code for rows rejected by annotators (to be added to ``bsafe_data.rows.REASONS``).
REASON = "annotator_rejected"

Policy = Literal["any", "majority"]


def annotator_rejections(
    folder: str | Path, policy: Policy = "any", *, db: str | Path | None = None
) -> dict[str, str]:
    """Kept rows (config ``default`` now) that annotators judged bad: ``row id -> short detail``.

    A judgement is *bad* when any answer is the bad one (``no`` to a quality question, ``yes``
    to "was the rejection right" for a row since moved back into the data); ``unsure`` is not
    bad; skips do not count. ``any``: one bad judgement rejects the row. ``majority``: more than
    half of the row's judgements are bad (a tie keeps it). Only each annotator's live judgement
    counts (undone and superseded ones do not). No audit store: ``{}``.
    """
    if policy not in ("any", "majority"):
        raise ValueError("policy is 'any' or 'majority'")
    path = Path(db) if db else default_db_path(folder)
    if not path.exists():
        return {}
    store = AuditStore(path)
    kept = kept_row_ids(folder)
    votes: dict[str, list[list[str]]] = defaultdict(list)
    for j in store.judgements():
        if j["skipped"] or j["row_id"] not in kept:
            continue
        votes[j["row_id"]].append(bad_questions(j["answers"]))
    out: dict[str, str] = {}
    for row_id, judged in sorted(votes.items()):
        bad = [qs for qs in judged if qs]
        rejected = len(bad) >= 1 if policy == "any" else 2 * len(bad) > len(judged)
        if rejected:
            questions = sorted({q for qs in bad for q in qs})
            answers = ", ".join(f"{q}={BAD_ANSWER[q]}" for q in questions)
            out[row_id] = f"{len(bad)}/{len(judged)} annotators judged it bad ({answers})"
    return out
