"""The ``bsafe-data`` command line: parses arguments and prints; the library does the work."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperCommand, TyperGroup, TyperOption

# "PyTorch was not found" is expected (tokenizers only): keep transformers' import-time notice quiet.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from bsafe_data.recipe import Recipe, RecipeError
from bsafe_data.registry import load_recipe, recipe_json_schema
from bsafe_data.rows import ROW_KINDS, row_json_schema
from bsafe_data.terminal import one_line, safe

app = typer.Typer(
    help="Build, verify and publish backtracking safety training data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True, soft_wrap=True)  # messages stay one line (no wrapping)
out = Console(soft_wrap=True)

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe field: a.b=value (value parsed as YAML). Repeatable."),
]
RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.")]

SEGMENT_STYLES = {
    "prefix": "default",
    "steering": "bold yellow",
    "violation": "bold white on red",
    "control": "bold black on cyan",
    "continuation": "green",
}


def _fail(message: str, code: int = 2) -> typer.Exit:
    console.print(Text(message, style="red"))
    return typer.Exit(code)


def _load(recipe_path: Path, overrides: list[str] | None) -> Recipe:
    try:
        return load_recipe(recipe_path, overrides or [])
    except RecipeError as exc:
        raise _fail(str(exc)) from None


@app.command()
def validate(recipe: RecipeArg, set_: SetOption = None) -> None:
    """Check a recipe (a build's or an eval's); list every problem with its field path and YAML
    line (exit 2 if any)."""
    from bsafe_data.eval.recipe import load_any_recipe

    try:
        loaded = load_any_recipe(recipe, set_ or [])
    except RecipeError as exc:
        raise _fail(str(exc)) from None
    out.print(
        f"[green]ok[/green] {recipe}: recipe {loaded.name!r} {loaded.version} (sha256 {loaded.sha256()[:12]})"
    )


@app.command()
def schema(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the schema files.")] = Path("schemas"),
    check: Annotated[bool, typer.Option(help="Exit 1 if the files on disk are stale.")] = False,
) -> None:
    """Write schemas/recipe.schema.json, schemas/eval.schema.json and schemas/row.schema.json from
    the models."""
    from bsafe_data.eval.recipe import eval_json_schema

    wanted = {
        "recipe.schema.json": json.dumps(recipe_json_schema(), indent=2) + "\n",
        "eval.schema.json": json.dumps(eval_json_schema(), indent=2) + "\n",
        "row.schema.json": json.dumps(row_json_schema(), indent=2) + "\n",
    }
    stale = [n for n, t in wanted.items() if not (out_dir / n).exists() or (out_dir / n).read_text() != t]
    if check:
        if stale:
            raise _fail(f"stale schema files: {', '.join(stale)} (run `bsafe-data schema`)", 1)
        out.print("schemas are up to date")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in wanted.items():
        (out_dir / name).write_text(text)
        out.print(f"wrote {out_dir / name}")


@app.command()
def build(
    recipe: RecipeArg,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Output folder (default: recipe output.dir).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N source rows.", min=1)] = None,
    source: Annotated[
        str | None, typer.Option(help="Replace the recipe's sources with one corpus (path or HF dataset id).")
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="LLM response cache folder.")] = None,
    push: Annotated[
        bool, typer.Option("--push", help="Publish after the build (repo and version from `publish:`).")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace a folder an earlier build of another recipe made.")
    ] = False,
    allow_empty: Annotated[
        bool, typer.Option("--allow-empty", help="Write the dataset even when it keeps no row.")
    ] = False,
    batch_export: Annotated[
        Path | None,
        typer.Option(
            help="Write the LLM calls as Batch JSONL to FILE (for vllm run-batch), then stop (exit 4)."
        ),
    ] = None,
    batch_import: Annotated[
        Path | None, typer.Option(help="Answer LLM calls from FILE, an offline engine's Batch output JSONL.")
    ] = None,
    set_: SetOption = None,
) -> None:
    """Build a dataset folder from a recipe (resumes a killed run from its finished chunks).

    Exit codes: 0 built; 1 the build failed (message says why, the previous dataset is intact);
    2 bad recipe or arguments; 3 built but incomplete: some rows failed for a transient reason
    (endpoint errors, expired batch lines) and a re-run retries exactly those; 4 stopped by the
    answer check: the generator's first answers are mostly unusable (the message says how to go on
    anyway); 5 stopped after --batch-export wrote the calls: run them offline, then re-run with
    --batch-import.
    """
    from bsafe_data.formats import output_dir
    from bsafe_data.llm.breaker import QualityStop
    from bsafe_data.pipeline import BuildError, BuildStopped
    from bsafe_data.pipeline import build as run_build
    from bsafe_data.sources import SourceError, spec_from_cli

    loaded = _load(recipe, set_)
    if batch_import is not None and not batch_import.is_file():
        raise _fail(f"--batch-import {batch_import}: no such file")
    if source:
        try:
            loaded.sources = [spec_from_cli(source)]
        except SourceError as exc:
            raise _fail(str(exc)) from None
    if push and not (loaded.publish.repo and loaded.publish.version):
        raise _fail("--push needs publish.repo and publish.version in the recipe (or --set publish.repo=…)")
    target = out_dir or Path(output_dir(loaded.output.dir, loaded.name))  # validated template
    with _BuildDisplay() as display:
        try:
            result = run_build(
                loaded,
                target,
                limit=limit,
                cache_dir=cache_dir,
                progress=display.update,
                force=force,
                allow_empty=allow_empty,
                batch_export=batch_export,
                batch_import=batch_import,
            )
        except BuildStopped as exc:
            raise _fail(f"build stopped: {exc}", 5) from None
        except QualityStop as exc:  # the sample only here, on the user's terminal: never in a file
            console.print(Text(f"build stopped: {safe(exc.message).removeprefix('stopped: ')}", style="red"))
            reason, _, answer = exc.sample.partition(": ")
            console.print(Text(f"sample answer ({one_line(reason)}): {one_line(answer)}", style="yellow"))
            raise typer.Exit(exc.exit_code) from None
        except BuildError as exc:
            raise _fail(f"build failed: {exc}", 1) from None
    for note in result.notes:
        console.print(Text(safe(note), style="yellow"))
    _print_summary(result)
    if result.incomplete:
        console.print(
            Text(
                f"incomplete: {result.incomplete} row(s) failed for a transient reason (see `rejected`, "
                "reasons generator_error/classifier_error); re-run the same command to retry exactly those",
                style="yellow",
            )
        )
        if push:
            raise _fail("not pushing an incomplete build", 3)
        raise typer.Exit(3)
    if push:
        from bsafe_data.publish import PublishError, push_dataset
        from bsafe_data.publish.cli import event_printer

        spec = loaded.publish
        try:
            pushed = push_dataset(
                target,
                spec.repo,
                spec.version,
                private=spec.private,
                gated=spec.gated,
                on_event=event_printer(console),
            )
        except PublishError as exc:
            raise _fail(f"push failed: {exc}", 1) from None
        out.print(f"published {pushed.repo_id} {pushed.tag} (commit {pushed.commit_sha}): {pushed.url}")


class _BuildDisplay:
    """A build's progress: source rows (with a total and an ETA when the source's size is known),
    and a line per endpoint: requests done, in flight, queued, failed, cache hits, and any wait
    under way (what, how long)."""

    def __init__(self) -> None:
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        self.progress = Progress(*columns, console=console, transient=False)
        self.rows = self.progress.add_task("building", total=None, info="")
        self.endpoints: dict[str, TaskID] = {}
        self.waits: dict[str, float] = {}  # role -> when the last wait reported ends (monotonic)
        self.batch_states: dict[str, str] = {}  # role -> the batch states last reported

    def __enter__(self) -> _BuildDisplay:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def update(self, state: Any) -> None:
        """Show a ``pipeline.BuildProgress``."""
        progress = self.progress
        elapsed = progress.tasks[self.rows].elapsed or 1e-9
        info = f"{state.rows / elapsed:,.0f} rows/s · kept {state.kept:,} · rejected {state.rejected:,}"
        progress.update(self.rows, total=state.total, completed=state.source_rows, info=info)
        for role, counters in state.endpoints.items():
            task = self.endpoints.get(role)
            if task is None:
                task = self.endpoints[role] = progress.add_task(escape(safe(role)), total=None, info="")
            line = (
                f"{escape(safe(counters['url']))}: {counters['done']:,} done · {counters['in_flight']}/"
                f"{counters['concurrency']} in flight · {counters['queued']:,} queued · "
                f"{counters['failed']:,} failed · {counters['cache_hits']:,} cached"
            )
            if counters.get("batch_open") or counters.get("batch_parked"):
                line += (
                    f" · batches: {escape(counters.get('batch_states') or 'none open')}, "
                    f"{counters.get('batch_done', 0):,}/{counters.get('batch_lines', 0):,} lines done, "
                    f"{counters.get('batch_parked', 0):,} to submit"
                )
                self._log_batches(role, counters)
            if counters.get("wait"):
                what, seconds = counters["wait"]
                line += f" · [yellow]waiting {seconds:,.0f} s: {escape(safe(what))}[/yellow]"
                self._log_wait(role, what, seconds)
            progress.update(task, completed=counters["done"], info=line)

    def _log_batches(self, role: str, counters: dict[str, Any]) -> None:
        """A line when the batches' states change (also where the bar is not redrawn)."""
        states = counters.get("batch_states") or "none open"
        if self.batch_states.get(role) != states:
            self.batch_states[role] = states
            line = f"{safe(role)}: batches {safe(states)} ({counters.get('batch_lines', 0):,} lines)"
            self.progress.console.print(Text(line, style="cyan"))

    def _log_wait(self, role: str, what: str, seconds: float) -> None:
        """A line for each new long wait (also where the bar is not redrawn: logs, CI)."""
        ends = time.monotonic() + seconds
        if ends > self.waits.get(role, 0.0) + 1.0:
            self.waits[role] = ends
            self.progress.console.print(
                Text(f"{safe(role)}: waiting {seconds:,.0f} s ({safe(what)})", style="yellow")
            )


