"""``bsafe-data eval``: a thin command over ``eval.run.evaluate``; ``plan_table`` for ``plan``.

Registered by ``bsafe_data.cli._register_optional_commands``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from bsafe_data.terminal import safe

console = Console(stderr=True, soft_wrap=True)  # messages stay one line
out = Console(soft_wrap=True)


def _t(text: object) -> str:
    """Data text for a table cell: harmless for the terminal, no markup."""
    return escape(safe(text))


def _fail(message: str, code: int) -> typer.Exit:
    console.print(Text(safe(message), style="red"))
    return typer.Exit(code)


def eval_command(
    recipe: Annotated[Path, typer.Argument(help="Eval recipe YAML file (method: eval).")],
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Report folder (default: recipe output.dir).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N prompts.", min=1)] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="LLM response cache folder.")] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace a folder another recipe's run made.")
    ] = False,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a recipe field: a.b=value (value parsed as YAML). Repeatable."),
    ] = None,
) -> None:
    """Evaluate a backtracking model: ASR with the backtracks executed, per attack and category.

    Exit codes: 0 written; 1 the run failed (endpoint, folder); 2 bad recipe, prompt file or
    tokenizer; 3 written, but some requests failed (a re-run retries them).
    """
    from bsafe_data.errors import BuildError
    from bsafe_data.eval.recipe import load_eval_recipe
    from bsafe_data.eval.run import evaluate
    from bsafe_data.llm.cache import CacheError
    from bsafe_data.llm.errors import FatalEndpointError
    from bsafe_data.llm.transport import CredentialsInURL
    from bsafe_data.recipe import RecipeError
    from bsafe_data.rl.reward import CriticError
    from bsafe_data.sources import SourceError
    from bsafe_data.tokenization import TokenizerLoadError

    try:
        loaded = load_eval_recipe(recipe, set_ or [])
    except RecipeError as exc:
        raise _fail(str(exc), 2) from None
    try:
        result = evaluate(loaded, out_dir, cache_dir=cache_dir, limit=limit, force=force, say=out.print)
    except (SourceError, TokenizerLoadError, CredentialsInURL) as exc:
        raise _fail(f"eval failed: {exc}", 2) from None
    except (FatalEndpointError, BuildError, CacheError, CriticError) as exc:
        raise _fail(f"eval failed: {exc}", 1) from None
    table = Table(title=f"ASR of {loaded.name} (after backtracks)")
    table.add_column("model")
    table.add_column("attack")
    table.add_column("ASR", justify="right")
    table.add_column("backtrack rate", justify="right")
    table.add_column("over-refusal", justify="right")
    for report in result.reports:
        for attack, cats in report.asr.items():
            rate = cats["all"]
            table.add_row(
                _t(report.model),
                _t(attack),
                f"{100 * rate.value:.1f}% ({rate.k}/{rate.n})",
                f"{100 * report.backtrack.value:.1f}%",
                f"{100 * report.over_refusal.value:.1f}%",
            )
    out.print(table)
    sent = ", ".join(f"{_t(m)} {n}" for m, n in result.requests.items())
    out.print(
        f"[green]wrote[/green] {_t(result.folder)}: {len(result.rows)} generations; requests sent: {sent}"
    )
    if result.errors:
        console.print(
            Text(
                f"incomplete: {result.errors} request(s) failed; re-run the same command to retry them",
                style="yellow",
            )
        )
        raise typer.Exit(3)


def plan_table(plan: object, name: str) -> Table:
    """The table ``bsafe-data plan`` prints for an eval recipe."""
    from bsafe_data.eval.plan import EvalPlan

    assert isinstance(plan, EvalPlan)
    table = Table(
        title=f"plan for eval {name}: {plan.prompts} prompts ({plan.harmful} harmful, {plan.benign} benign)"
    )
    table.add_column("model")
    table.add_column("attack")
    table.add_column("generations", justify="right")
    for model, per_attack in plan.generations.items():
        for attack, n in per_attack.items():
            table.add_row(_t(model), _t(attack), f"{n:,}")
        table.add_row(_t(model), "[bold]requests to send (not cached)[/bold]", f"{plan.requests(model):,}")
    for attack, n in plan.skipped.items():
        table.add_row("", f"{_t(attack)}: prompts without a target (skipped)", f"{n:,}")
    return table
