"""Each stage on its own, over explicit records, with the real tokenizers, generator and classifier."""

from __future__ import annotations

from pathlib import Path

import pytest

from bsafe_data.classify.base import Classifier, Item, Score
from bsafe_data.classify.builtin import BuiltinClassifier
from bsafe_data.classify.dedupe import DedupeIndex
from bsafe_data.classify.rules import RuleSet
from bsafe_data.executor.local import LocalExecutor, chunked, read_chunk_rows, write_chunk
from bsafe_data.generate.base import Generation, GenerationRequest, Generator
from bsafe_data.generate.builtin import BuiltinGenerator
from bsafe_data.label import backtrack_counts, chat_frame
from bsafe_data.methods.base import ChunkOutput, Resources
from bsafe_data.recipe import DedupeSpec, FilterSpec
from bsafe_data.registry import method_class, parse_recipe
from bsafe_data.sources import Conversation, SourceRef, read_sources
from bsafe_data.stages import adjust, classify, count, generate, rules
from bsafe_data.stages.dedupe import find_duplicates
from bsafe_data.stages.record import Injection, Record
from bsafe_data.stages.rows import base_row, rejected_row
from bsafe_data.stages.stats import ChunkStats, funnel_of, merge_stats
from bsafe_data.stages.step import Step

RESPONSE = "Water the fern once a week. Keep the soil moist but not wet. Avoid direct sunlight."
CONTEXT = (("user", "How do I look after a fern?"),)


def record(offset: int | None = 27, steering: str = "", violation: str = " You idiot.", rid: str = "r/v0"):
    conv = Conversation(SourceRef("mem", "train", 0, rid.split("/")[0], ""), CONTEXT, RESPONSE)
    spans = [(0, 27), (28, 60), (61, len(RESPONSE))]
    rec = Record(conv, rid, "train", 1, "clean" if offset is None else "injected", spans)
    if offset is not None:
        rec.injection = Injection(offset, 1, "Toxic", offset / len(RESPONSE), steering, violation)
    return rec


def run_steps(steps: list[Step], records: list[Record]) -> None:
    """The flow's work on local tasks, step by step (each task run alone: results per record)."""
    for step in steps:
        if step.run is not None:
            step.run(records)
            continue
        for rec in records:
            tasks = step.ask(rec) if rec.live else []
            step.apply(rec, [task.fn([task.arg])[0] for task in tasks])


def test_record_parts_split_the_response():
    rec = record()
    assert rec.part1 + rec.part2 == RESPONSE
    assert rec.part1 == "Water the fern once a week."
    assert rec.injection.inserted == " You idiot."
    clean = record(None)
    assert clean.part1 == "" and clean.part2 == RESPONSE and clean.live


def test_generate_applies_answers_and_records_failures():
    class Flaky(Generator):
        backend, model, template = "test", "flaky", "t"

        def generate_batch(self, requests):
            answers = {
                "r0/v0": Generation(error="generator_refused"),
                "r1/v0": Generation(violation="   "),
                "r2/v0": Generation(steering=" So,", violation=" you fool."),
            }
            return [answers[r.row_id] for r in requests]

    recs = [record(rid=f"r{i}/v0") for i in range(3)]
    seen: list[GenerationRequest] = []

    def request_of(rec: Record) -> GenerationRequest:
        req = GenerationRequest(rec.row_id, rec.conv.context, rec.part1, "Toxic", rec.seed)
        seen.append(req)
        return req

    def apply(rec: Record, gen: Generation) -> None:
        rec.injection.steering, rec.injection.violation = gen.steering, gen.violation

    run_steps([generate.generate_step(Flaky(), request_of, apply)], recs)
    assert [r.reasons for r in recs] == [["generator_refused"], ["empty_violation"], []]
    assert recs[2].injection.inserted == " So, you fool."
    assert [r.part1 for r in seen] == ["Water the fern once a week."] * 3


def test_generate_with_the_builtin_bank_is_deterministic():
    recs = [record(violation="") for _ in range(2)]

    def request_of(rec: Record) -> GenerationRequest:
        return GenerationRequest(rec.row_id, rec.conv.context, rec.part1, "Toxic", 42)

    def apply(rec: Record, gen: Generation) -> None:
        rec.injection.steering, rec.injection.violation = gen.steering, gen.violation

    run_steps([generate.generate_step(BuiltinGenerator(), request_of, apply)], recs)
    assert recs[0].injection.violation and recs[0].injection.inserted == recs[1].injection.inserted


def test_count_gives_exact_x_for_every_tokenizer(tokenizers):
    refs = {name: tok for name, tok in tokenizers.items()}
    rec = record(steering=" Honestly,", violation=" you are hopeless at this.")
    count.frame(refs, [rec])
    assert count.count(refs, [rec]) == []
    for entry, (_ref, tok) in zip(rec.backtrack, refs.items(), strict=True):
        head = chat_frame(tok, rec.conv.context)[0]
        full = tok(head + rec.part1 + rec.injection.inserted, add_special_tokens=False)["input_ids"]
        short = tok(head + rec.part1, add_special_tokens=False)["input_ids"]
        assert full[: len(short)] == short and entry["tokens"] == len(full) - len(short)
        assert entry["tokens"] == backtrack_counts(tok, [(head, rec.part1, rec.injection.inserted)])[0]


