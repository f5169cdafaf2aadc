"""Labels: the token invariant for X on real tokenizers, render() and tokenize() of stored rows.

The expected values are computed here, independently, with the tokenizers themselves: X is the growth
of ``encode(head + part1)`` when the inserted text is appended, valid only when the shorter encoding is a
prefix of the longer one (README, "How a row is made").
"""

from __future__ import annotations

import copy
import itertools
import json
import string
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from bsafe_data.label import (
    _FACTS,
    DEFAULT_CONTROL_FORMAT,
    RENDER_REASONS,
    ControlTokenError,
    RenderError,
    add_control_tokens,
    anchor,
    backtrack_counts,
    chat_frame,
    clean_segments,
    control_atoms,
    control_text,
    control_tokens,
    end_of_turn,
    render,
    segments_for,
    tokenize,
)
from bsafe_data.rows import SEGMENT_ORDER, empty_row
from tests.conftest import REPO, TOKENIZER_DIRS

NAMES = sorted(TOKENIZER_DIRS)
# The token each completion ends with, and the template text after it that training leaves out.
END_OF_TURN = {"qwen2.5": "<|im_end|>", "phi-3-mini": "<|end|>"}
AFTER_END = {"qwen2.5": "\n", "phi-3-mini": "\n<|endoftext|>"}


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
    # The training text is the template's, cut after the end-of-turn token.
    assert full_template(tok, context, stream) == rendered.prompt + rendered.completion + AFTER_END[name]
    assert rendered.completion.endswith(END_OF_TURN[name])
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
    assert tail == END_OF_TURN[name]
    assert full_template(tok, context, RESPONSE) == rendered.prompt + rendered.completion + AFTER_END[name]


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
    after = AFTER_END["phi-3-mini"]
    assert full_template(phi, context, stream) == rendered.prompt + rendered.completion + after
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


# -- endings for every template family ----------------------------------------------------------
# Real tokenizers (copies of the fixtures) with small chat templates written after the families'
# published ones: nothing is downloaded.

LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# Qwen3-style: the final assistant turn gets a (here empty) thinking block before the answer.
THINKING_TEMPLATE = (
    "{%- for message in messages %}{%- if message.role == 'assistant' and loop.last %}"
    "{{- '<|im_start|>assistant\n<think>\n' + (message.reasoning_content | default('')) + '\n</think>\n\n'"
    " + message.content + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n<think>\n\n</think>\n\n' }}"
    "{%- endif %}"
)
# Plain-text format (Alpaca-like): no special token after the answer.
PLAIN_TEMPLATE = (
    "{%- for message in messages %}{%- if message.role == 'assistant' %}"
    "{{- '### Response:\n' + message.content + '\n\n' }}"
    "{%- else %}{{- '### ' + message.role | capitalize + ':\n' + message.content + '\n\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '### Response:\n' }}{%- endif %}"
)

# family -> (end-of-turn token, template text after it, whether it is also the tokenizer's EOS)
FAMILIES = {
    "qwen2.5": ("<|im_end|>", "\n", True),
    "phi-3-mini": ("<|end|>", "\n<|endoftext|>", False),
    "llama3": ("<|eot_id|>", "", True),
    "llama3-base-eos": ("<|eot_id|>", "", False),
    "mistral": ("</s>", "", True),
    "thinking": ("<|im_end|>", "\n", True),
    "plain": ("<|endoftext|>", None, True),
    "no_template": ("<|im_end|>", None, True),
    "bytes": ("<|im_end|>", "\n", True),
}
BOS_FAMILIES = {"llama3", "llama3-base-eos", "mistral"}


