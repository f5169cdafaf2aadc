"""Classifier backends against a local OpenAI-compatible server, rules, taxonomy, duplicates."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from datasets import load_dataset

from bsafe_data.classify.base import ERROR_LABEL, Item, Score, transient_error
from bsafe_data.classify.dedupe import DedupeIndex, MinHasher, jaccard
from bsafe_data.classify.factory import make_classifier
from bsafe_data.classify.guard import LlamaGuardClassifier, llama_guard_prompt, parse_llama_guard
from bsafe_data.classify.judge import parse_verdict
from bsafe_data.classify.rules import RuleSet, context_overlap
from bsafe_data.classify.taxonomy import (
    LLAMA_GUARD_HAZARDS,
    NATIVE_TO_RLBF,
    OPENAI_MODERATION_CATEGORIES,
    markdown_table,
    rlbf_of,
    to_recipe,
)
from bsafe_data.label import chat_frame
from bsafe_data.pipeline import BuildError, build
from bsafe_data.recipe import RLBF_CATEGORIES, DedupeSpec, FilterSpec
from bsafe_data.registry import parse_recipe
from tests.conftest import REPO
from tests.guard_server import REFUSAL_SOURCE, ZORBLAX_SOURCE, GuardServer, make_recipe, write_corpus

CLI = str(Path(sys.executable).with_name("bsafe-data"))
#: Words the bank's violations use: the guard calls a text unsafe when it has one of them.
BANK_WORDS = [
    "idiot", "moron", "stupid", "loser", "damn", "crap", "hell", "bullshit", "jerk", "clown", "shit",
    "dumb", "pathetic", "wimp", "coward", "sucker", "screw", "zorblax", "@example.com", "555-",
]  # fmt: skip


@pytest.fixture(scope="module")
def server():
    with GuardServer() as srv:
        yield srv


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache of this test only (server answers depend on the test's configuration)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("BSAFE_DATA_CACHE_DIR", str(path))
    return path


def all_rows(folder: Path) -> list[dict]:
    """Kept and rejected rows through ``load_dataset``, with a fresh cache: ``datasets`` keys its cache
    of a local folder on the folder's name, so a rebuilt or refiltered folder would read stale rows."""
    rows = []
    for config in ("default", "rejected"):
        try:
            loaded = load_dataset(str(folder), config, cache_dir=tempfile.mkdtemp(dir=folder.parent))
        except ValueError:  # no rows in that config
            continue
        for split in loaded.values():
            rows.extend(split)
    return rows


def inserted(row: dict) -> str:
    return (row["injection"]["steering"] + row["injection"]["violation"]).strip()


# -- taxonomy --------------------------------------------------------------------------------------


def test_taxonomy_covers_every_vocabulary_and_maps_to_rlbf():
    assert set(LLAMA_GUARD_HAZARDS) == {f"S{i}" for i in range(1, 15)}
    for native in [*LLAMA_GUARD_HAZARDS, *OPENAI_MODERATION_CATEGORIES, "offensive", "pii:email"]:
        mapped = rlbf_of(native)
        assert mapped, native
        assert set(mapped) <= set(RLBF_CATEGORIES), native
    assert set(NATIVE_TO_RLBF) == {*LLAMA_GUARD_HAZARDS, *OPENAI_MODERATION_CATEGORIES, "offensive", "pii:*"}
    # every RLBF category is reachable from some classifier vocabulary
    reachable = {c for cats in NATIVE_TO_RLBF.values() for c in cats}
    assert reachable == set(RLBF_CATEGORIES)
    # spot checks of the table
    assert rlbf_of("S10")[0] == "Hate Speech" and rlbf_of("hate")[0] == "Hate Speech"
    assert rlbf_of("S4") == ("Under 18",) and rlbf_of("sexual/minors")[0] == "Under 18"
    assert (
        rlbf_of("S11")[0] == "Death Harm & Tragedy"
        and rlbf_of("self-harm/intent")[0] == "Death Harm & Tragedy"
    )
    assert rlbf_of("S9")[0] == "Firearms & Weapons" and rlbf_of("S13") == ("Politics",)
    assert rlbf_of("s10") == rlbf_of("S10") and rlbf_of("Hate speech") == ("Hate Speech",)
    assert "Hate Speech" not in rlbf_of("offensive") and "Profanity" in rlbf_of("offensive")
    assert rlbf_of("unknown-thing") == ()


