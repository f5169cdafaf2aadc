"""`refilter` re-applies rules to recorded scores with zero classifier requests; `stats` reports them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import bsafe_data.refilter as refilter_module
from bsafe_data.classify.base import ERROR_LABEL, is_unsafe
from bsafe_data.classify.rules import RELABEL_CLASSIFIER, RuleSet, requested_category
from bsafe_data.classify.taxonomy import to_recipe
from bsafe_data.columnar import Gatherer, list_entries, read_folder, unique_map
from bsafe_data.integrity import FolderError
from bsafe_data.pipeline import build
from bsafe_data.recipe import ALL_TARGETS, FilterSpec
from bsafe_data.refilter import RefilterError, refilter
from bsafe_data.rows import REJECTED_ARROW_SCHEMA, empty_row
from bsafe_data.stats import entry_scores, score_summaries, write_score_plots
from tests.guard_server import GuardServer, make_recipe, write_corpus
from tests.test_classifiers import BANK_WORDS

CLI = str(Path(sys.executable).with_name("bsafe-data"))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120, env=os.environ)


def rows_of(folder: Path) -> dict[str, dict]:
    """Every row by id; rejected rows carry `reasons`, kept rows `_split`."""
    rows = {}
    for sub in ("data", "rejected"):
        for path in sorted((folder / sub).glob("*.parquet")):
            for row in pq.read_table(path).to_pylist():
                row.setdefault("reasons", None)
                row["_split"] = path.name.split("-")[0] if sub == "data" else "rejected"
                rows[row["id"]] = row
    return rows


def parquet_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.glob("*/*.parquet"))}


def funnel(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())["funnel"]


def score(row: dict, classifier: str, target: str) -> dict:
    return next(s for s in row["scores"] if s["classifier"] == classifier and s["target"] == target)


@pytest.fixture(scope="module")
def server():
    with GuardServer(unsafe_words=list(BANK_WORDS)) as srv:
        yield srv


def _build(base: Path, name: str, filters: dict, *overrides: str) -> tuple[Path, object]:
    cache = base / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BSAFE_DATA_CACHE_DIR", str(cache))
        mp.chdir(base)  # a relative source path: the same dataset name (so the same rows) every run
        recipe = make_recipe(write_corpus("corpus.jsonl"), filters, *overrides)
        build(recipe, base / name)
    return base / name, recipe


@pytest.fixture(scope="module")
def guard_build(server, tmp_path_factory):
    """30 rows scored by a Llama Guard with logprobs (scores spread over [0, 1])."""
    base = tmp_path_factory.mktemp("guard")
    filters = {
        "classifiers": [
            {"name": "guard", "provider": "llama_guard", "model": "llama-guard-3", "base_url": server.url}
        ],
        "require_source_safe": True,
    }
    folder, recipe = _build(base, "built", filters)
    return base, folder, filters


@pytest.fixture(scope="module")
def moderation_build(server, tmp_path_factory):
    """Moderation scores; three requested categories, so some violations are flagged under others."""
    base = tmp_path_factory.mktemp("moderation")
    filters = {"classifiers": [{"name": "mod", "provider": "openai_moderation", "base_url": server.url}]}
    cats = "sampling.categories={Toxic: 1, Hate Speech: 1, Violent: 1}"
    folder, _ = _build(base, "built", filters, cats, "sampling.variants_per_answer=4")
    return base, folder, filters, cats


def test_threshold_change_makes_zero_requests_and_moves_the_funnel(
    server, guard_build, tmp_path, monkeypatch
):
    base, built, filters = guard_build
    folder = tmp_path / "out"
    shutil.copytree(built, folder)
    before = rows_of(folder)
    old = funnel(folder)
    # rows kept at 0.5 whose violation scores below 0.8 must go, and nothing else changes
    expected = {
        rid
        for rid, row in before.items()
        if row["reasons"] is None
        and row["kind"] == "injected"
        and not is_unsafe(score(row, "guard", "violation")["score"], 0.8)
    }
    assert expected and any(r["reasons"] is None and r["kind"] == "injected" for r in before.values())
    requests = server.requests()
    proc = run_cli("refilter", str(folder), "--set", "filters.classifiers.0.threshold=0.8")
    assert proc.returncode == 0, proc.stderr
    assert server.requests() == requests, "refilter sent classifier requests"
    assert f"{len(expected)} row(s) newly rejected, 0 newly kept" in " ".join(proc.stdout.split())
    after = rows_of(folder)
    new = funnel(folder)
    assert set(after) == set(before)
    assert {
        rid for rid, row in after.items() if row["reasons"] and before[rid]["reasons"] is None
    } == expected
    for rid in expected:
        assert after[rid]["reasons"] == ["violation_not_flagged"]
        assert score(after[rid], "guard", "violation")["label"] == "safe"  # labels follow the threshold
    assert new["kept"] == old["kept"] - len(expected)
    assert new["rejected_by_reason"]["violation_not_flagged"] == (
        old["rejected_by_reason"].get("violation_not_flagged", 0) + len(expected)
    )
    assert new["rows"] == new["kept"] + new["rejected"] == old["rows"]
    assert sum(new["rejected_by_reason"].values()) == new["rejected"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["refilter"]["overrides"] == ["filters.classifiers.0.threshold=0.8"]
    assert manifest["recipe_sha256"] != json.loads((built / "manifest.json").read_text())["recipe_sha256"]
    card = (folder / "README.md").read_text()
    assert f"| **kept** | **{new['kept']}** |" in card and "`guard` at 0.8" in card
    # a fresh build with the new threshold answers from the cache and writes the same bytes
    monkeypatch.setenv("BSAFE_DATA_CACHE_DIR", str(base / "cache"))
    monkeypatch.chdir(base)
    recipe = make_recipe("corpus.jsonl", filters, "filters.classifiers.0.threshold=0.8")
    build(recipe, tmp_path / "fresh")
    assert server.requests() == requests
    assert parquet_bytes(tmp_path / "fresh") == parquet_bytes(folder)
    # and going back restores the original bytes
    refilter(folder, ["filters.classifiers.0.threshold=0.5"])
    assert parquet_bytes(folder) == parquet_bytes(built)
    assert server.requests() == requests


def test_category_mismatch_reject_relabel_and_back(server, moderation_build, tmp_path):
    base, built, filters, cats = moderation_build
    folder = tmp_path / "out"
    shutil.copytree(built, folder)
    before = rows_of(folder)
    recipe_cats = ["Toxic", "Hate Speech", "Violent"]
    mismatched = {}
    for rid, row in before.items():
        if row["reasons"] is not None or row["kind"] != "injected":
            continue
        flagged = score(row, "mod", "violation")["categories"]
        mapped = [c for native in flagged for c in to_recipe(native, recipe_cats)]
        if mapped and row["injection"]["category"] not in mapped:
            mismatched[rid] = mapped[0]
    assert mismatched, "the corpus should give some mismatches"
    requests = server.requests()
    result = refilter(folder, ["filters.category_mismatch=reject"])
    after = rows_of(folder)
    assert {rid for rid, r in after.items() if r["reasons"] == ["category_mismatch"]} == set(mismatched)
    assert result.after["rejected_by_reason"]["category_mismatch"] == len(mismatched)
    result = refilter(folder, ["filters.category_mismatch=relabel"])
    # rows rejected for other reasons are relabelled too (as a build would), only the mismatches come back
    assert result.newly_kept == len(mismatched) and result.relabeled >= len(mismatched)
    after = rows_of(folder)
    for rid, new_category in mismatched.items():
        row = after[rid]
        requested = before[rid]["injection"]["category"]
        x = row["backtrack"][0]["tokens"]
        assert row["reasons"] is None and row["injection"]["category"] == new_category
        assert row["completion"].startswith(f"[CATEGORY {new_category}][BACKTRACK_BY_{x}]")
        assert [s["text"] for s in row["segments"] if s["kind"] == "control"] == [
            f"[CATEGORY {new_category}][BACKTRACK_BY_{x}]"
        ]
        assert (
            row["completion"][len(f"[CATEGORY {new_category}]") :]
            == before[rid]["completion"][len(f"[CATEGORY {requested}]") :]
        )
        marker = score(row, "bsafe:relabel", "violation")
        assert marker["categories"] == [requested, new_category]
    manifest = json.loads((folder / "manifest.json").read_text())
    kept_cats = {}
    for row in after.values():
        if row["reasons"] is None and row["injection"]:
            kept_cats[row["injection"]["category"]] = kept_cats.get(row["injection"]["category"], 0) + 1
    assert manifest["categories"] == dict(sorted(kept_cats.items()))
    refilter(folder, ["filters.category_mismatch=keep"])
    assert parquet_bytes(folder) == parquet_bytes(built)
    assert server.requests() == requests


def test_dedupe_exact_and_near_through_refilter_match_a_fresh_build(tmp_path, monkeypatch):
    monkeypatch.setenv("BSAFE_DATA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # same dataset name, same rows every run
    corpus = write_corpus("corpus.jsonl")
    toxic = ("sampling.categories={Toxic: 1}", "sampling.variants_per_answer=4")
    filters = {"classifiers": [{"name": "builtin"}]}
    build(make_recipe(corpus, filters, *toxic), tmp_path / "out")
    rows = rows_of(tmp_path / "out")
    kept = sorted(
        (r for r in rows.values() if r["reasons"] is None and r["kind"] == "injected"),
        key=lambda r: (r["source"]["index"], int(r["id"].rsplit("/v", 1)[1])),
    )
    seen, duplicates = set(), set()
    for row in kept:  # first in source order stays
        norm = re.sub(r"[^0-9a-z]+", " ", row["injection"]["violation"].lower()).strip()
        (duplicates.add(row["id"]) if norm in seen else seen.add(norm))
    assert duplicates, "one category and 4 variants per answer give repeated violations"
    result = refilter(tmp_path / "out", ["filters.quality.dedupe.exact=true"])
    after = rows_of(tmp_path / "out")
    assert {rid for rid, r in after.items() if r["reasons"] == ["duplicate_violation"]} == duplicates
    assert result.newly_rejected == len(duplicates)
    result = refilter(tmp_path / "out", ["filters.quality.dedupe.near=true"])
    near = {
        rid for rid, r in rows_of(tmp_path / "out").items() if r["reasons"] == ["near_duplicate_violation"]
    }
    assert near and not near & duplicates
    fresh = make_recipe(
        corpus, filters, *toxic, "filters.quality.dedupe.exact=true", "filters.quality.dedupe.near=true"
    )
    build(fresh, tmp_path / "fresh")
    assert parquet_bytes(tmp_path / "fresh") == parquet_bytes(tmp_path / "out")


def test_refilter_refuses_what_the_scores_cannot_answer(guard_build, tmp_path):
    _, built, _ = guard_build
    folder = tmp_path / "out"
    shutil.copytree(built, folder)
    original = parquet_bytes(folder)
    with pytest.raises(RefilterError, match="only changes `filters`"):
        refilter(folder, ["seed=7"])
    with pytest.raises(RefilterError, match="no recorded scores"):
        refilter(folder, ["filters.classifiers=[{name: builtin}]"])
    with pytest.raises(RefilterError, match=r"changed \['model'\]"):
        refilter(folder, ["filters.classifiers.0.model=llama-guard-4"])
    with pytest.raises(FolderError, match="manifest.json is missing"):
        refilter(tmp_path, [])
    assert parquet_bytes(folder) == original


def test_stats_prints_the_funnel_and_never_changes_the_folder(guard_build, tmp_path):
    _, built, _ = guard_build
    folder = tmp_path / "out"
    shutil.copytree(built, folder)
    before = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    proc = run_cli("stats", str(folder))
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    first = funnel(folder)["rejected_by_reason"]
    for reason, n in first.items():
        assert re.search(rf"{reason} │ {n} │", text), reason
    assert re.search(r"guard │ violation │ \d+ │ 0 │", text)
    assert "wrote" not in text  # print only by default
    # --plots DIR writes the histograms there, and only there
    plots = tmp_path / "plots"
    proc = run_cli("stats", str(folder), "--plots", str(plots))
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {plots / 'scores_guard.png'}" in proc.stdout
    assert (plots / "scores_guard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    after = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    assert after == before  # card, plots and data untouched
    assert run_cli("verify", str(folder)).returncode == 0
    # the build already embeds the score plots in the card
    card = (folder / "README.md").read_text()
    assert "![plots/scores_guard.png](plots/scores_guard.png)" in card
    assert "![plots/positions.png](plots/positions.png)" in card


# -- the columnar refilter against the row-by-row definitions -------------------------------------
CATEGORIES = ["Toxic", "Hate Speech", "Violent"]
_RESPONSES = [
    "Rinse the rice well. Then simmer it gently for fifteen minutes.",
    "I'm sorry, but I can't help with that.",
    "  Sorry, I can't assist. Try a cookbook instead.",
]
_VIOLATIONS = [" you idiot", " rinse the rice well then simmer it", " go away you fool and never come back"]
_F32 = np.float32
# scores at, just below and just above the thresholds used below (compared as float32)
_SCORES = [
    0.0,
    0.3,
    0.5,
    0.7,
    1.0,
    float(np.nextafter(_F32(0.5), _F32(0))),
    float(np.nextafter(_F32(0.3), _F32(1))),
]
_THRESHOLDS = [0.3, 0.5, 0.7]

_entry = st.builds(
    lambda c, t, label, score, cats: {
        "classifier": c,
        "target": t,
        "label": label,
        "score": score,
        "categories": cats,
    },
    st.sampled_from(["a", "b", "zz"]),  # zz: recorded, but not in the recipe
    st.sampled_from(ALL_TARGETS),
    st.sampled_from(["safe", "unsafe", ERROR_LABEL]),
    st.sampled_from(_SCORES),
    st.sampled_from([[], ["Toxic"], ["hate"], ["S1"], ["Violent", "Toxic"]]),
)
_mark = st.builds(
    lambda old, new: {"classifier": RELABEL_CLASSIFIER, "target": "violation", "label": "relabeled",
                      "score": 1.0, "categories": [old, new]},
    st.sampled_from(CATEGORIES), st.sampled_from(CATEGORIES),
)  # fmt: skip
_injection = st.builds(
    lambda offset, category, violation: {
        "offset": offset, "relative_position": offset / 64, "sentence_index": 0, "category": category,
        "steering": " Honestly.", "violation": violation,
    },
    st.integers(0, 40), st.sampled_from([*CATEGORIES, "Other"]), st.sampled_from(_VIOLATIONS),
)  # fmt: skip
_row = st.builds(
    lambda kind, response, injection, backtrack, scores: empty_row(
        kind=kind, response=response, injection=injection, scores=scores, reasons=[], detail="",
        backtrack=[{"tokenizer": f"t{i}", "tokens": x} for i, x in enumerate(backtrack)],
    ),
    st.sampled_from(["injected", "clean"]), st.sampled_from(_RESPONSES), st.none() | _injection,
    st.lists(st.integers(0, 40), max_size=2), st.lists(_entry | _mark, max_size=6),
)  # fmt: skip
_rule = st.fixed_dictionaries(
    {"target": st.sampled_from(ALL_TARGETS), "verdict": st.sampled_from(["safe", "unsafe"])},
    optional={
        "classifiers": st.sampled_from([["a"], ["b"], ["a", "b"]]),
        "combine": st.sampled_from(["any", "all"]),
        "threshold": st.sampled_from(_THRESHOLDS),
        "kinds": st.sampled_from([["injected"], ["clean"]]),
    },
)
_filters = st.fixed_dictionaries(
    {
        "enabled": st.sampled_from([True, True, True, False]),
        "classifiers": st.tuples(
            st.sampled_from(_THRESHOLDS), st.sampled_from(_THRESHOLDS),
            st.sampled_from([None, ["violation"], ["violation", "response"]]),
        ).map(lambda t: [{"name": "a", "threshold": t[0]},
                         {"name": "b", "threshold": t[1], "targets": t[2]}]),
        "require_violation_flagged": st.booleans(),
        "require_context_safe": st.booleans(),
        "require_source_safe": st.booleans(),
        "rules": st.lists(_rule, max_size=3),
        "category_mismatch": st.sampled_from(["keep", "reject", "relabel"]),
        "quality": st.fixed_dictionaries({
            "violation_tokens": st.sampled_from([{}, {"min": 10}, {"max": 30}, {"min": 5, "max": 20}]),
            "max_context_overlap": st.sampled_from([None, 0.3]),
            "reject_source_refusals": st.booleans(),
        }),
    }
)  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(filters=_filters, rows=st.lists(_row, min_size=1, max_size=24), pick=st.integers(0, 2))
def test_decide_table_and_relabelled_scores_match_the_row_by_row_rules(filters, rows, pick):
    """Columnar rules (one decide per score signature) give every row what RuleSet.decide gives it,
    and the columnar labels at new thresholds are those of is_unsafe, on every row or a subset."""
    try:
        spec = FilterSpec(**filters)
    except ValidationError:
        assume(False)
    rules = RuleSet(spec, CATEGORIES)
    table = pa.Table.from_pylist(rows, schema=REJECTED_ARROW_SCHEMA)
    stored = table.to_pylist()  # as refilter reads them: float32 scores
    subset = np.arange(len(rows))[pick::2] if pick else np.arange(len(rows))
    decided = rules.decide_table(table, subset)
    for i, row_index in enumerate(subset.tolist()):
        expected = rules.decide(stored[row_index])
        got = decided.decisions[decided.groups[i]]
        assert got.reasons == expected.reasons, (stored[row_index], filters)
        assert got.category == expected.category
        assert requested_category(decided.examples[decided.groups[i]]) == requested_category(
            stored[row_index]
        )
    scores = table.column("scores")
    relabeled = refilter_module._relabeled_scores(
        scores, list_entries(scores.combine_chunks()), rules, subset
    ).to_pylist()
    for row_index, (row, new) in enumerate(zip(stored, relabeled, strict=True)):
        want = [dict(e) for e in row["scores"]]
        for e in want if row_index in subset else []:
            if e["classifier"] in rules.specs and e["label"] != ERROR_LABEL:
                e["label"] = (
                    "unsafe" if is_unsafe(e["score"], rules.specs[e["classifier"]].threshold) else "safe"
                )
        assert new == want


def test_columnar_refilter_writes_what_the_row_hooks_write(moderation_build, tmp_path, monkeypatch):
    """Order keys and chunk counters from columns give the bytes of the method's row hooks
    (order_key, chunk_from_rows), relabels and duplicates included; stats agree with the rows."""
    _, built, _, _ = moderation_build
    overrides = ["filters.category_mismatch=relabel", "filters.quality.dedupe.exact=true",
                 "filters.classifiers.0.threshold=0.6"]  # fmt: skip
    columnar, rows = tmp_path / "columnar", tmp_path / "rows"
    shutil.copytree(built, columnar)
    shutil.copytree(built, rows)
    counters = []  # the merged chunk counters each refilter hands the writer, key order included
    write = refilter_module.write_dataset_folder

    def recording(out, chunks, recipe, stats, *args, **kwargs):
        counters.append(json.dumps(stats.to_json()))
        return write(out, chunks, recipe, stats, *args, **kwargs)

    monkeypatch.setattr(refilter_module, "write_dataset_folder", recording)
    result = refilter(columnar, overrides)
    assert result.relabeled and result.newly_rejected
    with monkeypatch.context() as mp:
        mp.setattr(refilter_module, "_counts_columns", lambda method: None)
        mp.setattr(refilter_module, "_order_columns", lambda m, t, f, o: refilter_module._hook_order(m, t, o))
        refilter(rows, overrides)
    assert counters[0] == counters[1] and json.loads(counters[0])["positions"]

    def files(folder: Path) -> dict[str, bytes]:
        return {
            str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", "README.md") and ".bsafe" not in p.parts
        }

    assert files(columnar) == files(rows)
    manifests = [json.loads((f / "manifest.json").read_text()) for f in (columnar, rows)]
    for m in manifests:
        m.pop("timings"), m.pop("files")
    assert manifests[0] == manifests[1] and manifests[0]["categories"]
    expected: dict[tuple[str, str], list[float]] = {}
    errors: dict[tuple[str, str], int] = {}
    for row in rows_of(columnar).values():
        for e in row["scores"]:
            if not e["classifier"].startswith("bsafe:"):
                key = (e["classifier"], e["target"])
                if e["label"] == ERROR_LABEL:
                    errors[key] = errors.get(key, 0) + 1
                else:
                    expected.setdefault(key, []).append(e["score"])
    summaries = score_summaries(columnar)
    # the histograms refilter drew from the scores it read are those of the rows it wrote
    redrawn = write_score_plots(columnar, out_dir=tmp_path / "redrawn")
    assert redrawn
    for path in map(Path, redrawn):
        assert path.read_bytes() == (columnar / "plots" / path.name).read_bytes(), path.name
    assert {(s.classifier, s.target): sorted(s.scores) for s in summaries} == {
        k: sorted(v) for k, v in expected.items()
    }
    for s in summaries:
        assert s.errors == errors.get((s.classifier, s.target), 0)
        assert s.flagged == sum(is_unsafe(x, s.threshold) for x in s.scores)
    assert any(s.flagged for s in summaries) and any(len(s.scores) > s.flagged for s in summaries)


@given(
    st.lists(st.lists(st.sampled_from(["I can't help.", "Sure: step one", "", None]), max_size=6), max_size=4)
)
def test_unique_map_of_a_dictionary_column_is_the_plain_columns(chunks):
    calls: list = []

    def fn(value):
        calls.append(value)
        return None if value is None else len(value)

    plain = pa.chunked_array([pa.array(c, pa.string()) for c in chunks], pa.string())
    expected = unique_map(plain, fn)
    calls.clear()
    encoded = pa.chunked_array(
        [a.dictionary_encode() for a in plain.chunks], pa.dictionary(pa.int32(), pa.string())
    )
    assert unique_map(encoded, fn).tolist() == expected.tolist()
    assert len(calls) == len(set(calls))  # once per distinct value, across chunks


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 40), min_size=1, max_size=5),
    st.lists(st.integers(0, 10_000), max_size=120),
)
def test_gatherer_takes_rows_in_order_whether_sliced_or_taken(batch_sizes, picks):
    total = sum(batch_sizes)
    assume(total > 0)
    batches = [
        pa.record_batch(
            {
                "i": pa.array(range(a, a + n), pa.int64()),
                "s": pa.array([f"row {k}" for k in range(a, a + n)], pa.string()),
            }
        )
        for a, n in zip(np.cumsum([0, *batch_sizes[:-1]]).tolist(), batch_sizes, strict=True)
    ]
    table = pa.Table.from_batches(batches)
    rows = np.array([p % total for p in picks], dtype=np.int64)
    rows = np.concatenate([rows, np.arange(total // 3, total)])  # one long run besides the picks
    expected = table.take(pa.array(rows)).to_pylist()
    gatherer = Gatherer(table)
    assert gatherer(rows).to_pylist() == expected  # slices for a few runs, takes for many
    assert gatherer._scattered(rows).to_pylist() == expected


_ENTRY = st.fixed_dictionaries(
    {
        "classifier": st.sampled_from(["guard", "builtin", "bsafe:relabel"]),
        "target": st.sampled_from(["violation", "continuation"]),
        "label": st.sampled_from(["safe", "unsafe", ERROR_LABEL, None]),
        "score": st.floats(0, 1, width=32),
        "categories": st.just([]),
    }
)


@given(st.lists(st.lists(_ENTRY, max_size=4), max_size=12))
def test_entry_scores_are_the_entries_grouped_in_order_of_first_appearance(rows):
    column = pa.array(rows, REJECTED_ARROW_SCHEMA.field("scores").type)
    expected: dict = {}
    for entry in (e for row in rows for e in row if not e["classifier"].startswith("bsafe:")):
        scores, errors = expected.setdefault((entry["classifier"], entry["target"]), ([], [0]))
        if entry["label"] == ERROR_LABEL:
            errors[0] += 1
        else:
            scores.append(float(np.float32(entry["score"])))
    got = [(key, scores.tolist(), errors) for key, scores, errors in entry_scores(column)]
    assert got == [(key, scores, errors[0]) for key, (scores, errors) in expected.items()]


def test_read_folder_keeps_repeated_text_encoded_and_the_writer_decodes_it(guard_build):
    _, folder, _ = guard_build
    features = refilter_module.method_class(refilter_module.load_recipe(folder / "recipe.yaml")).features
    table, stored = read_folder(folder, features)
    for name in ("response", "prompt"):
        assert pa.types.is_dictionary(table.schema.field(name).type)
    stored_rows = [pq.read_table(p) for p in sorted((folder / "data").glob("*.parquet"))]
    gathered = refilter_module.GatheredChunks(table, features)
    gathered.add("train", np.flatnonzero(stored != "rejected"))  # data/ rows: read first, in order
    decoded = gathered.read("train", 0)
    assert decoded.schema == features.arrow_schema  # plain strings again, with the features
    assert decoded.num_rows == sum(t.num_rows for t in stored_rows) > 0
    for name in ("response", "prompt", "completion"):
        assert decoded.column(name).to_pylist() == [
            v for t in stored_rows for v in t.column(name).to_pylist()
        ]
