"""The `bsafe-data push` command (registered by the main app with ``app.command("push")(push_command)``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from bsafe_data.publish.push import PublishError, push_dataset

console = Console(stderr=True)
out = Console()


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
            console=console,
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
        return
    if result.pr_url:
        out.print(result.pr_url)
    else:
        out.print(f"{result.url}/tree/{result.tag}")
