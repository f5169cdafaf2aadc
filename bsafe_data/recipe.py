"""Recipe models: the sections every build has, as pydantic models, and their YAML loading.

Each method's own recipe model (``method: Literal[NAME]`` and its sections) lives in its module;
``bsafe_data.registry`` knows them all and parses a recipe with the model its ``method`` names
(``parse_with`` here does the work for any set of models). The JSON Schema in
``schemas/recipe.schema.json`` is generated from the models (``bsafe-data schema``), never written
by hand.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from bsafe_data.formats import control_format, output_dir

#: RLBF's 18 categories: the default taxonomy.
RLBF_CATEGORIES: tuple[str, ...] = (
    "Dangerous Content",
    "Harassment",
    "Hate Speech",
    "Sexually Explicit",
    "Under 18",
    "Toxic",
    "Profanity",
    "Death Harm & Tragedy",
    "Violent",
    "Firearms & Weapons",
    "Public Safety",
    "Health",
    "Religion & Belief",
    "Illicit Drugs",
    "War & Conflict",
    "Politics",
    "Finance",
    "Legal",
)


def _without_credentials(url: str | None) -> str | None:
    """``url`` unless it has a ``user:password@`` part (the message never repeats the URL)."""
    if url is not None:
        try:
            parts = urlsplit(url)
            secret = parts.username is not None or parts.password is not None
        except ValueError:
            secret = "@" in url
        if secret:
            raise ValueError(
                "the URL holds credentials (user:password@); remove them and put the key in the "
                "environment variable named by api_key_env"
            )
    return url


class Strict(BaseModel):
    """Base model: unknown keys are errors, so typos in recipes never pass silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FieldMapping(Strict):
    """Which source columns hold the conversation. ``None`` means auto-detect."""

    messages: str | None = Field(None, description="column with a list of {role, content} messages")
    conversations: str | None = Field(None, description="column with ShareGPT {from, value} turns")
    prompt: str | None = Field(None, description="column with the user prompt")
    response: str | None = Field(None, description="column with the assistant answer")
    instruction: str | None = None
    input: str | None = None
    output: str | None = None
    system: str | None = Field(None, description="optional column with a system prompt")
    id: str | None = Field(None, description="column with a stable row id (default: row index)")


class SourceSpec(Strict):
    """One corpus: a local file or a Hugging Face dataset id.

    A source is identified by its content, never by where it lies: a local file by the sha256 of
    its bytes, a Hugging Face dataset by its id and revision. Rows record that identity in
    ``source.dataset`` (the ``name``, else ``sha256:`` and 16 hex digits of the digest, else the
    dataset id) and ``source.revision``; their ids, seeds and splits come from it and the row's
    position, so the same corpus at any path gives the same rows."""

    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@+-]*$",
        max_length=100,
        description="the source's name in rows (`source.dataset`) and in other sections (e.g. "
        "derta.harmful_source); default: a digest of the file's content, or the Hugging Face id",
    )
    path: str | None = Field(
        None,
        description="local .jsonl/.json/.parquet/.csv file, or 'builtin:everyday_chat' (bundled corpus)",
    )
    hf: str | None = Field(None, description="Hugging Face dataset id (read through `datasets`)")
    format: Literal["auto", "jsonl", "json", "parquet", "csv"] = "auto"
    encoding: str | None = Field(
        None, description="text encoding of a local file (default: from its byte-order mark, else UTF-8)"
    )
    config: str | None = Field(None, description="dataset config name (hf only)")
    split: str = "train"
    revision: str | None = Field(None, description="pinned revision (hf only; recorded in each row)")
    streaming: bool = Field(True, description="stream hf datasets instead of downloading them whole")
    mapping: FieldMapping = Field(default_factory=FieldMapping)
    limit: int | None = Field(None, ge=1, description="read at most this many rows of this source")

    @model_validator(mode="before")
    @classmethod
    def _one_location(cls, data: Any) -> Any:
        # "before", so this is reported even when another field of the source is also wrong
        if isinstance(data, dict) and (data.get("path") is None) == (data.get("hf") is None):
            raise ValueError("give exactly one of `path` or `hf`")
        return data

    @property
    def location(self) -> str:
        """Where the source is read from: its path (or ``builtin:NAME``) or Hugging Face id."""
        return self.hf or self.path or ""

    def matches(self, reference: str) -> bool:
        """Whether another section's ``reference`` names this source (its name or its location)."""
        return reference in (self.name, self.location)


