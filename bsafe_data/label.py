"""Splicing, control tokens, backtrack counts (X) and rendering of training text.

Spans are the truth (DESIGN.md §2): a row stores the original response, the injection offset and
the inserted texts. Everything here *derives* training strings and token counts from those spans for
a given tokenizer, so a dataset built once can be re-rendered for any model.

Token invariant (DESIGN.md §4): for every tokenizer, ``encode(head + part1)`` is a prefix of
``encode(head + part1 + steering + violation)`` and X is the difference in length. ``head`` is the
chat-template text before the assistant answer, so X is counted exactly as a trainer would see it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_CONTROL_FORMAT = "[CATEGORY {category}][BACKTRACK_BY_{x}]"

# Bracketed pieces of a control signal; each is one atom a trainer adds as a special token.
_CONTROL_ATOM = re.compile(r"\[[^\[\]]*\]|<[^<>]*>")
# Used to find where the chat template places the assistant content.
_SENTINEL = "\u2063BSAFE_SENTINEL\u2063"
# When a tokenizer has no chat template: a plain, documented fallback.
_FALLBACK_ROLE_PREFIX = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}


class RenderError(Exception):
    """A row cannot be rendered for a tokenizer (e.g. its chat template rewrites the answer)."""


def control_text(fmt: str, category: str, x: int) -> str:
    """The control signal, e.g. ``[CATEGORY Toxic][BACKTRACK_BY_7]``."""
    return fmt.format(category=category, x=x)


def control_atoms(text: str) -> list[str]:
    """Split a control signal into atoms (bracketed pieces); the whole text if it has none."""
    atoms = _CONTROL_ATOM.findall(text)
    return atoms if atoms and "".join(atoms) == text else [text]


def add_control_tokens(tokenizer: Any, atoms: Sequence[str]) -> int:
    """Register control atoms as special tokens (so they never merge with neighbouring text).

    Returns the number of tokens added; the model's embeddings must then be resized.
    """
    missing = [a for a in dict.fromkeys(atoms) if a not in tokenizer.get_vocab()]
    if not missing:
        return 0
    return tokenizer.add_tokens(missing, special_tokens=True)


def segments_for(part1: str, steering: str, violation: str, control: str, part2: str) -> list[dict[str, Any]]:
    """The assistant stream of an injected row, in order, with loss flags (empty pieces dropped)."""
    pieces = [
        ("prefix", part1, False),
        ("steering", steering, False),
        ("violation", violation, False),
        ("control", control, True),
        ("continuation", part2, True),
    ]
    return [{"kind": k, "text": t, "loss": loss} for k, t, loss in pieces if t]


def clean_segments(response: str) -> list[dict[str, Any]]:
    """The assistant stream of a clean row: the whole answer, trained on."""
    return [{"kind": "continuation", "text": response, "loss": True}]


def _as_messages(context: Sequence[Any]) -> list[dict[str, str]]:
    out = []
    for turn in context:
        if isinstance(turn, Mapping):
            out.append({"role": turn["role"], "content": turn["content"]})
        else:
            role, content = turn
            out.append({"role": role, "content": content})
    return out


def chat_frame(tokenizer: Any, context: Sequence[Any]) -> tuple[str, str]:
    """(head, tail): template text before and after the assistant answer for this context.

    Rendered from the full conversation with a sentinel answer, so templates that treat the final
    assistant turn specially (e.g. a thinking block) are reproduced exactly as a trainer sees them.
    """
    messages = _as_messages(context)
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": _SENTINEL}], tokenize=False
        )
    else:
        body = "".join(
            f"{_FALLBACK_ROLE_PREFIX.get(m['role'], m['role'] + ': ')}{m['content']}\n" for m in messages
        )
        eos = getattr(tokenizer, "eos_token", None) or ""
        full = f"{body}Assistant: {_SENTINEL}{eos}"
    if full.count(_SENTINEL) != 1:
        raise RenderError("the chat template does not reproduce the assistant answer verbatim")
    head, tail = full.split(_SENTINEL)
    return head, tail


def _encode_many(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # Batch call: the Rust tokenizer parallelises across texts. Special tokens come from the template.
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _special_strings(tokenizer: Any) -> tuple[str, ...]:
    cached = getattr(tokenizer, "_bsafe_special_strings", None)
    if cached is None:
        added = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
        cached = tuple(sorted(set(added) | set(tokenizer.all_special_tokens), key=len, reverse=True))
        tokenizer._bsafe_special_strings = cached
    return cached


def anchor(tokenizer: Any, head: str) -> str:
    """The tail of ``head`` from its last special token on.

    Special tokens split the text before the model's pre-tokenizer runs, so the ids of
    ``anchor + text`` are an exact suffix of the ids of ``head + text``: counting from the anchor
    gives the same X for a fraction of the work (tests check the equivalence on real tokenizers).
    """
    best = -1
    for special in _special_strings(tokenizer):
        best = max(best, head.rfind(special))
    return head[best:] if best >= 0 else head


def backtrack_counts(
    tokenizer: Any, items: Sequence[tuple[str, str, str]], exact_head: bool = False
) -> list[int | None]:
    """X for each (head, part1, inserted); ``None`` where the token invariant fails.

    X = len(encode(head + part1 + inserted)) - len(encode(head + part1)), valid only when the
    shorter encoding is a prefix of the longer one (no token merges across the boundary).
    ``exact_head=True`` encodes the whole head instead of its anchor (slower, same result).
    """
    if not items:
        return []
    heads = [h if exact_head else anchor(tokenizer, h) for h, _, _ in items]
    before = _encode_many(tokenizer, [h + p for h, (_, p, _) in zip(heads, items, strict=True)])
    after = _encode_many(tokenizer, [h + p + i for h, (_, p, i) in zip(heads, items, strict=True)])
    out: list[int | None] = []
    for b, a in zip(before, after, strict=True):
        out.append(len(a) - len(b) if a[: len(b)] == b and len(a) > len(b) else None)
    return out


@dataclass(frozen=True)
class Rendered:
    """Training strings for one tokenizer: TRL prompt-completion plus X (None for clean rows)."""

    prompt: str
    completion: str
    backtrack: int | None


def _infer_control_format(row: Mapping[str, Any]) -> str:
    control = next((s["text"] for s in row["segments"] if s["kind"] == "control"), None)
    if control is None or not row.get("backtrack"):
        return DEFAULT_CONTROL_FORMAT
    x = str(row["backtrack"][0]["tokens"])
    category = row["injection"]["category"]
    fmt = control.replace("{", "{{").replace("}", "}}")
    if category:
        fmt = fmt.replace(category, "{category}", 1)
    cut = fmt.rfind(x)
    if cut < 0:
        return DEFAULT_CONTROL_FORMAT
    return fmt[:cut] + "{x}" + fmt[cut + len(x) :]


def render(row: Mapping[str, Any], tokenizer: Any, control_format: str | None = None) -> Rendered:
    """Render a stored row for ``tokenizer``: its prompt/completion strings and X.

    ``control_format`` defaults to the format the row was built with (inferred from its control
    segment). Raises RenderError if the token invariant fails for this tokenizer.
    """
    head, tail = chat_frame(tokenizer, row["context"])
    injection = row.get("injection")
    if row["kind"] != "injected" or not injection:
        return Rendered(prompt=head, completion=row["response"] + tail, backtrack=None)
    offset = injection["offset"]
    part1, part2 = row["response"][:offset], row["response"][offset:]
    inserted = injection["steering"] + injection["violation"]
    (x,) = backtrack_counts(tokenizer, [(head, part1, inserted)])
    if x is None:
        raise RenderError("token_boundary: tokens merge across the injection point for this tokenizer")
    fmt = control_format or _infer_control_format(row)
    control = control_text(fmt, injection["category"], x)
    return Rendered(prompt=head + part1 + inserted, completion=control + part2 + tail, backtrack=x)


def tokenize(
    row: Mapping[str, Any], tokenizer: Any, control_format: str | None = None
) -> dict[str, list[int]]:
    """``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt tokens) for one row.

    Loss follows the characters: a token is trained on when it starts inside the completion. Add
    the control atoms as special tokens first (``add_control_tokens``) so none straddles the border.
    """
    rendered = render(row, tokenizer, control_format)
    text = rendered.prompt + rendered.completion
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    border = len(rendered.prompt)
    labels = [
        tok if start >= border else -100
        for tok, (start, _end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]
    return {
        "input_ids": list(enc["input_ids"]),
        "attention_mask": list(enc["attention_mask"]),
        "labels": labels,
    }
