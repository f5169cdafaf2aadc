"""BSAFE (detect-and-repair): real builds through the CLI, offline and against the test servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import load_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from guard_server import DEFAULTS as GUARD_DEFAULTS  # noqa: E402
from guard_server import GuardServer, unsafe_at  # noqa: E402
from openai_server import ServerProcess  # noqa: E402

from bsafe_data.classify.builtin import BuiltinClassifier  # noqa: E402
from bsafe_data.label import (  # noqa: E402
    Rendered,
    add_control_tokens,
    chat_frame,
    control_atoms,
    control_text,
    tokenize_rendered,
)
from bsafe_data.methods.bsafe import BUNDLED_UNSAFE  # noqa: E402
from bsafe_data.tokenization import load_tokenizer  # noqa: E402
from tests.conftest import REPO  # noqa: E402

CLI = str(Path(sys.executable).with_name("bsafe-data"))
RECIPE = str(REPO / "recipes" / "bsafe.yaml")
FAMILIES = {"qwen2.5": "builtin:qwen2.5", "phi-3-mini": "builtin:phi-3-mini"}
KEY = "sk-test-bsafe-77"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args], cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}
    )


def rows_of(out: Path, config: str = "default") -> list[dict]:
    ds = load_dataset(str(out), config) if config != "default" else load_dataset(str(out))
    return [r for split in ds.values() for r in split]


def bundled() -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, BUNDLED_UNSAFE.read_text().splitlines())}


@pytest.fixture(scope="module")
def offline(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bsafe") / "out"
    proc = cli("build", RECIPE, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def test_bundled_set_is_flagged_where_it_says_and_continuations_are_safe():
    rows = list(bundled().values())
    assert 90 <= len(rows) <= 120
    clf = BuiltinClassifier()
    for row in rows:
        answer = row["messages"][-1]["content"]
        start = row["violation_start"]
        safe, rest = answer[:start], answer[start:]
        assert clf.score_batch([safe])[0].label == "safe", row["id"]
        assert clf.score_batch([rest.split(". ")[0]])[0].label == "unsafe", row["id"]
        assert clf.score_batch([row["safe_continuation"]])[0].label == "safe", row["id"]


def test_offline_build_cuts_at_the_span_and_x_is_exact_for_both_families(offline):
    manifest = json.loads((offline / "manifest.json").read_text())
    assert manifest["method"] == "bsafe" and manifest["funnel"]["kept"] == 100
    rows = rows_of(offline)
    truth = bundled()
    tokenizers = {name: load_tokenizer(ref) for name, ref in FAMILIES.items()}
    for tok in tokenizers.values():
        add_control_tokens(tok, manifest["control_tokens"])
    checked = 0
    for row in rows:
        assert row["kind"] == "repaired"
        inj = row["injection"]
        answer = row["response"]
        before, deleted = answer[: inj["offset"]], inj["steering"] + inj["violation"]
        # the cut is the end of the word before the flagged sentence: the text before the judged span
        assert before == answer[: truth[row["source"]["id"]]["violation_start"]].rstrip()
        assert answer[inj["offset"] :].startswith(deleted)
        assert {b["tokenizer"] for b in row["backtrack"]} == set(FAMILIES)
        kinds = [(s["kind"], s["loss"]) for s in row["segments"]]
        assert kinds == [("prefix", False), ("violation", False), ("control", True), ("continuation", True)]
        context = [(t["role"], t["content"]) for t in row["context"]]
        for name, tok in tokenizers.items():
            x = next(b["tokens"] for b in row["backtrack"] if b["tokenizer"] == name)
            head, tail = chat_frame(tok, context)
            prompt = head + before + deleted
            if name == "qwen2.5":
                assert prompt == row["prompt"]
            enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
            ids, spans = enc["input_ids"], enc["offset_mapping"]
            left = ids[: len(ids) - x]
            assert left == tok(head + before, add_special_tokens=False)["input_ids"], (row["id"], name)
            # as text: the kept tokens end exactly where the judged span's cut is, the deleted ones after it
            cut = len(head + before)
            assert max(end for _, end in spans[: len(left)]) == cut, (row["id"], name)
            assert min(start for start, _ in spans[len(left) :]) >= cut, (row["id"], name)
            assert prompt[cut:] == deleted
            # what TRL trains on: the control atoms (single tokens) and the continuation, nothing before
            control = control_text(manifest["control_format"], inj["category"], x)
            continuation = row["segments"][-1]["text"]
            done = tokenize_rendered(Rendered(prompt, control + continuation + tail, x, control), tok)
            trained = [t for t, label in zip(done["input_ids"], done["labels"], strict=True) if label != -100]
            assert trained[:2] == tok.convert_tokens_to_ids(control_atoms(control)), (row["id"], name)
            assert tok.decode(trained[2:]).strip().startswith(continuation.strip()[:20])
            checked += 1
    assert checked == 200
    card = (offline / "README.md").read_text()
    assert "[CATEGORY Toxic][BACKTRACK_BY_" in card and "completion_only_loss=True" in card


def test_rows_without_a_span_or_with_a_flagged_continuation_are_rejected(tmp_path):
    truth = list(bundled().values())
    everyday = (REPO / "bsafe_data/data/corpus/everyday_chat.jsonl").read_text().splitlines()
    safe_answer = json.loads(everyday[0])
    bad = dict(truth[1], id="flagged", safe_continuation="Stop whining, you stupid idiot.")
    lines = [truth[0], bad, {"id": "safe", "messages": safe_answer["messages"], "safe_continuation": "x"}]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "out"
    proc = cli(
        "build", RECIPE, "--out", str(out), "--source", str(corpus), "--set", f"continuation.path={corpus}"
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rejected = {r["source"]["id"]: r["reasons"] for r in rows_of(out, "rejected")}
    assert rejected == {"flagged": ["continuation_flagged"], "safe": ["no_violation_found"]}
    assert [r["source"]["id"] for r in rows_of(out)] == [truth[0]["id"]]


def test_recipe_refuses_unknown_detector_or_checker():
    import bsafe_data.methods  # noqa: F401 - registers the method's recipe model
    from bsafe_data.recipe import RecipeError
    from bsafe_data.registry import load_recipe

    assert type(load_recipe(RECIPE)).__name__ == "BsafeRecipe"
    for override in ("detect.classifier=nope", "continuation.check=[builtin, nope]"):
        with pytest.raises(RecipeError, match="unknown classifiers \\['nope'\\]"):
            load_recipe(RECIPE, [override])


def test_plan_works():
    proc = cli("plan", RECIPE)
    assert proc.returncode == 0, proc.stderr
    assert "[BACKTRACK_BY_" in proc.stdout


@pytest.fixture(scope="module")
def servers():
    with ServerProcess(model="gen-model", api_key=KEY) as gen, GuardServer() as guard:
        yield gen, guard


def llm_build(gen: ServerProcess, guard: GuardServer, corpus: Path, out: Path, cache: Path):
    classifiers = (
        "[{name: builtin, provider: builtin}, "
        f"{{name: judge, provider: llm_judge, model: judge-model, base_url: '{guard.url}'}}]"
    )
    return cli(
        "build", RECIPE, "--out", str(out), "--source", str(corpus), "--cache-dir", str(cache),
        "--allow-empty",
        "--set", "generator.provider=openai", "--set", "generator.model=gen-model",
        "--set", f"generator.base_url={gen.url}", "--set", "generator.api_key_env=BSAFE_TEST_KEY",
        "--set", "generator.timeout_s=2", "--set", "generator.max_retries=1",
        "--set", f"filters.classifiers={classifiers}",
        env={"BSAFE_TEST_KEY": KEY},
    )  # fmt: skip


def with_marker(row: dict, marker: str) -> dict:
    """``row`` with ``marker`` appended to its first user turn (the test server reads it)."""
    messages = [dict(m) for m in row["messages"]]
    messages[0]["content"] += f" {marker}"
    return {**row, "messages": messages}


def test_llm_build_sends_prompts_caches_and_a_fault_is_a_reason(servers, tmp_path):
    gen, guard = servers
    gen.reset()
    guard.reset()
    words = GUARD_DEFAULTS["unsafe_words"]
    guard.configure(unsafe_words=words)
    rows = list(bundled().values())[:8]
    # the guard server's judge flags answers with one of its words and quotes from the first of them
    flagged = [r["id"] for r in rows if unsafe_at(r["messages"][-1]["content"], words)]
    assert 2 < len(flagged) < len(rows)
    # the generator's continuations call people idiots (the judge flags them), except where the
    # `notags` fault makes it answer a bland sentence: those rows are kept
    bland = set(flagged[:2])
    rows = [with_marker(r, "[[fault:notags:0]]") if r["id"] in bland else r for r in rows]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = tmp_path / "cache"
    first = llm_build(gen, guard, corpus, tmp_path / "a", cache)
    assert first.returncode == 0, first.stderr
    sent, judged = gen.stats()["chat"], guard.requests()
    assert sent == len(flagged)  # one continuation request per located span
    assert judged == len(rows) + len(flagged)  # the judge locates spans, then checks continuations
    rejected = rows_of(tmp_path / "a", "rejected")
    kept = rows_of(tmp_path / "a")
    reasons = {r["source"]["id"]: r["reasons"] for r in rejected}
    expected = {r["id"]: ["no_violation_found"] for r in rows if r["id"] not in flagged}
    expected.update({i: ["continuation_flagged"] for i in flagged if i not in bland})
    assert reasons == expected
    assert {r["source"]["id"] for r in kept} == bland
    for row in kept + rejected:
        if row["source"]["id"] not in flagged:
            continue
        labels = {(s["classifier"], s["target"]): s["label"] for s in row["scores"]}
        assert labels[("judge", "violation")] == "unsafe"
        # the judge saw the safe state and the continuation (not the deleted violation)
        assert labels[("judge", "part2")] == ("safe" if row["source"]["id"] in bland else "unsafe")
        start, _ = unsafe_at(row["response"], words)
        assert row["injection"]["offset"] == len(row["response"][:start].rstrip())  # the judged start
    for row in kept:  # generated continuations: X still exact for the primary tokenizer
        assert row["prompt"].endswith(row["injection"]["violation"])
        assert row["completion"].startswith(row["segments"][2]["text"] + row["segments"][3]["text"])
        assert row["generator"]["model"] == "gen-model"

    again = llm_build(gen, guard, corpus, tmp_path / "b", cache)
    assert again.returncode == 0, again.stderr
    assert gen.stats()["chat"] == sent and guard.requests() == judged  # everything from the cache
    assert rows_of(tmp_path / "b", "rejected") == rejected and rows_of(tmp_path / "b") == kept

    hit = next(i for i in flagged if i not in bland)  # its continuation request always fails
    faulty = [with_marker(r, "[[fault:503:0]]") if r["id"] == hit else r for r in rows]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in faulty))
    broken = llm_build(gen, guard, corpus, tmp_path / "c", cache)
    assert broken.returncode == 3, broken.stderr  # built, incomplete: a re-run retries that row
    reasons = {r["source"]["id"]: r["reasons"] for r in rows_of(tmp_path / "c", "rejected")}
    assert reasons == {**expected, hit: ["generator_error"]}
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["complete"] is False


def test_render_reproduces_repaired_rows_and_rerenders_for_the_other_family(offline, tokenizers):
    """`bsafe_data.render` reads a repaired row from its segments: the stored strings for the primary
    tokenizer, and for the other family the X its `backtrack` recorded (never the whole answer)."""
    import copy

    from bsafe_data import add_control_tokens, render

    manifest = json.loads((offline / "manifest.json").read_text())
    rows = rows_of(offline)
    for name, shared in tokenizers.items():
        tok = copy.deepcopy(shared)  # the fixture's tokenizers are shared by the whole session
        add_control_tokens(tok, manifest["control_tokens"])
        for row in rows:
            rendered = render(row, tok)
            recorded = {b["tokenizer"]: b["tokens"] for b in row["backtrack"]}
            assert rendered.backtrack == recorded[name]
            assert rendered.completion.startswith(rendered.control)  # the loss starts at the signal
            if name == "qwen2.5":
                assert (rendered.prompt, rendered.completion) == (row["prompt"], row["completion"])
