"""The row contract: the one place that defines what a dataset row is.

Everything that reads or writes rows (pipeline, writer, render, show, push, audit) imports the
schema from here. Column names and meanings are the public API (README "The row contract");
changing them needs a bump of ``SCHEMA_VERSION``.
"""

from __future__ import annotations

from typing import Any, Literal

import datasets
import pyarrow as pa

SCHEMA_VERSION = "2.0"  # 1.1: `detail` in config rejected; 1.2: PROMPT_FEATURES (rlbf_prompts),
# DeRTa kinds, config `preference` (PREFERENCE_FEATURES); 2.0: a source is its content (`source.dataset`
# a name or a digest, never a path; `source.revision` the file's digest), row ids and seeds from the
# row's position in it (not the id it carries)

RowKind = Literal["injected", "clean", "harmful_prefix", "refusal_token", "helpful"]
#: Every value of the ``kind`` column (DeRTa adds harmful_prefix, refusal_token and helpful).
ROW_KINDS: tuple[str, ...] = ("injected", "clean", "harmful_prefix", "refusal_token", "helpful")
SegmentKind = Literal["prefix", "steering", "violation", "control", "continuation"]

#: Segment kinds in the order they appear in the assistant stream.
SEGMENT_ORDER: tuple[str, ...] = ("prefix", "steering", "violation", "control", "continuation")

# Stable reason codes for the `rejected` config. Tests and downstream users match on these strings.
REASONS: dict[str, str] = {
    "missing_field": "the source row lacks a prompt or response field the mapping needs",
    "wrong_type": "a source field has the wrong type (e.g. a number where text is expected)",
    "empty_response": "the assistant answer is empty or whitespace",
    "no_assistant_turn": "the conversation has no assistant turn to modify",
    "too_few_sentences": "the answer has fewer sentences than the recipe requires",
    "invalid_text": "a text field is not valid Unicode (e.g. a lone surrogate escaped in JSON)",
    "answer_too_long": "the answer has more characters than limits.max_answer_chars",
    "turn_too_long": "a context turn has more characters than limits.max_turn_chars",
    "source_contains_control": "a source turn contains a control atom or a tokenizer special-token string",
    "generated_contains_control": "the generated text contains a control atom or a special-token string",
    "row_error": "handling this row failed unexpectedly; the detail names the stage and the error",
    "generator_error": "the generator failed after all retries",
    "generator_refused": "the generator refused to write the violation",
    "generator_unparseable": "the generator output could not be parsed into a violation",
    "empty_violation": "the generated violation is empty",
    "token_boundary": "a tokenizer merges tokens across the injection boundary; X would be wrong",
    "violation_not_flagged": "no required classifier flagged the violation as unsafe",
    "context_flagged": "a classifier flagged the original safe text (part1/part2) as unsafe",
    "source_refusal": "the source answer is itself a refusal",
    "source_unsafe": "a classifier rule called the whole source answer unsafe: the source is not used",
    "classifier_error": "a classifier call a rule needs failed for good, or its answer was unparseable",
    "category_mismatch": "the violation is flagged only under categories other than the requested one",
    "violation_too_short": "the inserted text has fewer tokens than filters.quality.violation_tokens.min",
    "violation_too_long": "the inserted text has more tokens than filters.quality.violation_tokens.max",
    "violation_copies_context": "the violation copies the original answer (word 3-gram overlap too high)",
    "duplicate_violation": "the violation equals (after normalising) one already kept in the dataset",
    "near_duplicate_violation": "the violation is a near-duplicate (MinHash Jaccard) of one already kept",
    "missing_companion": "a harmful prompt has no refusal (or safe answer) in the recipe's companion columns",
    "harmful_too_short": "the harmful answer has too few tokens (or no clean token boundary) to cut a prefix",
    "annotator_rejected": "annotators judged the kept row bad (`refilter --apply-audit`); detail says how",
}

# -- BSAFE (detect-and-repair, methods/bsafe.py): its row kind and reason codes ----------------
ROW_KINDS = (*ROW_KINDS, "repaired")
REASONS.update(
    {
        "no_violation_found": "BSAFE: the detector found no violating span in the unsafe answer",
        "continuation_flagged": "BSAFE: a classifier flagged the safe continuation as unsafe",
        "continuation_missing": "BSAFE offline: the bundled set has no safe continuation for this row",
    }
)

CONTEXT_FEATURE = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})

ROW_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "source": {
            "dataset": datasets.Value("string"),
            "split": datasets.Value("string"),
            "index": datasets.Value("int64"),
            "id": datasets.Value("string"),
            "revision": datasets.Value("string"),
        },
        "context": CONTEXT_FEATURE,
        "response": datasets.Value("string"),
        "kind": datasets.Value("string"),
        "injection": {
            "offset": datasets.Value("int32"),
            "relative_position": datasets.Value("float32"),
            "sentence_index": datasets.Value("int32"),
            "category": datasets.Value("string"),
            "steering": datasets.Value("string"),
            "violation": datasets.Value("string"),
        },
        "segments": datasets.List(
            {
                "kind": datasets.Value("string"),
                "text": datasets.Value("string"),
                "loss": datasets.Value("bool"),
            }
        ),
        "backtrack": datasets.List(
            {"tokenizer": datasets.Value("string"), "tokens": datasets.Value("int32")}
        ),
        "prompt": datasets.Value("string"),
        "completion": datasets.Value("string"),
        "scores": datasets.List(
            {
                "classifier": datasets.Value("string"),
                "target": datasets.Value("string"),
                "label": datasets.Value("string"),
                "score": datasets.Value("float32"),
                "categories": datasets.List(datasets.Value("string")),
            }
        ),
        "generator": {
            "backend": datasets.Value("string"),
            "model": datasets.Value("string"),
            "template": datasets.Value("string"),
            "seed": datasets.Value("int64"),
        },
    }
)

