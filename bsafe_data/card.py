"""Render the dataset card (README.md with Hub YAML metadata) from the template in data_cards/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
import yaml

from bsafe_data.recipe import Recipe
from bsafe_data.sandbox import environment

CARD_DIRS = (Path(__file__).parent / "data_cards", Path(__file__).parent.parent / "data_cards")


def _template_dir() -> Path:
    for folder in CARD_DIRS:
        if (folder / "dataset_card.md.j2").is_file():
            return folder
    raise FileNotFoundError("data_cards/dataset_card.md.j2 is missing from the installation")


def size_category(rows: int) -> str:
    """The Hub's size_categories bucket for a row count."""
    for bound, label in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
    ):
        if rows < bound:
            return label
    return "1M<n<10M"


def head_words(text: str, limit: int) -> str:
    """At most ``limit`` characters of the start of ``text``, cut at a word boundary with "…"."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = max(cut.rfind(" "), cut.rfind("\n"))
    return (cut[:space] if space > 0 else cut).rstrip() + "…"


def tail_words(text: str, limit: int) -> str:
    """At most ``limit`` characters of the end of ``text``, cut at a word boundary with "…"."""
    if len(text) <= limit:
        return text
    cut = text[-limit:]
    space = min((i for i in (cut.find(" "), cut.find("\n")) if i >= 0), default=-1)
    return "…" + (cut[space + 1 :] if space >= 0 else cut).lstrip()


def hub_configs(files: dict[str, Any]) -> list[dict[str, Any]]:
    """The card's ``configs``: one entry per config with splits, data_files globs by split."""
    configs = []
    for name, splits in files.items():
        if not splits:
            continue
        folder = "data" if name == "default" else name
        entry: dict[str, Any] = {
            "config_name": name,
            "data_files": [{"split": s, "path": f"{folder}/{s}-*.parquet"} for s in splits],
        }
        if name == "default":
            entry["default"] = True
        configs.append(entry)
    return configs


def card_metadata(recipe: Recipe, files: dict[str, dict[str, list[str]]], total_rows: int) -> dict[str, Any]:
    """The YAML header: license, tags, task categories, configs with data_files globs."""
    configs = hub_configs(files)
    meta: dict[str, Any] = {
        "license": recipe.output.license,
        "language": ["en"],
        "pretty_name": recipe.output.pretty_name or recipe.name,
        "task_categories": ["text-generation"],
        "size_categories": [size_category(total_rows)],
        "tags": ["safety", "synthetic", "backtracking", "alignment", "red-teaming", "bsafe-data"],
        "configs": configs,
    }
    if recipe.publish.gated != "none":
        meta["extra_gated_prompt"] = recipe.publish.extra_gated_prompt or (
            "This dataset contains harmful text for safety research. Agree to use it only for that."
        )
        if recipe.publish.extra_gated_fields:
            meta["extra_gated_fields"] = dict(recipe.publish.extra_gated_fields)
    return meta


def render_card(
    recipe: Recipe,
    manifest: dict[str, Any],
    files: dict[str, dict[str, list[str]]],
    examples: list[dict[str, Any]],
    plots: list[str],
    stats: Any,
    *,
    audit: dict[str, Any] | None = None,
) -> str:
    """The README.md text of the dataset folder; ``audit`` (from
    ``bsafe_data.audit.report.card_section``) adds an "Audit" section."""
    env = environment(  # sandboxed: the card renders row text and recipe fields
        loader=jinja2.FileSystemLoader(str(_template_dir())),
        autoescape=False,  # Markdown; untrusted text is escaped explicitly with |e
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["head_words"] = head_words
    env.filters["tail_words"] = tail_words
    funnel = manifest["funnel"]
    meta = card_metadata(recipe, files, funnel["kept"] + funnel["rejected"])
    from bsafe_data.registry import method_class

    method = method_class(recipe)
    own = f"methods/{recipe.method}.md.j2"
    template = own if (_template_dir() / own).is_file() else "dataset_card.md.j2"
    return env.get_template(template).render(
        yaml_header=yaml.safe_dump(meta, sort_keys=False, allow_unicode=True),
        pretty_name=meta["pretty_name"],
        description=recipe.description or "A safety training dataset built with bsafe-data.",
        recipe=recipe,
        manifest=manifest,
        funnel=funnel,
        counts=manifest["counts"],
        examples=examples,
        plots=plots,
        audit=audit,
        hub_ids=manifest["tokenizers"].get("hub_ids", {}),
        **method.card_context(recipe, manifest, stats),
    )
