"""Audit figures: answer rates with Wilson intervals, agreement on the overlap, categories,
human-vs-classifier confusion, and a PNG plot.

Units: every live, non-skipped judgement counts once in the rates (an overlap row judged by two
annotators gives two measurements). Agreement uses, per question, the items two or more
annotators answered: Cohen's kappa for each annotator pair (the figure is that kappa with two
annotators, the mean over pairs, Light's kappa, with more) and Krippendorff's alpha (nominal,
any number of annotators). ``unsure`` is a category of its own there and left out of rates.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path
from typing import Any

from bsafe_data.audit.folder import manifest_sha256
from bsafe_data.audit.questions import QUESTIONS, verdict
from bsafe_data.audit.stats import cohen_kappa, krippendorff_alpha_nominal, wilson_interval
from bsafe_data.audit.store import AuditStore, StoreError

#: (target scored by classifiers, question, answer meaning the span is unsafe, groups asked)
_CLASSIFIER_CHECKS = (
    ("violation", "violation_real", "yes"),
    ("part2", "continuation_safe", "no"),
    ("response", "response_safe", "no"),
)


def _rate(yes: int, n: int) -> dict[str, Any]:
    low, high = wilson_interval(yes, n)
    return {"rate": yes / n if n else None, "ci_low": low if n else None, "ci_high": high if n else None}


def _agreement(per_item: dict[int, dict[str, str]]) -> dict[str, Any]:
    """kappa (pairwise), alpha and overlap size for item -> {annotator: label}."""
    shared = {i: labels for i, labels in per_item.items() if len(labels) >= 2}
    annotators = sorted({a for labels in shared.values() for a in labels})
    pairs = []
    for a, b in combinations(annotators, 2):
        both = [(labels[a], labels[b]) for labels in shared.values() if a in labels and b in labels]
        if both:
            kappa = cohen_kappa([x for x, _ in both], [y for _, y in both])
            pairs.append({"a": a, "b": b, "n": len(both), "kappa": kappa})
    defined = [p["kappa"] for p in pairs if p["kappa"] is not None]
    alpha = krippendorff_alpha_nominal([list(labels.values()) for labels in shared.values()])
    return {
        "overlap_items": len(shared),
        "kappa": sum(defined) / len(defined) if defined else None,
        "kappa_pairs": pairs,
        "alpha": alpha,
    }


def audit_report(folder: str | Path, db: str | Path | None = None) -> dict[str, Any]:
    """Every audit figure as a JSON-ready dict (raises StoreError when there is no audit set)."""
    store = AuditStore.for_folder(folder, db)
    items = {i["item_id"]: i for i in store.items(with_rows=True)}
    live = store.judgements()
    judged = [j for j in live if not j["skipped"]]
    try:
        current = manifest_sha256(folder)
    except FileNotFoundError:
        current = None
    meta = store.meta()

    questions = []
    for group, qs in QUESTIONS.items():
        for key, text in qs:
            answers = [j["answers"][key] for j in judged if key in j["answers"]]
            counts = Counter(answers)
            decided = counts["yes"] + counts["no"]
            per_item: dict[int, dict[str, str]] = defaultdict(dict)
            for j in judged:
                if key in j["answers"]:
                    per_item[j["item_id"]][j["annotator"]] = j["answers"][key]
            questions.append(
                {
                    "question": key,
                    "text": text,
                    "group": group,
                    "n": len(answers),
                    "yes": counts["yes"],
                    "no": counts["no"],
                    "unsure": counts["unsure"],
                    **_rate(counts["yes"], decided),
                    **_agreement(per_item),
                }
            )

    verdict_items: dict[int, dict[str, str]] = defaultdict(dict)
    for j in judged:
        verdict_items[j["item_id"]][j["annotator"]] = verdict(j["answers"])

    by_category: dict[str, Counter] = defaultdict(Counter)
    for j in judged:
        item = items[j["item_id"]]
        name = item["category"] or "(clean)"
        if item["config"] == "rejected":
            name = f"{name} [rejected]"
        by_category[name][verdict(j["answers"])] += 1
    categories = []
    for name in sorted(by_category):
        c = by_category[name]
        categories.append(
            {
                "category": name,
                "n": sum(c.values()),
                "good": c["good"],
                "bad": c["bad"],
                "unsure": c["unsure"],
                **_rate(c["good"], c["good"] + c["bad"]),
            }
        )

    pipeline = {d: {"good": 0, "bad": 0, "unsure": 0} for d in ("kept", "rejected")}
    for j in judged:
        decision = "rejected" if items[j["item_id"]]["config"] == "rejected" else "kept"
        pipeline[decision][verdict(j["answers"])] += 1
    rejected_answers = Counter(
        j["answers"].get("rejection_right") for j in judged if "rejection_right" in j["answers"]
    )
    false_rej = rejected_answers["no"]
    decided_rej = rejected_answers["no"] + rejected_answers["yes"]

    thresholds = (meta.get("sample") or {}).get("thresholds") or {}
    classifiers = _classifier_confusion(judged, items, thresholds)

    return {
        "folder": str(folder),
        "db": str(store.path),
        "items": len(items),
        "judgements": len(judged),
        "skipped": len(live) - len(judged),
        "annotators": len({j["annotator"] for j in judged}),
        "manifest_sha256": current,
        "sample_manifest_sha256": meta.get("manifest_sha256"),
        "stale_judgements": sum(1 for j in judged if current and j["manifest_sha256"] != current),
        "sample": meta.get("sample"),
        "questions": questions,
        "verdict_agreement": _agreement(verdict_items),
        "by_category": categories,
        "confusion": {"pipeline": pipeline, "classifiers": classifiers},
        "false_rejections": {"n": decided_rej, "false": false_rej, **_rate(false_rej, decided_rej)},
    }


def _classifier_confusion(
    judged: list[dict[str, Any]], items: dict[int, dict[str, Any]], thresholds: dict[str, float]
) -> list[dict[str, Any]]:
    cells: dict[tuple[str, str, str], Counter] = defaultdict(Counter)
    for j in judged:
        row = items[j["item_id"]]["row"]
        for target, question, unsafe_answer in _CLASSIFIER_CHECKS:
            answer = j["answers"].get(question)
            if answer not in ("yes", "no"):
                continue
            human_unsafe = answer == unsafe_answer
            for s in row.get("scores") or []:
                if s.get("target") != target or s.get("label") == "error":
                    continue
                thr = thresholds.get(s["classifier"])
                clf_unsafe = (
                    float(s["score"]) >= thr
                    if thr is not None and s.get("score") is not None
                    else s.get("label") == "unsafe"
                )
                key = (
                    "both_unsafe"
                    if clf_unsafe and human_unsafe
                    else (
                        "classifier_only" if clf_unsafe else ("human_only" if human_unsafe else "both_safe")
                    )
                )
                cells[(s["classifier"], target, question)][key] += 1
    out = []
    for (clf, target, question), c in sorted(cells.items()):
        n = sum(c.values())
        matrix = {k: c[k] for k in ("both_unsafe", "classifier_only", "human_only", "both_safe")}
        out.append(
            {
                "classifier": clf,
                "target": target,
                "question": question,
                "n": n,
                "matrix": matrix,
                "agreement": (matrix["both_unsafe"] + matrix["both_safe"]) / n if n else None,
            }
        )
    return out


def write_plot(report: dict[str, Any], path: str | Path) -> Path:
    """PNG of the answer rates and the per-category good rates, with Wilson 95% intervals (Agg)."""
    from bsafe_data.plots import pyplot

    plt = pyplot()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    qs = [q for q in report["questions"] if q["rate"] is not None]
    cats = [c for c in report["by_category"] if c["rate"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(11, max(3.0, 0.32 * max(len(qs), len(cats), 4) + 1.2)))
    for ax, entries, label, title in (
        (axes[0], qs, "question", "answer 'yes' rate"),
        (axes[1], cats, "category", "rows judged good"),
    ):
        names = [e[label] for e in entries]
        rates = [e["rate"] for e in entries]
        err = [
            [r - e["ci_low"] for r, e in zip(rates, entries, strict=True)],
            [e["ci_high"] - r for r, e in zip(rates, entries, strict=True)],
        ]
        ys = list(range(len(entries)))
        ax.barh(ys, rates, xerr=err if entries else None, color="#4c78a8", ecolor="#333", capsize=3)
        ax.set_yticks(ys, [f"{n} (n={e['n']})" for n, e in zip(names, entries, strict=True)], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_title(f"{title}, Wilson 95%", fontsize=10)
        if not entries:
            ax.text(0.5, 0.5, "no judgements yet", ha="center", va="center", transform=ax.transAxes)
    kappa = report["verdict_agreement"]["kappa"]
    alpha = report["verdict_agreement"]["alpha"]
    kappa_text = "n/a" if kappa is None else f"{kappa:.2f}"
    alpha_text = "n/a" if alpha is None else f"{alpha:.2f}"
    fig.suptitle(
        f"audit: {report['judgements']} judgements, {report['annotators']} annotators; row verdict "
        f"kappa {kappa_text}, alpha {alpha_text}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def card_section(folder: str | Path) -> dict[str, Any] | None:
    """Figures for a dataset card "Audit" section, or None when the folder has no judged audit set.

    Keys: ``items``, ``judgements``, ``annotators``, ``manifest_sha256``, ``stale_judgements``,
    ``questions`` (question, text, n, rate, ci_low, ci_high, kappa, alpha), ``agreement`` (row
    verdict kappa, alpha, overlap_items), ``by_category`` (category, n, rate, ci_low, ci_high),
    ``pipeline`` (kept/rejected x good/bad/unsure) and ``false_rejections``.
    """
    try:
        report = audit_report(folder)
    except StoreError:
        return None
    if report["judgements"] == 0:
        return None
    return {
        "items": report["items"],
        "judgements": report["judgements"],
        "annotators": report["annotators"],
        "manifest_sha256": report["manifest_sha256"],
        "stale_judgements": report["stale_judgements"],
        "questions": [
            {k: q[k] for k in ("question", "text", "n", "rate", "ci_low", "ci_high", "kappa", "alpha")}
            for q in report["questions"]
            if q["n"]
        ],
        "agreement": {k: report["verdict_agreement"][k] for k in ("kappa", "alpha", "overlap_items")},
        "by_category": [
            {k: c[k] for k in ("category", "n", "rate", "ci_low", "ci_high")} for c in report["by_category"]
        ],
        "pipeline": report["confusion"]["pipeline"],
        "false_rejections": report["false_rejections"],
    }
