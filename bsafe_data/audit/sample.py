"""Draw an audit set from a built dataset folder.

Rows of both configs (kept and rejected, so false rejections are measured too) are grouped into
strata by any of ``category`` (injection category, ``(clean)`` for clean rows), ``kind``,
``fifth`` (fifth of ``injection.relative_position``, 1..5) and ``config``. First the
``borderline`` fraction is taken from the rows whose classifier scores sit closest to their
threshold (``recipe.yaml`` ``filters.classifiers[].threshold``). The rest balances the marginals:
row by row, the stratum cell is taken whose values lag most behind their targets, each value of
each dimension aiming at a share proportional to the square root of its row count (between
proportional and equal allocation: rare values such as rejected rows or clean rows get a
useful share, large ones do not swamp the set). Then the ``overlap`` fraction of the set is marked for
``replicas`` (2+) annotators, for agreement. All choices come from one seeded RNG over rows in a
fixed order: the same folder and arguments give the same set.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bsafe_data.audit.folder import (
    classifier_thresholds,
    fifth_of,
    iter_rows,
    manifest_sha256,
    threshold_margin,
)
from bsafe_data.audit.questions import group_of
from bsafe_data.audit.store import AuditStore, now_iso

STRATA = ("category", "kind", "fifth", "config")


@dataclass
class SampleResult:
    """What ``sample_audit_set`` stored."""

    db: Path
    items: int
    borderline: int
    overlap: int
    strata: int
    by_config: dict[str, int] = field(default_factory=dict)
    by_group: dict[str, int] = field(default_factory=dict)


def stratum_values(config: str, row: dict[str, Any]) -> dict[str, str]:
    """The value of every stratum dimension for one row."""
    inj = row.get("injection") or {}
    fifth = fifth_of(row)
    return {
        "category": inj.get("category") or "(clean)",
        "kind": row.get("kind") or "clean",
        "fifth": str(fifth) if fifth else "-",
        "config": config,
    }


def sample_audit_set(
    folder: str | Path,
    *,
    n: int = 200,
    strata: tuple[str, ...] | list[str] = STRATA,
    overlap: float = 0.2,
    borderline: float = 0.2,
    borderline_window: float = 0.15,
    replicas: int = 2,
    seed: int = 0,
    db: str | Path | None = None,
    force: bool = False,
) -> SampleResult:
    """Sample ``n`` rows of ``folder`` into an audit store and return a summary.

    ``borderline`` is the fraction of ``n`` taken first from rows with a score within
    ``borderline_window`` of its classifier's threshold (closest first); ``overlap`` the fraction
    of the set judged by ``replicas`` annotators.
    """
    unknown = [s for s in strata if s not in STRATA]
    if unknown:
        raise ValueError(f"unknown strata {unknown}; choose from {', '.join(STRATA)}")
    if not 0 <= overlap <= 1 or not 0 <= borderline <= 1:
        raise ValueError("--overlap and --borderline are fractions between 0 and 1")
    if replicas < 2:
        raise ValueError("--replicas must be at least 2 (the overlap is for agreement)")
    folder = Path(folder)
    manifest = manifest_sha256(folder)
    thresholds = classifier_thresholds(folder)
    rng = random.Random(seed)

    population: list[dict[str, Any]] = []
    for config, split, row in iter_rows(folder):
        values = stratum_values(config, row)
        population.append(
            {
                "row_id": row["id"],
                "config": config,
                "split": split,
                "kind": values["kind"],
                "grp": group_of(config, values["kind"]),
                "category": (row.get("injection") or {}).get("category"),
                "fifth": fifth_of(row),
                "stratum": "|".join(f"{s}={values[s]}" for s in strata) or "all",
                "values": values,
                "margin": threshold_margin(row, thresholds),
                "row": row,
            }
        )
    population.sort(key=lambda r: (r["config"], r["split"], r["row_id"]))
    if not population:
        raise ValueError(f"{folder} has no rows")
    sizes = Counter(r["stratum"] for r in population)
    n = min(n, len(population))

    # 1. borderline oversample: closest to a threshold first, ties in random order
    keys = {id(r): rng.random() for r in population}
    near = [r for r in population if r["margin"] is not None and r["margin"] <= borderline_window]
    near.sort(key=lambda r: (r["margin"], keys[id(r)]))
    chosen = near[: round(n * borderline)]
    for r in chosen:
        r["borderline"] = 1
    taken = {id(r) for r in chosen}

    # 2. balanced marginals: every value of every stratum dimension gets a share that grows with
    #    the square root of its size (between proportional and equal allocation)
    dims = list(strata)
    cells: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in population:
        if id(r) not in taken:
            cells[tuple(r["values"][d] for d in dims)].append(r)
    for rows in cells.values():
        rng.shuffle(rows)
    target: dict[str, dict[str, float]] = {}
    for d in dims:
        sizes_d = Counter(r["values"][d] for r in population)
        total = sum(math.sqrt(c) for c in sizes_d.values())
        target[d] = {v: math.sqrt(c) / total for v, c in sizes_d.items()}
    counts = {d: Counter(r["values"][d] for r in chosen) for d in dims}
    order = sorted(cells)
    rng.shuffle(order)
    while len(chosen) < n:
        k = len(chosen) + 1
        best, best_gain = None, -math.inf
        for cell in order:
            if not cells[cell]:
                continue
            gain = sum(target[d][v] * k - counts[d][v] for d, v in zip(dims, cell, strict=True))
            if gain > best_gain:
                best, best_gain = cell, gain
        if best is None:
            break
        r = cells[best].pop()
        r["borderline"] = 0
        chosen.append(r)
        for d, v in zip(dims, best, strict=True):
            counts[d][v] += 1

    # 3. queue order and the overlap
    rng.shuffle(chosen)
    n_overlap = round(len(chosen) * overlap)
    overlap_ids = {id(r) for r in rng.sample(chosen, n_overlap)}
    items = [
        {
            **{k: r[k] for k in ("row_id", "config", "split", "kind", "grp", "category", "fifth", "stratum")},
            "item_id": i + 1,
            "ord": i,
            "stratum_size": sizes[r["stratum"]],
            "borderline": r["borderline"],
            "margin": r["margin"],
            "replicas": replicas if id(r) in overlap_ids else 1,
            "row": r["row"],
        }
        for i, r in enumerate(chosen)
    ]
    store = AuditStore.for_folder(folder, db, create=True)
    meta = {
        "manifest_sha256": manifest,
        "sampled_at": now_iso(),
        "sample": {
            "n": n,
            "strata": list(strata),
            "overlap": overlap,
            "borderline": borderline,
            "borderline_window": borderline_window,
            "replicas": replicas,
            "seed": seed,
            "thresholds": thresholds,
            "population": len(population),
        },
    }
    store.replace_items(items, meta, force=force)
    return SampleResult(
        db=store.path,
        items=len(items),
        borderline=sum(i["borderline"] for i in items),
        overlap=n_overlap,
        strata=len({i["stratum"] for i in items}),
        by_config=dict(Counter(i["config"] for i in items)),
        by_group=dict(Counter(i["grp"] for i in items)),
    )