#: Config ``preference`` (Reset backtracking): TRL's standard preference format for DPOTrainer
#: (``prompt`` as rendered text, ``chosen``/``rejected`` continuations), plus the row it came from.
PREFERENCE_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "row_id": datasets.Value("string"),  # the default-config row the pair was derived from
        "kind": datasets.Value("string"),  # "unsafe" (after an unsafe prefix) or "safe" (safe prompt)
        "prompt": datasets.Value("string"),
        "chosen": datasets.Value("string"),
        "rejected": datasets.Value("string"),
    }
)

REJECTED_FEATURES = datasets.Features(
    {
        **ROW_FEATURES,
        "reasons": datasets.List(datasets.Value("string")),
        "detail": datasets.Value("string"),  # what went wrong, for people (never a secret)
    }
)

# Arrow schemas carry the `datasets` metadata, so parquet files load back with the exact Features.
ROW_ARROW_SCHEMA: pa.Schema = ROW_FEATURES.arrow_schema
REJECTED_ARROW_SCHEMA: pa.Schema = REJECTED_FEATURES.arrow_schema


def empty_row(**fields: Any) -> dict[str, Any]:
    """A row dict with every column present (lists empty, structs None), updated with ``fields``."""
    row: dict[str, Any] = {
        "id": "",
        "source": {"dataset": "", "split": "", "index": -1, "id": "", "revision": ""},
        "context": [],
        "response": "",
        "kind": "clean",
        "injection": None,
        "segments": [],
        "backtrack": [],
        "prompt": "",
        "completion": "",
        "scores": [],
        "generator": None,
    }
    row.update(fields)
    return row


def row_json_schema() -> dict[str, Any]:
    """JSON Schema of one row (config ``default``; ``rejected`` adds ``reasons``)."""

    def convert(feature: Any) -> dict[str, Any]:
        if isinstance(feature, datasets.Value):
            mapping = {
                "string": {"type": "string"},
                "bool": {"type": "boolean"},
                "float32": {"type": "number"},
                "int32": {"type": "integer"},
                "int64": {"type": "integer"},
            }
            return mapping[feature.dtype]
        if isinstance(feature, (datasets.List, datasets.Sequence)):
            return {"type": "array", "items": convert(feature.feature)}
        if isinstance(feature, dict):
            return {
                "type": ["object", "null"],
                "properties": {k: convert(v) for k, v in feature.items()},
                "required": list(feature),
                "additionalProperties": False,
            }
        raise TypeError(f"unsupported feature {feature!r}")

    body = convert(dict(ROW_FEATURES))
    body["type"] = "object"
    body["properties"]["reasons"] = {
        "type": "array",
        "items": {"type": "string", "enum": sorted(REASONS)},
        "description": "only in config `rejected`",
    }
    body["properties"]["detail"] = {"type": "string", "description": "only in config `rejected`"}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"bsafe-data row (schema {SCHEMA_VERSION})",
        **body,
    }


# -- prompt sets (method ``rlbf_prompts``): RL prompts, not SFT rows ------------------------------

#: Values of the ``attack`` column of a prompt set.
ATTACKS: tuple[str, ...] = ("none", "middle_fill", "suffix", "decoding")
#: Values of the ``expect`` column: what the policy should do with the prompt.
EXPECTS: tuple[str, ...] = ("backtrack", "answer", "refuse")

#: A prompt-set row: the shared core columns (``completion`` dropped: the policy writes it) with
#: ``prompt`` as TRL's conversational prompt (a list of messages, ending with the assistant prefill
#: when there is one), plus the attack metadata and the per-row sampling parameters.
PROMPT_FEATURES = datasets.Features(
    {
        **{k: v for k, v in ROW_FEATURES.items() if k not in ("prompt", "completion")},
        "prompt": CONTEXT_FEATURE,
        "prefill": datasets.Value("string"),  # the assistant prefill ('' when none)
        "suffix": datasets.Value("string"),  # text appended to the last user turn ('' when none)
        "attack": datasets.Value("string"),  # one of ATTACKS
        "category": datasets.Value("string"),  # '' for benign rows
        "expect": datasets.Value("string"),  # one of EXPECTS
        "sampling": {
            "temperature": datasets.Value("float32"),
            "top_p": datasets.Value("float32"),
            "top_k": datasets.Value("int32"),  # 0 = no top-k cut
        },
    }
)


def rejected_features(features: datasets.Features) -> datasets.Features:
    """The ``rejected`` config's features for a method's row features: plus ``reasons``, ``detail``."""
    return datasets.Features(
        {
            **features,
            "reasons": datasets.List(datasets.Value("string")),
            "detail": datasets.Value("string"),
        }
    )
