"""Fine-tune a causal LM on a bsafe-data dataset with TRL's SFTTrainer (prompt-completion rows).

    pip install -e '.[train]'
    python examples/train_sft.py out/bsafe_plus --model Qwen/Qwen2.5-0.5B-Instruct
    python examples/train_sft.py my-org/bsafe-plus --revision v1.0.0 \
        --model microsoft/Phi-3-mini-4k-instruct --rerender

What it does, in order:

1. loads the dataset (a folder written by ``bsafe-data build`` or a Hub dataset id) and its
   ``manifest.json`` when there is one;
2. with ``--rerender``, re-renders every row for the model's tokenizer (``bsafe_data.rerender``:
   prompt, completion and X recomputed; rows it cannot render are dropped and counted). Use it
   whenever the model's tokenizer is not the recipe's primary tokenizer;
3. adds the control atoms (``[CATEGORY c]``, ``[BACKTRACK_BY_X]``) as special tokens: the
   manifest's ``control_tokens`` plus ``bsafe_data.control_tokens(dataset)`` (or the re-render's
   atoms), and resizes the model's embeddings;
4. trains with ``completion_only_loss=True`` and ``eos_token=bsafe_data.end_of_turn(tokenizer)``, so
   TRL appends nothing to completions and trains on exactly the tokens ``bsafe_data.tokenize``
   labels (the control signal, the safe continuation and the end-of-turn token). The config is
   CPU-safe (float32, no bf16/fp16); on a GPU pass ``--bf16``.

Prints one JSON line with the run's summary (rows, added tokens, steps, loss).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="dataset folder (bsafe-data build --out DIR) or Hub dataset id")
    parser.add_argument("--model", required=True, help="model id or folder (AutoModelForCausalLM)")
    parser.add_argument("--tokenizer", help="tokenizer id or folder (default: the model's)")
    parser.add_argument("--revision", help="Hub revision of the dataset, e.g. v1.0.0")
    parser.add_argument("--split", default="train")
    parser.add_argument("--rerender", action="store_true", help="re-render rows for the model's tokenizer")
    parser.add_argument("--limit", type=int, help="use only the first N rows")
    parser.add_argument("--out", default="out/sft", help="output_dir of the trainer")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after N optimizer steps")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--max-length", type=int, default=2048, help="truncate sequences to N tokens")
    parser.add_argument("--num-proc", type=int, help="processes for dataset preparation")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", action="store_true", help="save the model and tokenizer to --out")
    return parser.parse_args(argv)


def load_rows(ref: str, split: str, revision: str | None) -> tuple[Any, dict[str, Any] | None]:
    """The split's rows and the manifest (None when the dataset has none)."""
    from datasets import load_dataset

    folder = Path(ref)
    if folder.is_dir():
        # A fresh read: `datasets` caches local folders by name, and a rebuilt folder keeps its name.
        dataset = load_dataset(str(folder), split=split, download_mode="force_redownload")
        manifest_path = folder / "manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
        return dataset, manifest
    dataset = load_dataset(ref, split=split, revision=revision)
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(ref, "manifest.json", repo_type="dataset", revision=revision)
        manifest = json.loads(Path(path).read_text())
    except Exception:  # no manifest in the repo, or offline without it cached
        manifest = None
    return dataset, manifest


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the fine-tuning; returns (and prints) the summary."""
    args = parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    import bsafe_data

    dataset, manifest = load_rows(args.dataset, args.split, args.revision)
    if args.limit:
        dataset = dataset.select(range(min(args.limit, dataset.num_rows)))
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    dropped: dict[str, int] = {}
    if args.rerender:
        result = bsafe_data.rerender(dataset, tokenizer, num_proc=args.num_proc)
        dataset, atoms, dropped = result.dataset, result.control_tokens, result.dropped
    else:
        atoms = list((manifest or {}).get("control_tokens", [])) + bsafe_data.control_tokens(dataset)
    added = bsafe_data.add_control_tokens(tokenizer, atoms)

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))

    config = SFTConfig(
        output_dir=args.out,
        completion_only_loss=True,
        eos_token=bsafe_data.end_of_turn(tokenizer),
        max_length=args.max_length,
        max_steps=args.max_steps,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        bf16=args.bf16,
        fp16=False,
        gradient_checkpointing=False,
        dataset_num_proc=args.num_proc,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset.select_columns(["prompt", "completion"]),
        processing_class=tokenizer,
    )
    output = trainer.train()
    if args.save:
        trainer.save_model(args.out)
        tokenizer.save_pretrained(args.out)
    summary = {
        "rows": dataset.num_rows,
        "dropped": dropped,
        "control_tokens_added": added,
        "vocab": len(tokenizer),
        "eos_token": config.eos_token,
        "steps": output.global_step,
        "train_loss": output.training_loss,
    }
    if not math.isfinite(output.training_loss):
        raise SystemExit(f"training loss is not finite: {summary}")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
