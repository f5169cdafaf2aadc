"""The `bsafe-data push` command (registered by the main app with ``app.command("push")(push_command)``).

The library reports progress as ``PushEvent``s and returns a ``PushResult``; this module renders
both with rich (progress and the dry-run plan on stderr, the release URL on stdout).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from bsafe_data.publish.errors import PublishError
from bsafe_data.publish.push import PushEvent, PushResult, format_size, push_dataset

console = Console(stderr=True, soft_wrap=True)  # messages stay one line
out = Console()
#: Events that report a completed step (shown with a green check mark).
_DONE = frozenset({"authenticated", "setting", "pull_request", "tagged"})


def event_printer(target: Console) -> Callable[[PushEvent], None]:
    """The ``on_event`` callback that prints push progress on ``target``."""

    def show(event: PushEvent) -> None:
        if event.kind in _DONE:
            target.print(Text.assemble(("✓ ", "green"), event.message))
        elif event.kind == "retrying":
            target.print(Text(event.message, style="yellow"))
        else:
            target.print(Text(event.message))

    return show


def print_plan(target: Console, result: PushResult, gated: str) -> None:
    """The dry run: files and sizes, deletions, the total and the card diff."""
    state = "new repo" if result.new_repo else "existing repo"
    table = Table(title=f"dry run: {result.repo_id} v{result.version} ({state})")
    table.add_column("file")
    table.add_column("size", justify="right")
    for path, size in result.files:
        table.add_row(Text(path), format_size(size))
    for path in result.deleted:
        table.add_row(Text(f"delete {path}", style="red"), "")
    target.print(table)
    total = format_size(sum(s for _, s in result.files))
    target.print(
        f"total {total} in {len(result.files)} files; one commit, then tag v{result.version}"
        + (f"; gating: {gated}" if gated != "none" else "")
    )
    target.print(Text("card diff (Hub → new):", style="bold"))
    target.print(result.card_diff or "(no change)", markup=False, highlight=False)
    target.print(Text("dry run: nothing was uploaded", style="yellow"))


def push_command(
    folder: Annotated[Path, typer.Argument(help="Dataset folder written by `bsafe-data build`.")],
    repo: Annotated[str, typer.Option("--repo", help="Dataset repo on the Hub: namespace/name.")],
    version: Annotated[str, typer.Option("--version", help="Release version X.Y.Z; tagged vX.Y.Z.")],
    private: Annotated[bool, typer.Option("--private", help="Make the repo private.")] = False,
    gated: Annotated[str, typer.Option("--gated", help="Gate access: none, auto or manual.")] = "none",
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Commit as a pull request.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the changes; upload nothing.")] = False,
) -> None:
    """Publish a built dataset as one commit tagged vX.Y.Z (token: HF_TOKEN or `hf auth login`)."""
    if gated not in ("none", "auto", "manual"):
        console.print(Text(f"--gated must be none, auto or manual, not {gated!r}", style="red"))
        raise typer.Exit(2)
    try:
        result = push_dataset(
            folder,
            repo,
            version,
            private=private,
            gated=gated,  # type: ignore[arg-type]
            create_pr=create_pr,
            dry_run=dry_run,
            on_event=event_printer(console),
        )
    except PublishError as exc:
        console.print(Text(str(exc), style="red"))
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        console.print(Text("interrupted: re-run the same push (no file is sent twice)", style="red"))
        raise typer.Exit(130) from None
    except Exception as exc:  # never a traceback for the user; the message names the failure
        console.print(Text(f"push failed: {type(exc).__name__}: {exc}", style="red"))
        raise typer.Exit(1) from None
    if result.dry_run:
        print_plan(console, result, gated)
        return
    if result.pr_url:
        out.print(result.pr_url)
    else:
        out.print(f"{result.url}/tree/{result.tag}")
