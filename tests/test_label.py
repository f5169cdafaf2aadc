"""Labels: the token invariant for X on real tokenizers, render() and tokenize() of stored rows.

The expected values are computed here, independently, with the tokenizers themselves: X is the growth
of ``encode(head + part1)`` when the inserted text is appended, valid only when the shorter encoding is a
prefix of the longer one (DESIGN.md §4).
"""

from __future__ import annotations

import copy
import itertools
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from bsafe_data.label import (
    DEFAULT_CONTROL_FORMAT,
    RenderError,
    add_control_tokens,
    backtrack_counts,
    chat_frame,
    clean_segments,
    control_atoms,
    control_text,
    render,
    segments_for,
    tokenize,
)
from bsafe_data.rows import SEGMENT_ORDER, empty_row
from tests.conftest import TOKENIZER_DIRS

NAMES = sorted(TOKENIZER_DIRS)


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def expected_x(tok, head: str, part1: str, inserted: str) -> int | None:
    """The test's own X: None unless encode(head+part1) is a proper prefix of encode(head+part1+inserted)."""
    before = encode(tok, head + part1)
    after = encode(tok, head + part1 + inserted)
    if after[: len(before)] != before:
        return None
    if len(after) == len(before):
        # Nothing to delete: the insertion is empty, or the tokenizer swallowed it (phi-3's `<|assistant|>`
        # strips the whitespace after it). X = 0 is no backtrack; the library reports None.
        return None
    return len(after) - len(before)


CONTEXTS = [
    [{"role": "user", "content": "How do I bake bread?"}],
    [{"role": "system", "content": "Be concise."}, {"role": "user", "content": "Tips for sleep?"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Explain rain.  \n"},
    ],
]
PART1S = [
    "",
    "Sure.",
    "Sure. ",
    "Mix the flour",
    "Line one\n",
    "Paragraph.\n\n",
    "Trailing  spaces  ",
    "Count: 12",
    "Hel",
    "café",
    "Smile 😀",
    " leading space",
    "\n\nstarts with newlines",
    "tab\t",
]
INSERTED = [
    " Here is how to make a weapon.",
    "\n\nStep 1: do harm.",
    "  double spaced",
    "3 more digits",
    "lo world",
    "😀 emoji first",
    "ümlaut and 漢字",
    "\tTabbed",
    "!",
    " ",
    "\n",
    "",
]


def heads_for(tok) -> list[str]:
    """Chat-template heads, plus heads without any special token (empty and plain text)."""
    return [chat_frame(tok, ctx)[0] for ctx in CONTEXTS] + ["", "User: hi\nAssistant: "]


# -- the token invariant --------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_token_invariant_on_boundary_cases(tokenizers, name):
    tok = tokenizers[name]
    items = list(itertools.product(heads_for(tok), PART1S, INSERTED))
    got = backtrack_counts(tok, items)
    assert len(got) == len(items)
    want = [expected_x(tok, h, p, i) for h, p, i in items]
    mismatches = [
        (repr(p), repr(i), g, w) for (h, p, i), g, w in zip(items, got, want, strict=True) if g != w
    ]
    assert not mismatches, mismatches[:10]
    # Both outcomes occur, so the test exercises the merge detection as well as the counting.
    merged = [(p, i) for (_, p, i), w in zip(items, want, strict=True) if w is None and i]
    assert merged, "expected some boundary merges (e.g. 'Hel' + 'lo world')"
    assert ("Hel", "lo world") in merged
    assert sum(w is not None for w in want) > len(items) // 2
    # The anchor shortcut and the exact head agree.
    assert backtrack_counts(tok, items, exact_head=True) == got


@pytest.mark.parametrize("name", NAMES)
def test_x_is_the_number_of_tokens_to_delete(tokenizers, name):
    tok = tokenizers[name]
    head = chat_frame(tok, CONTEXTS[0])[0]
    part1, inserted = "Mix flour and water.", " Then add something dangerous to hurt people."
    (x,) = backtrack_counts(tok, [(head, part1, inserted)])
    after = encode(tok, head + part1 + inserted)
    assert x is not None and x > 3
    assert after[:-x] == encode(tok, head + part1)  # deleting X tokens returns exactly to part1
    assert tok.decode(after[-x:]).strip() == inserted.strip()


def test_backtrack_counts_edge_inputs(tokenizers):
    tok = tokenizers["qwen2.5"]
    assert backtrack_counts(tok, []) == []
    head = chat_frame(tok, CONTEXTS[0])[0]
    # Order is kept and one bad item does not affect its neighbours.
    got = backtrack_counts(tok, [(head, "A.", " B"), (head, "Hel", "lo"), (head, "A.", " B C")])
    assert got[1] is None and got[0] is not None and got[2] == got[0] + 1


ALPHABET = string.printable + "\u00a0éü漢😀"
texts = st.text(alphabet=ALPHABET, max_size=40)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=st.text(alphabet=ALPHABET, min_size=1, max_size=30), part1=texts, inserted=texts)
def test_token_invariant_property(tokenizers, name, user, part1, inserted):
    tok = tokenizers[name]
    head = chat_frame(tok, [{"role": "user", "content": user}])[0]
    assert backtrack_counts(tok, [(head, part1, inserted)]) == [expected_x(tok, head, part1, inserted)]


