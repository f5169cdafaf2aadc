"""Sources: every file format and row shape becomes a Conversation; bad rows become SourceRejects
with stable reason codes and never stop the run; Hugging Face datasets stream through `datasets`."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bsafe_data.recipe import FieldMapping, SourceSpec
from bsafe_data.rows import REASONS
from bsafe_data.sources import (
    Conversation,
    SourceError,
    SourceReject,
    read_source,
    read_sources,
    spec_from_cli,
)

# -- writers: one per format ------------------------------------------------------------------


def write_jsonl(path: Path, records: list) -> Path:
    path = path.with_suffix(".jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_json(path: Path, records: list) -> Path:
    path = path.with_suffix(".json")
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def write_parquet(path: Path, records: list) -> Path:
    path = path.with_suffix(".parquet")
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def write_csv(path: Path, records: list) -> Path:
    """CSV cells are text: list columns are written as JSON text (what real CSV exports hold)."""
    path = path.with_suffix(".csv")
    fields = list(dict.fromkeys(k for r in records for k in r))
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for r in records:
            writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    return path


WRITERS = {"jsonl": write_jsonl, "json": write_json, "parquet": write_parquet, "csv": write_csv}

# -- shapes: records and what they must read as --------------------------------------------------

SHAPES = {
    "messages": (
        [
            {
                "id": "m-1",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "How do I boil an egg?"},
                    {"role": "assistant", "content": "Put it in boiling water. Wait 9 minutes."},
                ],
            },
            {
                "id": "m-2",
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello! How can I help?"},
                ],
            },
        ],
        [
            (
                "m-1",
                (("system", "Be brief."), ("user", "How do I boil an egg?")),
                "Put it in boiling water. Wait 9 minutes.",
            ),
            ("m-2", (("user", "Hi"),), "Hello! How can I help?"),
        ],
    ),
    "sharegpt": (
        [
            {
                "conversations": [
                    {"from": "system", "value": "You are kind."},
                    {"from": "human", "value": "Name a colour."},
                    {"from": "gpt", "value": "Blue. It is calm."},
                ]
            },
            {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4."}]},
        ],
        [
            ("0", (("system", "You are kind."), ("user", "Name a colour.")), "Blue. It is calm."),
            ("1", (("user", "2+2?"),), "4."),
        ],
    ),
    "prompt_response": (
        [
            {"id": "p-1", "prompt": "What is tea?", "response": "A drink. It is made from leaves."},
            {"id": "p-2", "prompt": "Unicode: café 😀", "response": "Très bien. 👍"},
        ],
        [
            ("p-1", (("user", "What is tea?"),), "A drink. It is made from leaves."),
            ("p-2", (("user", "Unicode: café 😀"),), "Très bien. 👍"),
        ],
    ),
    "instruction": (
        [
            {"instruction": "Summarise.", "input": "Cats sleep a lot.", "output": "Cats nap. Often."},
            {"instruction": "Say hi.", "input": "", "output": "Hi there."},
        ],
        [
            ("0", (("user", "Summarise.\n\nCats sleep a lot."),), "Cats nap. Often."),
            ("1", (("user", "Say hi."),), "Hi there."),
        ],
    ),
}


def as_tuples(items) -> list:
    return [(i.ref.id, i.context, i.response) for i in items]


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_every_format_and_shape(tmp_path, fmt, shape):
    records, expected = SHAPES[shape]
    path = WRITERS[fmt](tmp_path / "corpus", records)
    items = list(read_source(SourceSpec(path=str(path))))
    assert all(isinstance(i, Conversation) for i in items), items
    assert as_tuples(items) == expected
    digest = hashlib.sha256(path.read_bytes()).hexdigest()  # the identity: content, never the path
    for index, item in enumerate(items):
        assert item.ref.dataset == f"sha256:{digest[:16]}"
        assert item.ref.split == "train"
        assert item.ref.index == index
        assert item.ref.revision == f"sha256:{digest}"
        assert item.ref.as_dict() == {
            "dataset": f"sha256:{digest[:16]}",
            "split": "train",
            "index": index,
            "id": item.ref.id,
            "revision": f"sha256:{digest}",
        }


def test_explicit_format_overrides_the_suffix(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(json.dumps({"prompt": "q", "response": "An answer."}) + "\n")
    with pytest.raises(SourceError, match="format"):
        list(read_source(SourceSpec(path=str(path))))
    (item,) = read_source(SourceSpec(path=str(path), format="jsonl"))
    assert item.response == "An answer."


def test_json_object_holding_one_list(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"meta": {"v": 1}, "data": [{"prompt": "q", "response": "A."}]}))
    (item,) = read_source(SourceSpec(path=str(path)))
    assert (item.context, item.response) == ((("user", "q"),), "A.")
    path.write_text(json.dumps({"a": [], "b": []}))
    with pytest.raises(SourceError):
        list(read_source(SourceSpec(path=str(path))))


# -- multi-turn, mappings, system column ------------------------------------------------------------


def test_multi_turn_last_assistant_turn_is_the_response(tmp_path):
    turns = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2 is the answer."},
    ]
    trailing_user = [*turns, {"role": "user", "content": "u3, never answered"}]
    path = write_jsonl(tmp_path / "multi", [{"messages": turns}, {"messages": trailing_user}])
    first, second = read_source(SourceSpec(path=str(path)))
    expected_context = (("system", "S"), ("user", "u1"), ("assistant", "a1"), ("user", "u2"))
    assert first.context == expected_context
    assert first.response == "a2 is the answer."
    assert second.context == expected_context
    assert second.response == "a2 is the answer."


def test_sharegpt_role_aliases(tmp_path):
    conv = [
        {"from": "human", "value": "h"},
        {"from": "gpt", "value": "g"},
        {"from": "user", "value": "u"},
        {"from": "chatgpt", "value": "c"},
        {"from": "Human", "value": "H"},
        {"from": "bot", "value": "final answer."},
    ]
    path = write_jsonl(tmp_path / "aliases", [{"conversations": conv}])
    (item,) = read_source(SourceSpec(path=str(path)))
    assert item.context == (
        ("user", "h"),
        ("assistant", "g"),
        ("user", "u"),
        ("assistant", "c"),
        ("user", "H"),
    )
    assert item.response == "final answer."


def test_explicit_mapping(tmp_path):
    records = [
        {"key": "q-17", "question": "Why?", "answer": "Because. That is all."},
        {"key": "q-18", "dialog": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y."}]},
        {"key": "q-19", "turns": [{"from": "human", "value": "s"}, {"from": "gpt", "value": "t."}]},
        {"key": "q-20", "task": "Translate.", "text": "chat", "result": "cat."},
    ]
    path = write_jsonl(tmp_path / "mapped", records)
    mappings = [
        FieldMapping(prompt="question", response="answer", id="key"),
        FieldMapping(messages="dialog", id="key"),
        FieldMapping(conversations="turns", id="key"),
        FieldMapping(instruction="task", input="text", output="result", id="key"),
    ]
    expected = [
        ("q-17", (("user", "Why?"),), "Because. That is all."),
        ("q-18", (("user", "x"),), "y."),
        ("q-19", (("user", "s"),), "t."),
        ("q-20", (("user", "Translate.\n\nchat"),), "cat."),
    ]
    for i, mapping in enumerate(mappings):
        items = list(read_source(SourceSpec(path=str(path), mapping=mapping)))
        assert as_tuples(items[i : i + 1]) == [expected[i]], mapping
        # The other rows do not have this mapping's columns: rejected, not crashed.
        others = [item for j, item in enumerate(items) if j != i]
        assert all(isinstance(o, SourceReject) and o.reason == "missing_field" for o in others), others


def test_system_prompt_column(tmp_path):
    records = [
        {"sys": "You are a pirate.", "prompt": "Hello?", "response": "Arr. Ahoy."},
        {
            "sys": "Be formal.",
            "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Good day."}],
        },
        {"sys": "Be short.", "instruction": "Count.", "output": "1, 2."},
    ]
    path = write_jsonl(tmp_path / "sys", records)
    items = list(read_source(SourceSpec(path=str(path), mapping=FieldMapping(system="sys"))))
    assert as_tuples(items) == [
        ("0", (("system", "You are a pirate."), ("user", "Hello?")), "Arr. Ahoy."),
        ("1", (("system", "Be formal."), ("user", "Hi")), "Good day."),
        ("2", (("system", "Be short."), ("user", "Count.")), "1, 2."),
    ]
    # Without the mapping the column is ignored.
    assert next(read_source(SourceSpec(path=str(path)))).context == (("user", "Hello?"),)
    # A typed columnar file (every row has every column).
    path = write_parquet(tmp_path / "sys", [records[0], {"sys": "S2", "prompt": "Q2", "response": "A2."}])
    items = list(read_source(SourceSpec(path=str(path), mapping=FieldMapping(system="sys"))))
    assert [i.context for i in items] == [
        (("system", "You are a pirate."), ("user", "Hello?")),
        (("system", "S2"), ("user", "Q2")),
    ]


def test_null_system_cell_means_no_system_turn(tmp_path):
    records = [
        {"sys": "Be brief.", "prompt": "Q1", "response": "A1."},
        {"sys": None, "prompt": "Q2", "response": "A2."},
    ]
    path = write_parquet(tmp_path / "nullsys", records)
    items = list(read_source(SourceSpec(path=str(path), mapping=FieldMapping(system="sys"))))
    assert as_tuples(items) == [
        ("0", (("system", "Be brief."), ("user", "Q1")), "A1."),
        ("1", (("user", "Q2"),), "A2."),
    ]


# -- bad rows -----------------------------------------------------------------------------------------

GOOD = {"prompt": "q", "response": "A fine answer."}
BAD_LINES = [
    (json.dumps(GOOD), None),
    (json.dumps({"prompt": "q"}), "missing_field"),
    (json.dumps({"response": "orphan answer"}), "missing_field"),
    (json.dumps({"unrelated": 1}), "missing_field"),
    (json.dumps({"messages": [{"role": "assistant", "content": "no user first"}]}), "missing_field"),
    (
        json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}),
        "missing_field",
    ),
    (json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}), "missing_field"),
    (json.dumps({"prompt": "q", "response": 5}), "wrong_type"),
    (json.dumps({"prompt": ["q"], "response": "a"}), "wrong_type"),
    (json.dumps({"messages": "not a list"}), "wrong_type"),
    (json.dumps({"messages": {"role": "user", "content": "x"}}), "wrong_type"),
    (json.dumps({"messages": ["just text"]}), "wrong_type"),
    (
        json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "a"}]}),
        "wrong_type",
    ),
    (
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text"}]},
                    {"role": "assistant", "content": "a"},
                ]
            }
        ),
        "wrong_type",
    ),
    (json.dumps({"instruction": "do", "input": 3, "output": "done"}), "wrong_type"),
    (json.dumps(42), "wrong_type"),
    (json.dumps(None), "wrong_type"),
    (json.dumps(["a", "list"]), "wrong_type"),
    ('{"prompt": "q", "response": ', "wrong_type"),  # invalid JSON line
    ("not json at all", "wrong_type"),
    (json.dumps({"prompt": "q", "response": ""}), "empty_response"),
    (json.dumps({"prompt": "q", "response": " \n\t "}), "empty_response"),
    (
        json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}),
        "empty_response",
    ),
    (json.dumps({"messages": [{"role": "user", "content": "only a question"}]}), "no_assistant_turn"),
    (json.dumps({"messages": []}), "no_assistant_turn"),
    (
        json.dumps({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}),
        "no_assistant_turn",
    ),
    (json.dumps(GOOD), None),
]


def test_every_bad_row_kind_is_rejected_with_its_reason(tmp_path):
    path = tmp_path / "bad.jsonl"
    # Blank lines are skipped, not counted as rows.
    path.write_text(
        "\n".join(line for line, _ in BAD_LINES[:3])
        + "\n\n"
        + "\n".join(line for line, _ in BAD_LINES[3:])
        + "\n"
    )
    items = list(read_source(SourceSpec(path=str(path))))  # must not raise
    assert len(items) == len(BAD_LINES), "every row ends up kept or rejected"
    got = [(type(i).__name__, getattr(i, "reason", None)) for i in items]
    want = [("Conversation", None) if r is None else ("SourceReject", r) for _, r in BAD_LINES]
    assert got == want
    for index, item in enumerate(items):
        assert item.ref.index == index
        if isinstance(item, SourceReject):
            assert item.reason in REASONS
            assert item.detail  # a human-readable explanation too


def test_bad_rows_in_csv_and_parquet(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text(
        'prompt,response\nq,A good answer.\nq,\nq,"   "\n',
        encoding="utf-8",
    )
    assert [getattr(i, "reason", "ok") for i in read_source(SourceSpec(path=str(path)))] == [
        "ok",
        "empty_response",
        "empty_response",
    ]
    path = tmp_path / "bad_messages.csv"
    path.write_text('messages\n"[{""role"": ""user"", ""content"": ""x""}]"\nnot json\n', encoding="utf-8")
    assert [getattr(i, "reason", "ok") for i in read_source(SourceSpec(path=str(path)))] == [
        "no_assistant_turn",
        "wrong_type",
    ]
    path = write_parquet(
        tmp_path / "bad",
        [
            {"prompt": "q", "response": "Fine."},
            {"prompt": "q", "response": None},
            {"prompt": None, "response": "x"},
        ],
    )
    assert [getattr(i, "reason", "ok") for i in read_source(SourceSpec(path=str(path)))] == [
        "ok",
        "missing_field",
        "missing_field",
    ]


# -- whole-source errors ----------------------------------------------------------------------------


def test_missing_file_is_a_source_error(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        list(read_source(SourceSpec(path=str(tmp_path / "nope.jsonl"))))
    with pytest.raises(SourceError, match="not found"):
        list(read_source(SourceSpec(path=str(tmp_path))))  # a folder is not a file
    with pytest.raises(SourceError, match="unknown bundled corpus"):
        list(read_source(SourceSpec(path="builtin:no_such_corpus")))


@pytest.mark.parametrize(
    ("name", "content"), [("c.json", b'[{"prompt": "a",'), ("c.parquet", b"not parquet")]
)
def test_corrupt_file_is_a_source_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SourceError):
        list(read_source(SourceSpec(path=str(path))))


def test_non_utf8_jsonl_line_is_a_bad_row(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        b'{"prompt": "a", "response": "Fine."}\n{"prompt": "caf\xe9", "response": "b"}\n'
        b'{"prompt": "c", "response": "Also fine."}\n'
    )
    items = list(read_source(SourceSpec(path=str(path))))
    assert [getattr(i, "reason", "ok") for i in items] == ["ok", "wrong_type", "ok"]


# -- limit, several sources -------------------------------------------------------------------------


def test_limit_counts_rows_including_rejects(tmp_path):
    path = write_jsonl(tmp_path / "five", [GOOD, {"prompt": "q"}, GOOD, GOOD, GOOD])
    items = list(read_source(SourceSpec(path=str(path), limit=2)))
    assert [type(i).__name__ for i in items] == ["Conversation", "SourceReject"]
    assert len(list(read_source(SourceSpec(path=str(path), limit=99)))) == 5


def test_read_sources_in_order_with_a_total_limit(tmp_path):
    a = write_jsonl(tmp_path / "a", [{"id": f"a{i}", **GOOD} for i in range(3)])
    b = write_csv(tmp_path / "b", [{"id": f"b{i}", **GOOD} for i in range(3)])
    specs = [SourceSpec(path=str(a), limit=2), SourceSpec(path=str(b))]
    assert [i.ref.id for i in read_sources(specs)] == ["a0", "a1", "b0", "b1", "b2"]
    assert [i.ref.id for i in read_sources(specs, limit=3)] == ["a0", "a1", "b0"]
    digests = [hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in (a, a, b)]
    assert [i.ref.dataset for i in read_sources(specs, limit=3)] == [f"sha256:{d}" for d in digests]


# -- Hugging Face datasets (a local folder, read through `datasets.load_dataset`) --------------------


@pytest.fixture
def hf_folder(tmp_path) -> Path:
    folder = tmp_path / "org_dataset"
    (folder / "data").mkdir(parents=True)
    rows = [
        {
            "id": "h0",
            "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey. Yes."}],
        },
        {
            "id": "h1",
            "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A. B."}],
        },
        {"id": "h2", "messages": [{"role": "user", "content": "No answer"}]},
    ]
    datasets.Dataset.from_list(rows).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(rows[:1]).to_parquet(str(folder / "data" / "test-00000-of-00001.parquet"))
    return folder


def test_hf_dataset_streams_with_revision_recorded(hf_folder):
    spec = SourceSpec(hf=str(hf_folder), revision="v1.2.0")
    assert spec.streaming is True
    items = list(read_source(spec))
    assert [type(i).__name__ for i in items] == ["Conversation", "Conversation", "SourceReject"]
    assert items[2].reason == "no_assistant_turn"
    assert as_tuples(items[:2]) == [("h0", (("user", "Hi"),), "Hey. Yes."), ("h1", (("user", "Q"),), "A. B.")]
    for index, item in enumerate(items):
        assert item.ref.as_dict() == {
            "dataset": str(hf_folder),
            "split": "train",
            "index": index,
            "id": f"h{index}",
            "revision": "v1.2.0",
        }


def test_hf_dataset_split_limit_and_download_mode(hf_folder):
    (test_item,) = read_source(SourceSpec(hf=str(hf_folder), split="test"))
    assert (test_item.ref.split, test_item.ref.id) == ("test", "h0")
    assert len(list(read_source(SourceSpec(hf=str(hf_folder), limit=1)))) == 1
    whole = list(read_source(SourceSpec(hf=str(hf_folder), streaming=False)))
    assert [i.ref.id for i in whole] == ["h0", "h1", "h2"]
    assert whole[0].ref.revision == ""


def test_hf_dataset_errors_are_source_errors(hf_folder, tmp_path):
    with pytest.raises(SourceError, match="validation"):
        list(read_source(SourceSpec(hf=str(hf_folder), split="validation")))
    with pytest.raises(SourceError, match="cannot open"):
        list(read_source(SourceSpec(hf=str(tmp_path / "no_such_folder"))))


# -- --source ---------------------------------------------------------------------------------------


def test_spec_from_cli(tmp_path):
    path = write_jsonl(tmp_path / "corpus", [GOOD])
    spec = spec_from_cli(str(path))
    assert (spec.path, spec.hf) == (str(path), None)
    assert spec_from_cli("builtin:everyday_chat").path == "builtin:everyday_chat"
    hub = spec_from_cli("org/some-dataset")
    assert (hub.path, hub.hf) == (None, "org/some-dataset")
    for value in ("missing.jsonl", "./missing/file.jsonl", str(tmp_path / "missing.jsonl")):
        with pytest.raises(SourceError, match="no such file"):
            spec_from_cli(value)


# -- identity: content, not place ---------------------------------------------------------------
def _cli_build(recipe: Path, out: Path, source: Path, *extra: str, name: str | None = None) -> None:
    import os
    import subprocess
    import sys

    cli = str(Path(sys.executable).with_name("bsafe-data"))
    spec = json.dumps({"path": str(source), **({"name": name} if name else {})})
    proc = subprocess.run(
        [cli, "build", str(recipe), "--out", str(out), "--set", f"sources=[{spec}]",
         "--set", "tokenizers.extra=[]", "--set", "output.chunk_rows=7", *extra],
        capture_output=True, text=True, env=os.environ, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr


def _parquet(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.parquet"))}


def test_the_same_corpus_at_two_paths_builds_the_same_bytes(tmp_path):
    """A source is its content: the same file at two paths (other names, other folders) gives
    byte-identical parquet, and neither path reaches the rows, the manifest or the card."""
    from tests.conftest import REPO

    flagship = REPO / "recipes" / "bsafe_plus.yaml"
    lines = (REPO / "bsafe_data" / "data" / "corpus" / "everyday_chat.jsonl").read_text().splitlines()[:20]
    here = tmp_path / "alice" / "corpus.jsonl"
    there = tmp_path / "elsewhere" / "deeper" / "copy-of-it.jsonl"
    for path in (here, there):
        path.parent.mkdir(parents=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _cli_build(flagship, tmp_path / "a", here)
    _cli_build(flagship, tmp_path / "b", there)
    first, second = _parquet(tmp_path / "a"), _parquet(tmp_path / "b")
    assert first and first == second
    for folder in (tmp_path / "a", tmp_path / "b"):
        for name in ("manifest.json", "README.md"):
            text = (folder / name).read_text()
            assert str(tmp_path) not in text and "alice" not in text and "elsewhere" not in text, name
        for rows in _parquet(folder).values():
            assert str(tmp_path).encode() not in rows
    rows = pq.read_table(tmp_path / "a" / "data" / "train-00000-of-00001.parquet").to_pylist()
    assert {r["source"]["dataset"] for r in rows} == {
        "sha256:" + __import__("hashlib").sha256(here.read_bytes()).hexdigest()[:16]
    }
    named = tmp_path / "named"
    _cli_build(flagship, named, here, name="chat-sample")
    rows = pq.read_table(named / "data" / "train-00000-of-00001.parquet").to_pylist()
    assert {r["source"]["dataset"] for r in rows} == {"chat-sample"}
    assert "name: chat-sample" in (named / "recipe.yaml").read_text()


def test_rows_sharing_one_id_get_unique_row_ids(tmp_path):
    """Every source row carries the same id: row ids stay unique and each row has its own seed
    (its own injection point), because ids and seeds come from the row's position."""
    from tests.conftest import REPO

    flagship = REPO / "recipes" / "bsafe_plus.yaml"
    lines = (REPO / "bsafe_data" / "data" / "corpus" / "everyday_chat.jsonl").read_text().splitlines()[:15]
    rows = [{**json.loads(line), "id": "same"} for line in lines]
    corpus = write_jsonl(tmp_path / "same.jsonl", rows)
    out = tmp_path / "out"
    _cli_build(
        flagship, out, corpus, "--set", "sampling.variants_per_answer=2", "--set", "filters.enabled=false"
    )
    built = [
        r
        for p in sorted(out.rglob("*.parquet"))
        if "preference" not in p.parts
        for r in pq.read_table(p).to_pylist()
    ]
    ids = [r["id"] for r in built]
    assert len(ids) == 30 and len(set(ids)) == 30
    assert {r["source"]["id"] for r in built} == {"same"}
    offsets = {r["injection"]["offset"] for r in built if r["injection"]}
    assert len(offsets) > 5  # not one seed for all
