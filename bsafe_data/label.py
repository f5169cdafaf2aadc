"""Splicing, control tokens, backtrack counts (X) and rendering of training text.

Spans are the truth (README, "The row contract"): a row stores the original response, the injection offset and
the inserted texts. Everything here *derives* training strings and token counts from those spans for
a given tokenizer, so a dataset built once can be re-rendered for any model.

Token invariant (README, "How a row is made"): for every tokenizer, ``encode(head + part1)`` is a prefix of
``encode(head + part1 + steering + violation)`` and X is the difference in length. ``head`` is the
chat-template text before the assistant answer, so X is counted exactly as a trainer would see it.

Where the training string ends
------------------------------
``prompt`` is the template's text before the answer (plus, for injected rows, ``part1``, steering
and violation); ``completion`` is the control signal and the safe continuation (or the whole clean
answer) followed by the template's text after the answer **cut right after the end-of-turn token E
the model must learn to emit**:

* E is the first special token the chat template writes after the answer. Qwen2.5 / ChatML and
  Qwen3-style thinking templates: ``<|im_end|>`` (the template's trailing ``\\n`` is dropped; a
  thinking block ``<think>…</think>`` is rendered into the head, before the answer). Phi-3:
  ``<|end|>`` (its trailing ``\\n<|endoftext|>`` is dropped). Llama 3: ``<|eot_id|>``. Mistral:
  ``</s>``.
* A template that writes no special token after the answer (plain-text formats): the text after
  the answer without trailing whitespace, then the tokenizer's EOS; E is the EOS.
* A tokenizer without a chat template: ``User: …\\nAssistant:\\n`` + answer + EOS; E is the EOS
  (a newline, not a space, before the answer: a space would merge with its first word).
* When the tokenizer itself prepends special tokens on encode (Llama 3's ``<|begin_of_text|>``,
  Mistral's ``<s>``), ``prompt`` does not repeat them: the trainer's encode adds them once.

What TRL does with it (``SFTTrainer``, prompt-completion rows, checked against trl 1.16): it
appends ``SFTConfig.eos_token`` (default ``tokenizer.eos_token``) to every completion that does not
already end with it, then encodes ``prompt`` and ``prompt + completion`` with the tokenizer's own
special tokens and trains (``completion_only_loss=True``) on the tokens after their common prefix.
So where E is the tokenizer's EOS (Qwen2.5-Instruct, Llama 3.1-Instruct, Mistral) the standard
config trains on exactly E as the last token. Where they differ (Phi-3: E ``<|end|>``, EOS
``<|endoftext|>``) pass ``SFTConfig(eos_token=end_of_turn(tokenizer))``: TRL then appends nothing
and also makes E the model's EOS for generation. ``tokenize()`` returns those same ``input_ids`` and
``labels``, and refuses (``RenderError`` with reason ``prompt_boundary``) rows whose prompt tokens
are not a prefix of the full sequence's, where TRL would silently move the border.

Control atoms (``[CATEGORY Toxic]``, ``[BACKTRACK_BY_7]``) must each be one token: add them with
``add_control_tokens(tokenizer, control_tokens(rows, tokenizer))`` and resize the model's
embeddings. ``tokenize`` raises ``ControlTokenError`` rather than split an atom.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

from bsafe_data.formats import CONTROL_FIELDS, parse_format

DEFAULT_CONTROL_FORMAT = "[CATEGORY {category}][BACKTRACK_BY_{x}]"

# Bracketed pieces of a control signal; each is one atom a trainer adds as a special token.
_CONTROL_ATOM = re.compile(r"\[[^\[\]]*\]|<[^<>]*>")
# Used to find where the chat template places the assistant content.
_SENTINEL = "\u2063BSAFE_SENTINEL\u2063"
# When a tokenizer has no chat template: a plain, documented fallback.
_FALLBACK_ROLE_PREFIX = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}
# Context used to find a tokenizer's end-of-turn token.
_PROBE_CONTEXT = [{"role": "user", "content": "Hi"}]
_BATCH = 1000

#: Why a row cannot be rendered (``RenderError.reason``) for a tokenizer.
RENDER_REASONS: dict[str, str] = {
    "token_boundary": "the tokenizer merges tokens across the injection point; X would be wrong",
    "chat_template": "the chat template fails on the row's context or does not reproduce the answer verbatim",
    "prompt_boundary": "the prompt's tokens are not a prefix of the prompt+completion tokens",
}


class RenderError(Exception):
    """A row cannot be rendered for a tokenizer; ``reason`` is a key of ``RENDER_REASONS``."""

    def __init__(self, message: str, reason: str = "chat_template") -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (type(self), (str(self), self.reason))


class ControlTokenError(ValueError):
    """A control atom is not a single token for a tokenizer (not added, or cannot be added)."""


def control_text(fmt: str, category: str, x: int | str) -> str:
    """The control signal, e.g. ``[CATEGORY Toxic][BACKTRACK_BY_7]`` (``fmt`` may use only
    ``{category}`` and ``{x}``: anything else is a ``FormatError``)."""
    return parse_format(fmt, CONTROL_FIELDS).render(category=category, x=x)


def control_atoms(text: str) -> list[str]:
    """Split a control signal into atoms (bracketed pieces); the whole text if it has none."""
    atoms = _CONTROL_ATOM.findall(text)
    return atoms if atoms and "".join(atoms) == text else [text]


def control_vocabulary(fmt: str, categories: Sequence[str], max_x: int) -> list[str]:
    """Every atom of format ``fmt`` for each category and X from 1 to ``max_x`` (at least 1), in order."""
    atoms: dict[str, None] = {}
    for category in categories:
        for x in range(1, max(1, max_x) + 1):
            atoms.update(dict.fromkeys(control_atoms(control_text(fmt, category, x))))
    return list(atoms)


def control_patterns(fmt: str) -> list[str]:
    """A regex per atom of the control format ``fmt``, matching any category and any number."""
    any_field = {"category": r"[^\[\]<>\n]{1,80}?", "x": r"\d+"}
    return [parse_format(atom, CONTROL_FIELDS).regex(any_field) for atom in control_atoms(fmt)]


# -- per-tokenizer facts, cached without touching the tokenizer object ----------------------------

# tokenizer -> (stamp, facts). Weak keys: the cache never keeps a tokenizer alive, and nothing is
# stored on the third-party object. The stamp notices added tokens and changed BOS/EOS settings.
_FACTS: weakref.WeakKeyDictionary[Any, tuple[tuple[Any, ...], dict[str, Any]]] = weakref.WeakKeyDictionary()


def _stamp(tokenizer: Any) -> tuple[Any, ...]:
    return (
        len(tokenizer),
        getattr(tokenizer, "bos_token", None),
        getattr(tokenizer, "eos_token", None),
        getattr(tokenizer, "add_bos_token", None),
        getattr(tokenizer, "add_eos_token", None),
    )


def _facts(tokenizer: Any) -> dict[str, Any]:
    stamp = _stamp(tokenizer)
    try:
        cached = _FACTS.get(tokenizer)
    except TypeError:  # an unhashable or non-weakref-able tokenizer: compute every time
        cached = None
    if cached is not None and cached[0] == stamp:
        return cached[1]
    added = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    specials = tuple(sorted(set(added) | set(tokenizer.all_special_tokens), key=len, reverse=True))
    facts = {"specials": specials, "auto_prefix": _auto_prefix(tokenizer)}
    try:
        _FACTS[tokenizer] = (stamp, facts)
    except TypeError:
        pass
    return facts


def _special_strings(tokenizer: Any) -> tuple[str, ...]:
    """Every special token's text, longest first."""
    return _facts(tokenizer)["specials"]