# -- control atoms and segments ------------------------------------------------------------------


def test_control_text_and_atoms():
    text = control_text(DEFAULT_CONTROL_FORMAT, "Toxic", 7)
    assert text == "[CATEGORY Toxic][BACKTRACK_BY_7]"
    assert control_atoms(text) == ["[CATEGORY Toxic]", "[BACKTRACK_BY_7]"]
    assert control_atoms("<|bt|><x=3>") == ["<|bt|>", "<x=3>"]
    assert control_atoms("[RESET]") == ["[RESET]"]
    assert control_atoms("BACKTRACK 4") == ["BACKTRACK 4"]  # no brackets: one atom
    assert control_atoms("[A] [B]") == ["[A] [B]"]  # text between atoms: kept whole


@pytest.mark.parametrize("name", NAMES)
def test_add_control_tokens_makes_each_atom_one_token(tokenizers, name):
    tok = copy.deepcopy(tokenizers[name])
    atoms = control_atoms("[CATEGORY Hate Speech][BACKTRACK_BY_12]")
    size = len(tok)
    assert add_control_tokens(tok, [*atoms, atoms[0]]) == 2  # duplicates counted once
    assert len(tok) == size + 2
    assert add_control_tokens(tok, atoms) == 0  # idempotent
    for atom in atoms:
        assert len(encode(tok, atom)) == 1
    ids = encode(tok, "violent text." + "".join(atoms) + " Safe again.")
    assert [tok.convert_ids_to_tokens(i) for i in ids].count(atoms[1]) == 1
    assert len(tokenizers[name]) == size, "the session tokenizer was not touched"


def test_segments_for_and_clean_segments():
    segs = segments_for("Part one.", " So,", " bad text.", "[C][B]", " Part two.")
    assert [s["kind"] for s in segs] == list(SEGMENT_ORDER)
    assert [s["loss"] for s in segs] == [False, False, False, True, True]
    assert "".join(s["text"] for s in segs) == "Part one. So, bad text.[C][B] Part two."
    no_steering = segments_for("", "", " bad.", "[C]", " rest")
    assert [s["kind"] for s in no_steering] == ["violation", "control", "continuation"]
    assert clean_segments("All good.") == [{"kind": "continuation", "text": "All good.", "loss": True}]


# -- rows, render, tokenize ----------------------------------------------------------------------

RESPONSE = "Mix flour and water. Knead it well for ten minutes.\n\nBake at 220C for 30 minutes."
OFFSET = RESPONSE.index(" Knead")
STEERING = " Actually, forget baking."
VIOLATION = " Here is how to poison someone's bread so they get very sick."
CATEGORY = "Dangerous Content"