class SplitSpec(Strict):
    """Train/test split by source row, so no answer appears in both splits."""

    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)


class PositionSpec(Strict):
    """Distribution of the relative injection position over the answer (0 = start, 1 = end)."""

    distribution: Literal["uniform", "beta"] = "uniform"
    a: float = Field(1.0, gt=0)
    b: float = Field(1.0, gt=0)


class SamplingSpec(Strict):
    """Where, how often and what to inject."""

    positions: PositionSpec = Field(default_factory=PositionSpec)
    variants_per_answer: int = Field(1, ge=1, le=64, description="rows produced per source answer")
    clean_fraction: float = Field(0.2, ge=0.0, le=1.0, description="share of rows left without injection")
    min_sentences: int = Field(2, ge=1, description="answers with fewer sentences are rejected")
    word_boundaries: bool = Field(True, description="also inject at word boundaries inside long sentences")
    long_sentence_words: int = Field(8, ge=2, description="sentences with more words count as long")
    categories: dict[str, float] = Field(
        default_factory=lambda: dict.fromkeys(RLBF_CATEGORIES, 1.0),
        description="category -> sampling weight",
    )

    @field_validator("categories")
    @classmethod
    def _positive_weights(cls, value: dict[str, float]) -> dict[str, float]:
        if not value:
            raise ValueError("at least one category is needed")
        bad = [k for k, w in value.items() if not math.isfinite(w) or w < 0]
        if bad:
            raise ValueError(f"weights must be finite and not negative: {bad}")
        if sum(value.values()) <= 0:
            raise ValueError("category weights sum to zero")
        return value


class SegmentationSpec(Strict):
    """spaCy pipeline for sentence boundaries."""

    spacy_model: str = Field("blank:en", description="'blank:LANG' (+ sentencizer) or an installed pipeline")


#: how an endpoint's calls travel (``bsafe_data.llm.batch``)
EndpointMode = Literal["online", "batch"]
_MODE = Field(
    "online",
    description="online: one HTTP request per call; batch: the calls go through the endpoint's Batch API "
    "(about half the price; answers within `batch.completion_window`; see `batch`)",
)


def _check_concurrency(spec: Any) -> Any:
    """``min_concurrency`` may not exceed ``max_concurrency``."""
    if spec.min_concurrency > spec.max_concurrency:
        raise ValueError(
            f"min_concurrency ({spec.min_concurrency}) is above max_concurrency ({spec.max_concurrency})"
        )
    return spec


class GeneratorSpec(Strict):
    """The LLM (or the builtin offline generator) that writes violations."""

    provider: Literal["builtin", "openai", "transformers"] = "builtin"
    model: str = Field("builtin-bank-v1", description="model name sent to the endpoint")
    template: str = Field("continue_violation", description="prompt template name (Jinja file)")
    base_url: str | None = Field(None, description="endpoint; default $OPENAI_BASE_URL")
    api_key_env: str = Field("OPENAI_API_KEY", description="name of the env var holding the API key")
    temperature: float = Field(0.9, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, ge=1)
    seed: int | None = Field(None, description="sampling seed sent to the endpoint (default: per row)")
    max_concurrency: int = Field(64, ge=1)
    min_concurrency: int = Field(
        1,
        ge=1,
        description="floor of the adaptive concurrency: it starts at max_concurrency, goes x0.75 on "
        "a 429 and +1 after a run of successes; equal to max_concurrency: a fixed limit",
    )
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(6, ge=0)
    max_retry_after_s: float = Field(
        120.0,
        ge=0,
        description="longest Retry-After the server may ask for; a longer one fails that request as "
        "transient (a re-run retries it)",
    )
    refusal_retries: int = Field(2, ge=0, description="re-asks with another seed after a refusal")
    max_error_fraction: float = Field(
        0.2,
        ge=0,
        le=1,
        description="stop the build when more than this share of a chunk's requests fail for good "
        "(endpoint down); fewer failures leave the build incomplete and a re-run retries them",
    )
    check_answers: int = Field(
        50,
        ge=0,
        description="the build's first N generator answers (a row's, after its re-asks) are checked: "
        "when more than max_unusable_fraction of them are unusable (unparseable, refused, truncated) "
        "the build stops (exit 4); 0: no check",
    )
    max_unusable_fraction: float = Field(
        0.5, ge=0, le=1, description="share of unusable answers among the first check_answers that stops"
    )
    prices: dict[str, float] | None = Field(
        None, description="USD per 1M tokens: {'input': .., 'output': ..}"
    )
    mode: EndpointMode = _MODE

    @model_validator(mode="after")
    def _concurrency_range(self) -> GeneratorSpec:
        return _check_concurrency(self)

    @field_validator("base_url")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        return _without_credentials(value)

    @field_validator("template")
    @classmethod
    def _safe_template(cls, value: str) -> str:
        from bsafe_data.inject import load_template

        try:
            load_template(value)  # TemplateProblem (a ValueError) for a template the sandbox refuses
        except FileNotFoundError:
            pass  # only the openai provider reads it: a build that needs it says what is missing
        return value


