"""The Ray executor on a two-node cluster without shared storage writes the same parquet as ``local``.

A local ``ray.cluster_utils.Cluster`` (a head and one worker node, one CPU each) runs the two
actors of a ``workers=2`` build, one per node (each actor takes a CPU). The build's driver runs in
a mount namespace of its own where the output folder's parent is a private tmpfs: the actors, in
the cluster's processes, cannot see the output or work folder at all (where they wrote into it,
their files would land in the empty folder the test sees), so every chunk reaches the driver
through Ray's object store.
"""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest

from tests.test_executors import CLI, FLAGSHIP, build, parquet

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'bsafe-data[ray]'")

_NODE = {"num_cpus": 1, "object_store_memory": 100 * 1024**2}
#: four chunks, two per actor (the actors' set-up is most of the time)
ARGS = ["--limit", "40", "--set", "output.chunk_rows=10", "--set", "sampling.variants_per_answer=2"]


def _private_mounts() -> bool:
    """Whether this machine lets a process mount a tmpfs in a mount namespace of its own."""
    try:
        probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    made = Cluster(initialize_head=True, head_node_args=_NODE)
    made.add_node(**_NODE)
    made.wait_for_nodes()
    yield made
    made.shutdown()


@pytest.mark.skipif(not _private_mounts(), reason="needs mount namespaces (unshare -m)")
def test_a_two_node_cluster_without_shared_storage_builds_the_same_parquet_as_local(cluster, tmp_path):
    nodes = [node for node in cluster.list_all_nodes() if node.all_processes]
    assert len(nodes) == 2  # a head and a worker node, one CPU each: one actor on each
    build(tmp_path / "local", args=ARGS)
    hidden, copied = tmp_path / "hidden", tmp_path / "copied"
    hidden.mkdir()
    command = [
        CLI, "build", FLAGSHIP, "--out", str(hidden / "ds"), *ARGS,
        "--set", "execution.executor=ray", "--set", "execution.workers=2",
        "--set", f"execution.ray_address={cluster.address}",
    ]  # fmt: skip
    script = (
        f"mount -t tmpfs none {shlex.quote(str(hidden))} && {shlex.join(command)} "
        f"&& cp -r {shlex.quote(str(hidden / 'ds'))} {shlex.quote(str(copied))}"
    )
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=os.environ, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any(hidden.iterdir())  # nothing of the build is where the actors could have written
    assert parquet(copied) == parquet(tmp_path / "local")
