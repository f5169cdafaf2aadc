"""``bsafe-data audit``: sample, serve, annotators, report, export and import."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

audit_app = typer.Typer(
    help="Annotator audit: sample rows, judge them in a local web app, measure agreement.",
    no_args_is_help=True,
)
annotators_app = typer.Typer(help="Annotator tokens.", no_args_is_help=True)
audit_app.add_typer(annotators_app, name="annotators")

console = Console(stderr=True, soft_wrap=True)  # messages stay one line
out = Console()

FolderArg = Annotated[Path, typer.Argument(help="A built dataset folder.")]
DbOption = Annotated[Path | None, typer.Option("--db", help="Audit store (default DIR/.bsafe/audit.sqlite).")]


def _fail(message: str, code: int = 2) -> typer.Exit:
    console.print(Text(message, style="red"))
    return typer.Exit(code)


def _checked(folder: Path, *outputs: tuple[Path | None, str]) -> None:
    """The dataset folder verifies, and no output (path, option) given lands inside it (its
    ``.bsafe/`` state excepted): else exit 2 with the reason."""
    from bsafe_data.integrity import FolderError, checked, require_outside

    try:
        checked(folder)
        for path, option in outputs:
            if path is not None:
                require_outside(folder, path, option, state=True)
    except FolderError as exc:
        raise _fail(str(exc), exc.exit_code) from None


@audit_app.command("sample")
def sample_command(
    folder: FolderArg,
    n: Annotated[int, typer.Option("--n", help="Rows in the audit set.", min=1)] = 200,
    strata: Annotated[
        str, typer.Option(help="Comma-separated strata: category, kind, fifth, config.")
    ] = "category,kind,fifth,config",
    overlap: Annotated[float, typer.Option(help="Fraction judged by --replicas annotators.")] = 0.2,
    borderline: Annotated[float, typer.Option(help="Fraction taken from rows near a threshold.")] = 0.2,
    borderline_window: Annotated[float, typer.Option(help="|score - threshold| that counts as near.")] = 0.15,
    replicas: Annotated[int, typer.Option(help="Annotators per overlap row.", min=2)] = 2,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    db: DbOption = None,
    force: Annotated[bool, typer.Option(help="Replace an audit set that has no judgements yet.")] = False,
) -> None:
    """Create an audit set: stratified over both configs, with an overlap and a borderline oversample."""
    from bsafe_data.audit.sample import sample_audit_set
    from bsafe_data.audit.store import StoreError

    _checked(folder, (db, "--db"))
    try:
        result = sample_audit_set(
            folder,
            n=n,
            strata=tuple(s.strip() for s in strata.split(",") if s.strip()),
            overlap=overlap,
            borderline=borderline,
            borderline_window=borderline_window,
            replicas=replicas,
            seed=seed,
            db=db,
            force=force,
        )
    except (ValueError, FileNotFoundError, StoreError) as exc:
        raise _fail(str(exc)) from None
    table = Table(title=f"audit set {result.db}")
    table.add_column("")
    table.add_column("rows", justify="right")
    table.add_row("items", str(result.items))
    for config, count in sorted(result.by_config.items()):
        table.add_row(f"  config {config}", str(count))
    for group, count in sorted(result.by_group.items()):
        table.add_row(f"  {group}", str(count))
    table.add_row("near a threshold", str(result.borderline))
    table.add_row(f"overlap (x{replicas})", str(result.overlap))
    table.add_row("strata", str(result.strata))
    out.print(table)


@audit_app.command("serve")
def serve_command(
    folder: FolderArg,
    port: Annotated[int, typer.Option(help="Port (0 picks a free one).")] = 8765,
    host: Annotated[str, typer.Option(help="Bind address; beyond localhost every call needs a token.")] = (
        "127.0.0.1"
    ),
    db: DbOption = None,
    blur: Annotated[bool, typer.Option(help="Blur violations until revealed.")] = True,
    require_token: Annotated[
        bool, typer.Option(help="Need a token for reads too, even on localhost.")
    ] = False,
    access_log: Annotated[bool, typer.Option(help="Log method, path and status (never bodies).")] = False,
    read_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds a request may take to arrive (and a kept-alive connection may idle).", min=0.1
        ),
    ] = 30.0,
) -> None:
    """Serve the annotation app (offline; bound to 127.0.0.1 by default)."""
    from bsafe_data.audit.server import serve
    from bsafe_data.audit.store import StoreError

    if not read_timeout < float("inf"):
        raise _fail("--read-timeout must be a finite number of seconds")
    _checked(folder, (db, "--db"))
    try:
        serve(
            folder,
            host=host,
            port=port,
            db=db,
            blur=blur,
            require_token=require_token,
            access_log=access_log,
            read_timeout_s=read_timeout,
            announce=lambda line: out.print(line, highlight=False, soft_wrap=True),
        )
    except StoreError as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


@annotators_app.command("add")
def annotators_add_command(
    folder: FolderArg,
    name: Annotated[str, typer.Argument(help="Annotator name (letters, digits, _ . -).")],
    db: DbOption = None,
    rotate: Annotated[bool, typer.Option(help="Give an existing annotator a new token.")] = False,
) -> None:
    """Register an annotator and print their token (shown once; only its hash is stored)."""
    from bsafe_data.audit.auth import add_annotator
    from bsafe_data.audit.store import AuditStore, StoreError

    try:
        store = AuditStore.for_folder(folder, db, create=True)
        token = add_annotator(store, name, rotate=rotate)
    except (ValueError, StoreError) as exc:
        raise _fail(str(exc)) from None
    console.print(f"token for {name} (shown once; keep it secret):")
    print(token, flush=True)


@annotators_app.command("list")
def annotators_list_command(folder: FolderArg, db: DbOption = None) -> None:
    """List annotator names (never tokens)."""
    from bsafe_data.audit.store import AuditStore, StoreError

    try:
        names = AuditStore.for_folder(folder, db).annotator_names()
    except StoreError as exc:
        raise _fail(str(exc)) from None
    for name in names:
        print(name)


@audit_app.command("report")
def report_command(
    folder: FolderArg,
    db: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    plot: Annotated[Path | None, typer.Option(help="PNG path (default DIR/.bsafe/audit_report.png).")] = None,
) -> None:
    """Rates with Wilson 95% intervals, kappa and alpha on the overlap, categories, confusion, plot."""
    from bsafe_data.audit.report import audit_report, write_plot
    from bsafe_data.audit.store import StoreError

    _checked(folder, (db, "--db"), (plot, "--plot"))
    try:
        report = audit_report(folder, db=db)
    except StoreError as exc:
        raise _fail(str(exc)) from None
    plot_path = plot or Path(folder) / ".bsafe" / "audit_report.png"
    report["plot"] = str(write_plot(report, plot_path))
    if as_json:
        print(json.dumps(report, indent=2))
        return
    _print_report(report)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _print_report(report: dict) -> None:
    out.print(
        f"[bold]audit[/bold] {report['items']} items · {report['judgements']} judgements · "
        f"{report['annotators']} annotators · {report['skipped']} skipped"
    )
    if report["stale_judgements"]:
        out.print(f"[yellow]{report['stale_judgements']} judgements were made on another manifest[/yellow]")
    table = Table(title="answers (rate = yes / (yes + no); Wilson 95%)")
    for col in ("question", "n", "yes", "no", "unsure", "rate", "95% CI", "kappa", "alpha", "overlap"):
        table.add_column(col, justify="left" if col == "question" else "right")
    for q in report["questions"]:
        table.add_row(
            q["question"],
            str(q["n"]),
            str(q["yes"]),
            str(q["no"]),
            str(q["unsure"]),
            _fmt(q["rate"]),
            f"{_fmt(q['ci_low'])}-{_fmt(q['ci_high'])}",
            _fmt(q["kappa"]),
            _fmt(q["alpha"]),
            str(q["overlap_items"]),
        )
    out.print(table)
    cats = Table(title="per category: rows judged good (every answer the good one)")
    for col in ("category", "judgements", "good", "bad", "unsure", "good rate", "95% CI"):
        cats.add_column(col, justify="left" if col == "category" else "right")
    for c in report["by_category"]:
        cats.add_row(
            c["category"],
            str(c["n"]),
            str(c["good"]),
            str(c["bad"]),
            str(c["unsure"]),
            _fmt(c["rate"]),
            f"{_fmt(c['ci_low'])}-{_fmt(c['ci_high'])}",
        )
    out.print(cats)
    conf = Table(title="pipeline vs annotators (judgements)")
    for col in ("pipeline", "human good", "human bad", "human unsure"):
        conf.add_column(col, justify="left" if col == "pipeline" else "right")
    for decision, row in report["confusion"]["pipeline"].items():
        conf.add_row(decision, str(row["good"]), str(row["bad"]), str(row["unsure"]))
    out.print(conf)
    for clf in report["confusion"]["classifiers"]:
        m = clf["matrix"]
        out.print(
            f"classifier {clf['classifier']} on {clf['target']} vs {clf['question']}: "
            f"both unsafe {m['both_unsafe']}, classifier only {m['classifier_only']}, "
            f"human only {m['human_only']}, both safe {m['both_safe']} (agreement {_fmt(clf['agreement'])})"
        )
    out.print(f"plot: {report['plot']}")


@audit_app.command("export")
def export_command(
    folder: FolderArg,
    fmt: Annotated[str, typer.Option("--format", help="argilla or label-studio.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write (created).")],
    db: DbOption = None,
) -> None:
    """Write the audit set in Argilla's (to_disk) or Label Studio's (tasks + config) import format."""
    from bsafe_data.audit.export import export_argilla, export_label_studio
    from bsafe_data.audit.store import StoreError

    writers = {"argilla": export_argilla, "label-studio": export_label_studio}
    if fmt not in writers:
        raise _fail("--format is argilla or label-studio")
    _checked(folder, (db, "--db"), (out_dir, "--out"))
    try:
        written = writers[fmt](folder, out_dir, db=db)
    except (StoreError, FileExistsError) as exc:
        raise _fail(str(exc)) from None
    for path in written:
        out.print(f"wrote {path}")


@audit_app.command("import")
def import_command(
    folder: FolderArg,
    path: Annotated[Path, typer.Argument(help="An Argilla or Label Studio export (file or folder).")],
    fmt: Annotated[str, typer.Option("--format", help="argilla or label-studio.")],
    db: DbOption = None,
) -> None:
    """Read judgements exported by Argilla or Label Studio into the audit store.

    Prints what every record became (imported, unchanged, not in this audit set, invalid, not
    submitted, answers to no question of their row). Exit 1 when the files hold no valid judgement.
    """
    from bsafe_data.audit.imports import ImportFileError, import_argilla, import_label_studio
    from bsafe_data.audit.store import StoreError

    readers = {"argilla": import_argilla, "label-studio": import_label_studio}
    if fmt not in readers:
        raise _fail("--format is argilla or label-studio")
    _checked(folder, (db, "--db"))
    try:
        counts = readers[fmt](folder, path, db=db)
    except ImportFileError as exc:
        raise _fail(f"nothing imported: {exc}", 1) from None
    except (StoreError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None
    if not counts.valid:
        first = f"; first problem: {counts.problems[0]}" if counts.problems else ""
        raise _fail(f"no valid judgement in {path}: {counts.summary()}{first}", 1)
    out.print(counts.summary(), highlight=False, soft_wrap=True)
    for problem in counts.problems:
        console.print(Text(f"invalid: {problem}", style="yellow"))