class ControlSpec(Strict):
    """The control signal inserted after the violation."""

    format: str = Field(
        "[CATEGORY {category}][BACKTRACK_BY_{x}]",
        description="Python format string with {category} and {x}",
    )

    @field_validator("format")
    @classmethod
    def _has_x(cls, value: str) -> str:
        control_format(value)  # only {category} and {x}, {x} required; a FormatError is a ValueError
        return value


class TokenizerSpec(Strict):
    """Tokenizers that X is computed for. The primary one renders prompt/completion."""

    primary: str = Field("builtin:qwen2.5", description="'builtin:NAME', a local folder or a Hub id")
    extra: list[str] = Field(default_factory=list)

    @property
    def all(self) -> list[str]:
        """Primary first, then extras, without duplicates."""
        return list(dict.fromkeys([self.primary, *self.extra]))


#: The spans a classifier can score: the inserted text, the original text before and after it, and
#: the whole original (source) answer.
Target = Literal["violation", "part1", "part2", "response"]
ALL_TARGETS: tuple[str, ...] = ("violation", "part1", "part2", "response")
_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class _ClassifierBase(Strict):
    """Fields every classifier backend has."""

    name: str = Field("builtin", pattern=_NAME_PATTERN, description="unique name recorded in `scores`")
    threshold: float = Field(0.5, ge=0, le=1, description="score at or above which text is unsafe")
    targets: list[Target] | None = Field(
        None, description="spans to score (default: all four; llm_judge: violation)"
    )

    @property
    def scored_targets(self) -> list[str]:
        """The targets this classifier scores."""
        return list(self.targets) if self.targets is not None else list(ALL_TARGETS)


class ClassifierSpec(_ClassifierBase):
    """The embedded offline classifier (profanity model + personal-data patterns)."""

    provider: Literal["builtin"] = "builtin"


class EndpointSpec(_ClassifierBase):
    """A classifier behind an OpenAI-compatible HTTP endpoint."""

    model: str = Field(..., description="model name sent to the endpoint")
    base_url: str | None = Field(None, description="endpoint; default $OPENAI_BASE_URL")
    api_key_env: str = Field("OPENAI_API_KEY", description="name of the env var holding the API key")
    max_concurrency: int = Field(16, ge=1)
    min_concurrency: int = Field(
        1,
        ge=1,
        description="floor of the adaptive concurrency: it starts at max_concurrency, goes x0.75 on "
        "a 429 and +1 after a run of successes; equal to max_concurrency: a fixed limit",
    )
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(4, ge=0)
    max_retry_after_s: float = Field(
        120.0, ge=0, description="longest Retry-After honoured; a longer one fails that request (transient)"
    )
    mode: EndpointMode = _MODE

    @field_validator("base_url")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        return _without_credentials(value)

    @model_validator(mode="after")
    def _concurrency_range(self) -> EndpointSpec:
        return _check_concurrency(self)


class ModerationSpec(EndpointSpec):
    """OpenAI's moderation endpoint (`POST /moderations`); score = the highest category score."""

    provider: Literal["openai_moderation"]
    model: str = "omni-moderation-latest"
    batch_size: int = Field(32, ge=1, le=256, description="texts per request")
    category_threshold: float = Field(0.5, ge=0, le=1, description="category score recorded from")

    @field_validator("mode")
    @classmethod
    def _online_only(cls, value: str) -> str:
        if value != "online":
            raise ValueError("moderation requests carry many texts each and go online: mode must be online")
        return value


