"""Re-render a built dataset for another tokenizer: prompt, completion and X recomputed per row.

A dataset is built once with the recipe's primary tokenizer. Its rows keep the spans (response,
injection offset, inserted texts), so ``rerender(dataset, tokenizer)`` derives the training strings
of any other model: the chat template's head and end-of-turn ending (``label`` module docstring),
X counted with that tokenizer's tokens and the control signal rewritten with it. Rows the tokenizer
cannot render are dropped and counted by reason (``label.RENDER_REASONS``):

* ``token_boundary``: its tokens merge across the injection point, so no exact X exists;
* ``chat_template``: its chat template fails on the row's context (e.g. no system role);
* ``prompt_boundary``: a clean row whose prompt tokens are not a prefix of prompt+completion.

``rerender_folder(src, tokenizer, out)`` (``bsafe-data rerender DIR --tokenizer ID --out DIR2``)
writes a new dataset folder in the same Hub layout: ``data/`` re-rendered, ``rejected/`` the same
rows, a card, the recipe with the new primary tokenizer and a manifest with file hashes, so
``bsafe-data verify DIR2`` passes. No model is called. This module imports ``datasets`` only when
it runs.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import shutil
import sys
import types
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bsafe_data.label import (
    Rendered,
    RenderError,
    _natural_key,
    _render_rows,
    add_control_tokens,
    control_atoms,
    end_of_turn,
    segments_for,
)

#: Columns ``rerender`` reads; every dataset bsafe-data builds has them.
REQUIRED_COLUMNS = (
    "context",
    "response",
    "kind",
    "injection",
    "segments",
    "backtrack",
    "prompt",
    "completion",
)
_REASON = "_bsafe_rerender_reason"
_CONTROL = "_bsafe_rerender_control"


@dataclass(frozen=True)
class RerenderResult:
    """What ``rerender`` produced.

    ``dataset``: the kept rows (a ``Dataset``, or a ``DatasetDict`` for a ``DatasetDict`` input) with
    ``prompt``, ``completion``, ``segments`` and ``backtrack`` (this tokenizer's X first) rewritten.
    ``dropped``: rows left out, by reason; ``dropped_by_split`` the same per split of a DatasetDict.
    ``control_tokens``: every control atom the kept rows contain, to ``add_control_tokens`` before
    training. ``end_of_turn``: the token every completion ends with (``SFTConfig(eos_token=...)``).
    """

    dataset: Any
    tokenizer: str
    rows_in: int
    dropped: dict[str, int]
    control_tokens: list[str]
    end_of_turn: str | None
    dropped_by_split: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def rows_out(self) -> int:
        """Rows kept."""
        return self.rows_in - sum(self.dropped.values())


def _tokenizer_name(tokenizer: Any) -> str:
    from bsafe_data.tokenization import short_name

    ref = getattr(tokenizer, "name_or_path", "") or ""
    return short_name(ref) if ref else type(tokenizer).__name__


def _rerender_batch(
    batch: dict[str, list[Any]], tokenizer: Any, name: str, control_format: str | None
) -> dict[str, list[Any]]:
    """``Dataset.map(batched=True)`` body: new strings, segments and X, plus a drop reason per row."""
    keys = list(batch)
    rows = [dict(zip(keys, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    results = _render_rows(rows, tokenizer, control_format)
    reasons = [r.reason if isinstance(r, RenderError) else "" for r in results]
    # Clean rows: the border between the template head and the answer must be a token border.
    # (Injected completions start with a control atom, a special token once added: always a border.)
    clean = [i for i, r in enumerate(results) if isinstance(r, Rendered) and r.backtrack is None]
    if clean:
        prompts = tokenizer([results[i].prompt for i in clean])["input_ids"]
        fulls = tokenizer([results[i].prompt + results[i].completion for i in clean])["input_ids"]
        for i, prompt_ids, full_ids in zip(clean, prompts, fulls, strict=True):
            if full_ids[: len(prompt_ids)] != prompt_ids:
                reasons[i] = "prompt_boundary"
    out: dict[str, list[Any]] = {
        "prompt": [],
        "completion": [],
        "segments": [],
        "backtrack": [],
        _REASON: reasons,
        _CONTROL: [],
    }
    for row, result, reason in zip(rows, results, reasons, strict=True):
        if reason or not isinstance(result, Rendered):
            out["prompt"].append(row["prompt"])
            out["completion"].append(row["completion"])
            out["segments"].append(row["segments"])
            out["backtrack"].append(row["backtrack"])
            out[_CONTROL].append("")
            continue
        out["prompt"].append(result.prompt)
        out["completion"].append(result.completion)
        out[_CONTROL].append(result.control)
        if result.backtrack is None:
            out["segments"].append(row["segments"])
            out["backtrack"].append(row["backtrack"])
            continue
        inj = row["injection"]
        offset = inj["offset"]
        response = row["response"]
        out["segments"].append(
            segments_for(
                response[:offset], inj["steering"], inj["violation"], result.control, response[offset:]
            )
        )
        others = [b for b in row["backtrack"] or [] if b["tokenizer"] != name]
        out["backtrack"].append([{"tokenizer": name, "tokens": result.backtrack}, *others])
    return out


def _keep(reasons: list[str]) -> list[bool]:
    return [not r for r in reasons]


def _rerender_split(
    dataset: Any, tokenizer: Any, name: str, num_proc: int | None, control_format: str | None
) -> tuple[Any, Counter[str], set[str]]:
    import datasets

    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise ValueError(f"not a bsafe-data dataset: missing column(s) {missing}")
    features = dataset.features.copy()
    features[_REASON] = datasets.Value("string")
    features[_CONTROL] = datasets.Value("string")
    mapped = dataset.map(
        _rerender_batch,
        batched=True,
        batch_size=500,
        num_proc=num_proc,
        features=features,
        fn_kwargs={"tokenizer": tokenizer, "name": name, "control_format": control_format},
        desc=f"Re-rendering for {name}",
    )
    reasons = Counter(r for r in mapped[_REASON] if r)
    atoms = {a for control in set(mapped[_CONTROL]) if control for a in control_atoms(control)}
    kept = mapped.filter(_keep, input_columns=[_REASON], batched=True, num_proc=num_proc)
    return kept.remove_columns([_REASON, _CONTROL]), reasons, atoms


def rerender(
    dataset: Any,
    tokenizer: Any,
    num_proc: int | None = None,
    control_format: str | None = None,
    *,
    name: str | None = None,
) -> RerenderResult:
    """Re-render every row of ``dataset`` for ``tokenizer``; see the module docstring.

    ``dataset``: a ``datasets.Dataset`` or ``DatasetDict`` of bsafe-data rows (``load_dataset(DIR)``).
    ``tokenizer``: a tokenizer object (not modified) or a reference (``builtin:NAME``, folder, Hub
    id). ``num_proc``: worker processes for ``Dataset.map``/``filter``. ``control_format``: overrides
    the format inferred from each row. ``name``: the tokenizer name recorded in ``backtrack``
    (default: ``short_name`` of the reference or of ``tokenizer.name_or_path``). Raises
    ``ControlTokenError`` if a needed control atom cannot be a single token for this tokenizer,
    ``ValueError`` if the dataset lacks a bsafe-data column.
    """
    from bsafe_data.tokenization import load_tokenizer, short_name

    if isinstance(tokenizer, str):
        name, tokenizer = name or short_name(tokenizer), load_tokenizer(tokenizer)
    else:
        name = name or _tokenizer_name(tokenizer)
    import datasets

    splits = dict(dataset) if isinstance(dataset, datasets.DatasetDict) else None
    parts = splits if splits is not None else {"": dataset}
    kept: dict[str, Any] = {}
    by_split: dict[str, dict[str, int]] = {}
    total: Counter[str] = Counter()
    atoms: set[str] = set()
    rows_in = 0
    for split, part in parts.items():
        rows_in += part.num_rows
        kept[split], reasons, split_atoms = _rerender_split(part, tokenizer, name, num_proc, control_format)
        by_split[split] = dict(sorted(reasons.items()))
        total.update(reasons)
        atoms |= split_atoms
    needed = sorted(atoms, key=_natural_key)
    add_control_tokens(copy.deepcopy(tokenizer), needed)  # fail now, not at training time
    if splits is None:
        out, by_split = kept[""], {}
    else:
        out = datasets.DatasetDict(kept)
    return RerenderResult(
        dataset=out,
        tokenizer=name,
        rows_in=rows_in,
        dropped=dict(sorted(total.items())),
        control_tokens=needed,
        end_of_turn=end_of_turn(tokenizer),
        dropped_by_split=by_split,
    )


class RerenderFolderError(Exception):
    """The folder cannot be re-rendered (message says why and what to do)."""


@dataclass(frozen=True)
class RerenderFolderResult:
    """The new folder, its funnel, rows dropped by reason and the control atoms of the kept rows."""

    folder: Path
    funnel: dict[str, Any]
    dropped: dict[str, int]
    control_tokens: list[str]


def rerender_folder(
    folder: str | Path, tokenizer: str, out: str | Path, *, num_proc: int | None = None
) -> RerenderFolderResult:
    """Re-render the kept rows of the built ``folder`` for ``tokenizer`` (a reference:
    ``builtin:NAME``, folder or Hub id) into the new dataset folder ``out``; see the module
    docstring. Rows the tokenizer cannot render are left out and counted in the manifest's
    ``rerender`` entry (the rejected config is carried over unchanged). Raises ``FolderError``
    for a ``folder`` that does not verify and an ``out`` inside it (or holding it)."""
    import datasets
    import pyarrow as pa

    from bsafe_data.executor.local import write_chunk
    from bsafe_data.executor.output import OutputError, OutputFolder, os_error_message
    from bsafe_data.integrity import checked, require_outside
    from bsafe_data.recipe import RecipeError
    from bsafe_data.refilter import read_rows
    from bsafe_data.registry import load_recipe, method_class
    from bsafe_data.rows import ROW_ARROW_SCHEMA
    from bsafe_data.stages.stats import funnel_of
    from bsafe_data.writer import ChunkFolders, write_dataset_folder

    folder, out = Path(folder), Path(out)
    checked(folder)  # FolderError: the folder is not what its build wrote
    require_outside(folder, out, "--out", replaces=True)
    manifest = json.loads((folder / "manifest.json").read_text())
    try:
        old_refs = load_recipe(folder / "recipe.yaml").tokenizers.all  # as the builder named them
        overrides = [f"tokenizers.primary={json.dumps(tokenizer)}"]
        overrides.append(f"tokenizers.extra={json.dumps([r for r in old_refs if r != tokenizer])}")
        recipe = load_recipe(folder / "recipe.yaml", overrides)
    except RecipeError as exc:
        raise RerenderFolderError(str(exc)) from None
    rows = read_rows(folder)
    kept: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["_split"] != "rejected":
            kept.setdefault(row["_split"], []).append({k: v for k, v in row.items() if k != "_split"})
    parts = {
        split: datasets.Dataset(pa.Table.from_pylist(split_rows, schema=ROW_ARROW_SCHEMA))
        for split, split_rows in kept.items()
    }
    result = rerender(datasets.DatasetDict(parts), tokenizer, num_proc=num_proc)
    split_of: dict[str, str] = {}
    new_rows: list[dict[str, Any]] = []
    for split in kept:
        for row in result.dataset[split].to_list():
            split_of[row["id"]] = split
            new_rows.append(row)
    new_rows += [
        {k: v for k, v in row.items() if k != "_split"} for row in rows if row["_split"] == "rejected"
    ]
    method = method_class(recipe)
    chunk = method.chunk_from_rows(new_rows, split_of)
    chunk.stats.source_rows = int(manifest["funnel"].get("source_rows", chunk.stats.source_rows))
    chunk.stats.repaired = int(manifest["funnel"].get("repaired_boundaries", 0))
    funnel = funnel_of(chunk.stats)
    note = {
        "rerender": {
            "from_manifest_sha256": hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest(),
            "tokenizer": tokenizer,
            "dropped": result.dropped,
            "dropped_by_split": result.dropped_by_split,
            "model_requests": 0,
        }
    }
    target = OutputFolder(out, recipe.name)
    try:
        target.check()
        with target.locked():
            shutil.rmtree(target.work, ignore_errors=True)
            target.work.mkdir(parents=True)
            try:
                path = write_chunk(target.work, 0, chunk)
                staging = target.new_staging()
                write_dataset_folder(
                    staging,
                    ChunkFolders([path]),
                    recipe,
                    chunk.stats,
                    funnel,
                    usage=manifest.get("usage", {}),
                    client_usage=manifest.get("usage_by_client"),
                    timings=manifest.get("timings", {}),
                    manifest_extra=note,
                )
                target.write_marker(staging, recipe.sha256())
                target.commit()
            except OSError as exc:
                target.discard()
                raise RerenderFolderError(os_error_message(exc, f"writing {out}")) from None
            finally:
                target.finish()
    except OutputError as exc:
        raise RerenderFolderError(str(exc)) from None
    return RerenderFolderResult(out, funnel, result.dropped, result.control_tokens)


class _CallableModule(types.ModuleType):
    """``bsafe_data.rerender`` names both this module and its function: importing the submodule
    binds the package attribute to the module, so the module forwards calls to ``rerender``."""

    def __call__(self, *args: Any, **kwargs: Any) -> RerenderResult:
        return rerender(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
__signature__ = inspect.signature(rerender)
