"""``bsafe-data refilter`` and ``bsafe-data stats``: thin commands over ``refilter`` and ``stats``.

Registered by ``bsafe_data.cli._register_optional_commands``.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

console = Console(stderr=True, soft_wrap=True)  # messages stay one line
out = Console()


class AuditPolicy(str, Enum):
    """How many bad judgements reject a row."""

    any = "any"
    majority = "majority"


FolderArg = Annotated[Path, typer.Argument(help="A built dataset folder.")]


def _funnel_table(title: str, funnel: dict, before: dict | None = None) -> Table:
    from bsafe_data.stats import funnel_rules

    table = Table(title=title)
    table.add_column("stage / rule")
    if before is not None:
        table.add_column("before", justify="right")
    table.add_column("rows", justify="right")
    table.add_column("rows the rule failed", justify="right")

    def add(label: str, key: str) -> None:
        cells = [label]
        if before is not None:
            cells.append(str(before.get(key, "")))
        table.add_row(*cells, str(funnel.get(key, "")), "")

    add("source rows", "source_rows")
    add("rows considered", "rows")
    add("[green]kept[/green]", "kept")
    add("[red]rejected[/red]", "rejected")
    old_first = (before or {}).get("rejected_by_reason", {})
    reasons = funnel_rules(funnel)
    known = {r for r, _, _ in reasons}
    reasons += [(r, 0, 0) for r, _, _ in funnel_rules(before or {}) if r not in known]
    for reason, first, hits in reasons:
        cells = [f"  {reason}"]
        if before is not None:
            cells.append(str(old_first.get(reason, 0)))
        table.add_row(*cells, str(first), str(hits))
    return table


def refilter_command(
    folder: FolderArg,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a filters field: filters.a.b=value (YAML). Repeatable."),
    ] = None,
    apply_audit: Annotated[
        bool,
        typer.Option(
            "--apply-audit",
            help="Also move the kept rows annotators judged bad (DIR/.bsafe audit) to `rejected`.",
        ),
    ] = False,
    audit_policy: Annotated[
        AuditPolicy,
        typer.Option(help="With --apply-audit: reject on any bad judgement or on a majority of them."),
    ] = AuditPolicy.any,
) -> None:
    """Re-apply changed filter rules to the recorded scores (no classifier call); rewrite the folder."""
    from bsafe_data.integrity import FolderError
    from bsafe_data.refilter import RefilterError, refilter

    try:
        result = refilter(folder, set_ or [], audit=audit_policy.value if apply_audit else None)
    except (RefilterError, FolderError) as exc:
        console.print(Text(str(exc), style="red"))
        raise typer.Exit(2) from None
    out.print(_funnel_table(f"refiltered {folder}", result.after, result.before))
    out.print(
        f"{result.newly_rejected} row(s) newly rejected, {result.newly_kept} newly kept, "
        f"{result.relabeled} relabelled; 0 classifier requests; {result.seconds:.1f} s"
    )
    if apply_audit:
        out.print(
            f"{result.annotator_rejected} row(s) rejected by annotators "
            f"(policy {audit_policy.value}, reason annotator_rejected)"
        )


def stats_command(
    folder: FolderArg,
    plots: Annotated[
        Path | None,
        typer.Option(help="Also write the score histograms (scores_*.png) into this folder."),
    ] = None,
) -> None:
    """Funnel per rule and score distributions of a built folder (read only); --plots: PNG histograms."""
    from bsafe_data.executor.output import os_error_message
    from bsafe_data.integrity import FolderError
    from bsafe_data.stats import stats

    try:
        report = stats(folder, plots_dir=plots)
    except FolderError as exc:
        console.print(Text(str(exc), style="red"))
        raise typer.Exit(exc.exit_code) from None
    except OSError as exc:  # the plots folder cannot be written
        console.print(Text(os_error_message(exc, f"writing plots to {plots}"), style="red"))
        raise typer.Exit(1) from None
    out.print(_funnel_table(f"funnel of {folder}", report["funnel"]))
    table = Table(title="classifier scores (all rows, kept and rejected)")
    for column in ("classifier", "target", "scored", "errors", "mean", "threshold", "≥ threshold"):
        table.add_column(column, justify="left" if column in ("classifier", "target") else "right")
    for s in report["scores"]:
        mean = float(s.scores.mean()) if len(s.scores) else 0.0
        share = f"{s.flagged} ({100.0 * s.flagged / len(s.scores):.0f}%)" if len(s.scores) else "0"
        threshold = "-" if s.threshold is None else f"{s.threshold:g}"
        table.add_row(
            s.classifier, s.target, str(len(s.scores)), str(s.errors), f"{mean:.3f}", threshold, share
        )
    out.print(table)
    for plot in report["plots"]:
        out.print(f"wrote {plot}", soft_wrap=True, highlight=False)