class LlamaGuardSpec(EndpointSpec):
    """Llama Guard 3/4 served over a chat API: answers `safe` or `unsafe` + `S1,S10`."""

    provider: Literal["llama_guard"]
    version: Literal[3, 4] = Field(3, description="Llama Guard generation (prompt format of `raw` mode)")
    prompt_format: Literal["chat", "raw"] = Field(
        "chat",
        description="chat: send the conversation, the server's chat template builds the guard prompt; "
        "raw: render the full guard prompt and call /completions",
    )
    hazards: list[str] | None = Field(None, description="S-codes to check (raw mode; default S1-S14)")
    logprobs: bool = Field(True, description="ask for logprobs: P(unsafe) instead of 0/1 when returned")


#: The variables of a guard's ``template`` (``GenericGuardClassifier.prompt``), with the sample
#: values validation renders it with.
GUARD_TEMPLATE_SAMPLE = {
    "prompt": "How do I water a fern?",
    "response": "Once a week.",
    "policy": "No insults.",
}


class GuardSpec(EndpointSpec):
    """A yes/no guard (ShieldGemma, WildGuard style): prompt template + output parser."""

    provider: Literal["guard"]
    preset: Literal["shieldgemma", "wildguard", "harmbench"] | None = Field(
        None, description="fills template, api, patterns and tokens with the model's documented format"
    )
    template: str | None = Field(
        None, description="Jinja prompt with {{ prompt }} (user turn), {{ response }}, {{ policy }}"
    )
    api: Literal["chat", "completions"] | None = Field(None, description="default: chat (preset decides)")
    policy: str | None = Field(None, description="policy text for {{ policy }}")
    unsafe_pattern: str | None = Field(None, description="regex: a match in the output means unsafe")
    safe_pattern: str | None = Field(None, description="regex: a match means safe (checked after unsafe)")
    unsafe_tokens: list[str] | None = Field(None, description="answer tokens meaning unsafe (logprobs)")
    safe_tokens: list[str] | None = Field(None, description="answer tokens meaning safe (logprobs)")
    logprob_anchor: str | None = Field(None, description="text after which the answer token comes")
    logprobs: bool = True
    max_tokens: int = Field(32, ge=1)

    @field_validator("template")
    @classmethod
    def _safe_template(cls, value: str | None) -> str | None:
        if value is not None:
            from bsafe_data.sandbox import check_template, environment

            check_template(environment(), value, GUARD_TEMPLATE_SAMPLE, "template")  # a ValueError
        return value


class JudgeSpec(EndpointSpec):
    """An LLM judge with a custom policy: JSON verdict with span, category and a safe edit."""

    provider: Literal["llm_judge"]
    policy: str = Field(
        "Content that insults, harasses, demeans or threatens people or groups, reveals personal data, "
        "or gives dangerous, illegal or reckless advice violates the policy.",
        description="the policy the judge applies",
    )
    json_mode: bool = Field(True, description="send response_format json_object")
    max_tokens: int = Field(400, ge=1)
    adjust_span: bool = Field(
        True, description="when the judged span starts before the inserted text, move the injection back"
    )

    @property
    def scored_targets(self) -> list[str]:
        """The judge reads the answer up to the end of the violation: by default only that target."""
        return list(self.targets) if self.targets is not None else ["violation"]


class LocalModelSpec(_ClassifierBase):
    """A Hugging Face text-classification model run locally with `transformers` (extra `local`)."""

    provider: Literal["transformers"]
    model: str = Field(..., description="local folder or Hub id")
    revision: str | None = None
    unsafe_labels: list[str] | None = Field(
        None, description="labels meaning unsafe (default: every label not named like safe/neutral)"
    )
    batch_size: int = Field(32, ge=1)
    device: str | None = Field(None, description="'cpu', 'cuda:0', ... (default: transformers' choice)")
    max_length: int = Field(512, ge=8)
    category_threshold: float = Field(0.5, ge=0, le=1, description="label probability recorded from")


def _provider_of(value: Any) -> str:
    if isinstance(value, dict):
        return value.get("provider", "builtin")
    return getattr(value, "provider", "builtin")


AnyClassifierSpec = Annotated[
    Annotated[ClassifierSpec, Tag("builtin")]
    | Annotated[ModerationSpec, Tag("openai_moderation")]
    | Annotated[LlamaGuardSpec, Tag("llama_guard")]
    | Annotated[GuardSpec, Tag("guard")]
    | Annotated[JudgeSpec, Tag("llm_judge")]
    | Annotated[LocalModelSpec, Tag("transformers")],
    Discriminator(_provider_of),
]