def family_tokenizer(family: str):
    """A fresh tokenizer of ``family`` (see FAMILIES), built from a fixture tokenizer."""
    if family in TOKENIZER_DIRS:
        return fresh_tokenizer(family)
    if family.startswith("llama3"):
        tok = fresh_tokenizer("qwen2.5")  # byte-level BPE like Llama 3's
        tok.add_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], special_tokens=True)
        # Llama 3.1 Instruct ends generation at <|eot_id|>; the base/3.0 config has <|end_of_text|>.
        eos = "<|eot_id|>" if family == "llama3" else "<|end_of_text|>"
        tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": eos})
        tok.add_bos_token = True  # Llama 3 prepends <|begin_of_text|> on encode
        tok.chat_template = LLAMA3_TEMPLATE
        return tok
    if family == "mistral":
        tok = fresh_tokenizer("phi-3-mini")  # SentencePiece-style like Mistral's
        tok.add_tokens(["[INST]", "[/INST]"], special_tokens=True)
        tok.add_special_tokens({"eos_token": "</s>"})
        tok.add_bos_token = True  # Mistral prepends <s> on encode
        tok.chat_template = MISTRAL_TEMPLATE
        return tok
    if family == "bytes":
        return bytes_tokenizer()
    tok = fresh_tokenizer("qwen2.5")
    if family == "thinking":
        tok.add_tokens(["<think>", "</think>"])  # ordinary added tokens, as in Qwen3
        tok.chat_template = THINKING_TEMPLATE
    elif family == "plain":
        tok.add_special_tokens({"eos_token": "<|endoftext|>"})
        tok.chat_template = PLAIN_TEMPLATE
    elif family == "no_template":
        tok.chat_template = None
    else:
        raise KeyError(family)
    return tok