def test_builtin_pii_kinds_with_and_without_the_quick_test():
    """The "@ or three digits" test only skips texts no pattern can match (Unicode digits too)."""
    from bsafe_data.classify.builtin import _PII_PATTERNS, pii_categories

    texts = [
        "mail me at a.b+c@d-e.org today", "call (555) 123-4567", "+1 555.123.4567", "ssn 123-45-6789",
        "card 1234 5678 9012 3456", "\u0661\u0662\u0663-\u0664\u0665-\u0666\u0667\u0668\u0669",
        "x@y", "no numbers here", "12 34 56", "1234-5678-9012-3456 and 987-65-4321", "",
    ]  # fmt: skip
    every = [[name for name, pattern in _PII_PATTERNS.items() if pattern.search(t)] for t in texts]
    assert [pii_categories(t) for t in texts] == every
    assert every[0] == ["pii:email"] and every[3] == ["pii:ssn"] and every[5] == ["pii:ssn"]
    assert every[7] == every[8] == [] and set(every[9]) == {"pii:card", "pii:ssn"}


def test_taxonomy_to_recipe_categories_and_extra_map():
    cats = list(RLBF_CATEGORIES)
    assert to_recipe("S10", cats) == ["Hate Speech", "Religion & Belief"]
    assert to_recipe("harassment", ["Toxic", "Violent"]) == ["Toxic"]  # only the recipe's categories
    assert to_recipe("Health", cats) == ["Health"]  # a judge names recipe categories directly
    custom = ["Insult", "PII"]
    assert to_recipe("pii:phone", custom, {"pii:*": ["PII"]}) == ["PII"]
    assert to_recipe("offensive", custom, {"Toxic": ["Insult"]}) == ["Insult"]  # via the RLBF name
    assert to_recipe("offensive", custom) == []


def test_readme_documents_the_mapping_table():
    readme = (REPO / "README.md").read_text()
    assert markdown_table() in readme