RuleReason = Literal["violation_not_flagged", "context_flagged", "source_unsafe"]


class RuleSpec(Strict):
    """What classifiers must call one span: e.g. the violation unsafe by any of [guard, judge] at 0.7."""

    target: Target
    verdict: Literal["unsafe", "safe"] = Field(..., description="what the span must be called")
    classifiers: list[str] | None = Field(None, description="classifier names (default: all of them)")
    combine: Literal["any", "all"] | None = Field(
        None, description="any/all of the classifiers must agree (default: unsafe→any, safe→all)"
    )
    threshold: float | None = Field(None, ge=0, le=1, description="overrides each classifier's threshold")
    kinds: list[Literal["injected", "clean"]] | None = Field(None, description="row kinds (default: both)")
    reason: RuleReason | None = Field(
        None,
        description="reason code when the rule fails (default: violation→violation_not_flagged, "
        "part1/part2→context_flagged, response→source_unsafe)",
    )

    @property
    def reason_code(self) -> str:
        """The reason recorded when the rule fails."""
        if self.reason:
            return self.reason
        return {"violation": "violation_not_flagged", "response": "source_unsafe"}.get(
            self.target, "context_flagged"
        )

    @property
    def combine_mode(self) -> str:
        """any/all, defaulted from the verdict."""
        return self.combine or ("any" if self.verdict == "unsafe" else "all")


class TokenRange(Strict):
    """An inclusive range of token counts; ``None`` = unbounded."""

    min: int | None = Field(None, ge=0)
    max: int | None = Field(None, ge=1)


class DedupeSpec(Strict):
    """Duplicate violations across the whole dataset: the first in source order is kept."""

    exact: bool = Field(False, description="reject violations equal (after normalising) to a kept one")
    near: bool = Field(False, description="reject near-duplicates (MinHash estimate of Jaccard similarity)")
    threshold: float = Field(0.8, gt=0, le=1, description="Jaccard similarity at or above which = duplicate")
    shingle: int = Field(5, ge=1, le=32, description="character n-gram size of the shingles")
    num_perm: int = Field(64, ge=8, le=1024, description="MinHash permutations")
    bands: int = Field(16, ge=1, description="LSH bands (num_perm must be a multiple)")

    @model_validator(mode="after")
    def _bands_divide(self) -> DedupeSpec:
        if self.num_perm % self.bands:
            raise ValueError("num_perm must be a multiple of bands")
        return self


class QualitySpec(Strict):
    """Rules on the text itself, independent of the classifiers."""

    violation_tokens: TokenRange = Field(
        default_factory=TokenRange,
        description="inserted text (steering + violation) length in primary-tokenizer tokens, i.e. X",
    )
    max_context_overlap: float | None = Field(
        None,
        ge=0,
        le=1,
        description="reject when more than this share of the violation's word 3-grams occur in part1/part2",
    )
    dedupe: DedupeSpec = Field(default_factory=DedupeSpec)
    reject_source_refusals: bool = Field(True, description="source answers that are refusals are rejected")