def _print_summary(result) -> None:  # noqa: ANN001 - BuildResult, imported lazily
    funnel = result.funnel
    table = Table(title=f"built {result.out_dir}", show_header=True)
    table.add_column("stage")
    table.add_column("rows", justify="right")
    table.add_row("source rows", str(funnel["source_rows"]))
    table.add_row("rows considered", str(funnel["rows"]))
    table.add_row("[green]kept[/green]", str(funnel["kept"]))
    for kind, n in funnel["kept_by_kind"].items():
        table.add_row(f"  kept {kind}", str(n))
    table.add_row("[red]rejected[/red]", str(funnel["rejected"]))
    for reason, n in funnel["rejected_by_reason"].items():
        table.add_row(f"  {reason}", str(n))
    out.print(table)
    total = result.timings.get("total", 0) or 1e-9
    resumed = f", {result.resumed_chunks} chunk(s) resumed" if result.resumed_chunks else ""
    out.print(
        f"{funnel['rows']:,} rows from {funnel['source_rows']:,} source rows in {total:.1f} s "
        f"({funnel['rows'] / total:,.0f} rows/s){resumed}"
    )


@app.command()
def show(
    folder: Annotated[Path, typer.Argument(help="A built dataset folder.")],
    n: Annotated[int, typer.Option("--n", help="How many rows.", min=1)] = 3,
    config: Annotated[str, typer.Option(help="default or rejected.")] = "default",
    split: Annotated[
        str | None, typer.Option(help="train or test (default: train; test when all kept rows are there).")
    ] = None,
    kind: Annotated[str | None, typer.Option(help="Only rows of this kind (injected/clean).")] = None,
) -> None:
    """Print rows with the segments coloured (violation, control and continuation distinct)."""
    import pyarrow.parquet as pq

    from bsafe_data.integrity import FolderError, checked

    if config not in ("default", "rejected"):
        raise _fail(f"--config must be default or rejected, not {config!r}")
    if kind is not None and kind not in ROW_KINDS:
        raise _fail(f"--kind must be one of {', '.join(ROW_KINDS)}, not {kind!r}")
    try:
        checked(folder)
    except FolderError as exc:
        raise _fail(str(exc), exc.exit_code) from None
    sub = "data" if config == "default" else config
    files: list[Path] = []
    for name in [split] if split else ["train", "test"]:  # a build may keep rows in test only
        files = files or sorted((folder / sub).glob(f"{name}-*.parquet"))
    if not files:
        raise _fail(f"no {config}/{split or 'train'} parquet files under {folder}")
    shown = 0
    for path in files:
        for row in pq.read_table(path).to_pylist():
            if kind and row["kind"] != kind:
                continue
            _print_row(row)
            shown += 1
            if shown >= n:
                return