def test_readme_snippets_are_valid_recipes_and_the_http_backends_answer(server, cache):
    """Every backend has a README snippet; each parses, and each endpoint backend scores via the server."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Classifiers and filters", 1)[1].split("\n## ", 1)[0]
    snippets = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", section, re.S)]
    assert snippets
    providers = set()
    for snippet in snippets:
        recipe = parse_recipe(yaml.safe_dump({"name": "x", "sources": [{"path": "c.jsonl"}], **snippet}))
        for spec in recipe.filters.classifiers:
            providers.add(spec.provider)
            if spec.provider in ("builtin", "transformers"):
                continue
            local = spec.model_copy(update={"base_url": server.url})
            classifier = make_classifier(local, None, list(RLBF_CATEGORIES))
            items = [
                Item(
                    "You are a pathetic idiot.",
                    "violation",
                    (("user", "Hi"),),
                    "Hello.",
                    " You are a pathetic idiot.",
                )
            ]
            items.append(Item("Water the fern weekly.", "part2", (("user", "Hi"),)))
            bad, good = classifier.score_items(items)
            assert (bad.label, good.label) == ("unsafe", "safe"), spec.name
    assert providers == {"builtin", "openai_moderation", "llama_guard", "guard", "llm_judge", "transformers"}


# -- backends against the server -------------------------------------------------------------------


def _filters(server, *specs):
    return FilterSpec.model_validate({"classifiers": [{**s, "base_url": server.url} for s in specs]})


def test_every_http_backend_scores_and_every_call_is_cached(server, cache):
    specs = _filters(
        server,
        {"name": "lg3", "provider": "llama_guard", "model": "llama-guard-3"},
        {
            "name": "lg4raw",
            "provider": "llama_guard",
            "model": "Llama-Guard-4",
            "version": 4,
            "prompt_format": "raw",
        },
        {"name": "lg_nolp", "provider": "llama_guard", "model": "llama-guard-3-1b", "logprobs": False},
        {"name": "mod", "provider": "openai_moderation", "batch_size": 2},
        {"name": "sg", "provider": "guard", "preset": "shieldgemma", "model": "shieldgemma-2b"},
        {"name": "wg", "provider": "guard", "preset": "wildguard", "model": "wildguard-7b"},
        {"name": "judge", "provider": "llm_judge", "model": "any-judge"},
    ).classifiers
    ctx = (("system", "Be nice."), ("user", "How do I water a fern?"))
    items = [
        Item("You are an idiot.", "violation", ctx, "Water weekly.", " You are an idiot."),
        Item("Water weekly.", "part1", ctx),
        Item("Keep the soil moist.", "part2", ctx),
        Item("Zorblax the game.", "response", ctx),
        Item("You are an idiot.", "violation", ctx, "Water weekly.", " You are an idiot."),  # same again
    ]
    p = {
        text: server.p_unsafe(text) for text in ("You are an idiot.", "Water weekly.", "Keep the soil moist.")
    }
    for spec in specs:
        classifier = make_classifier(spec, None, list(RLBF_CATEGORIES))
        before = server.requests()
        scores = classifier.score_items(items)
        sent = server.requests() - before
        assert [s.label for s in scores] == ["unsafe", "safe", "safe", "unsafe", "unsafe"], spec.name
        assert scores[0] == scores[4]
        if spec.provider in ("llama_guard", "guard") and getattr(spec, "logprobs", True):
            assert scores[0].score == pytest.approx(p["You are an idiot."], abs=1e-4), spec.name
            assert scores[1].score == pytest.approx(p["Water weekly."], abs=1e-4), spec.name
        if spec.name == "lg_nolp":
            assert [s.score for s in scores] == [1.0, 0.0, 0.0, 1.0, 1.0]
        if spec.provider == "llama_guard":
            assert scores[0].categories == ("S10",) and scores[3].categories == ("S1",)
        if spec.provider == "openai_moderation":
            assert sent == 2  # 4 distinct texts in batches of 2
            assert scores[0].categories == ("harassment",) and scores[3].categories == ("hate",)
        elif spec.provider == "llm_judge":
            assert sent == 4 and scores[0].categories == ("Harassment",)
            assert scores[0].detail["span_start"] == len(" You are an ") and scores[0].detail["safe_edit"]
        else:
            assert sent == 4, spec.name  # the duplicate item is sent once
        again = make_classifier(spec, None, list(RLBF_CATEGORIES))
        before = server.requests()
        assert again.score_items(items) == scores
        assert server.requests() == before, f"{spec.name}: cached answers were requested again"
        assert again.usage["cache_hits"] == 5


def test_llama_guard_prompt_and_parser():
    item = Item(
        "You are an idiot.",
        "violation",
        (("system", "x"), ("user", "Hi"), ("assistant", "Hey"), ("user", "Q?")),
    )
    prompt = llama_guard_prompt(item, 3)
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")
    assert (
        "S1: Violent Crimes.\nS2: Non-Violent Crimes." in prompt and "S14: Code Interpreter Abuse." in prompt
    )
    assert "User: Hi\n\nAgent: Hey\n\nUser: Q?\n\nAgent: You are an idiot.\n\n<END CONVERSATION>" in prompt
    assert prompt.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    lg4 = llama_guard_prompt(item, 4, ["S10"])
    assert "<|header_start|>user<|header_end|>" in lg4 and "S10: Hate." in lg4 and "S1:" not in lg4
    assert parse_llama_guard("safe") == ("safe", ())
    assert parse_llama_guard("\nunsafe\nS1,S10") == ("unsafe", ("S1", "S10"))
    assert parse_llama_guard("unsafe S3") == ("unsafe", ("S3",))
    assert parse_llama_guard("I think it is fine") is None


def test_judge_verdict_parsing():
    assert parse_verdict('{"violating": false}') == {"violating": False}
    fenced = 'Here:\n```json\n{"violating": true, "span": "x", "category": "Toxic"}\n```'
    assert parse_verdict(fenced)["category"] == "Toxic"
    with pytest.raises(ValueError):
        parse_verdict("no json here")


def test_retries_then_errors_are_scored_as_errors(server, cache):
    spec = _filters(
        server, {"name": "lg", "provider": "llama_guard", "model": "llama-guard-3", "max_retries": 2}
    )
    classifier = LlamaGuardClassifier(spec.classifiers[0], None, backoff_base_s=0.01)
    server.configure(fail_status=503, fail_count=2)
    [score] = classifier.score_items([Item("Hello there, friend.")])
    assert score.label == "safe" and classifier.usage["retries"] == 2
    server.configure(fail_status=500, fail_count=3)
    [score] = classifier.score_items([Item("You absolute moron.")])
    assert score.label == ERROR_LABEL and classifier.usage["errors"] == 1
    assert transient_error(score)  # retries exhausted: a re-run retries the row
    server.configure(fail_status=422, fail_count=1)
    [refused] = classifier.score_items([Item("Some text the endpoint refuses.")])
    assert refused.label == ERROR_LABEL and not transient_error(refused)  # its final answer
    assert "a re-run does not retry it" in refused.detail["error"]
    server.configure(fail_status=None, fail_count=0)
    # a failed call is not served from the cache: the next run asks again
    before = server.requests()
    [score] = classifier.score_items([Item("You absolute moron.")])
    assert score.label == "unsafe" and server.requests() == before + 1


def test_wrong_key_stops_the_build_with_a_readable_message(server, cache, tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    recipe = tmp_path / "recipe.yaml"
    filters = {
        "classifiers": [
            {"name": "guard", "provider": "llama_guard", "model": "llama-guard-3", "base_url": server.url}
        ]
    }
    recipe.write_text(make_recipe(corpus, filters).to_yaml())
    server.configure(fail_status=401, fail_count=1)
    try:
        proc = subprocess.run(
            [CLI, "build", str(recipe), "--out", str(tmp_path / "out"), "--limit", "2"],
            capture_output=True, text=True, timeout=120, env=os.environ,
        )  # fmt: skip
    finally:
        server.configure(fail_status=None, fail_count=0)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    message = " ".join(proc.stderr.split())
    assert "classifier 'guard' endpoint http://127.0.0.1" in message and "HTTP 401" in message
    assert "Traceback" not in proc.stderr


# -- builds -----------------------------------------------------------------------------------------


def test_guard_build_rejects_unflagged_violations_unsafe_sources_and_refusals(
    server, cache, tmp_path, monkeypatch
):
    server.configure(unsafe_words=["idiot", "moron", "stupid", "zorblax"])
    monkeypatch.chdir(tmp_path)  # a relative source path: the same dataset name (so the same rows) every run
    corpus = write_corpus("corpus.jsonl")
    filters = {
        "classifiers": [
            {"name": "guard", "provider": "llama_guard", "model": "llama-guard-3", "base_url": server.url}
        ],
        "require_source_safe": True,
    }
    out = tmp_path / "out"
    try:
        result = build(make_recipe(corpus, filters), out)
    finally:
        server.configure(unsafe_words=list(BANK_WORDS))
    funnel = result.funnel
    assert funnel["rows"] == funnel["kept"] + funnel["rejected"] == 30
    assert sum(funnel["rejected_by_reason"].values()) == funnel["rejected"]
    rows = all_rows(out)
    assert len(rows) == 30
    seen = {"kept": 0, "violation_not_flagged": 0}
    for row in rows:
        src = row["source"]["id"]
        reasons = row.get("reasons") or []
        if src == ZORBLAX_SOURCE:
            assert reasons[0] == "source_unsafe", row["id"]  # every variant, clean or injected
            continue
        if src == REFUSAL_SOURCE:
            assert reasons[0] == "source_refusal", row["id"]
            continue
        scores = {s["target"]: s for s in row["scores"]}
        assert scores["response"]["label"] == "safe"
        if row["kind"] != "injected":
            assert not reasons
            continue
        assert set(scores) >= {"violation", "part2", "response"}
        flagged = re.search(r"(?<![0-9a-z])(idiot|moron|stupid)", inserted(row), re.I) is not None
        assert (scores["violation"]["label"] == "unsafe") == flagged, row["id"]
        if flagged:
            assert not reasons
            seen["kept"] += 1
        else:
            assert reasons == ["violation_not_flagged"], row["id"]
            seen["violation_not_flagged"] += 1
    assert seen["kept"] and seen["violation_not_flagged"], seen
    card = (out / "README.md").read_text()
    assert "rejected: `source_unsafe`" in card and "rejected: `violation_not_flagged`" in card


def test_judge_span_that_starts_earlier_moves_the_injection_and_changes_x(
    server, cache, tmp_path, tokenizers, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # same dataset name, same rows every run
    corpus = write_corpus("corpus.jsonl")
    plain = build(make_recipe(corpus, {"classifiers": [{"name": "builtin"}]}), tmp_path / "plain")
    # the judge quotes from "Notably" when it is in the answer, else from the first unsafe word
    words = [w for w in BANK_WORDS if w != "zorblax"]
    server.configure(judge_span_from="Notably", unsafe_words=words)
    judged_filters = {
        "classifiers": [
            {"name": "builtin"},
            {"name": "judge", "provider": "llm_judge", "model": "judge-model", "base_url": server.url},
        ]
    }
    try:
        build(make_recipe(corpus, judged_filters), tmp_path / "judged")
    finally:
        server.configure(judge_span_from=None, unsafe_words=list(BANK_WORDS))
    assert plain.funnel["rows"] == 30
    before = {r["id"]: r for r in all_rows(tmp_path / "plain")}
    after = {r["id"]: r for r in all_rows(tmp_path / "judged")}
    assert set(before) == set(after)
    tok = tokenizers["qwen2.5"]
    moved = unchanged = 0
    for row_id, new in after.items():
        old = before[row_id]
        if new["kind"] != "injected" or not new["backtrack"] or not old["backtrack"]:
            continue
        judge = next(s for s in new["scores"] if s["classifier"] == "judge")
        marker = new["response"].index("Notably")
        old_off, new_off = old["injection"]["offset"], new["injection"]["offset"]
        x_old, x_new = old["backtrack"][0]["tokens"], new["backtrack"][0]["tokens"]
        if judge["label"] == "unsafe" and old_off > marker:
            moved += 1
            # moved back to the whitespace before "Notably"; the moved text joined the steering
            assert new_off == len(new["response"][:marker].rstrip()), row_id
            assert (
                new["injection"]["steering"]
                == new["response"][new_off:old_off] + old["injection"]["steering"]
            )
            assert new["injection"]["violation"] == old["injection"]["violation"]
            assert x_new > x_old, row_id
            # X is exact for the new boundary (token invariant) and the continuation restarts there
            head, _ = chat_frame(tok, new["context"])
            part1 = new["response"][:new_off]
            ids_before = tok(head + part1, add_special_tokens=False)["input_ids"]
            ids_after = tok(head + part1 + new["injection"]["steering"] + new["injection"]["violation"],
                            add_special_tokens=False)["input_ids"]  # fmt: skip
            assert ids_after[: len(ids_before)] == ids_before and x_new == len(ids_after) - len(ids_before)
            assert new["segments"][-1]["text"] == new["response"][new_off:]
            assert f"[BACKTRACK_BY_{x_new}]" in new["completion"]
        else:
            unchanged += 1
            assert (new_off, x_new) == (old_off, x_old), row_id
    assert moved >= 2 and unchanged >= 2, (moved, unchanged)


def test_local_transformers_backend(tmp_path):
    spec = FilterSpec.model_validate(
        {"classifiers": [{"name": "local", "provider": "transformers", "model": str(tmp_path)}]}
    )
    if importlib.util.find_spec("torch") is None:
        recipe = make_recipe(write_corpus(tmp_path / "c.jsonl"), spec.model_dump())
        with pytest.raises(BuildError, match=r"bsafe-data\[local\]"):
            build(recipe, tmp_path / "out")
        return
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "you", "idiot", "water"]))
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(tmp_path)
    config = BertConfig(
        vocab_size=8,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        intermediate_size=8,
        id2label={0: "safe", 1: "toxic"},
        label2id={"safe": 0, "toxic": 1},
    )
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    classifier = make_classifier(spec.classifiers[0], tmp_path / "cache")
    scores = classifier.score_batch(["you idiot", "water"])
    assert all(0.0 <= s.score <= 1.0 and s.label in ("safe", "unsafe") for s in scores)
    assert classifier.score_batch(["you idiot", "water"]) == scores and classifier.usage["cache_hits"] == 2


# -- rules ------------------------------------------------------------------------------------------


def _row(kind="injected", scores=(), category="Hate Speech", x=10, violation=" You idiot.", response=None):
    response = response or "Water it weekly. Keep the soil moist."
    row = {"kind": kind, "response": response, "scores": list(scores), "backtrack": [], "injection": None}
    if kind == "injected":
        row["injection"] = {"offset": 16, "category": category, "steering": "", "violation": violation}
        row["backtrack"] = [{"tokenizer": "qwen2.5", "tokens": x}]
    return row


def _s(name, target, score, cats=(), label=None):
    return {"classifier": name, "target": target, "label": label or ("unsafe" if score >= 0.5 else "safe"),
            "score": score, "categories": list(cats)}  # fmt: skip


def _rules(filters: dict) -> RuleSet:
    spec = FilterSpec.model_validate(filters)
    return RuleSet(spec, list(RLBF_CATEGORIES))


def test_rules_any_all_thresholds_kinds_and_errors():
    two = {"classifiers": [{"name": "a"}, {"name": "b", "threshold": 0.7}]}
    rules = _rules(two)
    row = _row(
        scores=[
            _s("a", "violation", 0.6),
            _s("b", "violation", 0.6),
            _s("a", "part2", 0.1),
            _s("b", "part2", 0.2),
        ]
    )
    assert rules.decide(row).reasons == []  # any classifier flags the violation
    row["scores"][0]["score"] = 0.4
    assert rules.decide(row).reasons == ["violation_not_flagged"]  # b's own threshold is 0.7
    row["scores"][2]["score"] = 0.9
    assert rules.decide(row).reasons == ["violation_not_flagged", "context_flagged"]
    all_rule = {"target": "violation", "verdict": "unsafe", "combine": "all", "threshold": 0.5}
    strict = _rules({**two, "require_violation_flagged": False, "rules": [all_rule]})
    row = _row(scores=[_s("a", "violation", 0.6), _s("b", "violation", 0.55)])
    assert strict.decide(row).reasons == []  # the rule's threshold overrides b's 0.7
    row["scores"][1]["score"] = 0.45
    assert strict.decide(row).reasons == ["violation_not_flagged"]
    # float32 precision: a score equal to the threshold is unsafe in the build and after a round trip
    assert (
        _rules({"classifiers": [{"name": "a", "threshold": 0.7}]})
        .decide(_row(scores=[_s("a", "violation", 0.7)]))
        .reasons
        == []
    )
    # source rules apply to clean and injected rows; clean rows have no violation to flag
    src = _rules({"classifiers": [{"name": "g"}], "require_source_safe": True})
    assert src.decide(_row("clean", [_s("g", "response", 0.8)])).reasons == [
        "source_unsafe",
        "context_flagged",
    ]
    assert src.decide(_row("clean", [_s("g", "response", 0.1)])).reasons == []
    injected = _row(scores=[_s("g", "violation", 0.9), _s("g", "response", 0.9)])
    assert src.decide(injected).reasons == ["source_unsafe"]
    # a failed classifier call rejects the row
    err = _row(scores=[_s("g", "violation", 0.0, label=ERROR_LABEL)])
    assert src.decide(err).reasons == ["classifier_error"]
    # rules restricted to a kind; disabled filters decide nothing
    kinds = _rules(
        {
            "classifiers": [{"name": "g"}],
            "require_violation_flagged": False,
            "require_context_safe": False,
            "rules": [{"target": "response", "verdict": "safe", "kinds": ["injected"]}],
        }
    )
    assert kinds.decide(_row("clean", [_s("g", "response", 0.9)])).reasons == []
    assert kinds.decide(_row(scores=[_s("g", "response", 0.9)])).reasons == ["source_unsafe"]
    assert _rules({"enabled": False}).decide(_row(scores=[_s("builtin", "violation", 0.0)])).reasons == []


def test_rules_recipe_validation():
    with pytest.raises(ValueError, match="unknown classifiers"):
        FilterSpec.model_validate(
            {"rules": [{"target": "violation", "verdict": "unsafe", "classifiers": ["nope"]}]}
        )
    with pytest.raises(ValueError, match="unique"):
        FilterSpec.model_validate({"classifiers": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(ValueError, match="does not score"):
        FilterSpec.model_validate({
            "classifiers": [{"name": "j", "provider": "llm_judge", "model": "m"}],
            "rules": [{"target": "part2", "verdict": "safe", "classifiers": ["j"]}],
        })  # fmt: skip
    assert FilterSpec().classifiers[0].provider == "builtin"  # the flagship default


def test_category_mismatch_keep_reject_relabel():
    row = _row(category="Hate Speech", scores=[_s("b", "violation", 0.9, ["offensive"])])
    base = {"classifiers": [{"name": "b"}]}
    assert _rules(base).decide(row).reasons == []
    decision = _rules({**base, "category_mismatch": "reject"}).decide(row)
    assert decision.reasons == ["category_mismatch"]
    decision = _rules({**base, "category_mismatch": "relabel"}).decide(row)
    assert decision.reasons == [] and decision.category == "Toxic"  # offensive -> Toxic first
    custom = _rules({**base, "category_mismatch": "relabel", "category_map": {"offensive": ["Profanity"]}})
    assert custom.decide(row).category == "Profanity"
    matching = _row(category="Profanity", scores=[_s("b", "violation", 0.9, ["offensive"])])
    assert _rules({**base, "category_mismatch": "reject"}).decide(matching).reasons == []
    unknown = _row(category="Hate Speech", scores=[_s("b", "violation", 0.9, [])])
    assert _rules({**base, "category_mismatch": "reject"}).decide(unknown).reasons == []  # nothing to compare


def test_quality_rules_length_copy_refusal():
    # no classifier at all: the shorthand rules must be off (they would hold vacuously otherwise)
    no_scores = {"require_violation_flagged": False, "require_context_safe": False}
    with pytest.raises(ValueError, match="hold vacuously"):
        FilterSpec.model_validate({"classifiers": []})
    rules = _rules(
        {
            **no_scores,
            "classifiers": [],
            "quality": {"violation_tokens": {"min": 5, "max": 20}, "max_context_overlap": 0.5},
        }
    )
    assert rules.decide(_row(x=3)).reasons == ["violation_too_short"]
    assert rules.decide(_row(x=25)).reasons == ["violation_too_long"]
    assert rules.decide(_row(x=10)).reasons == []
    copy = _row(violation=" Keep the soil moist.", response="Water it weekly. Keep the soil moist.")
    assert rules.decide(copy).reasons == ["violation_copies_context"]
    assert context_overlap("you are an idiot for asking", "keep the soil moist") == 0.0
    assert context_overlap("keep the soil moist please", "always keep the soil moist") == pytest.approx(2 / 3)
    refusal = _row("clean", response="I'm sorry, but I can't help with that. Ask someone else.")
    assert rules.decide(refusal).reasons == ["source_refusal"]
    assert (
        _rules({**no_scores, "classifiers": [], "quality": {"reject_source_refusals": False}})
        .decide(refusal)
        .reasons
        == []
    )


def test_dedupe_exact_and_near():
    exact = DedupeIndex(DedupeSpec(exact=True))
    assert exact.check_and_add("You are an idiot.") is None
    assert exact.check_and_add("you are an IDIOT!") == "duplicate_violation"
    assert exact.check_and_add("You are a clown.") is None
    near = DedupeIndex(DedupeSpec(near=True, threshold=0.7))
    first = "Only a complete idiot would ask about watering ferns, and you are clearly that idiot."
    second = "Only a complete idiot would ask about watering roses, and you are clearly that idiot."
    other = "Skip the helmet, nobody needs it, and ignore the instruction manual completely."
    assert jaccard(first, second) > 0.7 > jaccard(first, other)
    assert near.check_and_add(first) is None
    assert near.check_and_add(second) == "near_duplicate_violation"
    assert near.check_and_add(other) is None
    # signatures are reproducible (fixed hash functions, no global RNG)
    assert (MinHasher().signature(first) == MinHasher().signature(first)).all()


def test_score_detail_is_not_stored():
    score = Score("j", "unsafe", 1.0, ("Toxic",), detail={"span_start": -4, "safe_edit": "x"})
    assert score.as_dict("violation") == {
        "classifier": "j", "target": "violation", "label": "unsafe", "score": 1.0, "categories": ["Toxic"],
    }  # fmt: skip
    assert json.dumps(score.as_dict("violation"))
