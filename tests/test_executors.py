"""Executors give the same dataset: `processes` (a worker pool) and `local` write identical bytes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

CLI = str(Path(sys.executable).with_name("bsafe-data"))
FLAGSHIP = str(REPO / "recipes" / "bsafe_plus.yaml")
ARGS = ["--limit", "120", "--set", "output.chunk_rows=15", "--set", "sampling.variants_per_answer=2"]


def build(out: Path, *extra: str, args: list[str] = ARGS) -> None:
    proc = subprocess.run(
        [CLI, "build", FLAGSHIP, "--out", str(out), *args, *extra],
        capture_output=True, text=True, env=os.environ, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


def parquet(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.glob("*/*.parquet"))}


def test_processes_and_local_write_identical_parquet(tmp_path):
    build(tmp_path / "local")
    build(tmp_path / "pool", "--set", "execution.executor=processes", "--set", "execution.workers=2")
    assert parquet(tmp_path / "pool") == parquet(tmp_path / "local")
    assert (tmp_path / "pool" / "manifest.json").read_text().count('"kept"') == 1


def test_a_pool_resumes_chunks_a_killed_local_build_finished(tmp_path):
    """Both executors share the chunk layout: a pool re-run resumes a killed local build."""
    build(tmp_path / "reference")
    out, work = tmp_path / "ds", tmp_path / ".ds.bsafe-work"
    proc = subprocess.Popen(
        [CLI, "build", FLAGSHIP, "--out", str(out), *ARGS],
        env=os.environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not (work / "chunk-000002").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list(work.glob("chunk-??????")))
    assert 0 < finished < 8
    resumed = subprocess.run(
        [CLI, "build", FLAGSHIP, "--out", str(out), *ARGS, "--set", "execution.executor=processes"],
        capture_output=True, text=True, env=os.environ, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert f"{finished} chunk(s) resumed" in resumed.stdout  # how the executor runs is not what is built
    assert parquet(out) == parquet(tmp_path / "reference")


def test_ray_writes_the_same_parquet_as_local(tmp_path):
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'bsafe-data[ray]'")
    build(tmp_path / "local")
    build(tmp_path / "ray", "--set", "execution.executor=ray", "--set", "execution.workers=2")
    assert parquet(tmp_path / "ray") == parquet(tmp_path / "local")