def bytes_tokenizer():
    """A real byte-level tokenizer without merges (one token per byte) and Qwen's ChatML template.

    Its X values are far larger than any recipe tokenizer's: a family whose control atoms the
    dataset's manifest does not list.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = fresh_tokenizer("qwen2.5").chat_template
    return tok


@pytest.fixture(scope="module")
def families():
    return {family: family_tokenizer(family) for family in FAMILIES}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_completion_ends_exactly_at_the_end_of_turn_token(families, family):
    tok = copy.deepcopy(families[family])
    end, after, is_eos = FAMILIES[family]
    assert end_of_turn(tok) == end
    assert (tok.eos_token == end) is is_eos  # where False, SFTConfig(eos_token=end_of_turn(tok))
    context = CONTEXTS[0]
    head, tail = chat_frame(tok, context)
    assert tail.endswith(end) and tail.count(end) == 1
    row = make_injected_row(tok, family, context)
    rendered = render(row, tok)
    clean = render(make_clean_row(context), tok)
    for r, answer in ((rendered, None), (clean, RESPONSE)):
        assert r.completion.endswith(end)
        if after is None:
            continue  # no template text to compare with: the EOS is appended
        stream = answer or "".join(s["text"] for s in row["segments"])
        bos = tok.bos_token if family in BOS_FAMILIES else ""
        assert full_template(tok, context, stream) == bos + r.prompt + r.completion + after
    if family == "thinking":
        assert head.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    if family == "no_template":
        assert head == "User: How do I bake bread?\nAssistant:\n" and tail == tok.eos_token
    if family == "plain":
        assert head.endswith("### Response:\n") and tail == "<|endoftext|>"

    add_control_tokens(tok, control_atoms(rendered.control))
    end_id = tok.convert_tokens_to_ids(end)
    for r_row in (row, make_clean_row(context)):
        out = tokenize(r_row, tok)
        ids, labels = out["input_ids"], out["labels"]
        assert ids[-1] == end_id and labels[-1] == end_id, "the end-of-turn token is the last trained token"
        assert ids.count(end_id) == 1 + encode(tok, head).count(end_id)  # nothing trained after it
        if family in BOS_FAMILIES:
            # The tokenizer adds the BOS; the prompt does not repeat it.
            assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
            assert not head.startswith(tok.bos_token)


def test_template_that_rejects_the_context_is_a_render_error(families):
    tok = families["mistral"]
    row = make_clean_row(CONTEXTS[1])  # a system turn: this Mistral template raises
    with pytest.raises(RenderError, match="chat_template") as info:
        render(row, tok)
    assert info.value.reason == "chat_template" and info.value.reason in RENDER_REASONS


def test_render_error_reasons_survive_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(RenderError("token_boundary: x", reason="token_boundary")))
    assert err.reason == "token_boundary" and str(err) == "token_boundary: x"


def test_tokenize_labels_follow_trl_common_prefix_rule(tokenizers):
    """labels = -100 on encode(prompt), the rest trained; a prompt that is no token prefix is refused."""
    tok = tokenizers["qwen2.5"]
    context = CONTEXTS[0]
    clean = make_clean_row(context)
    out = tokenize(clean, tok)
    head = chat_frame(tok, context)[0]
    n = len(tok(head)["input_ids"])
    assert out["labels"] == [-100] * n + out["input_ids"][n:]
    # A clean answer starting with a newline merges with the head's "\n": no exact border exists.
    merged = make_clean_row(context)
    merged["response"] = "\n\nStarts with blank lines."
    with pytest.raises(RenderError, match="prompt_boundary") as info:
        tokenize(merged, tok)
    assert info.value.reason == "prompt_boundary"


# -- control vocabulary ----------------------------------------------------------------------------


def test_tokenize_refuses_to_split_a_control_atom(tokenizers):
    tok = copy.deepcopy(tokenizers["qwen2.5"])
    row = make_injected_row(tok, "qwen2.5", CONTEXTS[0])
    with pytest.raises(ControlTokenError, match="add_control_tokens") as info:
        tokenize(row, tok)
    assert "[CATEGORY Dangerous Content]" in str(info.value)
    atoms = control_tokens([row], tok)
    assert add_control_tokens(tok, atoms[:1]) == 1
    assert atoms[0].startswith("[BACKTRACK_BY_")
    with pytest.raises(ControlTokenError, match=r"CATEGORY Dangerous"):  # one atom still missing
        tokenize(row, tok)
    add_control_tokens(tok, atoms)
    assert tokenize(row, tok)["labels"].count(-100) > 0


def test_add_control_tokens_refuses_atoms_that_cannot_be_one_token(tokenizers):
    tok = copy.deepcopy(tokenizers["qwen2.5"])
    with pytest.raises(ControlTokenError, match="cannot be made single tokens"):
        add_control_tokens(tok, ["[OK]", ""])
    # An atom that is already an ordinary vocabulary token becomes an added token with its id.
    size = len(tok)
    hello = tok.convert_tokens_to_ids("Hello")
    assert "Hello" not in tok.get_added_vocab()
    assert add_control_tokens(tok, ["Hello"]) == 0 and len(tok) == size  # no new embedding row
    assert tok.convert_tokens_to_ids("Hello") == hello and "Hello" in tok.get_added_vocab()
    assert encode(tok, "sayHello")[-1] == hello  # now split out of any neighbouring text


def test_control_tokens_recorded_and_recounted(tokenizers):
    qwen, phi = tokenizers["qwen2.5"], tokenizers["phi-3-mini"]
    row = make_injected_row(qwen, "qwen2.5", CONTEXTS[0])
    x_qwen = row["backtrack"][0]["tokens"]
    x_phi = expected_x(phi, chat_frame(phi, CONTEXTS[0])[0], RESPONSE[:OFFSET], STEERING + VIOLATION)
    row["backtrack"].append({"tokenizer": "phi-3-mini", "tokens": x_phi})
    clean = make_clean_row(CONTEXTS[0])
    cat = f"[CATEGORY {CATEGORY}]"
    # Recorded: every recorded tokenizer's X, in natural order (2 < 10), atoms listed once.
    assert control_tokens([row, clean, row]) == sorted(
        {f"[BACKTRACK_BY_{x_qwen}]", f"[BACKTRACK_BY_{x_phi}]"},
        key=lambda a: int(a.rstrip("]").split("_")[-1]),
    ) + [cat]
    # Re-counted for a tokenizer: only its own X.
    assert control_tokens([row, clean], phi) == [f"[BACKTRACK_BY_{x_phi}]", cat]
    assert control_tokens([row], qwen) == [f"[BACKTRACK_BY_{x_qwen}]", cat]
    assert control_tokens([row], phi, control_format="<bt {category} {x}>") == [f"<bt {CATEGORY} {x_phi}>"]
    assert control_tokens([clean]) == []
    # Rows that do not render for the tokenizer are skipped (rerender drops them).
    broken = copy.deepcopy(row)
    broken["injection"] = {
        **broken["injection"],
        "offset": RESPONSE.index("lour and"),
        "steering": "",
        "violation": "lour poison",
    }
    assert control_tokens([broken], phi) == []
    # datasets objects work as well as lists.
    import datasets

    from bsafe_data.rows import ROW_FEATURES

    ds = datasets.Dataset.from_list([row, clean], features=ROW_FEATURES)
    assert control_tokens(ds) == control_tokens([row, clean])
    assert control_tokens(datasets.DatasetDict({"train": ds, "test": ds}), phi) == control_tokens([row], phi)


def test_special_token_cache_is_not_stored_on_the_tokenizer(tokenizers):
    tok = copy.deepcopy(tokenizers["qwen2.5"])
    head = chat_frame(tok, CONTEXTS[0])[0]
    assert not [a for a in vars(tok) if "bsafe" in a]
    assert tok in _FACTS
    text = head + "text[CATEGORY New]more"
    assert anchor(tok, text) == "<|im_start|>assistant\ntext[CATEGORY New]more"
    add_control_tokens(tok, ["[CATEGORY New]"])  # the cache notices the new special token
    assert anchor(tok, text) == "[CATEGORY New]more"
    import gc
    import weakref

    ref = weakref.ref(tok)
    del tok
    gc.collect()
    assert ref() is None, "the cache does not keep the tokenizer alive"


# -- rerender (no torch needed) --------------------------------------------------------------------


def test_rerender_recomputes_rows_and_reports_drops(tokenizers, families):
    import datasets

    from bsafe_data import rerender
    from bsafe_data.rows import ROW_FEATURES

    qwen = tokenizers["qwen2.5"]
    rows = [make_injected_row(qwen, "qwen2.5", ctx) for ctx in CONTEXTS]  # CONTEXTS[1] has a system turn
    rows[2]["id"] = "merged"
    rows[2]["injection"] = {
        **rows[2]["injection"],
        "offset": RESPONSE.index("lour and"),
        "steering": "",
        "violation": "lour poison recipe",
    }
    rows.append(make_clean_row(CONTEXTS[0]))
    ds = datasets.Dataset.from_list(rows, features=ROW_FEATURES)
    mistral = families["mistral"]
    result = rerender(ds, mistral, name="mistral")
    assert result.rows_in == 4 and result.rows_out == result.dataset.num_rows == 2
    assert result.dropped == {"chat_template": 1, "token_boundary": 1}
    assert result.end_of_turn == "</s>"
    assert result.dataset.column_names == ds.column_names
    assert result.dataset.features == ds.features
    out = result.dataset.to_list()
    assert [r["kind"] for r in out] == ["injected", "clean"]
    for got in out:
        want = render(rows[0] if got["kind"] == "injected" else rows[3], mistral)
        assert (got["prompt"], got["completion"]) == (want.prompt, want.completion)
        assert got["completion"].endswith("</s>")
    injected = out[0]
    assert injected["backtrack"] == [
        {"tokenizer": "mistral", "tokens": render(rows[0], mistral).backtrack},
        {"tokenizer": "qwen2.5", "tokens": rows[0]["backtrack"][0]["tokens"]},
    ]
    control = next(s["text"] for s in injected["segments"] if s["kind"] == "control")
    assert injected["completion"].startswith(control)
    assert result.control_tokens == sorted(control_atoms(control))  # [BACKTRACK_BY_x] < [CATEGORY c]
    # The rerendered row renders to itself again (its format and X are consistent).
    again = render(injected, mistral)
    assert (again.prompt, again.completion) == (injected["prompt"], injected["completion"])
    # A DatasetDict gives per-split counts; a reference string works as the tokenizer.
    both = rerender(datasets.DatasetDict({"train": ds, "test": ds.select([0])}), "builtin:phi-3-mini")
    assert set(both.dataset) == {"train", "test"}
    assert both.dropped_by_split["test"] == {} and both.tokenizer == "phi-3-mini"
    assert both.dataset["train"][0]["backtrack"][0]["tokenizer"] == "phi-3-mini"
    with pytest.raises(ValueError, match="missing column"):
        rerender(ds.select_columns(["prompt", "completion"]), qwen)


# -- lean import -------------------------------------------------------------------------------------


def test_import_bsafe_data_is_lean():
    heavy = "{'spacy','matplotlib','sklearn','aiohttp','typer'}"
    code = (
        "import bsafe_data, sys; bsafe_data.render; bsafe_data.tokenize; bsafe_data.rerender; "
        "bsafe_data.control_tokens; bsafe_data.add_control_tokens; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().replace("'", '"')) == []
    # The exports resolve, and bsafe_data.rerender stays callable whichever way it was imported.
    code = (
        "import bsafe_data.rerender as m, bsafe_data; from bsafe_data.rerender import RerenderResult; "
        "assert callable(bsafe_data.rerender) and m.RerenderResult is RerenderResult; "
        "assert all(getattr(bsafe_data, n) is not None for n in bsafe_data.__all__); print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr
