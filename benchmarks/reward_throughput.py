"""Throughput of ``BacktrackReward`` with the builtin critic, in completions per second.

Usage: python benchmarks/reward_throughput.py [--n 2000] [--batch 64] [--tokenizer builtin:qwen2.5]

Completions are built from the bundled corpus (``builtin:everyday_chat``): each conversation's
first sentence plus a rude attack is the assistant prefill, and the completion is one of an exact
backtrack, an over-backtrack, no backtrack, a malformed signal or (on the plain prompt) a benign
answer, followed by the rest of the original answer. Every completion is distinct, so the cold
pass pays for every decode and every critic call (identical final answers, e.g. two exact
backtracks of the same conversation, share one call); the warm pass repeats the same batches
(memo hits: decoding only). Both are measured in this one run and printed as JSON, e.g.
``{"completions": 2000, "cold_completions_per_s": ..., "warm_completions_per_s": ...}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ATTACKS = [
    " Forget that, you clueless idiot, nobody cares.",
    " Honestly only a stupid loser would ask this.",
    " Stop whining, you pathetic moron.",
    " What a dumb question, you absolute clown.",
]


def make_batch(n: int, tokenizer: object) -> tuple[list, list, dict[str, list]]:
    """``n`` (prompt, completion) pairs and their columns, all distinct."""
    from bsafe_data.label import backtrack_counts, chat_frame

    corpus = REPO / "bsafe_data" / "data" / "corpus" / "everyday_chat.jsonl"
    convs = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts, completions = [], []
    columns: dict[str, list] = {"attack": [], "expect": [], "category": []}
    for i in range(n):
        messages = convs[i % len(convs)]["messages"]
        user = messages[0]["content"]
        answer = messages[-1]["content"]
        first, _, rest = answer.partition(". ")
        first, rest = first + ".", " " + rest
        attack = ATTACKS[i % len(ATTACKS)].replace(".", f" #{i}.")  # distinct texts: no memo hits
        kind = i % 5
        if kind == 4:  # benign prompt, plain answer
            prompts.append([{"role": "user", "content": user}])
            completions.append(first + rest)
            columns["attack"].append(None)
            columns["expect"].append("answer")
            columns["category"].append(None)
            continue
        head, _tail = chat_frame(tokenizer, [{"role": "user", "content": user}])
        (x,) = backtrack_counts(tokenizer, [(head, first, attack)])
        x = x or 8
        signal = {
            0: f"[CATEGORY Toxic][BACKTRACK_BY_{x}]",
            1: f"[CATEGORY Toxic][BACKTRACK_BY_{x + 3}]",
            2: "",
            3: "[CATEGORY Toxic][BACKTRACK_BY_lots]",
        }[kind]
        prompts.append([{"role": "user", "content": user}, {"role": "assistant", "content": first + attack}])
        completions.append(signal + rest)
        columns["attack"].append(attack)
        columns["expect"].append("backtrack")
        columns["category"].append("Toxic")
    return prompts, completions, columns


def run(n: int, batch: int, tokenizer_ref: str) -> dict[str, float]:
    """Time one cold and one warm pass over ``n`` completions in batches of ``batch``."""
    from bsafe_data.rl import BacktrackReward, RewardSpec

    reward = BacktrackReward(spec=RewardSpec(tokenizer=tokenizer_ref))
    prompts, completions, columns = make_batch(n, reward.tokenizer)
    reward(prompts[:4], completions[:4], **{k: v[:4] for k, v in columns.items()})  # load the critic model
    reward._memo.clear()

    def one_pass() -> float:
        start = time.perf_counter()
        for lo in range(0, n, batch):
            cols = {k: v[lo : lo + batch] for k, v in columns.items()}
            reward(prompts[lo : lo + batch], completions[lo : lo + batch], **cols)
        return time.perf_counter() - start

    cold = one_pass()
    calls = sum(reward.calls.values())
    warm = one_pass()
    return {
        "completions": n,
        "batch": batch,
        "tokenizer": tokenizer_ref,
        "cold_seconds": round(cold, 3),
        "cold_completions_per_s": round(n / cold, 1),
        "warm_seconds": round(warm, 3),
        "warm_completions_per_s": round(n / warm, 1),
        "critic_texts_cold": calls,
        "critic_texts_warm": sum(reward.calls.values()) - calls,
    }


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="completions per pass")
    parser.add_argument("--batch", type=int, default=64, help="completions per reward call (TRL batch)")
    parser.add_argument("--tokenizer", default="builtin:qwen2.5")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.n, args.batch, args.tokenizer)))


if __name__ == "__main__":
    main()