def _print_row(row: dict) -> None:
    header = Text(f"── {safe(row['id'])} · {safe(row['kind'])}", style="bold")
    if row.get("injection"):
        inj = row["injection"]
        x = ", ".join(f"{safe(b['tokenizer'])}={b['tokens']}" for b in row["backtrack"])
        header.append(f" · {safe(inj['category'])} · pos {inj['relative_position']:.2f} · X {x}")
    if row.get("reasons"):
        header.append(f" · reasons {safe(', '.join(row['reasons']))}", style="red")
        if row.get("detail"):
            header.append(f" ({safe(row['detail'])})", style="red")
    out.print(header)
    for turn in row["context"]:
        out.print(Text(f"{safe(turn['role'])}: ", style="dim") + Text(safe(turn["content"])))
    stream = Text("assistant: ", style="dim")
    for seg in row["segments"]:  # Text: no markup parsing
        stream.append(safe(seg["text"]), style=SEGMENT_STYLES.get(seg["kind"], "default"))
    out.print(stream)
    out.print()


@app.command()
def verify(folder: Annotated[Path, typer.Argument(help="A built dataset folder.")]) -> None:
    """Check a dataset folder against its manifest: file hashes, no undeclared file, schema, funnel."""
    from bsafe_data.integrity import verify as verify_folder

    result = verify_folder(folder)
    if not result.ok:
        for problem in result.problems:
            console.print(Text(f"{folder}: {safe(problem)}", style="red"))
        raise typer.Exit(1)
    out.print(f"[green]ok[/green] {folder}: {len(result.files)} files match manifest.json")


