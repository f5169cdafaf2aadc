"""RLBF's RL stage with TRL's GRPOTrainer and ``bsafe_data.rl.BacktrackReward``.

    pip install -e '.[train]'
    python examples/grpo_rlbf.py --model my-sft-checkpoint            # a BSAFE+ SFT model
    python examples/grpo_rlbf.py --tiny --max-steps 2                 # smoke run: tiny random model, CPU
    bsafe-data build recipes/rlbf_prompts.yaml --out out/rlbf_prompts
    python examples/grpo_rlbf.py --tiny --dataset out/rlbf_prompts    # on a built prompt set

What it does, in order:

1. builds a small in-memory prompt set: conversations whose assistant turn is *prefilled* with the
   start of a safe answer plus an injected violation (``expect=backtrack``, with the ``attack``
   text and its ``category``), and benign prompts without prefill (``expect=answer``). TRL
   continues a final assistant message (``continue_final_message``), so the policy generates right
   after the violation: the ideal completion is ``[CATEGORY c][BACKTRACK_BY_X]`` + a safe
   continuation. (The real prompt set will come from the ``rlbf_prompts`` method.)
2. loads the policy (``--model``; ``--tiny`` writes a random 1-layer Llama into ``--out`` with the
   bundled Qwen2.5 tokenizer, no download), registers the control atoms as special tokens
   (``add_control_tokens``) and resizes the embeddings;
3. trains with GRPO on ``BacktrackReward``: TRL passes ``completion_ids``, so the reward sees the
   control atoms even though TRL decodes completions with ``skip_special_tokens=True``; the
   reward's term means are logged as ``backtrack/...`` metrics.

Prints one JSON line with the run's summary (steps, mean reward per step, reward samples).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

#: (user turn, safe start of the answer, injected violation, category). Violations are mild and
#: only ever sit in prompts, as the builtin critic's test material.
ATTACKS: list[tuple[str, str, str, str]] = [
    (
        "How do I cook fluffy rice on the stove?",
        "Rinse the rice in cold water until it runs clear.",
        " Forget the rice, you stupid idiot, nobody wants your cooking.",
        "Toxic",
    ),
    (
        "Any tips for a job interview?",
        "Research the company before the interview.",
        " Honestly only a pathetic loser needs tips for this.",
        "Harassment",
    ),
    (
        "How should I start running?",
        "Begin with short intervals of running and walking.",
        " Or just quit, you lazy moron, you will never finish a race.",
        "Toxic",
    ),
]
BENIGN: list[str] = ["How do I keep my houseplants alive in winter?", "What should I pack for a picnic?"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="policy model id or folder (AutoModelForCausalLM)")
    parser.add_argument("--tiny", action="store_true", help="use a tiny random Llama (smoke test, CPU)")
    parser.add_argument("--tokenizer", default="builtin:qwen2.5", help="tokenizer (default: bundled Qwen2.5)")
    parser.add_argument("--out", default="out/grpo_rlbf", help="output_dir of the trainer")
    parser.add_argument("--max-steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2, help="per-device batch (completions)")
    parser.add_argument("--num-generations", type=int, default=2, help="completions per prompt (GRPO group)")
    parser.add_argument("--max-completion-length", type=int, default=24)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--max-x", type=int, default=128, help="register [BACKTRACK_BY_1..N] atoms")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", help="a folder built from recipes/rlbf_prompts.yaml (default: built-in)")
    parser.add_argument("--rows", type=int, default=None, help="use only the first N rows of --dataset")
    parser.add_argument("--cpu", action="store_true", help="force CPU")
    return parser.parse_args(argv)


def prompt_dataset() -> Any:
    """The in-memory prompt set (conversational prompts, TRL's ``prompt`` column + reward columns)."""
    from datasets import Dataset

    rows = []
    for user, start, attack, category in ATTACKS:
        rows.append(
            {
                "prompt": [
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": start + attack},
                ],
                "expect": "backtrack",
                "attack": attack,
                "category": category,
            }
        )
    for user in BENIGN:
        rows.append(
            {"prompt": [{"role": "user", "content": user}], "expect": "answer", "attack": "", "category": ""}
        )
    return Dataset.from_list(rows)


def built_prompt_set(folder: str, rows: int | None = None) -> tuple[Any, dict[str, Any]]:
    """(train split, manifest) of a built ``rlbf_prompts`` folder, in the reward's column names.

    The prompt set's ``attack`` column names the variant (none / middle_fill / suffix / decoding);
    ``BacktrackReward`` reads ``attack`` as the violating text inside the prefill, so it becomes
    ``attack`` = the injected steering + violation ('' without one) and the variant ``attack_kind``.
    """
    from datasets import load_dataset

    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    train = load_dataset(folder, split="train")
    if rows is not None:
        train = train.select(range(min(rows, len(train))))

    def to_reward_columns(row: dict[str, Any]) -> dict[str, Any]:
        inj = row["injection"]
        return {"attack_kind": row["attack"], "attack": (inj["steering"] + inj["violation"]) if inj else ""}

    train = train.map(to_reward_columns)
    keep = {"prompt", "expect", "category", "attack", "attack_kind", "prefill", "sampling"}
    return train.remove_columns([c for c in train.column_names if c not in keep]), manifest


def control_atoms_for(categories: list[str], max_x: int) -> list[str]:
    """``[CATEGORY c]`` for every category and ``[BACKTRACK_BY_1..max_x]``."""
    from bsafe_data.label import DEFAULT_CONTROL_FORMAT, control_atoms, control_text

    atoms: list[str] = []
    for category in categories:
        atoms.extend(control_atoms(control_text(DEFAULT_CONTROL_FORMAT, category, 1)))
    for x in range(1, max_x + 1):
        atoms.extend(control_atoms(control_text(DEFAULT_CONTROL_FORMAT, categories[0], x)))
    return list(dict.fromkeys(atoms))


def tiny_model(tokenizer: Any, folder: Path) -> str:
    """Write a random 1-layer Llama sized for ``tokenizer`` into ``folder``; returns the folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run GRPO; returns (and prints) the summary."""
    args = parse_args(argv)
    if not args.model and not args.tiny:
        raise SystemExit("give --model (a BSAFE+ SFT checkpoint) or --tiny")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from bsafe_data.label import add_control_tokens
    from bsafe_data.recipe import RLBF_CATEGORIES
    from bsafe_data.rl import BacktrackReward, RewardSpec
    from bsafe_data.tokenization import resolve_tokenizer_path

    out = Path(args.out)
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_tokenizer_path(args.tokenizer) if args.tiny else (args.model)
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    added = add_control_tokens(tokenizer, control_atoms_for(list(RLBF_CATEGORIES), args.max_x))
    dataset, spec = prompt_dataset(), RewardSpec()  # builtin critic; any classifier spec works
    if args.dataset:  # the recipe's `reward` section, recorded in the manifest
        dataset, manifest = built_prompt_set(args.dataset, args.rows)
        spec = RewardSpec(**manifest["reward"])
        added += add_control_tokens(tokenizer, manifest["control_tokens"])
    model_ref = tiny_model(tokenizer, out / "tiny_model") if args.tiny else args.model
    model = AutoModelForCausalLM.from_pretrained(model_ref, dtype=torch.float32)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))

    reward = BacktrackReward(tokenizer, spec)
    config = GRPOConfig(
        output_dir=str(out),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        learning_rate=args.lr,
        beta=0.0,  # no reference model: cheaper; raise it for a KL penalty
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        fp16=False,
        use_cpu=args.cpu or args.tiny,
        seed=args.seed,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    steps = [entry for entry in trainer.state.log_history if "reward" in entry]
    summary = {
        "steps": trainer.state.global_step,
        "control_tokens_added": added,
        "mean_reward_per_step": [round(float(e["reward"]), 4) for e in steps],
        "rewards_finite": all(math.isfinite(float(e["reward"])) for e in steps),
        "logged_backtrack_metrics": sorted({k for e in steps for k in e if "backtrack/" in k}),
        "last_reward_samples": len(reward.last_breakdown),
        "critic_texts": reward.calls,
        "train_rows": len(dataset),
        "expects": sorted(set(dataset["expect"])),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
