"""Prompt sources of an evaluation: AdvBench, HarmBench, JailbreakBench, ``rlbf_prompts`` builds and
plain prompt tables, read with the project's source readers (``sources.raw_records``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bsafe_data.eval.recipe import PromptSourceSpec
from bsafe_data.recipe import SourceSpec
from bsafe_data.sources import SourceError, raw_records

#: Column names of each layout: (prompt, target, category); the first present one is used.
_COLUMNS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "advbench": (("goal",), ("target",), ("category",)),
    "harmbench": (("Behavior", "behavior"), ("target", "Target"), ("SemanticCategory", "FunctionalCategory")),
    "jailbreakbench": (("Goal", "goal"), ("Target", "target"), ("Category", "category")),
    "prompts": (("prompt", "question", "instruction"), ("target", "prefill"), ("category",)),
}


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt: the conversation before the answer, what it is for, and its own attack text."""

    id: str
    source: str
    kind: str  # harmful | benign
    messages: tuple[tuple[str, str], ...]  # (role, content) turns, ending with the user turn
    category: str = ""
    target: str = ""  # a harmful answer start (AdvBench `target`, a prompt set's prefill); '' if none
    injection: str = ""  # the violating text inside `target` when known (steering + violation)

    @property
    def user(self) -> str:
        """The last user turn."""
        return next((c for r, c in reversed(self.messages) if r == "user"), "")


def _first(record: Mapping[str, Any], names: Sequence[str]) -> str:
    for name in names:
        value = record.get(name)
        if isinstance(value, str) and value.strip():
            return value
    return ""


def _turns(record: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """A ``messages`` column's turns up to the last user turn (a chat corpus as prompts)."""
    raw = record.get("messages")
    if not isinstance(raw, (list, tuple)):
        return ()
    turns = [
        (str(m.get("role")), str(m.get("content")))
        for m in raw
        if isinstance(m, Mapping) and isinstance(m.get("content"), str)
    ]
    last = max((i for i, (role, _) in enumerate(turns) if role == "user"), default=-1)
    return tuple(turns[: last + 1])


def _layout(spec: PromptSourceSpec, path: Path, first: Mapping[str, Any] | None) -> str:
    if spec.layout != "auto":
        return spec.layout
    if path.is_dir() or (first is not None and "expect" in first and "prompt" in first):
        return "rlbf_prompts"
    if first is not None:
        for layout in ("jailbreakbench", "advbench", "harmbench", "prompts"):  # JBB has a Behavior column too
            if _first(first, _COLUMNS[layout][0]):
                return layout
        if _turns(first):
            return "prompts"
        found = sorted(map(str, first))[:12]
        raise SourceError(
            f"{spec.path}: cannot tell the prompt layout (found columns {found}); set `layout:`"
        )
    return "prompts"


def _prompt_files(folder: Path) -> list[Path]:
    """The parquet shards of a build's default config (``data/``), in name order."""
    files = sorted((folder / "data").glob("*.parquet"))
    if not files:
        raise SourceError(f"{folder}: no data/*.parquet (not a bsafe-data prompt-set folder)")
    return files


def _records(spec: PromptSourceSpec) -> Iterator[Mapping[str, Any]]:
    path = Path(spec.path)
    if not path.exists():
        raise SourceError(f"prompt file not found: {path}")
    files = _prompt_files(path) if path.is_dir() else [path]
    left = spec.limit
    for file in files:
        source = SourceSpec(path=str(file), encoding=spec.encoding, limit=left)
        for record in raw_records(source):
            yield record
            if left is not None:
                left -= 1
        if left is not None and left <= 0:
            return


def read_prompts(spec: PromptSourceSpec) -> list[EvalPrompt]:
    """Every usable prompt of one source (rows without a prompt text are skipped)."""
    records = iter(_records(spec))
    first = next(records, None)
    layout = _layout(spec, Path(spec.path), first)
    out: list[EvalPrompt] = []
    for index, record in enumerate(([first] if first is not None else []) + list(records)):
        prompt = _rlbf_prompt(spec, index, record) if layout == "rlbf_prompts" else None
        if layout != "rlbf_prompts":
            text_cols, target_cols, category_cols = _COLUMNS[layout]
            user = _first(record, text_cols)
            turns = (("user", user),) if user else _turns(record)
            if turns:
                prompt = EvalPrompt(
                    id=str(record.get("id") or index),
                    source=spec.path,
                    kind=spec.kind,
                    messages=turns,
                    category=_first(record, category_cols),
                    target=_first(record, target_cols),
                )
        if prompt is not None:
            out.append(prompt)
    return out


def _rlbf_prompt(spec: PromptSourceSpec, index: int, record: Mapping[str, Any]) -> EvalPrompt | None:
    """A row of an ``rlbf_prompts`` build: its messages (the assistant prefill apart), its prefill as
    the target and its injection as the violating text."""
    turns = record.get("prompt")
    if not isinstance(turns, (list, tuple)) or not turns:
        return None
    messages = [(str(t["role"]), str(t["content"])) for t in turns if isinstance(t, Mapping)]
    prefill = str(record.get("prefill") or "")
    if messages and messages[-1][0] == "assistant":
        prefill = prefill or messages[-1][1]
        messages = messages[:-1]
    if not messages:
        return None
    injection = record.get("injection")
    violating = ""
    if isinstance(injection, Mapping):
        violating = str(injection.get("steering") or "") + str(injection.get("violation") or "")
    benign = record.get("expect") == "answer"
    return EvalPrompt(
        id=str(record.get("id") or index),
        source=spec.path,
        kind="benign" if benign else spec.kind,
        messages=tuple(messages),
        category=str(record.get("category") or ""),
        target=prefill,
        injection=violating,
    )


def read_all(specs: Sequence[PromptSourceSpec]) -> list[EvalPrompt]:
    """The prompts of every source, in recipe order."""
    return [p for spec in specs for p in read_prompts(spec)]
