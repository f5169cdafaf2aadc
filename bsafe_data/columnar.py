"""A dataset folder's rows as one Arrow table, and the column work done on it (refilter, rules).

``read_folder`` reads every shard (``data/`` and ``rejected/``) into one table in the rejected
config's columns, so a kept row and a rejected one differ only in ``reasons``. The helpers below
work on whole columns (pyarrow, polars) instead of row dicts: taking rows, the entries of a list
column as a frame, per-row signatures grouped, and writing a finished chunk from tables. Nothing
here knows a rule or a method; it only moves columns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bsafe_data.rows import rejected_features


@contextmanager
def bulk_memory() -> Iterator[None]:
    """Arrow allocates from jemalloc (else the system allocator) inside the block.

    A refilter decodes and re-encodes gigabytes in short-lived buffers. Arrow's default mimalloc
    hands freed memory back to the OS after 10 ms, so the next buffer page-faults it in again:
    reading a 1M-row folder took 18 s with it, 4 s with jemalloc (``benchmarks/refilter_throughput``).
    Buffers remember their pool, so switching back afterwards is safe."""
    previous = pa.default_memory_pool()
    try:
        pool = pa.jemalloc_memory_pool()
    except NotImplementedError:  # a pyarrow built without jemalloc
        pool = pa.system_memory_pool()
    pa.set_memory_pool(pool)
    try:
        yield
    finally:
        pa.set_memory_pool(previous)


#: String columns that repeat row after row (an answer's variants share its response and
#: prompt): ``read_folder`` keeps them dictionary-encoded, as parquet stores them, and the writer
#: decodes one piece at a time. Decoded up front they were 28% of a 1M-row folder in memory, and
#: touching fresh memory (kernel time) was most of a refilter's cost: median 16.3 -> 12.8 s, peak
#: RSS 5.0 -> 4.1 GB in fresh processes (``benchmarks/refilter_throughput``).
REPEATED_TEXT = ("response", "prompt")
_DICTIONARY_TEXT = pa.dictionary(pa.int32(), pa.string())


def read_folder(folder: Path, features: datasets.Features) -> tuple[pa.Table, np.ndarray]:
    """Every row of the folder (``data/`` then ``rejected/``, shards in name order) as one table
    in the rejected config's columns, and each row's config split (train/test/rejected).

    Kept rows get ``reasons`` null and ``detail`` "" (what a kept row rejected later is given).
    The ``REPEATED_TEXT`` columns are dictionary arrays (``Table.cast`` to the features' schema
    decodes them).
    """
    schema = rejected_features(features).arrow_schema.remove_metadata()
    repeated = [f.name for f in schema if f.name in REPEATED_TEXT and f.type == pa.string()]
    for name in repeated:
        schema = schema.set(schema.get_field_index(name), pa.field(name, _DICTIONARY_TEXT))
    tables, splits = [], []
    for sub, config in (("data", None), ("rejected", "rejected")):
        for path in sorted((folder / sub).glob("*.parquet")):
            table = pq.read_table(path, read_dictionary=repeated)
            n = table.num_rows
            columns = []
            for field in schema:
                if field.name in table.column_names:
                    columns.append(table.column(field.name).cast(field.type))
                elif field.name == "detail":
                    columns.append(pa.chunked_array([pa.array([""] * n, pa.string())]))
                else:
                    columns.append(pa.chunked_array([pa.nulls(n, field.type)]))
            tables.append(pa.Table.from_arrays(columns, schema=schema))
            splits.append(np.full(n, config or path.name.split("-", 1)[0], dtype="U8"))
    if not tables:
        return schema.empty_table(), np.empty(0, dtype="U8")
    return pa.concat_tables(tables), np.concatenate(splits)


def taken(column: pa.ChunkedArray | pa.Array, rows: np.ndarray) -> pa.Array:
    """``column`` at ``rows`` as one array (no copy when ``rows`` is every row in order)."""
    if isinstance(column, pa.ChunkedArray):
        if len(rows) == len(column) and (len(rows) == 0 or _is_range(rows, 0)):
            return column.combine_chunks()
        return column.take(pa.array(rows)).combine_chunks()
    if len(rows) == len(column) and (len(rows) == 0 or _is_range(rows, 0)):
        return column
    return column.take(pa.array(rows))


def _is_range(rows: np.ndarray, start: int) -> bool:
    return bool(rows[0] == start and rows[-1] == start + len(rows) - 1 and np.all(np.diff(rows) == 1))


def struct_field(array: pa.Array, name: str) -> pa.Array:
    """Field ``name`` of a struct array (null where the struct is null)."""
    values = pc.struct_field(array, name)
    if array.null_count:
        values = pc.if_else(array.is_valid(), values, pa.nulls(len(values), values.type))
    return values


def list_entries(array: pa.Array) -> pl.DataFrame:
    """The entries of a list-of-structs array as a frame: ``r`` (the row) and the struct's fields,
    in row order, then entry order."""
    parents = pc.list_parent_indices(array)
    flat = pc.list_flatten(array)
    columns = {"r": pl.from_arrow(parents).cast(pl.Int64)}
    for i, field in enumerate(flat.type):
        columns[field.name] = pl.from_arrow(flat.field(i))
    return pl.DataFrame(columns)


def join_lists(frame: pl.DataFrame, n: int, column: str = "categories") -> np.ndarray:
    """Per row (0..n-1): the ``column`` lists of its entries in ``frame`` as one string (None for
    a row without entries); equal strings mean equal lists of lists (JSON, which escapes the
    separator)."""
    out = np.full(n, None, dtype=object)
    if frame.height:
        encoded = pl.struct(pl.col(column)).struct.json_encode()
        joined = frame.group_by("r", maintain_order=True).agg(encoded.str.join("\x1e").alias(column))
        out[joined["r"].to_numpy()] = joined[column].to_numpy()
    return out


def unique_map(values: pa.Array | pa.ChunkedArray, fn: Callable[[Any], Any]) -> np.ndarray:
    """``fn`` of each value, called once per distinct value (answers repeat: one per variant)."""
    if pa.types.is_dictionary(values.type):
        return _dictionary_map(values, fn)
    distinct = pc.unique(values)
    results = np.array([fn(v) for v in distinct.to_pylist()] + [None], dtype=object)
    index = pc.index_in(values, value_set=distinct)
    index = index.combine_chunks() if isinstance(index, pa.ChunkedArray) else index
    return results[index.fill_null(len(distinct)).to_numpy()]


def _dictionary_map(values: pa.Array | pa.ChunkedArray, fn: Callable[[Any], Any]) -> np.ndarray:
    """``unique_map`` of a dictionary column without decoding it: the chunks' dictionaries unified
    into one (its values are the distinct values), each row's result taken by its index."""
    chunked = values if isinstance(values, pa.ChunkedArray) else pa.chunked_array([values])
    chunks = chunked.unify_dictionaries().chunks
    if not chunks:
        return np.empty(0, dtype=object)
    words = chunks[0].dictionary.to_pylist()
    results = np.array([fn(w) for w in words] + [fn(None) if chunked.null_count else None], dtype=object)
    return np.concatenate([results[c.indices.fill_null(len(words)).to_numpy()] for c in chunks])


