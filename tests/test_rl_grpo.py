"""TRL's GRPOTrainer runs two steps on CPU with BacktrackReward (examples/grpo_rlbf.py, tiny random
Llama built in tmp from the bundled tokenizer; no downloads). Skipped when torch or trl is missing."""

from __future__ import annotations

import importlib.util
import math

import pytest

from tests.conftest import REPO

pytest.importorskip("torch", reason="GRPO smoke test needs torch (pip install -e '.[train]')")
pytest.importorskip("trl", reason="GRPO smoke test needs trl (pip install -e '.[train]')")


def _example():
    spec = importlib.util.spec_from_file_location("grpo_rlbf", REPO / "examples" / "grpo_rlbf.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_grpo_two_steps_on_cpu_with_the_backtrack_reward(tmp_path):
    example = _example()
    summary = example.main(["--tiny", "--max-steps", "2", "--out", str(tmp_path / "grpo"), "--seed", "0"])
    assert summary["steps"] == 2
    assert len(summary["mean_reward_per_step"]) == 2 and summary["rewards_finite"]
    assert all(-4.0 <= r <= 1.0 for r in summary["mean_reward_per_step"])  # within the formula's range
    assert summary["control_tokens_added"] > 0
    # the reward ran inside the trainer: its term means reached TRL's metrics through log_metric
    assert "backtrack/term/unsafe" in summary["logged_backtrack_metrics"]
    assert summary["last_reward_samples"] == 2 and summary["critic_texts"]["builtin"] > 0
    assert (tmp_path / "grpo" / "tiny_model" / "config.json").exists()
    assert not math.isnan(sum(summary["mean_reward_per_step"]))


def test_prompt_set_prefills_end_with_their_attack():
    example = _example()
    rows = list(example.prompt_dataset())
    attacks = [r for r in rows if r["expect"] == "backtrack"]
    assert attacks and all(r["prompt"][-1]["content"].endswith(r["attack"]) for r in attacks)
    assert any(r["expect"] == "answer" and r["prompt"][-1]["role"] == "user" for r in rows)


def test_grpo_two_steps_on_a_built_prompt_set(tmp_path):
    """The prompt set of recipes/rlbf_prompts.yaml, built through the CLI, trains with GRPO on
    BacktrackReward with the reward settings its manifest records."""
    import subprocess
    import sys

    folder = tmp_path / "prompts"
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "bsafe_data",
            "build",
            str(REPO / "recipes" / "rlbf_prompts.yaml"),
            "--out",
            str(folder),
            "--limit",
            "12",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    example = _example()
    rows, manifest = example.built_prompt_set(str(folder), 8)
    middle = [r for r in rows if r["attack_kind"] == "middle_fill"]
    assert middle and all(r["prompt"][-1]["content"].endswith(r["attack"]) for r in middle)
    assert manifest["reward"]["unsafe"] == 3.0
    summary = example.main(
        [
            "--tiny",
            "--max-steps",
            "2",
            "--out",
            str(tmp_path / "grpo"),
            "--dataset",
            str(folder),
            "--rows",
            "8",
        ]
    )
    assert summary["steps"] == 2 and summary["rewards_finite"] and summary["train_rows"] == 8
    assert len(summary["mean_reward_per_step"]) == 2
    assert all(-4.0 <= r <= 1.0 for r in summary["mean_reward_per_step"])
    assert "backtrack/term/unsafe" in summary["logged_backtrack_metrics"]
    assert summary["critic_texts"]["builtin"] > 0
    assert len(summary["expects"]) >= 2  # the first rows mix backtrack / refuse / answer prompts