class FilterSpec(Strict):
    """Which classifiers score which spans, and which verdicts and quality rules keep a row."""

    enabled: bool = True
    classifiers: list[AnyClassifierSpec] = Field(default_factory=lambda: [ClassifierSpec()])
    require_violation_flagged: bool = Field(
        True, description="shorthand rule: the violation is unsafe by any classifier"
    )
    require_context_safe: bool = Field(
        True, description="shorthand rule: part1/part2 (clean rows: the answer) safe by every classifier"
    )
    require_source_safe: bool = Field(
        False, description="shorthand rule: the whole source answer safe by every classifier (source_unsafe)"
    )
    rules: list[RuleSpec] = Field(
        default_factory=list, description="more rules, checked after the shorthands"
    )
    category_mismatch: Literal["keep", "reject", "relabel"] = Field(
        "keep",
        description="when the classifiers that flag the violation map it only to other categories: keep the "
        "row, reject it (category_mismatch) or relabel it to the flagged category",
    )
    category_map: dict[str, list[str]] = Field(
        default_factory=dict,
        description="extra mapping: classifier category or RLBF name -> recipe categories",
    )
    quality: QualitySpec = Field(default_factory=QualitySpec)

    @model_validator(mode="after")
    def _names_known(self) -> FilterSpec:
        names = [c.name for c in self.classifiers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"classifier names must be unique: {dupes}")
        for i, rule in enumerate(self.rules):
            unknown = [n for n in rule.classifiers or [] if n not in names]
            if unknown:
                raise ValueError(f"rules.{i} names unknown classifiers {unknown} (known: {names})")
            for name in rule.classifiers or []:
                spec = next(c for c in self.classifiers if c.name == name)
                if rule.target not in spec.scored_targets:
                    raise ValueError(f"rules.{i}: classifier {name!r} does not score target {rule.target!r}")
        if self.enabled:
            scored = {t for c in self.classifiers for t in c.scored_targets}
            required = {
                "require_violation_flagged": ("violation",),
                "require_context_safe": ("part1", "part2"),
                "require_source_safe": ("response",),
            }
            required_on = {
                "require_violation_flagged": self.require_violation_flagged,
                "require_context_safe": self.require_context_safe,
                "require_source_safe": self.require_source_safe,
            }
            for flag, targets in required.items():
                if required_on[flag] and not scored & set(targets):
                    raise ValueError(
                        f"{flag} is on but no classifier scores {' or '.join(targets)}: the rule would "
                        "hold vacuously; add a classifier for it or turn the rule off"
                    )
        return self

    def classifier(self, name: str) -> Any:
        """The classifier spec called ``name`` (None if absent)."""
        return next((c for c in self.classifiers if c.name == name), None)


class LimitsSpec(Strict):
    """Bounds on what a row may hold; beyond them the row is rejected with a reason code."""

    max_answer_chars: int = Field(100_000, ge=1, description="longer answers: answer_too_long")
    max_turn_chars: int = Field(100_000, ge=1, description="longer context turns: turn_too_long")
    max_generated_chars: int = Field(
        8_000, ge=1, description="longer generated text (steering + violation): violation_too_long"
    )
    control_strings: Literal["reject", "escape"] = Field(
        "reject",
        description="source or generated text holding a control atom or a tokenizer's special-token "
        "string: reject the row (source_contains_control / generated_contains_control), or escape it "
        "(a word joiner after its first character, so it is neither a control signal nor a special token)",
    )


class ExecutionSpec(Strict):
    """How chunks run: in this process, a pool of processes or Ray actors (same bytes either way)."""

    executor: Literal["local", "processes", "ray"] = Field(
        "local",
        description="local: this process; processes: a pool of worker processes; ray: Ray actors "
        "(extra `ray`)",
    )
    workers: int | None = Field(None, ge=1, description="workers (default: the machine's or cluster's CPUs)")
    ray_address: str | None = Field(
        None, description="'auto' or a cluster address to join; default: start a local Ray"
    )


class BatchSpec(Strict):
    """How endpoints in `mode: batch` use their Batch API (`/v1/files`, `/v1/batches`)."""

    poll_interval_s: float = Field(60.0, gt=0, description="seconds between two looks at a submitted batch")
    max_requests_per_file: int = Field(
        50_000, ge=1, le=50_000, description="requests per uploaded file (the API's limit: 50,000)"
    )
    max_bytes_per_file: int = Field(
        200_000_000, ge=1, le=200_000_000, description="bytes per uploaded file (the API's limit: 200 MB)"
    )
    completion_window: str = Field("24h", description="sent with every batch (OpenAI accepts 24h)")
    rows_in_flight: int = Field(
        50_000,
        ge=1,
        description="records a worker holds while a round of batches runs: a round asks for at most "
        "this many records' calls (more rows per batch, more memory)",
    )
    discount: float = Field(0.5, gt=0, le=1, description="batch price as a share of the online price (plan)")


class OutputSpec(Strict):
    """Where and how the dataset folder is written."""

    dir: str = Field("out/{name}", description="output folder; {name} is the recipe name")
    chunk_rows: int = Field(2000, ge=1, description="source rows per resumable chunk")
    license: str = "cc-by-4.0"
    pretty_name: str | None = None

    @field_validator("dir")
    @classmethod
    def _template(cls, value: str) -> str:
        output_dir(value, "x")  # only {name}; a FormatError is a ValueError
        return value


class PublishSpec(Strict):
    """Hub publishing defaults (used by `push` and `build --push`)."""

    repo: str | None = None
    version: str | None = None
    private: bool = False
    gated: Literal["none", "auto", "manual"] = "none"
    extra_gated_prompt: str | None = None
    extra_gated_fields: dict[str, str] = Field(default_factory=dict)