def test_frame_renders_each_context_once_and_gives_every_record_its_own(tokenizers, monkeypatch):
    """Variants share a context: one chat-template render per (tokenizer, context), same frames."""
    other = (("user", "And a cactus?"),)
    records = [record(rid=f"r/v{i}") for i in range(3)] + [record(rid="s/v0")]
    records[-1].conv = Conversation(SourceRef("mem", "train", 1, "s", ""), other, RESPONSE)
    renders: list[str] = []

    def counted(name: str, original):
        def render(*args, **kwargs):
            renders.append(name)
            return original(*args, **kwargs)

        return render

    for name, tok in tokenizers.items():
        monkeypatch.setattr(tok, "apply_chat_template", counted(name, tok.apply_chat_template))
    count.frame(tokenizers, records)
    assert sorted(renders) == sorted(list(tokenizers) * 2)  # two contexts per tokenizer, not four
    monkeypatch.undo()
    for rec in records:
        assert rec.frames == {ref: chat_frame(tok, rec.conv.context) for ref, tok in tokenizers.items()}
    assert records[0].frames != records[-1].frames


def test_count_with_repair_steps_back_or_rejects(tokenizers):
    refs = dict(tokenizers)
    # "week" + "ly" merges across the boundary for byte-level BPE: the injection sits mid-word.
    merged = record(offset=25, violation="ly idiot")
    unrepairable = record(offset=5, violation="y idiot")  # "Water|y": no earlier word end
    count.frame(refs, [merged, unrepairable])
    calls = []

    def step_back(rec: Record) -> bool:
        calls.append(rec.row_id)
        return adjust.previous_word_end(rec) if rec is merged else False

    repaired = count.count_with_repair(refs, [merged, unrepairable], step_back)
    assert unrepairable.reasons == ["token_boundary"]
    assert merged.live and repaired == 1
    assert merged.injection.offset == len("Water the fern once a")
    assert len(merged.backtrack) == len(refs)


def test_move_back_snaps_to_whitespace_and_joins_the_steering():
    rec = record(offset=60, violation=" Idiot.")
    assert adjust.move_back(rec, 44)  # inside "moist": back to the space before it
    assert rec.injection.offset == len("Water the fern once a week. Keep the soil")
    assert rec.injection.steering == " moist but not wet."
    assert rec.part1 + rec.injection.steering == RESPONSE[:60]
    assert rec.injection.sentence_index == 1
    assert not adjust.move_back(rec, rec.injection.offset + 3)  # not earlier: no move


class SpanJudge(Classifier):
    """A judge that says the violation starts 15 characters before the inserted text."""

    adjusts_spans = True
    targets = ("violation",)

    def __init__(self):
        super().__init__()
        self.name = "judge"

    def score_items(self, items):
        return [Score(self.name, "unsafe", 0.9, ("Toxic",), detail={"span_start": -15}) for _ in items]


def test_classify_runs_judges_first_and_keeps_every_score(tokenizers):
    refs = dict(tokenizers)
    rec = record(offset=60, violation=" Idiot.")
    clean = record(None, rid="c/v0")
    count.frame(refs, [rec, clean])
    count.count(refs, [rec])
    builtin = BuiltinClassifier("builtin")
    order = []

    def on_verdict(verdicts):
        order.append("judge")
        adjust.apply_judge_verdicts(refs, verdicts)

    run_steps(classify.classify_steps([builtin, SpanJudge()], classify.span_items, on_verdict), [rec, clean])
    assert order == ["judge"]
    assert [s["classifier"] for s in rec.scores][:4] == ["builtin"] * 4  # recipe order kept
    assert {s["target"] for s in rec.scores if s["classifier"] == "builtin"} == {
        "violation",
        "part1",
        "part2",
        "response",
    }
    assert [s["target"] for s in clean.scores] == ["response"]
    # the judge moved the point back, so the builtin classifier scored the longer violation
    violation = next(s for s in rec.scores if s["classifier"] == "builtin" and s["target"] == "violation")
    assert rec.injection.offset < 60 and violation["score"] >= 0
    assert rec.backtrack and rec.live


def test_span_items_skip_empty_part1():
    rec = record(offset=0, violation="You idiot.")
    targets = [i.target for i in classify.span_items(rec, ("violation", "part1", "part2", "response"))]
    assert targets == ["violation", "part2", "response"]
    item = classify.span_items(rec, ("violation",))[0]
    assert isinstance(item, Item) and item.stream == "You idiot."


