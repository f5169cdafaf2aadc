"""The reference backtrack decoder on two tokenizer families (qwen2.5 byte-level BPE, phi-3-mini
sentencepiece): the round trip over a real flagship build, random insert-then-backtrack texts
(hypothesis), malformed signals and the floor."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bsafe_data.label import (
    DEFAULT_CONTROL_FORMAT,
    add_control_tokens,
    backtrack_counts,
    chat_frame,
    control_atoms,
    control_text,
    render,
)
from bsafe_data.rl import MALFORMED_REASONS, apply_backtracks, assistant_marker
from tests.conftest import REPO, TOKENIZER_DIRS

CLI = str(Path(sys.executable).with_name("bsafe-data"))
FAMILIES = ["qwen2.5", "phi-3-mini"]


def _fresh(name: str):
    """A private tokenizer copy: atoms are registered on it, never on the shared session fixture."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIRS[name]))


@pytest.fixture(scope="module")
def flagship_rows(tmp_path_factory) -> list[dict]:
    """Every row (kept and rejected) of a real flagship build, made with the CLI (``--limit 80``)."""
    out = tmp_path_factory.mktemp("rl_flagship") / "ds"
    env = {**os.environ, "BSAFE_DATA_CACHE_DIR": str(out.parent / "cache")}
    proc = subprocess.run(
        [CLI, "build", str(REPO / "recipes" / "bsafe_plus.yaml"), "--out", str(out), "--limit", "80"],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = []
    for path in sorted((out / "data").glob("*.parquet")):
        rows.extend(pq.read_table(path).to_pylist())
    assert len(rows) >= 200 and any(r["kind"] == "clean" for r in rows)
    return rows


@pytest.fixture(scope="module")
def families() -> dict:
    """One private tokenizer per family."""
    return {name: _fresh(name) for name in FAMILIES}


def _signal_of(rendered) -> str:
    return rendered.completion[: rendered.completion.index("]", rendered.completion.index("]") + 1) + 1]


@pytest.mark.parametrize("name", FAMILIES)
def test_round_trip_every_row_of_a_flagship_build(flagship_rows, families, name):
    """apply_backtracks(prompt ⊕ completion) == head + part1 + part2 + tail for every built row,
    as one text, as prompt + completion tokenized apart, and as token ids."""
    tok = families[name]
    renders = [(row, render(row, tok)) for row in flagship_rows]
    atoms = {a for row, r in renders if row["kind"] == "injected" for a in control_atoms(_signal_of(r))}
    add_control_tokens(tok, sorted(atoms))
    injected = 0
    for row, r in renders:
        head, tail = chat_frame(tok, row["context"])
        want = head + row["response"] + tail
        whole = apply_backtracks(r.prompt + r.completion, tok)
        split = apply_backtracks(r.completion, tok, prompt=r.prompt)
        full_ids = tok(r.prompt + r.completion, add_special_tokens=False)["input_ids"]
        by_ids = apply_backtracks(full_ids, tok)
        assert whole.text == want, row["id"]
        assert split.text == want, row["id"]
        assert whole.malformed == () and by_ids.malformed == ()
        assert whole.floor == len(head), row["id"]  # the assistant turn starts the deletable part
        if row["kind"] != "injected":
            assert whole.signals == () and list(whole.ids) == full_ids and list(by_ids.ids) == full_ids
            exact = want if name == "qwen2.5" else tok.decode(full_ids, skip_special_tokens=False)
            assert by_ids.text == exact
            continue
        injected += 1
        inj = row["injection"]
        for traj in (whole, split, by_ids):
            (signal,) = traj.signals
            assert (signal.category, signal.x, signal.deleted) == (inj["category"], r.backtrack, r.backtrack)
            assert signal.removed_text == inj["steering"] + inj["violation"]
        # the kept ids are the model's ids with the X tokens and the two atoms cut out, i.e. the
        # decoder's own per-segment tokenization equals the tokenizer's with registered atoms
        at = full_ids.index(tok.convert_tokens_to_ids(control_atoms(_signal_of(r))[0]))
        expected_ids = full_ids[: at - r.backtrack] + full_ids[at + 2 :]
        assert list(whole.ids) == expected_ids and list(by_ids.ids) == expected_ids
        assert whole.deleted_tokens == r.backtrack and len(whole.removed) == 1
        if name == "qwen2.5":  # byte-level BPE decodes exactly: token ids give the same text
            assert by_ids.text == want
        else:  # sentencepiece: the tokenizer's decoding of the kept ids
            assert by_ids.text == tok.decode(expected_ids, skip_special_tokens=False)
    assert injected >= 150


# -- random insert-then-backtrack texts ------------------------------------------------------------

_CHARS = st.characters(
    blacklist_categories=("Cs", "Cc", "Co", "Cn"), blacklist_characters="[]<>\u2063", max_codepoint=0x1FAFF
)
_WORDS = st.text(_CHARS, min_size=1, max_size=24) | st.sampled_from(
    ["fern", "Water weekly.", "naïve café", "数据集", "🙂🙃", "  two  spaces", "line\nbreak", "x"]
)
_TEXT = st.lists(_WORDS, min_size=1, max_size=4).map(" ".join)
_CATEGORIES = st.sampled_from(["Toxic", "Finance", "Hate Speech", "Death Harm & Tragedy"])


@pytest.mark.parametrize("name", FAMILIES)
def test_random_insert_then_backtrack_decodes_exactly(families, name):
    """Original text A ⊕ B ⊕ C, violations V1 after A and V2 after B, each followed by its exact
    signal (X counted as BSAFE+ does, with the atoms registered): the decoder returns
    head + A + B + C + tail exactly, from the text and from the token ids."""
    tok = families[name]

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
    @given(user=_TEXT, a=_TEXT, v1=_TEXT, b=_TEXT, v2=_TEXT, c=_TEXT, c1=_CATEGORIES, c2=_CATEGORIES)
    def check(user, a, v1, b, v2, c, c1, c2):
        head, tail = chat_frame(tok, [{"role": "user", "content": user}])
        v1, v2 = " " + v1, " " + v2
        (x1,) = backtrack_counts(tok, [(head, a, v1)])
        assume(x1 is not None)
        s1 = control_text(DEFAULT_CONTROL_FORMAT, c1, x1)
        add_control_tokens(tok, control_atoms(s1))
        (x2,) = backtrack_counts(tok, [(head + a + v1 + s1, b, v2)], exact_head=True)
        assume(x2 is not None)
        s2 = control_text(DEFAULT_CONTROL_FORMAT, c2, x2)
        add_control_tokens(tok, control_atoms(s2))
        stream = head + a + v1 + s1 + b + v2 + s2 + c + tail
        traj = apply_backtracks(stream, tok)
        assert traj.text == head + a + b + c + tail
        assert [(s.category, s.deleted) for s in traj.signals] == [(c1, x1), (c2, x2)]
        assert [s.removed_text for s in traj.signals] == [v1, v2]
        assert traj.malformed == ()
        ids = tok(stream, add_special_tokens=False)["input_ids"]
        by_ids = apply_backtracks(ids, tok)
        assert by_ids.ids == traj.ids  # the decoder tokenizes exactly as the tokenizer does
        assert [s.deleted for s in by_ids.signals] == [x1, x2]
        if name == "qwen2.5":  # byte-level BPE: ids decode to the same text, up to its NFC normaliser
            assert by_ids.text == tok.backend_tokenizer.normalizer.normalize_str(traj.text)

    check()


@pytest.mark.parametrize("name", FAMILIES)
def test_random_insert_then_backtrack_without_registered_atoms(name):
    """Unregistered atoms are cut out by text, so X still counts the tokens before the signal."""
    tok = _fresh(name)

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
    @given(user=_TEXT, a=_TEXT, v=_TEXT, b=_TEXT, cat=_CATEGORIES)
    def check(user, a, v, b, cat):
        head, tail = chat_frame(tok, [{"role": "user", "content": user}])
        (x,) = backtrack_counts(tok, [(head, a, " " + v)])
        assume(x is not None)
        traj = apply_backtracks(
            head + a + " " + v + control_text(DEFAULT_CONTROL_FORMAT, cat, x) + b + tail, tok
        )
        assert traj.text == head + a + b + tail and traj.signals[0].deleted == x

    check()


# -- malformed signals and the floor ---------------------------------------------------------------


def _frame(tok, user="How do I water a fern?"):
    head, tail = chat_frame(tok, [{"role": "user", "content": user}])
    return head, tail


@pytest.mark.parametrize("name", FAMILIES)
def test_x_beyond_the_floor_stops_at_the_assistant_turn(families, name):
    tok = families[name]
    head, tail = _frame(tok)
    traj = apply_backtracks(
        head + "Water it weekly. You fool." + "[CATEGORY Toxic][BACKTRACK_BY_500] Mist it." + tail, tok
    )
    assert traj.text == head + " Mist it." + tail  # the user turn and the template are untouched
    (signal,) = traj.signals
    assert signal.malformed == "x_exceeds_floor" and signal.x == 500
    assert [signal.deleted] == backtrack_counts(tok, [(head, "", "Water it weekly. You fool.")])
    assert traj.floor == len(head) and head.endswith(assistant_marker(tok))


@pytest.mark.parametrize("name", FAMILIES)
def test_unknown_category_is_executed_and_flagged(families, name):
    tok = families[name]
    head, tail = _frame(tok)
    (x,) = backtrack_counts(tok, [(head, "Water it.", " You fool.")])
    traj = apply_backtracks(
        head + f"Water it. You fool.[CATEGORY Rudeness][BACKTRACK_BY_{x}] Mist it." + tail, tok
    )
    assert traj.text == head + "Water it. Mist it." + tail
    assert [s.malformed for s in traj.signals] == ["unknown_category"]
    # with categories=None every category is accepted
    assert apply_backtracks(traj.stream, tok, categories=None).malformed == ()


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize(
    "signal",
    [
        "[BACKTRACK_BY_3]",  # category atom missing
        "[CATEGORY Toxic]",  # backtrack atom missing
        "[CATEGORY Toxic][BACKTRACK_BY_three]",  # X not an integer
        "[CATEGORY Toxic][BACKTRACK_BY_0]",  # X not positive
        "[CATEGORY Toxic][BACKTRACK_BY_-2]",
        "[BACKTRACK_BY_3][CATEGORY Toxic]",  # atoms out of order
        "[CATEGORY ][BACKTRACK_BY_3]",  # empty category
    ],
)
def test_unparsable_signals_delete_nothing_and_vanish(families, name, signal):
    tok = families[name]
    head, tail = _frame(tok)
    traj = apply_backtracks(head + "Water it. You fool." + signal + " Mist it." + tail, tok)
    assert traj.text == head + "Water it. You fool. Mist it." + tail
    assert traj.deleted_tokens == 0
    assert traj.malformed and {s.malformed for s in traj.signals} == {"unparsable"}
    assert set(MALFORMED_REASONS) == {"unparsable", "unknown_category", "x_exceeds_floor"}


@pytest.mark.parametrize("name", FAMILIES)
def test_atoms_apart_are_two_malformed_signals(families, name):
    tok = families[name]
    head, tail = _frame(tok)
    traj = apply_backtracks(
        head + "Water it. You fool.[CATEGORY Toxic] [BACKTRACK_BY_3] Mist it." + tail, tok
    )
    assert [s.malformed for s in traj.signals] == ["unparsable", "unparsable"]
    assert traj.text == head + "Water it. You fool.  Mist it." + tail


@pytest.mark.parametrize("name", FAMILIES)
def test_signals_in_the_user_turn_are_plain_text(families, name):
    tok = families[name]
    user = "Please print [CATEGORY Toxic][BACKTRACK_BY_2] literally."
    head, tail = _frame(tok, user)
    traj = apply_backtracks(head + "Sure: it is a control signal." + tail, tok)
    assert traj.signals == () and traj.text == traj.stream and user in traj.text


@pytest.mark.parametrize("name", FAMILIES)
def test_later_signals_count_visible_tokens_only(families, name):
    """The second signal's X counts B and then A's tokens: never the first signal's atoms or the
    tokens it already deleted."""
    tok = families[name]
    head, tail = _frame(tok)
    a, v, b = "Water the fern every week in summer", " and you are a fool", " Mist it."
    (x1,) = backtrack_counts(tok, [(head, a, v)])
    add_control_tokens(tok, control_atoms(control_text(DEFAULT_CONTROL_FORMAT, "Toxic", x1)))
    b_tokens = len(tok(b, add_special_tokens=False)["input_ids"])
    enc = tok(head + a, add_special_tokens=False, return_offsets_mapping=True)
    k = 2  # the second signal deletes B and the last k tokens of A
    cut = enc["offset_mapping"][len(enc["input_ids"]) - k][0]
    stream = (
        head
        + a
        + v
        + f"[CATEGORY Toxic][BACKTRACK_BY_{x1}]"
        + b
        + f"[CATEGORY Toxic][BACKTRACK_BY_{b_tokens + k}]"
        + tail
    )
    traj = apply_backtracks(stream, tok)
    assert traj.text == (head + a)[:cut] + tail
    assert [s.deleted for s in traj.signals] == [x1, b_tokens + k] and traj.malformed == ()


@pytest.mark.parametrize("name", FAMILIES)
def test_prefilled_attack_in_the_prompt_is_deletable_and_explicit_floor_wins(families, name):
    tok = families[name]
    head, tail = _frame(tok)
    prefix, attack = "Water it weekly.", " You are a fool."
    (x,) = backtrack_counts(tok, [(head, prefix, attack)])
    completion = f"[CATEGORY Toxic][BACKTRACK_BY_{x}] Mist the leaves." + tail
    traj = apply_backtracks(completion, tok, prompt=head + prefix + attack)
    assert traj.text == head + prefix + " Mist the leaves." + tail
    assert traj.prompt_chars == len(head + prefix + attack)
    assert traj.completion_text == " Mist the leaves." + tail
    # a floor after the prefix protects it: only the attack can go, the rest is malformed
    protected = apply_backtracks(completion, tok, prompt=head + prefix + attack, floor=len(head + prefix))
    assert protected.text == head + prefix + " Mist the leaves." + tail and protected.malformed == ()
    later = apply_backtracks(completion, tok, prompt=head + prefix + attack, floor=len(head + prefix) + 4)
    assert later.malformed[0].malformed == "x_exceeds_floor" and later.deleted_tokens < x


@pytest.mark.parametrize("name", FAMILIES)
def test_custom_control_format_without_category(families, name):
    tok = families[name]
    head, tail = _frame(tok)
    (x,) = backtrack_counts(tok, [(head, "Water it.", " You fool.")])
    traj = apply_backtracks(head + f"Water it. You fool.<undo {x}> Mist it." + tail, tok, "<undo {x}>")
    assert traj.text == head + "Water it. Mist it." + tail
    assert traj.signals[0].category is None and traj.signals[0].deleted == x
    with pytest.raises(ValueError):
        apply_backtracks("text", tok, "{category}{x}")  # nothing to recognise it by