@app.command()
def rerender(
    folder: Annotated[Path, typer.Argument(help="A built dataset folder.")],
    tokenizer: Annotated[str, typer.Option(help="builtin:NAME, a tokenizer folder or a Hub id.")],
    out_dir: Annotated[Path, typer.Option("--out", help="The new dataset folder (new or empty).")],
    num_proc: Annotated[int | None, typer.Option(help="Worker processes.", min=1)] = None,
) -> None:
    """Re-render the kept rows for another tokenizer into a new verified folder (no model call)."""
    from bsafe_data.integrity import FolderError
    from bsafe_data.label import ControlTokenError
    from bsafe_data.rerender import RerenderFolderError, rerender_folder

    try:
        result = rerender_folder(folder, tokenizer, out_dir, num_proc=num_proc)
    except FolderError as exc:
        raise _fail(str(exc), exc.exit_code) from None
    except (RerenderFolderError, ControlTokenError) as exc:
        raise _fail(str(exc)) from None
    dropped = ", ".join(f"{n} {reason}" for reason, n in result.dropped.items()) or "none"
    out.print(
        f"[green]wrote[/green] {out_dir}: {result.funnel['kept']} kept, {result.funnel['rejected']} rejected "
        f"rows for {tokenizer}; dropped: {dropped}; {len(result.control_tokens)} control atoms; "
        "0 model requests"
    )


@app.command()
def plan(
    recipe: RecipeArg,
    limit: Annotated[int | None, typer.Option(help="Only the first N source rows.", min=1)] = None,
    latency: Annotated[float, typer.Option(help="Assumed seconds per LLM request.", min=0.001)] = 2.0,
    set_: SetOption = None,
) -> None:
    """Before spending anything: requests, tokens, cost and wall time, plus three sample rows (an
    eval recipe: generations per model and attack, and the requests the cache does not hold)."""
    from bsafe_data.eval.recipe import EvalRecipe, load_any_recipe
    from bsafe_data.plan import plan_build

    try:
        any_recipe = load_any_recipe(recipe, set_ or [])
    except RecipeError as exc:
        raise _fail(str(exc)) from None
    if isinstance(any_recipe, EvalRecipe):
        from bsafe_data.eval.cli import plan_table
        from bsafe_data.eval.plan import plan_eval

        try:
            planned = plan_eval(any_recipe, limit=limit)
        except Exception as exc:  # unreadable prompt file or tokenizer: readable message, no traceback
            raise _fail(f"plan failed: {exc}", 2) from None
        out.print(plan_table(planned, any_recipe.name))
        return
    loaded = any_recipe
    try:
        result = plan_build(loaded, limit=limit, latency_s=latency)
    except Exception as exc:  # unreadable source or tokenizer: readable message, no traceback
        raise _fail(f"plan failed: {exc}", 1) from None
    table = Table(title=f"plan for {loaded.name} ({loaded.generator.provider} / {loaded.generator.model})")
    table.add_column("item")
    table.add_column("estimate", justify="right")
    table.add_row("source rows", f"{result.source_rows:,}")
    table.add_row("rejected before generation", f"{result.rejected_before_generation:,}")
    table.add_row("generator requests (before refusal retries)", f"{result.requests:,}")
    table.add_row(f"input tokens ({loaded.tokenizers.primary})", f"{result.input_tokens:,}")
    table.add_row(
        "output tokens (estimate / max)", f"{result.output_tokens_estimate:,} / {result.output_tokens_max:,}"
    )
    if result.cost_usd is None:
        table.add_row("estimated cost", "no price table in recipe")
    else:
        mode, batch = loaded.generator.mode, loaded.batch
        online = "estimated cost, online" + (" (recipe)" if mode == "online" else "")
        table.add_row(online, f"${result.cost_usd:,.2f}")
        batched = f"estimated cost, batch ({batch.discount:.0%} of online, within {batch.completion_window})"
        table.add_row(batched + (" (recipe)" if mode == "batch" else ""), f"${result.cost_batch_usd:,.2f}")
    wall = (
        "offline, no requests" if loaded.generator.provider == "builtin" else f"{result.wall_seconds:,.0f} s"
    )
    table.add_row(f"wall time (limited by {result.bottleneck}, {latency:g} s/request)", wall)
    out.print(table)
    out.print("[bold]sample rows (builtin generator):[/bold]")
    for row in result.samples:
        _print_row(row)


batches_app = typer.Typer(
    help="The Batch API batches of a build (endpoints in batch mode).", no_args_is_help=True
)
app.add_typer(batches_app, name="batches")
BuildDirArg = Annotated[Path, typer.Argument(help="The build's output folder (--out).")]


def _batch_folder(folder: Path) -> Path:
    from bsafe_data.executor.output import OutputFolder
    from bsafe_data.pipeline import BATCH_DIR

    return OutputFolder(folder, "").work / BATCH_DIR


@batches_app.command("list")
def batches_list(folder: BuildDirArg) -> None:
    """Each batch of the build in FOLDER: id, endpoint, state and line counts (open ones asked anew)."""
    from bsafe_data.llm.batch import list_batches

    states = list_batches(_batch_folder(folder))
    if not states:
        out.print(f"no batches: {folder} has no build in progress with endpoints in batch mode")
        return
    table = Table(title=f"batches of {folder}")
    for column in ("batch", "endpoint", "role", "state", "lines", "done", "failed"):
        table.add_column(column)
    for state in states:
        counts = state.counts
        table.add_row(
            escape(safe(state.batch_id or "(not submitted)")),
            escape(safe(state.endpoint)),
            escape(safe(state.role)),
            escape(safe(state.status)) + (" (read)" if state.done else ""),
            f"{len(state.custom_ids):,}",
            f"{counts.get('completed', 0):,}",
            f"{len(state.failed) if state.done else counts.get('failed', 0):,}",
        )
    out.print(table)