def test_rules_reject_and_relabel():
    spec = FilterSpec.model_validate(
        {"category_mismatch": "relabel", "category_map": {"offensive": ["Harassment"]}}
    )
    ruleset = RuleSet(spec, ["Toxic", "Harassment"], "")
    flagged = record()
    flagged.scores = [
        {
            "classifier": "builtin",
            "target": "violation",
            "label": "unsafe",
            "score": 0.9,
            "categories": ["x"],
        },
        {"classifier": "builtin", "target": "part1", "label": "safe", "score": 0.1, "categories": []},
    ]
    missed = record(rid="m/v0")
    missed.scores = [
        {"classifier": "builtin", "target": "violation", "label": "safe", "score": 0.1, "categories": []}
    ]
    relabel = record(rid="l/v0")
    relabel.scores = [
        {
            "classifier": "builtin",
            "target": "violation",
            "label": "unsafe",
            "score": 0.9,
            "categories": ["offensive"],
        }
    ]
    dead = record(rid="d/v0")
    dead.reasons = ["generator_error"]
    rules.apply_rules(ruleset, [flagged, missed, relabel, dead])
    assert flagged.live and missed.reasons == ["violation_not_flagged"]
    assert relabel.injection.category == "Harassment"
    assert relabel.scores[-1]["classifier"] == "bsafe:relabel"
    assert dead.reasons == ["generator_error"]  # rejected records are left alone


def test_dedupe_pass_keeps_the_first_and_names_the_rest():
    index = DedupeIndex(DedupeSpec(exact=True))

    def row(rid: str, violation: str, reasons=None, kind="injected"):
        return {"id": rid, "kind": kind, "injection": {"violation": violation}, "reasons": reasons}

    rows = [
        row("a", "You idiot!"),
        row("b", "you IDIOT"),
        row("c", "You idiot!", reasons=["violation_not_flagged"]),
        row("d", "Something else"),
        row("e", "", kind="clean"),
    ]
    assert find_duplicates(index, rows) == {"b": "duplicate_violation"}
    assert find_duplicates(DedupeIndex(DedupeSpec()), rows) == {}  # inactive


def test_rows_and_stats_add_up():
    rec = record()
    row = base_row(rec.conv, rec.row_id)
    assert row["id"] == "r/v0" and row["context"][0]["role"] == "user" and row["response"] == RESPONSE
    stats = ChunkStats(source_rows=2)
    stats.emitted({**row, "kind": "clean"}, "train")
    stats.emitted(rejected_row(dict(row), ["token_boundary", "context_flagged"]), None)
    stats.count("categories", "Toxic")
    stats.observe("backtrack", 5, "qwen2.5")
    total = merge_stats([stats, ChunkStats(**stats.to_json())])
    funnel = funnel_of(total)
    assert funnel["rows"] == funnel["kept"] + funnel["rejected"] == 4
    assert funnel["rejected_by_reason"] == {"token_boundary": 2}
    assert funnel["reason_hits"] == {"context_flagged": 2, "token_boundary": 2}
    assert total.backtrack == {"qwen2.5": [5, 5]} and total.categories == {"Toxic": 2}


def test_chunk_writes_are_atomic_and_read_back(tmp_path: Path):
    out = ChunkOutput()
    rec = record()
    row = base_row(rec.conv, rec.row_id)
    out.kept["train"].append(row)
    out.rejected.append(rejected_row(base_row(rec.conv, "x"), ["missing_field"]))
    path = write_chunk(tmp_path, 3, out)
    assert path.name == "chunk-000003" and not (tmp_path / "chunk-000003.tmp").exists()
    back = read_chunk_rows(path)
    assert [(r["id"], split) for r, split in back] == [("r/v0", "train"), ("x", None)]


def test_executor_shards_chunks_by_rank_and_resumes(tmp_path: Path):
    recipe = parse_recipe(
        "name: s\nsources: [{path: 'builtin:everyday_chat'}]\noutput: {chunk_rows: 10}\n"
        "tokenizers: {extra: []}\n"
    )
    assert [len(c) for c in chunked(range(45), 10)] == [10, 10, 10, 10, 5]

    def read():
        return read_sources(recipe.sources, 45)

    loads = []

    def load(workers):
        loads.append(workers)
        return method_class(recipe)(recipe, Resources.load(recipe))

    seen = {}
    for rank in (0, 1):
        run = LocalExecutor(recipe, tmp_path, rank=rank, world_size=2).run(read, load)
        seen[rank] = [path.name for path in run.chunks]
        assert sum(s.source_rows for s in run.stats) == sum(
            len(c) for i, c in enumerate(chunked(range(45), 10)) if i % 2 == rank
        )
    assert seen == {
        0: ["chunk-000000", "chunk-000002", "chunk-000004"],
        1: ["chunk-000001", "chunk-000003"],
    }
    assert loads == [2, 2]  # each worker loads its 1/N share of the endpoints' limits
    resumed = LocalExecutor(recipe, tmp_path, rank=0, world_size=2).run(read, load)
    assert len(loads) == 2 and resumed.resumed == 3  # nothing to process: nothing loaded
    with pytest.raises(ValueError):
        LocalExecutor(recipe, tmp_path, rank=2, world_size=2)