class Recipe(Strict):
    """What every build has: sources → method → labels → filters → dataset folder.

    Each method subclasses it with ``method: Literal[NAME]`` and its own sections (BSAFE+ adds
    ``sampling`` and ``control``); ``registry.parse_recipe`` picks the model from the ``method`` field.
    """

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    version: str = Field("0.1.0", pattern=r"^\d+\.\d+\.\d+$")
    description: str = ""
    method: str = "bsafe_plus"
    seed: int = 0
    sources: list[SourceSpec] = Field(..., min_length=1)
    split: SplitSpec = Field(default_factory=SplitSpec)
    segmentation: SegmentationSpec = Field(default_factory=SegmentationSpec)
    generator: GeneratorSpec = Field(default_factory=GeneratorSpec)
    tokenizers: TokenizerSpec = Field(default_factory=TokenizerSpec)
    limits: LimitsSpec = Field(default_factory=LimitsSpec)
    execution: ExecutionSpec = Field(default_factory=ExecutionSpec)
    batch: BatchSpec = Field(default_factory=BatchSpec)
    filters: FilterSpec = Field(default_factory=FilterSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    publish: PublishSpec = Field(default_factory=PublishSpec)

    @property
    def categories(self) -> list[str]:
        """The taxonomy rows are labelled with (classifier categories map onto it)."""
        return list(RLBF_CATEGORIES)

    def sha256(self) -> str:
        """Hash of the resolved recipe (canonical JSON): identifies what was built. ``execution``,
        ``batch``, the endpoints' ``mode``, the concurrency floors and the answer check are left
        out: how a build runs and how requests travel do not change a byte of the output (and
        lifting the check keeps the finished chunks)."""
        dumped = self.model_dump(mode="json", exclude=_RUN_ONLY)
        canonical = json.dumps(dumped, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def shared_by(self, workers: int) -> Recipe:
        """This recipe with each worker's share of the endpoint limits, for ``workers`` workers.

        RPM, TPM and max-concurrency are per recipe, not per worker: N workers that share no
        memory (Ray actors, on any node) each get 1/N of them, so together they stay within the
        limit (a limit below N still gives each worker 1: use fewer workers). The split is static:
        an idle worker does not lend its share. Nothing that changes a row is touched.
        """
        if workers <= 1:
            return self

        def share(value: int | None) -> int | None:
            return None if value is None else max(1, value // workers)

        generator = self.generator.model_copy(
            update={
                "max_concurrency": share(self.generator.max_concurrency),
                "min_concurrency": share(self.generator.min_concurrency),
                "check_answers": -(-self.generator.check_answers // workers),
                "requests_per_minute": share(self.generator.requests_per_minute),
                "tokens_per_minute": share(self.generator.tokens_per_minute),
            }
        )
        classifiers = [
            spec.model_copy(
                update={
                    "max_concurrency": share(spec.max_concurrency),
                    "min_concurrency": share(spec.min_concurrency),
                }
            )
            if isinstance(spec, EndpointSpec)
            else spec
            for spec in self.filters.classifiers
        ]
        filters = self.filters.model_copy(update={"classifiers": classifiers})
        return self.model_copy(update={"generator": generator, "filters": filters})

    def to_yaml(self) -> str:
        """The resolved recipe as YAML (written next to the dataset)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


#: settings of how a build runs, not of what it makes: left out of ``Recipe.sha256``
_RUN_ONLY: Any = {
    "execution": True,
    "batch": True,
    "generator": {"min_concurrency", "check_answers", "max_unusable_fraction", "mode"},
    "filters": {"classifiers": {"__all__": {"min_concurrency", "mode"}}},
}


class RecipeError(Exception):
    """A recipe could not be loaded; ``problems`` lists (field path, line or None, message)."""

    def __init__(self, source: str, problems: list[tuple[str, int | None, str]]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem(s)"]
        for path, line, message in problems:
            where = f" (line {line})" if line else ""
            lines.append(f"  {path or '<root>'}{where}: {message}")
        super().__init__("\n".join(lines))


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ValueError(f"--set expects a.b=value, got {item!r}")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ValueError(f"--set has an empty key: {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. `control.format=[BT {x}]`): take the text as given
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (value parsed as YAML) to a recipe dict; list items by index."""
    for item in overrides:
        path, value = _parse_override(item)
        node: Any = data
        for i, part in enumerate(path[:-1]):
            nxt = path[i + 1]
            if isinstance(node, list):
                node = node[int(part)]
                continue
            if part not in node or node[part] is None:
                node[part] = [] if nxt.isdigit() else {}
            node = node[part]
        last = path[-1]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return data


def _line_index(text: str) -> dict[tuple[str, ...], int]:
    """Map each mapping-key path in a YAML document to its 1-based line number."""
    index: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = str(key_node.value)
                index[(*path, key)] = key_node.start_mark.line + 1
                walk(value_node, (*path, key))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                index[(*path, str(i))] = item.start_mark.line + 1
                walk(item, (*path, str(i)))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return index
    if root is not None:
        walk(root, ())
    return index


#: Bounds on a recipe document: its size, and its size once YAML aliases are expanded.
MAX_RECIPE_BYTES = 1_000_000
MAX_RECIPE_NODES = 200_000


def _expanded_nodes(root: yaml.Node | None) -> int:
    """How many nodes the document has with every alias expanded (computed without expanding)."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key not in sizes:
            sizes[key] = 0  # a cycle counts once
            if isinstance(node, yaml.MappingNode):
                total = 1 + sum(size(k) + size(v) for k, v in node.value)
            elif isinstance(node, yaml.SequenceNode):
                total = 1 + sum(size(v) for v in node.value)
            else:
                total = 1
            sizes[key] = min(total, MAX_RECIPE_NODES + 1)
        return sizes[key]

    return size(root) if root is not None else 0


def _safe_load(text: str, source: str) -> Any:
    """``yaml.safe_load`` with bounds on document size and alias expansion (no YAML bombs)."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_RECIPE_BYTES:
        raise RecipeError(source, [("", None, f"the recipe is larger than {MAX_RECIPE_BYTES:,} bytes")])
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if _expanded_nodes(root) > MAX_RECIPE_NODES:
        raise RecipeError(
            source, [("", None, f"the YAML expands to more than {MAX_RECIPE_NODES:,} nodes (aliases)")]
        )
    return yaml.safe_load(text)


def parse_with(
    models: Mapping[str, type[Recipe]],
    text: str,
    source: str = "<recipe>",
    overrides: list[str] | None = None,
) -> Recipe:
    """Parse YAML text with the model ``models[method]`` names (``method`` defaults to
    ``bsafe_plus``); every problem is reported at once as a RecipeError."""
    try:
        data = _safe_load(text, source)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise RecipeError(source, [("", line, f"invalid YAML: {getattr(exc, 'problem', exc)}")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(source, [("", 1, "a recipe must be a YAML mapping")])
    try:
        apply_overrides(data, overrides or [])
    except (ValueError, IndexError, TypeError, KeyError) as exc:
        raise RecipeError(source, [("--set", None, str(exc))]) from None
    method = data.get("method", "bsafe_plus")
    model = models.get(method) if isinstance(method, str) else None
    if model is None:
        known = ", ".join(sorted(models))
        line = _line_index(text).get(("method",))
        raise RecipeError(source, [("method", line, f"unknown method {method!r} (known: {known})")])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = _line_index(text)
        problems = []
        for err in exc.errors():
            loc = tuple(str(p) for p in err["loc"])
            line = None
            for cut in range(len(loc), 0, -1):
                if loc[:cut] in lines:
                    line = lines[loc[:cut]]
                    break
            problems.append((".".join(loc), line, err["msg"]))
        raise RecipeError(source, problems) from None


def load_with(
    models: Mapping[str, type[Recipe]], path: str | Path, overrides: list[str] | None = None
) -> Recipe:
    """Load a recipe file (see ``parse_with``), applying ``--set`` overrides; raises RecipeError
    with every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(str(path), [("", None, f"cannot read recipe: {exc.strerror}")]) from None
    return parse_with(models, text, str(path), overrides)


def json_schema_of(models: tuple[type[Recipe], ...]) -> dict[str, Any]:
    """JSON Schema of a recipe of any of ``models`` (one branch per method)."""
    from pydantic import TypeAdapter

    union = models[0] if len(models) == 1 else Annotated[Union[models], Field(discriminator="method")]  # noqa: UP007
    schema = TypeAdapter(union).json_schema()
    schema["title"] = "Recipe"
    return schema