@batches_app.command("cancel")
def batches_cancel(folder: BuildDirArg) -> None:
    """Cancel the open batches of the build in FOLDER; a running build stops, and its next run keeps
    the answers that came and submits the rest again."""
    from bsafe_data.llm.batch import cancel_batches

    done = cancel_batches(_batch_folder(folder))
    if not done:
        out.print(f"no open batches in {folder}")
        return
    for state, what in done:
        out.print(f"{escape(safe(state.batch_id or '?'))} ({escape(safe(state.role))}): {escape(safe(what))}")


cache_app = typer.Typer(help="Inspect and prune the LLM response cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
CacheDirOption = Annotated[Path | None, typer.Option(help="Cache folder (default ~/.cache/bsafe-data).")]


@cache_app.command("stats")
def cache_stats_command(cache_dir: CacheDirOption = None) -> None:
    """Entries, size and counts by status, after a check of every page (exit 1 when damaged)."""
    from bsafe_data.llm.cache import CacheError, cache_stats

    try:
        stats = cache_stats(cache_dir)
    except CacheError as exc:
        raise _fail(str(exc), 1) from None
    out.print_json(json.dumps(stats, default=str))


@cache_app.command("prune")
def cache_prune_command(
    cache_dir: CacheDirOption = None,
    older_than_days: Annotated[float | None, typer.Option(help="Delete entries older than this.")] = None,
    status: Annotated[
        list[str] | None, typer.Option(help="Delete entries with this status (repeatable).")
    ] = None,
) -> None:
    """Delete old entries and/or entries of some statuses (error, truncated, refused).

    Exit 2 for bad arguments (nothing is touched), 1 when the cache is damaged (nothing is deleted).
    """
    from bsafe_data.llm.cache import CacheError, cache_prune, check_prune_arguments

    if older_than_days is None and not status:
        raise _fail("say what to prune: --older-than-days N and/or --status error")
    try:
        check_prune_arguments(older_than_days, status)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    try:
        removed = cache_prune(cache_dir, older_than_days, status)
    except CacheError as exc:
        raise _fail(str(exc), 1) from None
    out.print(f"removed {removed} entries")


def _register_optional_commands() -> None:
    """Commands that live in their own modules (publishing, cache, refilter, stats)."""
    from bsafe_data.classify.cli import refilter_command, stats_command

    app.command("refilter")(refilter_command)
    app.command("stats")(stats_command)
    from bsafe_data.eval.cli import eval_command

    app.command("eval")(eval_command)
    from bsafe_data.audit.cli import audit_app

    app.add_typer(audit_app, name="audit")
    try:
        from bsafe_data.publish.cli import push_command
    except ImportError:
        return
    app.command("push")(push_command)


_register_optional_commands()


def _hide_flag_types(command: click.Command, ctx: click.Context) -> None:
    for param in command.get_params(ctx):
        if isinstance(param, (click.Option, TyperOption)) and param.is_flag:
            param.metavar = ""  # typer prints the metavar instead of "<bool>"


class _Command(TyperCommand):
    """A command whose help shows no value type for plain flags (typer would print ``<bool>``)."""

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The help page, flags without a value type."""
        _hide_flag_types(self, ctx)
        super().format_help(ctx, formatter)


class _Group(TyperGroup):
    """The command group, flags without a value type in its help."""

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The help page, flags without a value type."""
        _hide_flag_types(self, ctx)
        super().format_help(ctx, formatter)


def _use_flag_help(typer_app: typer.Typer) -> None:
    """Every command of ``typer_app`` and its sub-apps uses ``_Command``."""
    if not isinstance(typer_app.info.cls, type):  # typer's default placeholder: a TyperGroup
        typer_app.info.cls = _Group
    for info in typer_app.registered_commands:
        if info.cls in (None, TyperCommand):
            info.cls = _Command
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _use_flag_help(group.typer_instance)


def _version(value: bool) -> None:
    if value:
        from bsafe_data import __version__

        out.print(f"bsafe-data {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the version and exit.", callback=_version, is_eager=True),
    ] = False,
) -> None:
    """Build, verify and publish backtracking safety training data."""


_use_flag_help(app)


def main() -> None:  # pragma: no cover - console script entry
    """Entry point for ``python -m bsafe_data``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    app()