def signature_groups(columns: Mapping[str, Any], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows with equal values in every column form a group: (each row's group, each group's first
    row), groups in order of their first row."""
    if not columns or n == 0:
        return np.zeros(n, dtype=np.int64), np.zeros(1 if n else 0, dtype=np.int64)
    frame = pl.DataFrame({f"c{i}": _series(v) for i, v in enumerate(columns.values())})
    grouped = (
        frame.with_row_index("_r")
        .group_by(frame.columns, maintain_order=True)
        .agg(pl.col("_r"))
        .select("_r")
        .with_row_index("_g")
        .explode("_r")
    )
    groups = np.empty(n, dtype=np.int64)
    groups[grouped["_r"].to_numpy()] = grouped["_g"].to_numpy()
    firsts = grouped.group_by("_g", maintain_order=True).agg(pl.col("_r").first())
    return groups, firsts["_r"].to_numpy().astype(np.int64)


def _series(values: Any) -> pl.Series:
    if isinstance(values, pl.Series):
        return values
    if isinstance(values, pa.Array | pa.ChunkedArray):
        return pl.from_arrow(values)
    if isinstance(values, np.ndarray) and values.dtype != object:
        return pl.Series(values)
    return pl.Series(list(values), strict=False)  # strings or booleans, with None


def replace_list_field(column: pa.ChunkedArray | pa.Array, name: str, values: pa.Array) -> pa.Array:
    """A list-of-structs column with struct field ``name`` replaced by ``values`` (one per entry,
    in ``list_flatten`` order); offsets and nulls unchanged."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    flat = pc.list_flatten(array)
    lengths = pc.list_value_length(array).fill_null(0)
    offsets = np.concatenate([[0], np.cumsum(lengths.to_numpy(), dtype=np.int64)]).astype(np.int32)
    fields = [values if f.name == name else flat.field(i) for i, f in enumerate(flat.type)]
    struct_mask = flat.is_null() if flat.null_count else None
    struct = pa.StructArray.from_arrays(fields, fields=list(flat.type), mask=struct_mask)
    mask = array.is_null() if array.null_count else None
    return pa.ListArray.from_arrays(pa.array(offsets), struct, type=array.type, mask=mask)


class Gatherer:
    """Rows of a table by index, batch by batch: ``Table.take`` on a table read from many shards
    first concatenates each whole column; here a few runs of consecutive rows are zero-copy
    slices (a refilter keeps most rows in place) and more are taken from their own batches."""

    #: more runs of consecutive rows than this: taken batch by batch, not sliced run by run. The
    #: parquet writer pays per array piece (levels, dictionary and statistics updates of every
    #: nested column): a 50k-row shard gathered as ~1,000 slices (2% of rows moved) encoded in
    #: 0.44 s, taken into whole batches (one copy) in 0.38 s, unmoved rows in 0.32 s
    MAX_PIECES = 16

    def __init__(self, table: pa.Table):
        self.schema = table.schema
        self.batches = table.to_batches()
        lengths = [b.num_rows for b in self.batches]
        self.starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])

    def __call__(self, rows: np.ndarray) -> pa.Table:
        """The rows ``rows`` (table row numbers), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return self.schema.empty_table()
        batch = np.searchsorted(self.starts, rows, side="right") - 1
        local = rows - self.starts[batch]
        cuts = np.flatnonzero((np.diff(batch) != 0) | (np.diff(local) != 1)) + 1
        if len(cuts) >= self.MAX_PIECES:
            return self._scattered(rows)
        edges = np.concatenate([[0], cuts, [len(rows)]]).tolist()
        pieces = [
            self.batches[int(batch[a])].slice(int(local[a]), b - a)
            for a, b in zip(edges[:-1], edges[1:], strict=True)
        ]
        return pa.Table.from_batches(pieces, schema=self.schema)

    def _scattered(self, rows: np.ndarray) -> pa.Table:
        """One take per batch touched (rows in table order), then one take into ``rows`` order."""
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        batch = np.searchsorted(self.starts, ordered, side="right") - 1
        edges = np.concatenate([[0], np.flatnonzero(np.diff(batch)) + 1, [len(rows)]]).tolist()
        pieces = [
            self.batches[int(batch[a])].take(pa.array(ordered[a:b] - self.starts[batch[a]]))
            for a, b in zip(edges[:-1], edges[1:], strict=True)
        ]
        table = pa.Table.from_batches(pieces, schema=self.schema)
        if np.all(order[1:] > order[:-1]):
            return table  # already in order
        inverse = np.empty(len(rows), dtype=np.int64)
        inverse[order] = np.arange(len(rows))
        return table.combine_chunks().take(pa.array(inverse))


def gather(table: pa.Table, rows: np.ndarray) -> pa.Table:
    """``table`` at ``rows`` (see ``Gatherer``; build one when gathering repeatedly)."""
    return Gatherer(table)(rows)


class PatchedColumn:
    """A column whose values some rows replace: a pool of arrays and each row's place in it, so
    replacing values never copies the column (``array`` builds it once at the end)."""

    def __init__(self, base: pa.Array | pa.ChunkedArray):
        base = base.combine_chunks() if isinstance(base, pa.ChunkedArray) else base
        self.type = base.type
        self.parts: list[pa.Array] = [base]
        self.size = len(base)
        self.index = np.arange(len(base), dtype=np.int64)

    def set(self, rows: np.ndarray, values: pa.Array | list[Any]) -> None:
        """Row ``rows[i]`` takes ``values[i]``."""
        values = values if isinstance(values, pa.Array) else pa.array(values, self.type)
        self.index[rows] = self.size + np.arange(len(rows), dtype=np.int64)
        self.parts.append(values.cast(self.type))
        self.size += len(values)

    def array(self) -> pa.Array:
        """The column with every replacement applied."""
        pool = pa.concat_arrays(self.parts) if len(self.parts) > 1 else self.parts[0]
        if len(self.parts) == 1:
            return pool
        return pool.take(pa.array(self.index))
