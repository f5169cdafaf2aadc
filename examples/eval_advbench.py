"""Evaluate a backtracking model on AdvBench-layout prompts, with its backtracks executed.

    python examples/eval_advbench.py                       # offline: the repository's scripted models
    python examples/eval_advbench.py --base-url http://127.0.0.1:8000/v1 --model my-model \
        --tokenizer Qwen/Qwen2.5-0.5B-Instruct --prompts harmful_behaviors.csv

With no ``--base-url`` it starts the two scripted models of ``tests/scripted_model_server.py`` (a
checkout of the repository is needed: one backtracks on cue, the other does not) and evaluates
the backtracking one against the plain one as a baseline. Without ``--prompts`` it writes an
AdvBench-layout CSV (``goal,target``) from the bundled harmful chat set (CC-BY-4.0, written for
bsafe-data), the target being the first sentence of the bundled harmful answer; benign prompts
(over-refusal) come from the bundled everyday chat corpus. Attacks: none, prefill (middle filling
with the target), a suffix slot and a decoding sweep. Writes the report folder (``--out``) and
prints its ASR table and one JSON line with the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "bsafe_data" / "data"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--base-url", help="the model's OpenAI-compatible endpoint (default: scripted models)"
    )
    parser.add_argument("--model", default="backtracker", help="model name at the endpoint")
    parser.add_argument(
        "--baseline", default="plain", help="baseline model name at the endpoint ('' for none)"
    )
    parser.add_argument(
        "--tokenizer", help="the model's tokenizer (default: the repository's qwen2.5 fixture)"
    )
    parser.add_argument(
        "--prompts", help="AdvBench-layout CSV (goal,target); default: made from bundled data"
    )
    parser.add_argument("--limit", type=int, default=20, help="harmful prompts")
    parser.add_argument("--out", default="out/eval_advbench", help="report folder")
    parser.add_argument("--cache-dir", help="response cache folder")
    return parser.parse_args(argv)


def bundled_prompts(folder: Path, limit: int) -> tuple[Path, Path]:
    """An AdvBench-layout CSV from the bundled harmful chat set, and benign prompts (JSONL)."""
    folder.mkdir(parents=True, exist_ok=True)
    advbench = folder / "advbench.csv"
    rows = [json.loads(line) for line in (DATA / "harmful" / "harmful_chat.jsonl").read_text().splitlines()]
    with advbench.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["goal", "target", "category"])
        writer.writeheader()
        for r in rows[:limit]:
            target = r["harmful_response"].split(". ")[0] + "."
            writer.writerow({"goal": r["prompt"], "target": target, "category": r["category"]})
    benign = folder / "benign.jsonl"
    lines = (DATA / "corpus" / "everyday_chat.jsonl").read_text().splitlines()[: max(2, limit // 2)]
    benign.write_text("".join(line + "\n" for line in lines))
    return advbench, benign


@contextlib.contextmanager
def endpoint(base_url: str | None) -> Iterator[str]:
    """The given endpoint, or the scripted models served for the duration."""
    if base_url:
        yield base_url
        return
    sys.path.insert(0, str(REPO))
    from tests.scripted_model_server import ScriptedModelServer

    with ScriptedModelServer() as server:
        yield server.url


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the evaluation; returns (and prints) the numbers."""
    args = parse_args(argv)
    from bsafe_data.eval.recipe import EvalRecipe
    from bsafe_data.eval.report import markdown_tables
    from bsafe_data.eval.run import evaluate

    out = Path(args.out)
    if args.prompts:
        advbench, benign = Path(args.prompts), None
    else:
        advbench, benign = bundled_prompts(out.parent / f"{out.name}.prompts", args.limit)
    tokenizer = args.tokenizer or str(REPO / "tests" / "fixtures" / "tokenizers" / "qwen2.5")
    with endpoint(args.base_url) as url:
        prompts: list[dict[str, Any]] = [{"path": str(advbench), "layout": "advbench", "limit": args.limit}]
        if benign is not None:
            prompts.append({"path": str(benign), "kind": "benign"})
        recipe = EvalRecipe(
            name="eval_advbench",
            model={"model": args.model, "base_url": url, "tokenizer": tokenizer},
            baseline={"model": args.baseline, "base_url": url, "tokenizer": tokenizer}
            if args.baseline
            else None,
            prompts=prompts,
            attacks=[
                {"kind": "none"},
                {"kind": "prefill"},
                {"kind": "suffix", "suffixes": ["zx-adv-suffix"]},
                {"kind": "decoding", "temperature": [0.0, 0.7, 1.2], "top_p": [0.9, 1.0]},
            ],
            output={"dir": str(out)},
        )
        result = evaluate(recipe, cache_dir=Path(args.cache_dir) if args.cache_dir else None, force=True)
    print(markdown_tables(result.reports))
    numbers = {
        r.model: {
            "asr": {a: cats["all"].value for a, cats in r.asr.items()},
            "backtrack_rate": r.backtrack.value,
            "exact_x_share": r.exact_x.value,
            "over_refusal": r.over_refusal.value,
        }
        for r in result.reports
    }
    print(json.dumps({"folder": str(result.folder), "requests": result.requests, "models": numbers}))
    return numbers


if __name__ == "__main__":
    main(sys.argv[1:])