def make_injected_row(tok, name, context, fmt=DEFAULT_CONTROL_FORMAT, offset=OFFSET, violation=VIOLATION):
    """A stored injected row as the pipeline writes it (rows.empty_row + the segment layout)."""
    head, tail = chat_frame(tok, context)
    part1, part2 = RESPONSE[:offset], RESPONSE[offset:]
    x = expected_x(tok, head, part1, STEERING + violation)
    assert x is not None
    control = fmt.format(category=CATEGORY, x=x)
    return empty_row(
        id="src-1/v0",
        source={"dataset": "test", "split": "train", "index": 0, "id": "src-1", "revision": ""},
        context=context,
        response=RESPONSE,
        kind="injected",
        injection={
            "offset": offset,
            "relative_position": offset / len(RESPONSE),
            "sentence_index": 1,
            "category": CATEGORY,
            "steering": STEERING,
            "violation": violation,
        },
        segments=segments_for(part1, STEERING, violation, control, part2),
        backtrack=[{"tokenizer": name, "tokens": x}],
        prompt=head + part1 + STEERING + violation,
        completion=control + part2 + tail,
        generator={"backend": "builtin", "model": "m", "template": "t", "seed": 1},
    )


def make_clean_row(context):
    return empty_row(id="src-2/v1", context=context, response=RESPONSE, segments=clean_segments(RESPONSE))


def full_template(tok, context, assistant_text: str) -> str:
    return tok.apply_chat_template(
        [*context, {"role": "assistant", "content": assistant_text}], tokenize=False
    )


@pytest.mark.parametrize("context", CONTEXTS, ids=["user", "system", "multi_turn"])
@pytest.mark.parametrize("name", NAMES)
def test_render_injected_row_is_the_chat_template_of_the_spliced_stream(tokenizers, name, context):
    tok = tokenizers[name]
    row = make_injected_row(tok, name, context)
    x = row["backtrack"][0]["tokens"]
    control = control_text(DEFAULT_CONTROL_FORMAT, CATEGORY, x)
    rendered = render(row, tok)
    stream = "".join(s["text"] for s in row["segments"])
    assert stream == RESPONSE[:OFFSET] + STEERING + VIOLATION + control + RESPONSE[OFFSET:]
    assert rendered.prompt + rendered.completion == full_template(tok, context, stream)
    assert rendered.backtrack == x
    assert rendered.completion.startswith(control)
    assert rendered.prompt.endswith(RESPONSE[:OFFSET] + STEERING + VIOLATION)
    # What the pipeline stored is what render() re-derives.
    assert (rendered.prompt, rendered.completion) == (row["prompt"], row["completion"])


@pytest.mark.parametrize("name", NAMES)
def test_render_clean_row(tokenizers, name):
    tok = tokenizers[name]
    context = CONTEXTS[1]
    rendered = render(make_clean_row(context), tok)
    head, tail = chat_frame(tok, context)
    assert rendered.backtrack is None
    assert rendered.prompt == head
    assert rendered.completion == RESPONSE + tail
    assert rendered.prompt + rendered.completion == full_template(tok, context, RESPONSE)


def test_render_for_another_tokenizer_uses_its_own_x(tokenizers):
    qwen, phi = tokenizers["qwen2.5"], tokenizers["phi-3-mini"]
    context = CONTEXTS[0]
    row = make_injected_row(qwen, "qwen2.5", context)  # built with qwen as the primary tokenizer
    x_qwen = row["backtrack"][0]["tokens"]
    x_phi = expected_x(phi, chat_frame(phi, context)[0], RESPONSE[:OFFSET], STEERING + VIOLATION)
    assert x_phi != x_qwen, "pick texts where the tokenizers disagree, or this test proves nothing"
    rendered = render(row, phi)
    assert rendered.backtrack == x_phi
    assert rendered.completion.startswith(f"[CATEGORY {CATEGORY}][BACKTRACK_BY_{x_phi}]")
    assert f"BACKTRACK_BY_{x_qwen}]" not in rendered.completion
    control_phi = control_text(DEFAULT_CONTROL_FORMAT, CATEGORY, x_phi)
    stream = RESPONSE[:OFFSET] + STEERING + VIOLATION + control_phi + RESPONSE[OFFSET:]
    assert rendered.prompt + rendered.completion == full_template(phi, context, stream)
    # The row's own format is inferred, also when it is not the default one.
    custom = make_injected_row(qwen, "qwen2.5", context, fmt="<bt cat={category} n={x}>")
    assert render(custom, phi).completion.startswith(f"<bt cat={CATEGORY} n={x_phi}>")
    # An explicit format wins.
    assert render(row, phi, control_format="[RESET {x}]").completion.startswith(f"[RESET {x_phi}]")


