"""The shard writer: parts (build chunks) cut into shards and row groups, on several threads."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bsafe_data import writer
from bsafe_data.writer import ChunkFolders


def _chunks(tmp_path: Path, sizes: list[int]) -> list[Path]:
    """Chunk folders holding ``train.parquet`` with consecutive ``n`` values (none when empty)."""
    chunks, n = [], 0
    for i, size in enumerate(sizes):
        chunk = tmp_path / f"chunk-{i}"
        chunk.mkdir()
        if size:
            pq.write_table(pa.table({"n": pa.array(range(n, n + size), pa.int64())}), chunk / "train.parquet")
        n += size
        chunks.append(chunk)
    return chunks


def test_shards_cut_parts_on_the_row_group_grid_of_each_part(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "SHARD_ROWS", 4)
    monkeypatch.setattr(writer, "_ROW_GROUP", 3)
    rows = ChunkFolders(_chunks(tmp_path, [5, 0, 7, 3]))
    jobs = writer._ShardJobs(rows)
    schema = pa.schema([("n", pa.int64())])
    names = jobs.add("train", rows.sizes("train"), schema, tmp_path / "data", "train")
    with jobs.running():
        pass
    assert names == [f"data/train-{i:05d}-of-00004.parquet" for i in range(4)]
    files = [pq.ParquetFile(tmp_path / name) for name in names]
    values = [v for f in files for v in f.read().column("n").to_pylist()]
    assert values == list(range(15))
    groups = [[f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)] for f in files]
    # part 0 (5 rows): groups of 3 then 2, the 2 split by the shard cut; part 2 (7): 3, 3, 1
    assert groups == [[3, 1], [1, 3], [3, 1], [3]]


def test_an_empty_split_is_one_empty_shard_and_stale_shards_go(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train-00000-of-00003.parquet").write_bytes(b"stale")
    rows = ChunkFolders(_chunks(tmp_path, [0, 0]))
    jobs = writer._ShardJobs(rows)
    names = jobs.add("train", rows.sizes("train"), pa.schema([("n", pa.int64())]), data, "train")
    with jobs.running():
        pass
    assert names == ["data/train-00000-of-00001.parquet"]
    assert sorted(p.name for p in data.iterdir()) == ["train-00000-of-00001.parquet"]
    assert pq.read_table(tmp_path / names[0]).num_rows == 0
