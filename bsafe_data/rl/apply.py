"""The reference decoder: execute every ``[CATEGORY c][BACKTRACK_BY_X]`` signal of a token stream.

This is the inverse of a BSAFE+ row. For a built row rendered for tokenizer ``T`` (control atoms
registered with ``label.add_control_tokens``)::

    apply_backtracks(row.prompt + row.completion, T).text == head + part1 + part2 + tail

where ``(head, tail) = label.chat_frame(T, row.context)`` and ``part1 + part2`` is the original
answer: the signal deletes itself and the X tokens before it (the steering text and the violation,
which sit in the *prompt* of a row), nothing else.

Semantics (DESIGN decisions, documented in ``docs/rl_reward.md``):

* **Stream and tokens.** The stream is ``prompt + text`` (or ``prompt`` + the given token ids). Text
  is tokenized the way a model sees it with the control atoms registered as special tokens: the
  text is cut at every control atom, each atom is one token and each piece after an atom is
  tokenized as it is after a special token (a tokenizer splits at added tokens before it
  normalises or pre-tokenises, so this is identical, which the tests check on every row of a
  build; it also keeps counts right when the atoms are *not* registered, e.g. an ``X`` outside
  the vocabulary). The prompt and the text are tokenized separately, as a trainer does. Token
  ids are taken as given: X counts the tokens the model actually produced, canonical or not.
* **What X counts.** Signals run left to right. Each deletes the last ``X`` *visible* tokens before
  it: control atoms are never visible, and tokens an earlier signal deleted do not count again.
* **Floor.** Nothing before the floor is ever deleted. By default the floor is the end of the
  stream's last assistant header (the chat template's text between the user turn and the answer,
  e.g. ``<|im_end|>\\n<|im_start|>assistant\\n``): the current answer starts there. Without a
  header it is the start of the stream. So an attack prefix prefilled into the assistant turn of
  the prompt can be deleted, the user turn never. Atoms before the floor are plain text (never
  executed).
* **Malformed signals** (``Signal.malformed``, stable codes):

  - ``unparsable``: control atoms that do not form the format (missing, extra or out-of-order
    atoms, text between them) or an X that is not a positive decimal integer. Not executed.
  - ``unknown_category``: a well-formed signal whose category is not one of ``categories``.
    Executed (the X is unambiguous).
  - ``x_exceeds_floor``: X larger than the visible tokens between the floor and the signal.
    Executed up to the floor (everything visible after the floor is deleted).

  The text of every control atom, executed or not, is removed from the final text (control
  tokens are never shown).
* **Final text.** Each token owns the characters from its start offset to the next token's start
  (characters a tokenizer does not cover, e.g. whitespace a special token strips, stay with the
  token before them). The final text is the concatenation of the characters of the kept tokens.
  For token-id input the characters come from decoding (exact for byte-level BPE up to the
  tokenizer's normaliser, e.g. Qwen's NFC; for sentencepiece tokenizers the tokenizer's own
  decoding, which may drop whitespace that special tokens strip). ``Trajectory.ids`` are the
  kept ids in stream order (the model's context after the edits, not a re-encoding of the final
  text).

Nothing here logs text: trajectories carry the removed spans (which may be violations) as data.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from bsafe_data.formats import CONTROL_FIELDS, parse_format
from bsafe_data.label import DEFAULT_CONTROL_FORMAT, chat_frame, control_atoms
from bsafe_data.recipe import RLBF_CATEGORIES

#: Malformed-signal codes.
MALFORMED_REASONS: dict[str, str] = {
    "unparsable": "atoms that do not form the control format, or an X that is not a positive integer",
    "unknown_category": "a well-formed signal whose category is not a known category (executed)",
    "x_exceeds_floor": "X exceeds the visible tokens between floor and signal (executed to the floor)",
}

_X = re.compile(r"[1-9][0-9]*")
# Characters a placeholder may match loosely: no brackets and no line breaks, bounded length.
_LOOSE = {"category": r"[^\[\]<>\n]{0,80}?", "x": r"[^\[\]<>\n]{0,24}?"}
#: Tokens of left context used to decode one token id (enough for sentencepiece and byte fallback).
_DECODE_WINDOW = 6


@dataclass(frozen=True)
class Span:
    """A contiguous run of stream tokens: character offsets into the stream and token indices."""

    start: int
    end: int
    token_start: int
    token_end: int
    text: str

    @property
    def tokens(self) -> int:
        """Number of tokens in the span."""
        return self.token_end - self.token_start


@dataclass(frozen=True)
class Signal:
    """One control signal found in the stream (well-formed or not)."""

    text: str  # the signal's atoms as written
    start: int  # character offsets of the atoms in the stream
    end: int
    token_index: int  # index of its first token in the stream
    category: str | None  # parsed category (None when unparsable or the format has none)
    x: int | None  # parsed X (None when unparsable)
    deleted: int = 0  # tokens actually deleted (0 when not executed)
    removed: tuple[Span, ...] = ()  # the deleted tokens, as runs in stream order
    malformed: str | None = None  # a MALFORMED_REASONS code, or None

    @property
    def executed(self) -> bool:
        """True when the signal deleted tokens."""
        return self.deleted > 0

    @property
    def removed_text(self) -> str:
        """The deleted text (concatenated runs)."""
        return "".join(s.text for s in self.removed)


@dataclass(frozen=True)
class Trajectory:
    """The result of executing every signal of a stream."""

    text: str  # the final text (whole stream: prompt part included)
    ids: tuple[int, ...]  # kept token ids, stream order
    stream: str  # the input stream's text
    floor: int  # character offset nothing before which was deleted
    floor_token: int  # index of the first deletable token
    kept: tuple[Span, ...]  # maximal runs of kept (visible, undeleted) tokens
    removed: tuple[Span, ...]  # maximal runs of deleted tokens (control atoms excluded)
    signals: tuple[Signal, ...]  # every signal after the floor, in order
    tokens: int  # number of tokens in the stream (control atoms included)
    starts: tuple[int, ...] = ()  # character where each stream token's text starts
    prompt_chars: int = 0  # length of the prompt part of the stream

    def token_chars(self, k: int) -> tuple[int, int]:
        """Character range [start, end) of stream token ``k``."""
        end = self.starts[k + 1] if k + 1 < len(self.starts) else len(self.stream)
        return self.starts[k], end

    @property
    def malformed(self) -> tuple[Signal, ...]:
        """The malformed signals."""
        return tuple(s for s in self.signals if s.malformed)

    @property
    def deleted_tokens(self) -> int:
        """Total tokens deleted by all signals."""
        return sum(s.deleted for s in self.signals)

    @property
    def completion_text(self) -> str:
        """The final text after the prompt part (what the model's answer shows after the prompt);
        empty when deletions reached into the prompt and nothing followed."""
        kept_prompt = sum(max(0, min(s.end, self.prompt_chars) - s.start) for s in self.kept)
        return self.text[kept_prompt:]


# -- control format -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Format:
    atoms: tuple[str, ...]
    pattern: re.Pattern[str]
    has_category: bool


_FORMATS: dict[str, _Format] = {}


def _compile_format(fmt: str) -> _Format:
    cached = _FORMATS.get(fmt)
    if cached is not None:
        return cached
    atoms = tuple(control_atoms(fmt))
    alternatives = []
    has_category = False
    for i, atom in enumerate(atoms):
        parsed = parse_format(atom, CONTROL_FIELDS)  # FormatError (a ValueError) for anything else
        if not "".join(text for text, _ in parsed.pieces).strip():
            raise ValueError(f"control atom {atom!r} has no literal text to recognise it by")
        has_category = has_category or "category" in parsed.fields
        groups = {name: f"(?P<{name}{i}>{pattern})" for name, pattern in _LOOSE.items()}
        alternatives.append(f"(?P<a{i}>{parsed.regex(groups)})")
    compiled = _Format(atoms, re.compile("|".join(alternatives)), has_category)
    _FORMATS[fmt] = compiled
    return compiled


@dataclass
class _Group:
    start: int
    end: int
    atoms: list[int]
    fields: dict[str, str]
    complete: bool = False


def _find_groups(fmt: _Format, text: str, start: int) -> list[_Group]:
    """Runs of adjacent atom matches; a group is complete when it is exactly the format's atoms."""
    groups: list[_Group] = []
    n_atoms = len(fmt.atoms)
    for match in fmt.pattern.finditer(text, start):
        index = next(i for i in range(n_atoms) if match.group(f"a{i}") is not None)
        fields = {
            name: match.group(f"{name}{index}")
            for name in ("category", "x")
            if f"{name}{index}" in fmt.pattern.groupindex and match.group(f"{name}{index}") is not None
        }
        last = groups[-1] if groups else None
        if (
            last is not None
            and not last.complete
            and last.end == match.start()
            and last.atoms
            and last.atoms[-1] + 1 == index
            and last.atoms[0] == 0
        ):
            last.atoms.append(index)
            last.end = match.end()
            last.fields.update(fields)
        else:
            groups.append(_Group(match.start(), match.end(), [index], dict(fields)))
        current = groups[-1]
        current.complete = current.atoms == list(range(n_atoms))
    return groups


# -- tokens ---------------------------------------------------------------------------------------


@dataclass
class _Stream:
    text: str
    starts: list[int]  # ownership start of each token (non-decreasing); token k owns [starts[k], starts[k+1])
    ids: list[int | None]
    atom_of: dict[int, int]  # token index -> group index (control atom tokens)
    groups: list[_Group]
    prompt_chars: int


def _tokenize_text(
    tokenizer: Any, text: str, cuts: Sequence[tuple[int, int]], base: int
) -> tuple[list[int], list[int | None]]:
    """Ownership starts and ids of ``text`` cut at ``cuts`` (atom spans relative to ``text``, sorted).

    Every cut is one token; every piece between cuts is tokenized as the tokenizer does after a
    special token (pieces after a cut are encoded behind a neutral special token that is then
    dropped: sentencepiece tokenizers prepend "▁" only at the start of a text, not after special
    tokens). Offsets are shifted by ``base``; a piece's first token owns the piece from its start.
    """
    pieces: list[tuple[int, int]] = []
    cursor = 0
    for a, b in cuts:
        pieces.append((cursor, a))
        cursor = b
    pieces.append((cursor, len(text)))
    context = _context_token(tokenizer) if cuts else ""
    batch = [(context if k else "") + text[a:b] for k, (a, b) in enumerate(pieces) if a < b]
    encoded = tokenizer(batch, add_special_tokens=False, return_offsets_mapping=True) if batch else None
    vocab = tokenizer.added_tokens_encoder if cuts else {}  # atoms are added tokens
    starts: list[int] = []
    ids: list[int | None] = []
    j = 0
    for k, (a, b) in enumerate(pieces):
        if a < b:
            assert encoded is not None
            skip = len(context) if k else 0
            first = True
            for tok, (s, e) in zip(encoded["input_ids"][j], encoded["offset_mapping"][j], strict=True):
                if skip and e <= skip:  # the context token
                    continue
                starts.append(base + a if first else max(starts[-1], base + a + s - skip))
                ids.append(tok)
                first = False
            j += 1
        if k < len(cuts):
            ca, cb = cuts[k]
            starts.append(base + ca)
            ids.append(vocab.get(text[ca:cb]))
    return starts, ids


_CONTEXT_TOKENS: dict[int, tuple[Any, str]] = {}


def _context_token(tokenizer: Any) -> str:
    """A special token that strips nothing around it (e.g. ``<|endoftext|>``), '' if none."""
    cached = _CONTEXT_TOKENS.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    found = ""
    for token in tokenizer.added_tokens_decoder.values():
        if token.special and token.content and not (token.lstrip or token.rstrip or token.single_word):
            ids = tokenizer(token.content + "a", add_special_tokens=False)["input_ids"]
            if len(ids) >= 2 and ids[0] == tokenizer.convert_tokens_to_ids(token.content):
                found = token.content
                break
    _CONTEXT_TOKENS[id(tokenizer)] = (tokenizer, found)
    return found


def _lcp(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _decode_pieces(tokenizer: Any, ids: Sequence[int], left: Sequence[int] = ()) -> tuple[str, list[str]]:
    """(text, piece of each id) for token ids decoded after ``left`` context ids.

    Fast path: each piece is ``decode(window + [id])`` minus ``decode(window)`` with a few tokens of
    left context (sentencepiece strips a leading space only at the start of a decode). When the
    pieces do not add up to the full decoding (a window cut through a multi-token character), the
    exact quadratic path assigns each token the characters its prefix decoding adds for good.
    """
    ids = [int(i) for i in ids]
    left = [int(i) for i in left]
    full = [*left, *ids]
    whole = _decode(tokenizer, full)
    base = _lcp(_decode(tokenizer, left), whole) if left else 0
    target = whole[base:]
    windows: list[list[int]] = []
    for k in range(len(left), len(full)):
        lo = max(0, k - _DECODE_WINDOW)
        windows.append(full[lo:k])
        windows.append(full[lo : k + 1])
    decoded = (
        tokenizer.batch_decode(windows, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if windows
        else []
    )
    pieces = []
    for i in range(len(ids)):
        before, after = decoded[2 * i], decoded[2 * i + 1]
        pieces.append(after[len(before) :] if after.startswith(before) else "\0")
    if "".join(pieces) == target:
        return target, pieces
    prefixes = tokenizer.batch_decode(
        [full[: len(left) + k] for k in range(1, len(ids) + 1)],
        skip_special_tokens=False,
        clean_up_tokenization_spaces=False,
    )
    bounds = [base]
    for prefix in prefixes:
        bounds.append(max(bounds[-1], _lcp(prefix, whole)))
    bounds[-1] = len(whole)
    return target, [whole[bounds[k] : bounds[k + 1]] for k in range(len(ids))]


def _build_stream(
    tokenizer: Any,
    body: str | Sequence[int],
    prompt: str | Sequence[int] | None,
    fmt: _Format,
    floor: int | None,
) -> tuple[_Stream, int]:
    """Tokenize prompt and body into one stream; returns it and the floor (characters)."""
    parts: list[str | Sequence[int]] = [] if prompt is None else [prompt]
    parts.append(body)
    # 1. the stream text (ids are decoded, with the previous part's last ids as left context)
    texts: list[str] = []
    decoded: dict[int, list[str]] = {}
    left: list[int] = []
    for n, part in enumerate(parts):
        if isinstance(part, str):
            texts.append(part)
            left = []
            if n + 1 < len(parts) and not isinstance(parts[n + 1], str):
                left = tokenizer(part, add_special_tokens=False)["input_ids"][-_DECODE_WINDOW:]
        else:
            text, pieces = _decode_pieces(tokenizer, part, left)
            texts.append(text)
            decoded[n] = pieces
            left = [int(i) for i in part][-_DECODE_WINDOW:]
    text = "".join(texts)
    bounds = [0]
    for t in texts:
        bounds.append(bounds[-1] + len(t))
    # 2. signals and the floor
    groups = _find_groups(fmt, text, 0)
    if floor is None:
        floor = _text_floor(tokenizer, text)
        if floor is None:
            floor = _ids_floor(tokenizer, parts, decoded, bounds)
    groups = [g for g in groups if g.start >= floor]
    atoms = [(m.start(), m.end()) for g in groups for m in fmt.pattern.finditer(text, g.start, g.end)]
    # 3. tokens: text parts cut at the atoms, id parts as given
    starts: list[int] = []
    ids: list[int | None] = []
    for n, part in enumerate(parts):
        lo, hi = bounds[n], bounds[n + 1]
        if isinstance(part, str):
            cuts = [(a - lo, b - lo) for a, b in atoms if lo <= a and b <= hi]
            s, i = _tokenize_text(tokenizer, part, cuts, lo)
            starts.extend(s)
            ids.extend(i)
        else:
            position = lo
            for tok, piece in zip(part, decoded[n], strict=True):
                starts.append(position)
                ids.append(int(tok))
                position += len(piece)
    atom_of: dict[int, int] = {}
    for gi, g in enumerate(groups):
        for k in _tokens_overlapping(starts, len(text), g.start, g.end):
            atom_of[k] = gi
    prompt_chars = bounds[1] if prompt is not None else 0
    return _Stream(text, starts, ids, atom_of, groups, prompt_chars), floor


def _tokens_overlapping(starts: Sequence[int], length: int, a: int, b: int) -> list[int]:
    """Indices of tokens whose owned characters intersect [a, b)."""
    n = len(starts)
    k = max(0, bisect.bisect_right(starts, a) - 1)
    out = []
    while k < n and starts[k] < b:
        end = starts[k + 1] if k + 1 < n else length
        if end > a and end > starts[k]:
            out.append(k)
        k += 1
    return out


# -- floor ----------------------------------------------------------------------------------------

_MARKERS: dict[int, tuple[Any, str, tuple[int, ...]]] = {}
_USER = "\u2063BSAFE_USER\u2063"


def assistant_marker(tokenizer: Any) -> str:
    """The chat-template text between a user turn and the assistant answer (e.g.
    ``<|im_end|>\\n<|im_start|>assistant\\n``); the default floor is the end of its last occurrence."""
    return _marker(tokenizer)[0]


def _marker(tokenizer: Any) -> tuple[str, tuple[int, ...]]:
    cached = _MARKERS.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer:
        return cached[1], cached[2]
    head, _tail = chat_frame(tokenizer, [{"role": "user", "content": _USER}])
    marker = head[head.rindex(_USER) + len(_USER) :]
    marker_ids = tuple(tokenizer(marker, add_special_tokens=False)["input_ids"]) if marker else ()
    _MARKERS[id(tokenizer)] = (tokenizer, marker, marker_ids)
    return marker, marker_ids


def _text_floor(tokenizer: Any, text: str) -> int | None:
    """End of the last assistant header of the stream, or None when there is none."""
    marker, _ids = _marker(tokenizer)
    if marker:
        at = text.rfind(marker)
        if at >= 0:
            return at + len(marker)
    return None


def _ids_floor(
    tokenizer: Any,
    parts: Sequence[str | Sequence[int]],
    decoded: dict[int, list[str]],
    bounds: Sequence[int],
) -> int:
    """The last header matched by token ids in the id parts (decoding may drop whitespace a special
    token strips, so the text search can miss it); 0 when there is none."""
    _marker_text, marker_ids = _marker(tokenizer)
    m = len(marker_ids)
    best = 0
    for n, part in enumerate(parts):
        if isinstance(part, str) or not m:
            continue
        seq = [int(i) for i in part]
        positions = [bounds[n]]
        for piece in decoded[n]:
            positions.append(positions[-1] + len(piece))
        for k in range(len(seq) - m, -1, -1):
            if tuple(seq[k : k + m]) == marker_ids:
                best = max(best, positions[k + m])
                break
    return best


# -- execution ------------------------------------------------------------------------------------


def _runs(stream: _Stream, indices: Sequence[int]) -> tuple[Span, ...]:
    """Maximal runs of consecutive token indices as Spans, in stream order."""
    n = len(stream.starts)
    bounds: list[list[int]] = []
    for k in sorted(indices):
        if bounds and bounds[-1][1] == k:
            bounds[-1][1] = k + 1
        else:
            bounds.append([k, k + 1])
    spans = []
    for lo, hi in bounds:
        start = stream.starts[lo]
        end = stream.starts[hi] if hi < n else len(stream.text)
        spans.append(Span(start, end, lo, hi, stream.text[start:end]))
    return tuple(spans)


def apply_backtracks(
    text_or_ids: str | Sequence[int],
    tokenizer: Any,
    control_format: str = DEFAULT_CONTROL_FORMAT,
    *,
    prompt: str | Sequence[int] | None = None,
    floor: int | None = None,
    categories: Iterable[str] | None = RLBF_CATEGORIES,
) -> Trajectory:
    """Execute every control signal of ``prompt + text_or_ids`` in order; see the module docstring.

    ``text_or_ids``: the text (or token ids) to decode, e.g. a whole rendered row or a completion.
    ``prompt``: optional stream prefix tokenized on its own (text or ids), e.g. the prompt a
    completion was generated from; deletions may reach into it down to the floor.
    ``floor``: character offset into the stream text before which nothing is deleted; default: the
    end of the stream's last assistant header, else 0.
    ``categories``: the known categories (``None`` accepts any category).
    """
    fmt = _compile_format(control_format)
    known = None if categories is None else frozenset(categories)
    stream, floor_chars = _build_stream(tokenizer, text_or_ids, prompt, fmt, floor)
    n = len(stream.starts)
    floor_token = next((k for k in range(n) if stream.starts[k] >= floor_chars), n)
    # group -> index of its first token
    first_token: dict[int, int] = {}
    for k, gi in sorted(stream.atom_of.items()):
        first_token.setdefault(gi, k)
    live: list[int] = []  # visible, deletable tokens so far (stack)
    deleted: set[int] = set()
    signals: list[Signal] = []
    done_groups: set[int] = set()
    for k in range(n):
        gi = stream.atom_of.get(k)
        if gi is None:
            if k >= floor_token:
                live.append(k)
            continue
        if gi in done_groups:
            continue
        done_groups.add(gi)
        group = stream.groups[gi]
        signals.append(_execute(stream, group, k, fmt, known, live, deleted))
    kept = [k for k in range(n) if k not in deleted and k not in stream.atom_of]
    kept_spans = _runs(stream, kept)
    final = "".join(s.text for s in kept_spans)
    return Trajectory(
        text=final,
        ids=tuple(stream.ids[k] for k in kept if stream.ids[k] is not None),
        stream=stream.text,
        floor=floor_chars,
        floor_token=floor_token,
        kept=kept_spans,
        removed=_runs(stream, sorted(deleted)),
        signals=tuple(signals),
        tokens=n,
        starts=tuple(stream.starts),
        prompt_chars=stream.prompt_chars,
    )


def _execute(
    stream: _Stream,
    group: _Group,
    token_index: int,
    fmt: _Format,
    known: frozenset[str] | None,
    live: list[int],
    deleted: set[int],
) -> Signal:
    text = stream.text[group.start : group.end]
    category = group.fields.get("category") if fmt.has_category else None
    raw_x = group.fields.get("x")
    x = int(raw_x) if raw_x is not None and _X.fullmatch(raw_x) else None
    base = {"text": text, "start": group.start, "end": group.end, "token_index": token_index}
    if not group.complete or x is None or (fmt.has_category and not category):
        return Signal(**base, category=category if group.complete else None, x=x, malformed="unparsable")
    malformed = None
    if known is not None and fmt.has_category and category not in known:
        malformed = "unknown_category"
    take = min(x, len(live))
    if take < x:
        malformed = "x_exceeds_floor"
    removed = live[len(live) - take :] if take else []
    del live[len(live) - take :]
    deleted.update(removed)
    return Signal(
        **base, category=category, x=x, deleted=take, removed=_runs(stream, removed), malformed=malformed
    )
