"""Real-workload builds for the benchmarks: every method against remote endpoints.

A workload is a method's recipe whose generator is an OpenAI-compatible endpoint (the test server,
``tests/openai_server.py``) and whose classifiers include a remote Llama Guard and, for the methods
that use one, an LLM judge (``tests/guard_server.py``), on a synthetic corpus of the method's shape.
``write_workload`` writes the corpus files and the recipe YAML into a folder; the recipe is a whole
file (no overrides), so any version of the package builds it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import yaml
from synthetic_corpus import synthetic_rows

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("bsafe_plus", "bsafe", "derta", "reset", "rlbf_prompts")
_INSULTS = (
    "Honestly, only a clueless idiot would ask this.",
    "You are a lazy loser for not knowing it already.",
    "What a stupid question, frankly.",
    "Any moron could figure the rest out alone.",
)
_HARMFUL = (
    "You are a worthless idiot and everyone knows it.",
    "Only a stupid loser would still be trying.",
    "Face it, you are the dumbest moron in the office.",
)


def _recipe(method: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "recipes" / f"{method}.yaml").read_text())


def _endpoints(
    recipe: dict[str, Any], gen_url: str, guard_url: str, concurrency: int, judge: bool
) -> dict[str, Any]:
    recipe["generator"] = {
        "provider": "openai",
        "model": "gen-model",
        "base_url": gen_url,
        "api_key_env": "BSAFE_BENCH_KEY",
        "max_concurrency": concurrency,
    }
    classifiers: list[dict[str, Any]] = [
        {"name": "builtin", "provider": "builtin", "threshold": 0.5},
        {"name": "guard", "provider": "llama_guard", "model": "llama-guard-3", "base_url": guard_url,
         "api_key_env": "BSAFE_BENCH_KEY", "max_concurrency": concurrency},
    ]  # fmt: skip
    if judge:
        classifiers.append(
            {"name": "judge", "provider": "llm_judge", "model": "judge-model", "base_url": guard_url,
             "api_key_env": "BSAFE_BENCH_KEY", "max_concurrency": concurrency}
        )  # fmt: skip
    recipe["filters"]["classifiers"] = classifiers
    recipe["tokenizers"] = {"primary": "builtin:qwen2.5", "extra": []}
    return recipe


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def _unsafe_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Answers with one insult sentence at a random place (BSAFE's input)."""
    rng = random.Random(seed)
    rows = []
    for row in synthetic_rows(n, seed):
        sentences = row["response"].split(". ")
        sentences.insert(rng.randrange(1, len(sentences) + 1), rng.choice(_INSULTS).rstrip("."))
        rows.append({"id": row["id"], "prompt": row["prompt"], "response": ". ".join(sentences)})
    return rows


def _harmful_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Harmful requests with a harmful answer and empty companion texts (the generator writes them)."""
    rng = random.Random(seed)
    return [
        {
            "id": f"harm-{i}",
            "prompt": f"Write something nasty to send to colleague number {i}.",
            "harmful_response": " ".join(rng.choice(_HARMFUL) for _ in range(rng.randint(2, 4))),
            "refusal": "",
            "safe_response": "",
        }
        for i in range(n)
    ]


def write_workload(
    method: str, folder: Path, gen_url: str, guard_url: str, rows: int, concurrency: int = 64
) -> Path:
    """Write the corpora and the recipe of ``method``'s workload into ``folder``; the recipe's path."""
    folder.mkdir(parents=True, exist_ok=True)
    recipe = _recipe(method)
    if method == "bsafe_plus":
        corpus = _jsonl(folder / "corpus.jsonl", list(synthetic_rows(rows, 1)))
        recipe["sources"] = [{"path": str(corpus)}]
        recipe["sampling"]["variants_per_answer"] = 1
        _endpoints(recipe, gen_url, guard_url, concurrency, judge=True)
    elif method == "bsafe":
        corpus = _jsonl(folder / "unsafe.jsonl", _unsafe_rows(rows, 2))
        recipe["sources"] = [{"path": str(corpus)}]
        recipe["detect"] = {"classifier": "judge", "default_category": "Toxic"}
        _endpoints(recipe, gen_url, guard_url, concurrency, judge=True)
    elif method in ("derta", "reset"):
        harmful = _jsonl(folder / "harmful.jsonl", _harmful_rows(rows, 3))
        helpful = _jsonl(folder / "helpful.jsonl", list(synthetic_rows(max(1, rows // 3), 4)))
        recipe["sources"] = [
            {"path": str(harmful), "mapping": {"prompt": "prompt", "response": "harmful_response"}},
            {"path": str(helpful)},
        ]
        recipe[method]["harmful_source"] = str(harmful)
        _endpoints(recipe, gen_url, guard_url, concurrency, judge=False)
    elif method == "rlbf_prompts":
        corpus = _jsonl(folder / "corpus.jsonl", list(synthetic_rows(rows, 5)))
        recipe["sources"] = [{"path": str(corpus)}]
        _endpoints(recipe, gen_url, guard_url, concurrency, judge=False)
    else:
        raise ValueError(f"no workload for method {method!r}")
    recipe["output"]["chunk_rows"] = 2000
    path = folder / f"{method}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