def _auto_prefix(tokenizer: Any) -> str:
    """Text of the special tokens the tokenizer prepends itself on encode (e.g. a BOS), else ''."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return "".join(tokenizer.convert_ids_to_tokens(full[:start]))
    return ""


def _first_special(tokenizer: Any, text: str) -> tuple[int, str] | None:
    """(position, token) of the earliest special token in ``text`` (longest on a tie)."""
    best: tuple[int, str] | None = None
    for special in _special_strings(tokenizer):
        pos = text.find(special)
        if pos >= 0 and (best is None or pos < best[0]):
            best = (pos, special)
    return best


# -- control vocabulary ----------------------------------------------------------------------------


def _is_one_token(tokenizer: Any, atom: str) -> bool:
    """The atom is an added token and encodes to exactly that token (so it never merges)."""
    if not atom or atom not in tokenizer.get_added_vocab():
        return False
    return tokenizer(atom, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(atom)]


_ADD_HINT = (
    "Each atom must be one token: call bsafe_data.add_control_tokens(tokenizer, "
    "bsafe_data.control_tokens(rows, tokenizer)) first and resize the model's embeddings "
    "(model.resize_token_embeddings(len(tokenizer)))."
)


def _split_atoms_error(atoms: Sequence[str], what: str, hint: str = _ADD_HINT) -> ControlTokenError:
    shown = ", ".join(repr(a) for a in atoms[:8]) + (f" and {len(atoms) - 8} more" if len(atoms) > 8 else "")
    return ControlTokenError(f"{len(atoms)} control atom(s) {what}: {shown}. {hint}")


def add_control_tokens(tokenizer: Any, atoms: Iterable[str]) -> int:
    """Register control atoms as special tokens (so they never merge with neighbouring text).

    An atom counts as present when it is an added token that encodes to itself alone; others are
    added (an atom already in the vocabulary as an ordinary token keeps its id). Returns how much
    the vocabulary grew: the model's embeddings must then be resized. Raises ``ControlTokenError``
    if an atom is still not a single token afterwards (e.g. an empty atom).
    """
    unique = list(dict.fromkeys(atoms))
    missing = [a for a in unique if not _is_one_token(tokenizer, a)]
    size = len(tokenizer)
    if missing:
        # Atoms already in the vocabulary as ordinary tokens become added tokens with their old id.
        tokenizer.add_tokens([a for a in missing if a], special_tokens=True)
    still = [a for a in missing if not _is_one_token(tokenizer, a)]
    if still:
        raise _split_atoms_error(
            still,
            "cannot be made single tokens for this tokenizer",
            "Use a control format whose atoms are non-empty text the tokenizer keeps verbatim.",
        )
    return len(tokenizer) - size


def _natural_key(text: str) -> list[Any]:
    return [int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", text))]


def _row_batches(rows_or_dataset: Any, columns: Sequence[str]) -> Iterator[list[dict[str, Any]]]:
    """Rows in lists of up to ``_BATCH``, from a ``datasets`` (Iterable)Dataset(Dict) or an iterable."""
    if isinstance(rows_or_dataset, Mapping) and all(
        hasattr(v, "column_names") for v in rows_or_dataset.values()
    ):
        for split in rows_or_dataset.values():  # DatasetDict
            yield from _row_batches(split, columns)
        return
    if hasattr(rows_or_dataset, "column_names") and hasattr(rows_or_dataset, "select_columns"):
        present = [c for c in columns if c in (rows_or_dataset.column_names or columns)]
        rows_or_dataset = rows_or_dataset.select_columns(present)
    iterator = iter(rows_or_dataset)
    while batch := list(islice(iterator, _BATCH)):
        yield batch


def control_tokens(
    rows_or_dataset: Any, tokenizer: Any = None, control_format: str | None = None
) -> list[str]:
    """Every control atom the rows need as a single token, in natural order.

    ``rows_or_dataset``: a ``datasets.Dataset``/``DatasetDict`` or any iterable of row dicts. With
    ``tokenizer``, X is re-counted for that tokenizer (rows it cannot render are skipped, as
    ``rerender`` drops them); without, the atoms of every X recorded in the rows' ``backtrack``
    (every recipe tokenizer) and of their stored control segments. ``control_format`` overrides
    the format inferred from each row.
    """
    atoms: set[str] = set()
    columns = ("context", "response", "kind", "injection", "segments", "backtrack")
    for batch in _row_batches(rows_or_dataset, columns):
        if tokenizer is not None:
            injected = [r for r in batch if r.get("kind") == "injected" and r.get("injection")]
            for rendered in _render_rows(injected, tokenizer, control_format):
                if isinstance(rendered, Rendered) and rendered.control:
                    atoms.update(control_atoms(rendered.control))
            continue
        for row in batch:
            injection = row.get("injection")
            if row.get("kind") != "injected" or not injection:
                continue
            fmt = control_format or _infer_control_format(row)
            for entry in row.get("backtrack") or []:
                atoms.update(control_atoms(control_text(fmt, injection["category"], entry["tokens"])))
            if control_format is None:
                for segment in row.get("segments") or []:
                    if segment["kind"] == "control" and segment["text"]:
                        atoms.update(control_atoms(segment["text"]))
    return sorted(atoms, key=_natural_key)


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


# -- chat frame and endings ------------------------------------------------------------------------


def _as_messages(context: Sequence[Any]) -> list[dict[str, str]]:
    out = []
    for turn in context:
        if isinstance(turn, Mapping):
            out.append({"role": turn["role"], "content": turn["content"]})
        else:
            role, content = turn
            out.append({"role": role, "content": content})
    return out


def _template_frame(tokenizer: Any, context: Sequence[Any]) -> tuple[str, str]:
    """(head, tail) exactly as the chat template renders them around a final assistant answer."""
    messages = _as_messages(context)
    if getattr(tokenizer, "chat_template", None):
        try:
            full = tokenizer.apply_chat_template(
                [*messages, {"role": "assistant", "content": _SENTINEL}], tokenize=False
            )
        except Exception as exc:  # jinja's TemplateError, raise_exception(...) in templates, ...
            raise RenderError(f"chat_template: the chat template fails on this context: {exc}") from exc
    else:
        body = "".join(
            f"{_FALLBACK_ROLE_PREFIX.get(m['role'], m['role'] + ': ')}{m['content']}\n" for m in messages
        )
        eos = getattr(tokenizer, "eos_token", None) or ""
        full = f"{body}Assistant:\n{_SENTINEL}{eos}"
    if not isinstance(full, str) or full.count(_SENTINEL) != 1:
        raise RenderError("chat_template: the chat template does not reproduce the assistant answer verbatim")
    head, tail = full.split(_SENTINEL)
    return head, tail


def _training_tail(tokenizer: Any, tail: str) -> str:
    found = _first_special(tokenizer, tail)
    if found is not None:
        pos, token = found
        return tail[: pos + len(token)]
    return tail.rstrip() + (getattr(tokenizer, "eos_token", None) or "")


def chat_frame(tokenizer: Any, context: Sequence[Any]) -> tuple[str, str]:
    """(head, tail): training text before and after the assistant answer for this context.

    Rendered from the full conversation with a sentinel answer, so templates that treat the final
    assistant turn specially (e.g. a thinking block) are reproduced exactly as a trainer sees them.
    ``tail`` ends right after the end-of-turn token (see the module docstring); ``head`` drops a
    leading BOS the tokenizer adds by itself. Raises ``RenderError`` (reason ``chat_template``).
    """
    head, tail = _template_frame(tokenizer, context)
    prefix = _facts(tokenizer)["auto_prefix"]
    if prefix and head.startswith(prefix):
        head = head[len(prefix) :]
    return head, _training_tail(tokenizer, tail)


def end_of_turn(tokenizer: Any) -> str | None:
    """The token every completion ends with for this tokenizer (E in the module docstring).

    Pass it as ``SFTConfig(eos_token=...)`` so TRL appends nothing; None when the tokenizer has
    neither a special token after the answer nor an EOS.
    """
    _, tail = _template_frame(tokenizer, _PROBE_CONTEXT)
    found = _first_special(tokenizer, tail)
    if found is not None:
        return found[1]
    return getattr(tokenizer, "eos_token", None) or None


# -- X ---------------------------------------------------------------------------------------------


def _encode_many(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # Batch call: the Rust tokenizer parallelises across texts. Special tokens come from the template;
    # ids only (no masks to build and convert: 5-10% of the call)
    encoded = tokenizer(
        texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False
    )
    return encoded["input_ids"]


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


# -- render and tokenize ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendered:
    """Training strings for one tokenizer: TRL prompt-completion, X and the control signal.

    ``backtrack`` is None and ``control`` empty for clean rows.
    """

    prompt: str
    completion: str
    backtrack: int | None
    control: str = ""


def _infer_control_format(row: Mapping[str, Any]) -> str:
    control = next((s["text"] for s in row.get("segments") or [] if s["kind"] == "control"), None)
    if control is None or not row.get("backtrack"):
        return DEFAULT_CONTROL_FORMAT
    x = str(row["backtrack"][0]["tokens"])
    category = (row.get("injection") or {}).get("category", "")
    fmt = control.replace("{", "{{").replace("}", "}}")
    if category:
        fmt = fmt.replace(category, "{category}", 1)
    cut = fmt.rfind(x)
    if cut < 0:
        return DEFAULT_CONTROL_FORMAT
    return fmt[:cut] + "{x}" + fmt[cut + len(x) :]


def _segment_pieces(row: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """(text kept, text a backtrack deletes, text after the control) of a row whose segments hold
    a backtrack control signal; None for rows without one. Segments before the control: ``prefix``
    is kept, the others (steering, violation) are what X counts."""
    segments = row.get("segments") or []
    at = next((i for i, s in enumerate(segments) if s["kind"] == "control"), None)
    if at is None or not row.get("backtrack"):
        return None
    kept = "".join(s["text"] for s in segments[:at] if s["kind"] == "prefix")
    deleted = "".join(s["text"] for s in segments[:at] if s["kind"] != "prefix")
    return kept, deleted, "".join(s["text"] for s in segments[at + 1 :])


def _render_rows(
    rows: Sequence[Mapping[str, Any]], tokenizer: Any, control_format: str | None = None
) -> list[Rendered | RenderError]:
    """``render`` for many rows, with one batched X count; failures are returned, not raised."""
    out: list[Rendered | RenderError | None] = [None] * len(rows)
    pending: list[tuple[int, str, str, str, str, str]] = []  # index, head, tail, part1, inserted, part2
    for i, row in enumerate(rows):
        try:
            head, tail = chat_frame(tokenizer, row["context"])
        except RenderError as exc:
            out[i] = exc
            continue
        injection = row.get("injection")
        if row["kind"] not in ("injected", "clean"):  # other methods: the segments are the stream
            pieces = _segment_pieces(row)
            if pieces is None:
                no_loss = "".join(s["text"] for s in row["segments"] if not s["loss"])
                loss = "".join(s["text"] for s in row["segments"] if s["loss"])
                out[i] = Rendered(prompt=head + no_loss, completion=loss + tail, backtrack=None)
            else:
                pending.append((i, head, tail, *pieces))
            continue
        if row["kind"] != "injected" or not injection:
            out[i] = Rendered(prompt=head, completion=row["response"] + tail, backtrack=None)
            continue
        offset = injection["offset"]
        part1, part2 = row["response"][:offset], row["response"][offset:]
        pending.append((i, head, tail, part1, injection["steering"] + injection["violation"], part2))
    xs = backtrack_counts(tokenizer, [(head, part1, inserted) for _, head, _, part1, inserted, _ in pending])
    for (i, head, tail, part1, inserted, part2), x in zip(pending, xs, strict=True):
        if x is None:
            out[i] = RenderError(
                "token_boundary: tokens merge across the injection point for this tokenizer",
                reason="token_boundary",
            )
            continue
        row = rows[i]
        fmt = control_format or _infer_control_format(row)
        control = control_text(fmt, (row.get("injection") or {}).get("category", ""), x)
        out[i] = Rendered(
            prompt=head + part1 + inserted, completion=control + part2 + tail, backtrack=x, control=control
        )
    return [r for r in out if r is not None]


def render(row: Mapping[str, Any], tokenizer: Any, control_format: str | None = None) -> Rendered:
    """Render a stored row for ``tokenizer``: its prompt/completion strings and X.

    ``control_format`` defaults to the format the row was built with (inferred from its control
    segment). Raises RenderError if the token invariant fails for this tokenizer.
    """
    (rendered,) = _render_rows([row], tokenizer, control_format)
    if isinstance(rendered, RenderError):
        raise rendered
    return rendered


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def tokenize_rendered(rendered: Rendered, tokenizer: Any) -> dict[str, list[int]]:
    """``input_ids``, ``attention_mask``, ``labels`` of rendered strings, as TRL's SFTTrainer makes them.

    ``input_ids`` = encode(prompt + completion) with the tokenizer's own special tokens; labels are
    -100 on the tokens of encode(prompt). Raises ``ControlTokenError`` if a control atom is not one
    token, ``RenderError`` (``prompt_boundary``) if the prompt's tokens are not a prefix.
    """
    atoms = control_atoms(rendered.control) if rendered.control else []
    split = [a for a in dict.fromkeys(atoms) if not _is_one_token(tokenizer, a)]
    if split:
        raise _split_atoms_error(split, "would be split into several tokens")
    prompt_ids = list(tokenizer(rendered.prompt)["input_ids"])
    enc = tokenizer(rendered.prompt + rendered.completion)
    ids = list(enc["input_ids"])
    n = _common_prefix(prompt_ids, ids)
    if n < len(prompt_ids):
        raise RenderError(
            "prompt_boundary: the prompt's tokens are not a prefix of the prompt+completion tokens "
            f"(they differ at token {n}: {tokenizer.decode(prompt_ids[n:])!r})",
            reason="prompt_boundary",
        )
    if atoms and ids[n : n + len(atoms)] != tokenizer.convert_tokens_to_ids(atoms):
        raise _split_atoms_error(atoms, "do not start the completion as single tokens")
    return {
        "input_ids": ids,
        "attention_mask": list(enc["attention_mask"]),
        "labels": [-100] * n + ids[n:],
    }


def tokenize(
    row: Mapping[str, Any], tokenizer: Any, control_format: str | None = None
) -> dict[str, list[int]]:
    """``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt tokens) for one row.

    The same ids and labels TRL's ``SFTTrainer`` computes for the row's prompt/completion with
    ``completion_only_loss=True`` (and ``eos_token=end_of_turn(tokenizer)`` where E is not the
    tokenizer's EOS): the completion's tokens, ending with the end-of-turn token, are trained on.
    Add the control atoms first (``add_control_tokens``); raises ``ControlTokenError`` otherwise.
    """
    return tokenize_rendered(render(row, tokenizer, control_format), tokenizer)