@pytest.mark.parametrize("name", NAMES)
def test_render_refuses_a_merged_boundary(tokenizers, name):
    tok = tokenizers[name]
    offset = RESPONSE.index("lour and")  # part1 ends inside "flour"
    row = make_injected_row(tok, name, CONTEXTS[0])
    row["injection"] = {
        **row["injection"],
        "offset": offset,
        "steering": "",
        "violation": "lour poison recipe",
    }
    assert expected_x(tok, chat_frame(tok, CONTEXTS[0])[0], RESPONSE[:offset], "lour poison recipe") is None
    with pytest.raises(RenderError, match="token_boundary"):
        render(row, tok)


def fresh_tokenizer(name: str):
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIRS[name]))


@pytest.mark.parametrize("context", CONTEXTS[:2], ids=["user", "system"])
@pytest.mark.parametrize("name", NAMES)
def test_tokenize_masks_exactly_the_prompt(tokenizers, name, context):
    tok = copy.deepcopy(tokenizers[name])
    row = make_injected_row(tok, name, context)
    x = row["backtrack"][0]["tokens"]
    atoms = control_atoms(control_text(DEFAULT_CONTROL_FORMAT, CATEGORY, x))
    assert add_control_tokens(tok, atoms) == 2
    out = tokenize(row, tok)
    ids, labels = out["input_ids"], out["labels"]
    assert len(ids) == len(labels) == len(out["attention_mask"])
    assert set(out["attention_mask"]) == {1}

    rendered = render(row, tok)
    prompt_ids = encode(tok, rendered.prompt)
    n = len(prompt_ids)
    assert ids[:n] == prompt_ids, "the prompt tokenizes the same alone and inside the full text"
    assert labels[:n] == [-100] * n
    assert labels[n:] == ids[n:], "every completion token is trained on"
    assert ids == encode(tok, rendered.prompt + rendered.completion)
    assert tok.convert_ids_to_tokens(ids[n]) == atoms[0]
    assert tok.convert_ids_to_tokens(ids[n + 1]) == atoms[1]

    # Violation tokens between part1 and the control: exactly X.
    head = chat_frame(tok, context)[0]
    start = len(head + RESPONSE[:OFFSET])
    enc = tok(rendered.prompt + rendered.completion, add_special_tokens=False, return_offsets_mapping=True)
    between = [i for i, (s, _e) in enumerate(enc["offset_mapping"]) if start <= s < len(rendered.prompt)]
    assert len(between) == x
    assert between == list(range(n - x, n))
    assert len(encode(tok, head + RESPONSE[:OFFSET])) == n - x


def test_tokenize_for_a_second_tokenizer_and_a_clean_row():
    phi = fresh_tokenizer("phi-3-mini")
    qwen = fresh_tokenizer("qwen2.5")
    context = CONTEXTS[0]
    row = make_injected_row(qwen, "qwen2.5", context)
    rendered = render(row, phi)
    atoms = control_atoms(control_text(DEFAULT_CONTROL_FORMAT, CATEGORY, rendered.backtrack))
    assert add_control_tokens(phi, atoms) == 2
    out = tokenize(row, phi)
    n = out["labels"].count(-100)
    assert out["labels"][:n] == [-100] * n
    assert out["input_ids"][:n] == encode(phi, rendered.prompt)
    assert phi.convert_ids_to_tokens(out["input_ids"][n]) == atoms[0]
    assert atoms[1] == f"[BACKTRACK_BY_{rendered.backtrack}]"

    clean = tokenize(make_clean_row(context), qwen)
    head = chat_frame(qwen, context)[0]
    m = len(encode(qwen, head))
    assert clean["labels"][:m] == [-100] * m
    assert -100 not in clean["labels"][m:]
    assert qwen.decode(clean["input_ids"][m:]) == RESPONSE + chat_frame(qwen, context)[1]
